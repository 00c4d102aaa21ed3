"""Per-prompt calibration of rewards against reference samples (docs/theory.md §1).

The calibrated reward of a response y to prompt x is its win rate against the reference
policy on that prompt, estimated from the K stored reference rewards r_1..r_K (mid-rank
for ties):

    Ĉ(x, y) = (1/K) Σ_k ( 1[r(x,y) > r_k] + ½·1[r(x,y) = r_k] )

When y is one of the K reference samples it is left out (compared with the other K − 1).
A prompt's quantile table is the sorted array of its K reference rewards.

Prompt ids are integers (what the ``sample`` stage writes: a 64-bit hash of the prompt) or
strings (any ids a user brings); one array holds one kind (:mod:`ctrl_offline.maths.prompt_ids`).
Everything is vectorised over all prompts at once, so millions of prompts need no Python loop
(:mod:`ctrl_offline.maths.groups`). Rows are grouped by prompt and sorted by reward with two value sorts
of packed 64-bit keys (``np.sort``, several times faster than ``np.argsort``): integer ids go in
the keys as they are, string ids are hashed to integer codes first (pandas). Run-length arithmetic
then gives every count. Applying tables to new rewards needs no sort: each reward is bisected into
its prompt's already sorted table, all rows in the same few passes.

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

from ctrl_offline.maths.groups import run_starts, search_sorted_segments, sort_by_group_and_value
from ctrl_offline.maths.prompt_ids import SHOW, as_prompt_ids, check_factorized, hex_as_int, index_of, is_int, name_some, order_key, plain

__all__ = ["CalibrationError", "CalibrationTables", "build_tables", "calibrate", "calibrate_reference",
           "int_prompt_ids", "quantile_cells", "rank_counts"]


class CalibrationError(ValueError):
    """Bad input to calibration; the message names the offending prompts or rows."""


def int_prompt_ids(prompt_ids) -> np.ndarray:
    """Prompt ids as the integers the ``sample`` stage writes (int64).

    Integer ids come back as they are. Strings of 16 hex digits, the ids ``sample`` wrote before
    it wrote integers (the same first 64 bits of the prompt's SHA-256), become those integers, so
    data from both versions can be matched. Anything else raises :class:`CalibrationError`.
    """
    ids = as_prompt_ids(prompt_ids, error=CalibrationError)
    if is_int(ids):
        return ids
    converted = hex_as_int(ids)
    if converted is None:
        raise CalibrationError("prompt ids are neither integers nor 16-hex-digit hashes: "
                               + name_some(ids[:SHOW], "prompt_id"))
    return converted


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
        return None if is_int(self.prompt_ids) else hex_as_int(self.prompt_ids)

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
        queries = as_prompt_ids(prompt_ids, error=CalibrationError)
        table_ids, note = self.prompt_ids, ""
        if len(queries) and len(table_ids) and is_int(queries) != is_int(table_ids):
            queries = as_prompt_ids(queries, check_all=True, error=CalibrationError)
            converted = self._hex_ids if is_int(queries) else hex_as_int(queries)
            if converted is None:
                kinds = ("integers", "strings") if is_int(queries) else ("strings", "integers")
                note = f" (these prompt ids are {kinds[0]}, the tables' are {kinds[1]})"
                codes = np.full(len(queries), -1)
            elif is_int(queries):
                codes = index_of(converted, queries, None, error=CalibrationError)
            else:
                codes = index_of(table_ids, converted, self._index, error=CalibrationError)
        else:
            codes = index_of(table_ids, queries, self._index, error=CalibrationError)
        missing = codes < 0
        if missing.any():
            absent = pd.unique(queries[missing])
            raise CalibrationError(
                f"{len(absent)} prompt(s) have no calibration table: " + name_some(absent, "prompt_id") + note
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
        prompt_ids = as_prompt_ids(prompt_ids, check_all=True, error=CalibrationError)  # one per table: cheap
        offsets = np.asarray(offsets, dtype=np.int64)
        rewards = np.asarray(rewards, dtype=float)
        k = np.diff(offsets)
        if len(offsets) != len(prompt_ids) + 1 or offsets[0] != 0 or offsets[-1] != len(rewards):
            raise CalibrationError("offsets must start at 0, end at len(rewards) and have one entry per prompt + 1")
        if np.any(k < 1):
            raise CalibrationError("empty calibration table for " + name_some(prompt_ids[k < 1], "prompt_id"))
        codes = np.repeat(np.arange(len(prompt_ids)), k)
        _check_finite(prompt_ids[codes], rewards)
        if is_int(prompt_ids):
            ordered = np.sort(prompt_ids)
            dup = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        else:
            index = pd.Index(prompt_ids)
            dup = [] if index.is_unique else pd.unique(prompt_ids[index.duplicated()])
        if len(dup):
            raise CalibrationError("duplicate calibration tables for " + name_some(dup, "prompt_id"))
        if not _sorted_within(offsets, rewards):  # tables read back from disk already are
            _, _, rewards = sort_by_group_and_value(codes.astype(np.uint64), rewards)
        return cls(prompt_ids, offsets, rewards)


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
            + name_some(rows, "row")
            + "; "
            + name_some(np.unique(np.asarray(prompt_ids)[rows]), "prompt_id")
        )


def _check_inputs(prompt_ids, rewards, sample_idx=None):
    prompt_ids = as_prompt_ids(prompt_ids, error=CalibrationError)
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
        pairs = sorted({(plain(uniques[int(k) // width]), int(k) % width) for k in dup[: 10 * SHOW]})
        raise CalibrationError(
            f"{dup.size} duplicate (prompt_id, sample_idx) pair(s): " + name_some(pairs, "")
        )


def _build(prompt_ids, rewards, sample_idx, min_k):
    """Tables, and the rows' order in them: (row of each sorted position, first position of each prompt)."""
    if min_k < 2:
        raise CalibrationError(f"min_k must be at least 2 (leave-one-out needs a second sample), got {min_k}")
    prompt_ids, rewards = _check_inputs(prompt_ids, rewards, sample_idx)
    n = len(rewards)
    if is_int(prompt_ids):  # the ids themselves are the sort keys: no hashing
        keys = order_key(prompt_ids)
    else:  # strings: integer codes in order of first appearance, by hashing
        codes, uniques = pd.factorize(prompt_ids)
        check_factorized(prompt_ids, codes, uniques, error=CalibrationError)
        keys = codes.astype(np.uint64)
    rows, keys_sorted, rewards_sorted = sort_by_group_and_value(keys, rewards)
    new_prompt = run_starts(keys_sorted)
    starts = np.flatnonzero(new_prompt)
    uniques = prompt_ids[rows[starts]]
    offsets = np.append(starts, n).astype(np.int64)
    k = np.diff(offsets)
    few = k < min_k
    if few.any():
        raise CalibrationError(
            f"{few.sum()} prompt(s) have fewer than min_k={min_k} reference samples: "
            + name_some(uniques[few], "prompt_id")
            + f" (with {name_some(k[few], 'K =')})"
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
    :mod:`ctrl_offline.maths.win_rates`) start from the counts.
    """
    prompt_ids, rewards = _check_inputs(prompt_ids, rewards)
    return _rank_counts(tables, prompt_ids, rewards)


def _rank_counts(tables: CalibrationTables, prompt_ids: np.ndarray, rewards: np.ndarray):
    codes = tables.codes_of(prompt_ids) if len(rewards) else np.empty(0, dtype=np.int64)
    start, end = tables.offsets[codes], tables.offsets[codes + 1]
    first_not_below = search_sorted_segments(tables.rewards, start, end, rewards, side="left")
    first_above = search_sorted_segments(tables.rewards, start, end, rewards, side="right")
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
                + name_some(rows, "row")
            )
        if np.any(loo & (k < 2)):
            raise CalibrationError("leave-one-out needs at least 2 reference samples per prompt")
    drop = loo.astype(np.int64)
    return (less + 0.5 * (equal - drop)) / (k - drop)


def quantile_cells(reference_logp: np.ndarray, rewards: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Exact calibration when π_ref is known on a finite response set (the LM testbed, docs/lm_testbed.md).

    Per prompt (rows of the (prompts, responses) arrays): (group of each response, cell start G⁻,
    cell end G) of its reward value under π_ref. A response's exact quantile is uniform on its cell
    [G⁻(r), G(r)] (tied responses share one).
    """
    cells = []
    for lq, r in zip(np.atleast_2d(reference_logp), np.atleast_2d(rewards)):
        _, group = np.unique(r, return_inverse=True)
        qv = np.bincount(group, weights=np.exp(lq))
        end = np.clip(np.cumsum(qv), 0.0, 1.0)
        cells.append((group, np.concatenate([[0.0], end[:-1]]), end))
    return cells
