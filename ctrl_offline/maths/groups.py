"""Per-prompt group arithmetic: every per-prompt quantity for all prompts at once, no loop per prompt.

Rows belong to groups (their prompts) through an integer key per row: codes 0, 1, … in order of
first appearance (``pd.factorize``), or integer prompt ids as order-preserving uint64 keys
(:func:`ctrl_offline.maths.prompt_ids.order_key`). Everything here is array arithmetic on those keys —
sorts, run starts, ``bincount``, ``repeat``/``cumsum``, ``maximum.accumulate`` — used by the
calibration (docs/theory.md §1) and by the pairs, targets and weights built from it (§4).

Sorting rows by (group, value) packs both into one uint64 word per row and value-sorts those words
(``np.sort``, several times faster than ``np.argsort`` or ``np.lexsort``;
``benchmarks/bench_calibration.py`` measures it); the few blocks that truncated keys leave out of
order are found and re-sorted exactly. Sorted groups are runs of equal keys: :func:`run_starts`,
:func:`run_heads` and :func:`rank_in_group` number them.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "run_starts",
    "run_heads",
    "rank_in_group",
    "group_size_of_row",
    "order_by_group",
    "group_layout",
    "all_pairs",
    "extreme_per_group",
    "group_log_mean_exp",
    "float_key",
    "packed_sort",
    "resort_blocks",
    "sort_by_group_and_value",
    "search_sorted_segments",
]


# --- runs of equal keys in a sorted array ------------------------------------------------------
def run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """True at the first position of each run of equal keys."""
    starts = np.ones(len(sorted_keys), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return starts


def run_heads(starts: np.ndarray) -> np.ndarray:
    """For each position, the first position of its run (``starts`` from :func:`run_starts`)."""
    return np.maximum.accumulate(np.where(starts, np.arange(len(starts)), 0))


def rank_in_group(sorted_codes: np.ndarray) -> np.ndarray:
    """0, 1, 2, … within each run of equal codes of an array sorted by code."""
    return np.arange(len(sorted_codes)) - run_heads(run_starts(sorted_codes))


# --- groups given by codes 0..n_groups-1 -------------------------------------------------------
def group_size_of_row(codes: np.ndarray, n_groups: int) -> np.ndarray:
    """The number of rows in each row's group."""
    return np.bincount(codes, minlength=n_groups)[codes]


def order_by_group(codes: np.ndarray) -> np.ndarray:
    """Rows in (group code, row index) order, ``np.argsort(codes, kind="stable")``, by one packed
    value sort (about twice as fast); codes are integers in 0..len(codes) − 1."""
    n = len(codes)
    bits = max(1, (n - 1).bit_length())
    if n and 2 * bits <= 64:
        rows, _, shift = packed_sort(codes.astype(np.uint64), np.arange(n, dtype=np.uint64), bits)
        if shift == 0:  # always, for codes below len(codes)
            return rows.view(np.int64)
    return np.argsort(codes, kind="stable")


def group_layout(codes: np.ndarray, n_groups: int):
    """Rows sorted by (group code, row index), each group's size, each sorted row's position in its
    group, and each row's rank in its group (its position among the group's rows in input order).

    Returns ``(order, sizes, local, rank_of_row)``.
    """
    order = order_by_group(codes)
    sizes = np.bincount(codes, minlength=n_groups)
    starts = np.cumsum(sizes) - sizes
    local = np.arange(len(codes)) - np.repeat(starts, sizes)  # position of each sorted row in its group
    rank_of_row = np.empty(len(codes), dtype=np.int64)
    rank_of_row[order] = local
    return order, sizes, local, rank_of_row


