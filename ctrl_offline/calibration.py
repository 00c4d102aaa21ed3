"""Per-prompt calibration of rewards against reference samples (docs/theory.md §1).

The calibrated reward of a response y to prompt x is its win rate against the reference
policy on that prompt, estimated from the K stored reference rewards r_1..r_K (mid-rank
for ties):

    Ĉ(x, y) = (1/K) Σ_k ( 1[r(x,y) > r_k] + ½·1[r(x,y) = r_k] )

When y is one of the K reference samples it is left out (compared with the other K − 1).
A prompt's quantile table is the sorted array of its K reference rewards.

Prompt ids are integers (what the ``sample`` stage writes: a 64-bit hash of the prompt) or
strings (any ids a user brings); one array holds one kind. Everything is vectorised over all
prompts at once, so millions of prompts need no Python loop. Rows are grouped by prompt and
sorted by reward with two value sorts of packed 64-bit keys (``np.sort``, several times faster
than ``np.argsort``): integer ids go in the keys as they are, string ids are hashed to integer
codes first (pandas). Run-length arithmetic then gives every count. Applying tables to new
rewards needs no sort: each reward is bisected into its prompt's already sorted table, all rows
in the same few passes.

>>> import numpy as np
>>> tables, u = calibrate_reference(np.array([7, 7, 7]), np.array([1.0, 1.0, 2.0]))
>>> u.tolist()          # each sample against the other two, ties count one half
[0.25, 0.25, 1.0]
>>> calibrate(tables, np.array([7]), np.array([1.5])).tolist()
[0.6666666666666666]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

__all__ = ["CalibrationError", "CalibrationTables", "build_tables", "calibrate", "calibrate_reference",
           "int_prompt_ids", "rank_counts"]

_SHOW = 5  # offending ids named in an error message


class CalibrationError(ValueError):
    """Bad input to calibration; the message names the offending prompts or rows."""


def _plain(value):
    """numpy scalars as Python values, so messages read 'p1' and 3 rather than np.str_('p1')."""
    return value.item() if isinstance(value, np.generic) else value


def _name_some(values, what: str) -> str:
    values = list(values)
    shown = ", ".join(repr(_plain(v)) for v in values[:_SHOW])
    more = f" and {len(values) - _SHOW} more" if len(values) > _SHOW else ""
    return f"{what} {shown}{more}".strip()


# --- prompt ids --------------------------------------------------------------------------------

_SIGN = np.uint64(1 << 63)


def _prompt_ids(prompt_ids, *, check_all: bool = False) -> np.ndarray:
    """``prompt_ids`` as a 1-D array of one kind: integers (int64, or uint64 when they need it) or
    strings. Raises naming the rows that are missing, and on mixed, float or other ids.

    An object array that starts with a string is taken for strings without a pass over every row
    (that pass costs as much as hashing them): the hashing that follows checks its unique values
    with :func:`_check_factorized`. ``check_all`` checks every row here instead.
    """
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1:
        raise CalibrationError(f"prompt ids must be a 1-D array, got shape {ids.shape}")
    kind = ids.dtype.kind
    if kind in "iu":
        return ids if ids.dtype in (np.int64, np.uint64) else ids.astype(np.int64)
    if kind in "US":
        return ids
    if kind != "O":
        hint = (" (integer ids with missing values read as floats: fill or drop them first)" if kind == "f" else "")
        raise CalibrationError(f"prompt ids must be integers or strings, got {ids.dtype} ids{hint}")
    if len(ids) == 0 or (not check_all and isinstance(ids[0], (str, bytes))):
        return ids
    inferred = pd.api.types.infer_dtype(ids, skipna=False)
    if inferred in ("string", "bytes"):
        return ids
    missing = pd.isna(ids)
    if missing.any():
        rows = np.flatnonzero(missing)
        raise CalibrationError(f"{len(rows)} row(s) have a missing prompt_id: " + _name_some(rows, "row"))
    if inferred == "integer":
        try:
            return ids.astype(np.int64)
        except OverflowError:
            try:
                return ids.astype(np.uint64)
            except OverflowError:
                raise CalibrationError("integer prompt ids must fit in 64 bits") from None
    first_row: dict[str, int] = {}
    for row, value in enumerate(ids):
        first_row.setdefault(type(value).__name__, row)
    shown = ", ".join(f"{name} (e.g. row {row}: {_plain(ids[row])!r})" for name, row in list(first_row.items())[:4])
    raise CalibrationError(f"prompt ids must be all integers or all strings, got a mix: {shown}")


def _check_factorized(ids: np.ndarray, codes: np.ndarray, uniques: np.ndarray) -> None:
    """After hashing string ids: no missing ones (code −1) and only strings among the unique values."""
    if ids.dtype.kind == "O" and ((codes < 0).any() or pd.api.types.infer_dtype(uniques, skipna=False) not in
                                  ("string", "bytes", "empty")):
        _prompt_ids(ids, check_all=True)  # raises, naming the rows


def _is_int(ids: np.ndarray) -> bool:
    return ids.dtype.kind in "iu"


def _order_key(ids: np.ndarray) -> np.ndarray:
    """Integer ids as uint64 keys in the same order (int64: the sign bit flipped)."""
    return ids.view(np.uint64) ^ _SIGN if ids.dtype == np.int64 else ids.astype(np.uint64, copy=False)


def _float_key(values: np.ndarray) -> np.ndarray:
    """Finite floats as uint64 keys in the same order, equal floats (0.0 and −0.0 too) on equal keys."""
    bits = (values + 0.0).view(np.int64)  # + 0.0 turns −0.0 into 0.0
    flip = bits >> 63  # 0 for positive floats, all ones for negative ones
    flip |= np.int64(-(2**63))
    flip ^= bits  # positive: the sign bit set; negative: every bit inverted
    return flip.view(np.uint64)


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _hex_as_int(ids: np.ndarray) -> np.ndarray | None:
    """16-hex-digit string ids as int64 (the same 64 bits), or None when any id is not one."""
    if len(ids) == 0:
        return np.empty(0, np.int64)
    try:
        text = ids.astype("U")
    except (TypeError, ValueError):
        return None
    if text.dtype.itemsize != 16 * 4 or np.any(np.char.str_len(text) != 16):
        return None
    try:
        digits = _HEX[text.astype("S16").view(np.uint8).reshape(-1, 16)]
    except UnicodeEncodeError:
        return None
    if np.any(digits == 255):
        return None
    value = np.zeros(len(ids), np.uint64)
    for column in range(16):
        value = (value << np.uint64(4)) | digits[:, column]
    return value.view(np.int64)


def int_prompt_ids(prompt_ids) -> np.ndarray:
    """Prompt ids as the integers the ``sample`` stage writes (int64).

    Integer ids come back as they are. Strings of 16 hex digits, the ids ``sample`` wrote before
    it wrote integers (the same first 64 bits of the prompt's SHA-256), become those integers, so
    data from both versions can be matched. Anything else raises :class:`CalibrationError`.
    """
    ids = _prompt_ids(prompt_ids)
    if _is_int(ids):
        return ids
    converted = _hex_as_int(ids)
    if converted is None:
        raise CalibrationError("prompt ids are neither integers nor 16-hex-digit hashes: "
                               + _name_some(ids[:_SHOW], "prompt_id"))
    return converted


def _packed_sort(primary: np.ndarray, secondary: np.ndarray, bits: int):
    """One ``np.sort`` of uint64 keys holding ``(primary − min) >> shift`` high and ``secondary``
    (distinct integers below ``2**bits``) low: several times faster than ``np.argsort``.

    Returns (secondary in key order, the high parts in key order, shift). With ``shift == 0`` that
    is the exact order by (primary, secondary); otherwise primaries that differ only in the dropped
    bits may sit out of order inside one block of equal high parts, for :func:`_resort_blocks`.
    """
    low = primary.min()
    shift = max(0, int(primary.max() - low).bit_length() - (64 - bits))
    keys = primary - low
    keys >>= np.uint64(shift)
    keys <<= np.uint64(bits)
    keys |= secondary
    keys.sort()
    return keys & np.uint64((1 << bits) - 1), keys >> np.uint64(bits), shift


def _resort_blocks(block_start: np.ndarray, wrong: np.ndarray, sort_keys: tuple, arrays: tuple) -> None:
    """Re-sort, in place, the blocks that hold a neighbour pair out of order.

    ``block_start`` marks the first position of each block, ``wrong[i]`` that positions i and
    i + 1 are out of order; inside those blocks the positions are put in ``np.lexsort`` order of
    ``sort_keys`` (last key primary) and every array in ``arrays`` is permuted alike.
    """
    block = np.cumsum(block_start)
    redo = np.flatnonzero(np.isin(block, block[1:][wrong]))
    within = np.lexsort(tuple(key[redo] for key in sort_keys) + (block[redo],))
    for array in arrays:
        array[redo] = array[redo][within]


def _sort_by_prompt_and_reward(keys: np.ndarray, rewards: np.ndarray):
    """Rows ordered by (prompt key, reward), with the keys and rewards in that order.

    ``keys``: one uint64 per row, equal for the rows of one prompt. Two packed value sorts:
    rewards (row in the low bits), then (key, reward rank). Either sort may drop low bits of its
    primary; the few blocks that leaves out of order are found and re-sorted exactly.
    """
    n = len(rewards)
    bits = max(1, (n - 1).bit_length())
    if 2 * bits > 64:  # more than 2**32 rows: keys and ranks do not fit one word together
        rows = np.lexsort((rewards, keys))
        return rows, keys[rows], rewards[rows]
    by_reward, _, _ = _packed_sort(_float_key(rewards), np.arange(n, dtype=np.uint64), bits)
    rank = np.empty(n, np.uint64)
    rank[by_reward] = np.arange(n, dtype=np.uint64)
    rank_sorted, high, shift = _packed_sort(keys, rank, bits)
    del rank
    rows = by_reward[rank_sorted]
    if shift == 0:
        keys_sorted = high + keys.min()
    else:
        keys_sorted = keys[rows]
        same_high = high[1:] == high[:-1]
        clash = same_high & (keys_sorted[1:] != keys_sorted[:-1])
        if clash.any():
            block_start = np.concatenate([[True], ~same_high])
            _resort_blocks(block_start, clash, (rank_sorted, keys_sorted), (rows, keys_sorted))
    rewards_sorted = rewards[rows]
    # Rewards that differ only in the bits the first sort dropped may be out of order in a prompt.
    new_prompt = np.ones(n, dtype=bool)
    new_prompt[1:] = keys_sorted[1:] != keys_sorted[:-1]
    wrong = (rewards_sorted[1:] < rewards_sorted[:-1]) & ~new_prompt[1:]
    if wrong.any():
        _resort_blocks(new_prompt, wrong, (rewards_sorted,), (rows, rewards_sorted))
    return rows, keys_sorted, rewards_sorted


@dataclass(frozen=True)
class CalibrationTables:
    """Sorted reference rewards of every prompt, stored flat (CSR layout).

    ``prompt_ids[i]``'s table is ``rewards[offsets[i]:offsets[i + 1]]``, sorted ascending.
    """

    prompt_ids: np.ndarray
    offsets: np.ndarray
    rewards: np.ndarray

    @property
    def k(self) -> np.ndarray:
        """Number of reference samples per prompt."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @cached_property
    def _index(self) -> pd.Index:
        return pd.Index(self.prompt_ids)

    @cached_property
    def _hex_ids(self) -> np.ndarray | None:
        """String table ids as integers when all are 16-hex-digit hashes (see :func:`int_prompt_ids`)."""
        return None if _is_int(self.prompt_ids) else _hex_as_int(self.prompt_ids)

    def table(self, prompt_id) -> np.ndarray:
        """The sorted reference rewards of one prompt."""
        (code,) = self.codes_of([prompt_id])
        return self.rewards[self.offsets[code] : self.offsets[code + 1]]

    def codes_of(self, prompt_ids) -> np.ndarray:
        """Row index of each id in these tables; raises naming the ids that have no table.

        Integer ids match integer tables and string ids string tables (7 is not "7"). Across the
        two kinds only the hashes match: 16-hex-digit strings, the ids ``sample`` wrote before it
        wrote integers, find the integer ids with the same 64 bits and the other way round.
        """
        queries = _prompt_ids(prompt_ids)
        table_ids, note = self.prompt_ids, ""
        if len(queries) and len(table_ids) and _is_int(queries) != _is_int(table_ids):
            queries = _prompt_ids(queries, check_all=True)
            converted = self._hex_ids if _is_int(queries) else _hex_as_int(queries)
            if converted is None:
                kinds = ("integers", "strings") if _is_int(queries) else ("strings", "integers")
                note = f" (these prompt ids are {kinds[0]}, the tables' are {kinds[1]})"
                codes = np.full(len(queries), -1)
            elif _is_int(queries):
                codes = _lookup(converted, queries, None)
            else:
                codes = _lookup(table_ids, converted, self._index)
        else:
            codes = _lookup(table_ids, queries, self._index)
        missing = codes < 0
        if missing.any():
            absent = pd.unique(queries[missing])
            raise CalibrationError(
                f"{len(absent)} prompt(s) have no calibration table: " + _name_some(absent, "prompt_id") + note
            )
        return codes

    @classmethod
    def from_lists(cls, prompt_ids, tables) -> CalibrationTables:
        """Build from one reward list per prompt (e.g. a small ``ref_rewards`` column)."""
        lengths = np.fromiter((len(t) for t in tables), dtype=np.int64, count=len(tables))
        flat = np.concatenate([np.asarray(t, dtype=float) for t in tables]) if len(tables) else np.empty(0)
        return cls.from_flat(prompt_ids, np.concatenate([[0], np.cumsum(lengths)]), flat)

    @classmethod
    def from_flat(cls, prompt_ids, offsets, rewards) -> CalibrationTables:
        """Build from CSR arrays (validated; each table's rewards sorted if they are not)."""
        prompt_ids = _prompt_ids(prompt_ids, check_all=True)  # one per table: cheap
        offsets = np.asarray(offsets, dtype=np.int64)
        rewards = np.asarray(rewards, dtype=float)
        k = np.diff(offsets)
        if len(offsets) != len(prompt_ids) + 1 or offsets[0] != 0 or offsets[-1] != len(rewards):
            raise CalibrationError("offsets must start at 0, end at len(rewards) and have one entry per prompt + 1")
        if np.any(k < 1):
            raise CalibrationError("empty calibration table for " + _name_some(prompt_ids[k < 1], "prompt_id"))
        codes = np.repeat(np.arange(len(prompt_ids)), k)
        _check_finite(prompt_ids[codes], rewards)
        if _is_int(prompt_ids):
            ordered = np.sort(prompt_ids)
            dup = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        else:
            index = pd.Index(prompt_ids)
            dup = [] if index.is_unique else pd.unique(prompt_ids[index.duplicated()])
        if len(dup):
            raise CalibrationError("duplicate calibration tables for " + _name_some(dup, "prompt_id"))
        if not _sorted_within(offsets, rewards):  # tables read back from disk already are
            _, _, rewards = _sort_by_prompt_and_reward(codes.astype(np.uint64), rewards)
        return cls(prompt_ids, offsets, rewards)


def _lookup(table_ids: np.ndarray, queries: np.ndarray, index: pd.Index | None) -> np.ndarray:
    """Position of each query in ``table_ids`` (unique ids of the queries' kind), −1 where absent."""
    if len(queries) < len(table_ids) and index is not None:
        return index.get_indexer(_prompt_ids(queries, check_all=True))
    if _is_int(table_ids) and table_ids.dtype == queries.dtype and len(table_ids) + len(queries) < 2**32:
        # Bulk integer lookups without hashing: sort tables and queries together (one value sort),
        # each run of equal ids starts with its table's entry when there is one.
        p, total = len(table_ids), len(table_ids) + len(queries)
        keys = _order_key(np.concatenate([table_ids, queries]))
        order, high, shift = _packed_sort(keys, np.arange(total, dtype=np.uint64), max(1, (total - 1).bit_length()))
        if shift == 0:
            ids_sorted = high
        else:
            ids_sorted = keys[order]
            same_high = high[1:] == high[:-1]
            clash = same_high & (ids_sorted[1:] != ids_sorted[:-1])
            if clash.any():
                _resort_blocks(np.concatenate([[True], ~same_high]), clash, (order, ids_sorted), (order, ids_sorted))
        run_start = np.ones(total, dtype=bool)
        run_start[1:] = ids_sorted[1:] != ids_sorted[:-1]
        head = order[np.maximum.accumulate(np.where(run_start, np.arange(total), 0))].astype(np.int64)
        is_query = order >= p
        codes = np.empty(len(queries), dtype=np.int64)
        codes[(order[is_query] - p).astype(np.int64)] = np.where(head < p, head, -1)[is_query]
        return codes
    if _is_int(table_ids) and _is_int(queries) and index is not None:  # int64 against uint64 ids
        return index.get_indexer(queries)
    # Bulk string lookups: hashing tables and queries together in one factorize is ~2x faster than
    # Index.get_indexer (4.7 s vs 9.8 s for 10M string ids against 1M tables). The table ids are
    # unique, so they take codes 0..n-1 in order and any larger code is an unknown id.
    both = (np.concatenate([table_ids.astype(object), queries.astype(object)])
            if table_ids.dtype != queries.dtype else np.concatenate([table_ids, queries]))
    codes, uniques = pd.factorize(both)
    codes = codes[len(table_ids) :]
    _check_factorized(queries, codes, uniques)
    codes[codes >= len(table_ids)] = -1
    return codes


def _sorted_within(offsets: np.ndarray, rewards: np.ndarray) -> bool:
    """Whether every CSR segment of ``rewards`` is ascending (one O(n) pass, no sort)."""
    descending = np.diff(rewards) < 0
    descending[offsets[1:-1] - 1] = False  # a step from one table into the next does not count
    return not descending.any()


def _check_finite(prompt_ids: np.ndarray, rewards: np.ndarray) -> None:
    bad = ~np.isfinite(rewards)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise CalibrationError(
            f"{len(rows)} reward(s) are NaN or infinite: "
            + _name_some(rows, "row")
            + "; "
            + _name_some(np.unique(np.asarray(prompt_ids)[rows]), "prompt_id")
        )


def _check_inputs(prompt_ids, rewards, sample_idx=None):
    prompt_ids = _prompt_ids(prompt_ids)
    rewards = np.asarray(rewards, dtype=float)
    if prompt_ids.shape != rewards.shape or rewards.ndim != 1:
        raise CalibrationError(
            f"prompt ids and rewards must be 1-D arrays of one length, got {prompt_ids.shape} and {rewards.shape}"
        )
    if sample_idx is not None and np.shape(sample_idx) != rewards.shape:
        raise CalibrationError(f"sample_idx must have the rewards' shape {rewards.shape}, got {np.shape(sample_idx)}")
    _check_finite(prompt_ids, rewards)
    return prompt_ids, rewards


def _check_unique_samples(new_prompt: np.ndarray, uniques: np.ndarray, sample_idx) -> None:
    """Refuse a repeated (prompt, sample_idx); rows grouped by prompt (``new_prompt`` marks each first row)."""
    sample_idx = np.asarray(sample_idx)
    if not np.issubdtype(sample_idx.dtype, np.integer) or (sample_idx.size and sample_idx.min() < 0):
        raise CalibrationError("sample_idx must hold non-negative integers")
    if sample_idx.size == 0:
        return
    width = int(sample_idx.max()) + 1
    prompts = int(np.count_nonzero(new_prompt))
    key = np.cumsum(new_prompt, dtype=np.uint32 if prompts * width <= 2**32 else np.int64)  # 32 bits sort faster
    key -= 1
    key *= width
    key += sample_idx.astype(key.dtype)
    key.sort()
    dup = key[1:][key[1:] == key[:-1]]
    if dup.size:
        pairs = sorted({(_plain(uniques[int(k) // width]), int(k) % width) for k in dup[: 10 * _SHOW]})
        raise CalibrationError(
            f"{dup.size} duplicate (prompt_id, sample_idx) pair(s): " + _name_some(pairs, "")
        )


def _search_sorted_segments(values, start, end, targets, *, side: str) -> np.ndarray:
    """``np.searchsorted`` of each target in its own sorted segment ``values[start:end]``.

    One vectorised bisection over all targets at once, deciding the position bit by bit from
    the largest power of two down: ceil(log2(K + 1)) passes for tables of at most K entries,
    so applying tables costs O(n log K) and never sorts the n new rows.
    """
    pos = start.copy()
    longest = int((end - start).max()) if len(start) else 0
    step = 1 << (longest.bit_length() - 1) if longest else 0
    while step:
        candidate = pos + step
        inside = candidate <= end
        # A candidate past the end probes a real entry (any will do): it is dropped below.
        probe = values[np.minimum(candidate, len(values)) - 1]
        inside &= (probe < targets) if side == "left" else (probe <= targets)
        pos = np.where(inside, candidate, pos)
        step >>= 1
    return pos


def _build(prompt_ids, rewards, sample_idx, min_k):
    """Tables, and the rows' order in them: (row of each sorted position, first position of each prompt)."""
    if min_k < 2:
        raise CalibrationError(f"min_k must be at least 2 (leave-one-out needs a second sample), got {min_k}")
    prompt_ids, rewards = _check_inputs(prompt_ids, rewards, sample_idx)
    n = len(rewards)
    if _is_int(prompt_ids):  # the ids themselves are the sort keys: no hashing
        keys = _order_key(prompt_ids)
    else:  # strings: integer codes in order of first appearance, by hashing
        codes, uniques = pd.factorize(prompt_ids)
        _check_factorized(prompt_ids, codes, uniques)
        keys = codes.astype(np.uint64)
    if n:
        rows, keys_sorted, rewards_sorted = _sort_by_prompt_and_reward(keys, rewards)
    else:
        rows, keys_sorted, rewards_sorted = np.empty(0, np.int64), keys, rewards
    new_prompt = np.ones(n, dtype=bool)
    new_prompt[1:] = keys_sorted[1:] != keys_sorted[:-1]
    starts = np.flatnonzero(new_prompt)
    uniques = prompt_ids[rows[starts]]
    offsets = np.append(starts, n).astype(np.int64)
    k = np.diff(offsets)
    few = k < min_k
    if few.any():
        raise CalibrationError(
            f"{few.sum()} prompt(s) have fewer than min_k={min_k} reference samples: "
            + _name_some(uniques[few], "prompt_id")
            + f" (with {_name_some(k[few], 'K =')})"
        )
    if sample_idx is not None:
        _check_unique_samples(new_prompt, uniques, np.asarray(sample_idx)[rows])
    return CalibrationTables(uniques, offsets, rewards_sorted), (rows, new_prompt)


def build_tables(prompt_ids, rewards, *, sample_idx=None, min_k: int = 2) -> CalibrationTables:
    """Per-prompt quantile tables from scored reference samples.

    ``prompt_ids``: integers or strings, one kind. Checks: rewards finite, at least ``min_k``
    samples per prompt, and (when ``sample_idx`` is given) no duplicate (prompt_id, sample_idx).
    Tables come in ascending order of integer ids, in order of first appearance of string ids.
    """
    tables, _ = _build(prompt_ids, rewards, sample_idx, min_k)
    return tables


def calibrate_reference(
    prompt_ids, rewards, *, sample_idx=None, min_k: int = 2
) -> tuple[CalibrationTables, np.ndarray]:
    """Tables from the reference samples, and every reference sample's leave-one-out Ĉ.

    Each sample is compared with the other K − 1 of its prompt:
    ``u = (#below + ½·#equal_others) / (K − 1)`` — equivalently ``(midrank − 1)/(K − 1)``.
    """
    tables, (rows, new_prompt) = _build(prompt_ids, rewards, sample_idx, min_k)
    # Run-length arithmetic on the rows sorted by (prompt, reward): a run is one reward of one prompt.
    r, n = tables.rewards, len(tables.rewards)
    new_run = new_prompt.copy()
    new_run[1:] |= r[1:] != r[:-1]
    run_start = np.flatnonzero(new_run)
    run_length = np.diff(np.append(run_start, n))
    prompt_start = np.repeat(tables.offsets[:-1], tables.k)
    below = np.repeat(run_start, run_length) - prompt_start
    equal_others = np.repeat(run_length - 1, run_length)
    u = np.empty(n)
    u[rows] = (below + 0.5 * equal_others) / (np.repeat(tables.k, tables.k) - 1)
    return tables, u


def rank_counts(tables: CalibrationTables, prompt_ids, rewards) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(below, equal, k) of each reward in its prompt's table: the number of the prompt's K
    reference rewards strictly below it, equal to it, and K itself. ``calibrate`` is
    ``(below + ½·equal) / k``; estimators that need more than Ĉ (the calibrated shortcut in
    :mod:`ctrl_offline.evaluation`) start from the counts.
    """
    prompt_ids, rewards = _check_inputs(prompt_ids, rewards)
    return _rank_counts(tables, prompt_ids, rewards)


def _rank_counts(tables: CalibrationTables, prompt_ids: np.ndarray, rewards: np.ndarray):
    codes = tables.codes_of(prompt_ids) if len(rewards) else np.empty(0, dtype=np.int64)
    start, end = tables.offsets[codes], tables.offsets[codes + 1]
    first_not_below = _search_sorted_segments(tables.rewards, start, end, rewards, side="left")
    first_above = _search_sorted_segments(tables.rewards, start, end, rewards, side="right")
    return first_not_below - start, first_above - first_not_below, end - start


def calibrate(tables: CalibrationTables, prompt_ids, rewards, *, leave_one_out=False) -> np.ndarray:
    """Ĉ of scored responses against existing tables.

    ``leave_one_out`` (a bool, or a boolean mask per row) marks responses that are themselves
    one of their prompt's reference samples: one copy of their reward is removed from the
    comparison. Raises if such a reward is not in the table, or a prompt has no table.
    """
    prompt_ids, rewards = _check_inputs(prompt_ids, rewards)
    less, equal, k = _rank_counts(tables, prompt_ids, rewards)
    loo = np.broadcast_to(np.asarray(leave_one_out, dtype=bool), rewards.shape)
    if loo.any():
        orphan = loo & (equal == 0)
        if orphan.any():
            rows = np.flatnonzero(orphan)
            raise CalibrationError(
                f"{len(rows)} row(s) marked leave-one-out have a reward that is not in their prompt's table: "
                + _name_some(rows, "row")
            )
        if np.any(loo & (k < 2)):
            raise CalibrationError("leave-one-out needs at least 2 reference samples per prompt")
    drop = loo.astype(np.int64)
    return (less + 0.5 * (equal - drop)) / (k - drop)
