"""Prompt ids (ctrl_offline.maths.prompt_ids): one kind per array, lookups, and the error-message format."""

import numpy as np
import pandas as pd
import pytest

from ctrl_offline.maths.prompt_ids import (
    as_prompt_ids,
    hex_as_int,
    index_of,
    name_rows_and_prompts,
    name_some,
)


class _Refused(ValueError):
    pass


def test_messages_name_the_first_five():
    assert name_some(np.arange(3), "row") == "row 0, 1, 2"
    assert name_some(np.arange(8), "rows") == "rows 0, 1, 2, 3, 4 and 3 more"
    assert name_some(np.array(["p1", "p2"]), "prompt_id") == "prompt_id 'p1', 'p2'"  # not np.str_('p1')
    mask = np.array([False, True, True, False])
    assert name_rows_and_prompts(mask, ["a", "b", "b", "c"]) == "rows 1, 2 (prompt_id 'b')"  # a list works too


@pytest.mark.parametrize(
    "ids,message",
    [
        (np.array([1.0, 2.0]), "got float64 ids"),
        (np.array([1, "a"], dtype=object), "got a mix: int"),
        (np.array([None, "a"], dtype=object), r"1 row\(s\) have a missing prompt_id: row 0"),
        (np.array([[1, 2]]), "1-D"),
    ],
)
def test_ids_are_refused_with_the_callers_error(ids, message):
    with pytest.raises(_Refused, match=message):
        as_prompt_ids(ids, check_all=True, error=_Refused)


def test_one_kind_per_array():
    assert as_prompt_ids(np.array([1, 2], dtype=np.int32)).dtype == np.int64
    assert as_prompt_ids(np.array([2**63 + 1], dtype=object), check_all=True).dtype == np.uint64
    assert as_prompt_ids(np.array([1, 2], dtype=object), check_all=True).dtype == np.int64
    assert as_prompt_ids(["a", "b"]).dtype.kind == "U"


def test_hex_ids_read_back_as_their_integers():
    ints = np.array([0, 1, -1, 2**62, -(2**63)], dtype=np.int64)
    hexes = np.char.mod("%016x", ints.view(np.uint64)).astype(object)
    np.testing.assert_array_equal(hex_as_int(hexes), ints)
    assert hex_as_int(np.array(["p1"], dtype=object)) is None
    assert hex_as_int(np.array(["0123456789abcdeg"], dtype=object)) is None


@pytest.mark.parametrize("kind", ["int", "wide_int", "str"])
@pytest.mark.parametrize("with_index", [False, True])
def test_index_of_finds_each_query_or_gives_minus_one(kind, with_index):
    rng = np.random.default_rng(5)
    if kind == "int":
        table = rng.permutation(200).astype(np.int64) * 3
    elif kind == "wide_int":  # ids over the whole 64-bit range, some one bit apart: the packed sort drops bits
        base = rng.integers(-(2**63), 2**63 - 1, size=100, dtype=np.int64)
        table = np.unique(np.concatenate([base, base ^ 1]))
        table = rng.permutation(table)
    else:
        table = np.array([f"q{i}" for i in rng.permutation(200)], dtype=object)
    absent = table[:20] + (1 if kind == "int" else 2) if kind != "str" else np.array(["zz", "q-1"] * 10, dtype=object)
    if kind == "wide_int":
        absent = absent[~np.isin(absent, table)]
    queries = rng.permutation(np.concatenate([table[rng.integers(0, len(table), size=500)], absent]))
    got = index_of(table, queries, pd.Index(table) if with_index else None)
    position = {v: i for i, v in enumerate(table.tolist())}
    np.testing.assert_array_equal(got, [position.get(q, -1) for q in queries.tolist()])