def all_pairs(codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair (a, b), a < b, of rows sharing a group, in (group, a, b) order.

    With the rows of each group laid out contiguously, the row at position i of a group of size
    n pairs with the n − 1 − i rows after it: repeat i that many times and add 1, 2, … to it.
    """
    order, sizes, local, _ = group_layout(codes, n_groups)
    later = np.repeat(sizes, sizes) - 1 - local  # partners after each sorted row
    first = np.repeat(np.arange(len(codes)), later)
    block_start = np.repeat(np.cumsum(later) - later, later)
    second = first + 1 + (np.arange(len(first)) - block_start)
    return order[first], order[second]


def extreme_per_group(codes: np.ndarray, values: np.ndarray, largest: bool) -> np.ndarray:
    """Row of the largest (or smallest) value of each group, ties to the lowest row index; in code order.

    ``values`` finite; −0.0 ties with 0.0.
    """
    rows, keys_sorted, _ = sort_by_group_and_value(codes.astype(np.uint64), -values if largest else values)
    return rows[run_starts(keys_sorted)]


def group_log_mean_exp(codes: np.ndarray, n_groups: int, x: np.ndarray):
    """Stable per-group log-mean-exp: (max of x per group, exp(x − max) per row, mean of it per group).

    The log-mean-exp of group g is ``top[g] + log(mean[g])``.
    """
    top = np.full(n_groups, -np.inf)
    np.maximum.at(top, codes, x)
    with np.errstate(invalid="ignore"):  # a group whose every x is −∞ gives NaN; callers check top
        shifted = np.exp(x - top[codes])
    mean = np.bincount(codes, weights=shifted, minlength=n_groups) / np.bincount(codes, minlength=n_groups)
    return top, shifted, mean


# --- sorting rows by (group, value) ------------------------------------------------------------
def float_key(values: np.ndarray) -> np.ndarray:
    """Finite floats as uint64 keys in the same order, equal floats (0.0 and −0.0 too) on equal keys."""
    bits = (values + 0.0).view(np.int64)  # + 0.0 turns −0.0 into 0.0
    flip = bits >> 63  # 0 for positive floats, all ones for negative ones
    flip |= np.int64(-(2**63))
    flip ^= bits  # positive: the sign bit set; negative: every bit inverted
    return flip.view(np.uint64)


def packed_sort(primary: np.ndarray, secondary: np.ndarray, bits: int):
    """One ``np.sort`` of uint64 keys holding ``(primary − min) >> shift`` high and ``secondary``
    (distinct integers below ``2**bits``) low: several times faster than ``np.argsort``.

    Returns (secondary in key order, the high parts in key order, shift). With ``shift == 0`` that
    is the exact order by (primary, secondary); otherwise primaries that differ only in the dropped
    bits may sit out of order inside one block of equal high parts, for :func:`resort_blocks`.
    """
    low = primary.min()
    shift = max(0, int(primary.max() - low).bit_length() - (64 - bits))
    keys = primary - low
    keys >>= np.uint64(shift)
    keys <<= np.uint64(bits)
    keys |= secondary
    keys.sort()
    return keys & np.uint64((1 << bits) - 1), keys >> np.uint64(bits), shift


def resort_blocks(block_start: np.ndarray, wrong: np.ndarray, sort_keys: tuple, arrays: tuple) -> None:
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


def sort_by_group_and_value(keys: np.ndarray, values: np.ndarray):
    """Rows (int64) ordered by (group key, value, row index), with the keys and values in that order.

    ``keys``: one uint64 per row, equal for the rows of one group; ``values``: finite floats.
    The order is ``np.lexsort((np.arange(n), values, keys))``, from two packed value sorts: values
    (row in the low bits), then (key, value rank). Either sort may drop low bits of its primary;
    the few blocks that leaves out of order are found and re-sorted exactly.
    """
    n = len(values)
    if n == 0:
        return np.empty(0, np.int64), keys, values
    bits = max(1, (n - 1).bit_length())
    if 2 * bits > 64:  # more than 2**32 rows: keys and ranks do not fit one word together
        rows = np.lexsort((values, keys))
        return rows, keys[rows], values[rows]
    by_value, _, _ = packed_sort(float_key(values), np.arange(n, dtype=np.uint64), bits)
    rank = np.empty(n, np.uint64)
    rank[by_value] = np.arange(n, dtype=np.uint64)
    rank_sorted, high, shift = packed_sort(keys, rank, bits)
    del rank
    rows = by_value[rank_sorted]
    if shift == 0:
        keys_sorted = high + keys.min()
    else:
        keys_sorted = keys[rows]
        same_high = high[1:] == high[:-1]
        clash = same_high & (keys_sorted[1:] != keys_sorted[:-1])
        if clash.any():
            block_start = np.concatenate([[True], ~same_high])
            resort_blocks(block_start, clash, (rank_sorted, keys_sorted), (rows, keys_sorted))
    values_sorted = values[rows]
    # Values that differ only in the bits the first sort dropped may be out of order in a group.
    new_group = run_starts(keys_sorted)
    wrong = (values_sorted[1:] < values_sorted[:-1]) & ~new_group[1:]
    if wrong.any():
        resort_blocks(new_group, wrong, (values_sorted,), (rows, values_sorted))
    return rows.view(np.int64), keys_sorted, values_sorted


# --- sorted segments (CSR layout) --------------------------------------------------------------
def search_sorted_segments(values, start, end, targets, *, side: str) -> np.ndarray:
    """``np.searchsorted`` of each target in its own sorted segment ``values[start:end]``.

    One vectorised bisection over all targets at once, deciding the position bit by bit from
    the largest power of two down: ceil(log2(K + 1)) passes for segments of at most K entries,
    so it costs O(n log K) and never sorts the n targets.
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
