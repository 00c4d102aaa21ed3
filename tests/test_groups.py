"""Per-prompt group arithmetic (ctrl_offline.maths.groups) against pandas groupby and plain loops."""

import itertools

import numpy as np
import pandas as pd
import pytest

from ctrl_offline.maths.groups import (
    all_pairs,
    extreme_per_group,
    float_key,
    group_layout,
    group_log_mean_exp,
    group_size_of_row,
    order_by_group,
    packed_sort,
    rank_in_group,
    run_heads,
    run_starts,
    search_sorted_segments,
    sort_by_group_and_value,
)


def codes_of(seed, n_groups=30, kmax=7):
    """Interleaved codes 0..n_groups-1 (each group 1..kmax rows) and values with ties."""
    rng = np.random.default_rng(seed)
    codes = rng.permutation(np.repeat(np.arange(n_groups), rng.integers(1, kmax + 1, size=n_groups)))
    return codes.astype(np.int64), rng.integers(0, 4, size=len(codes)) / 3


def test_run_starts_heads_and_rank_in_group():
    sorted_codes = np.array([0, 0, 0, 2, 5, 5, 7, 7, 7, 7])
    assert run_starts(sorted_codes).tolist() == [True, False, False, True, True, False, True, False, False, False]
    assert run_heads(run_starts(sorted_codes)).tolist() == [0, 0, 0, 3, 4, 4, 6, 6, 6, 6]
    assert rank_in_group(sorted_codes).tolist() == [0, 1, 2, 0, 0, 1, 0, 1, 2, 3]
    assert rank_in_group(np.array([], dtype=np.int64)).tolist() == []


@pytest.mark.parametrize("seed", range(3))
def test_order_by_group_is_a_stable_argsort(seed):
    codes, _ = codes_of(seed, n_groups=300)
    np.testing.assert_array_equal(order_by_group(codes), np.argsort(codes, kind="stable"))
    assert order_by_group(codes).dtype == np.int64 and len(order_by_group(codes[:0])) == 0


@pytest.mark.parametrize("seed", range(3))
def test_group_layout_matches_pandas(seed):
    codes, _ = codes_of(seed)
    n_groups = int(codes.max()) + 1
    order, sizes, local, rank_of_row = group_layout(codes, n_groups)
    np.testing.assert_array_equal(order, np.argsort(codes, kind="stable"))
    np.testing.assert_array_equal(sizes, pd.Series(codes).value_counts().sort_index().to_numpy())
    np.testing.assert_array_equal(rank_of_row, pd.Series(codes).groupby(codes).cumcount().to_numpy())
    np.testing.assert_array_equal(local, rank_of_row[order])
    np.testing.assert_array_equal(rank_in_group(codes[order]), local)
    np.testing.assert_array_equal(group_size_of_row(codes, n_groups), sizes[codes])


@pytest.mark.parametrize("seed", range(3))
def test_all_pairs_are_every_pair_within_a_group(seed):
    codes, _ = codes_of(seed)
    a, b = all_pairs(codes, int(codes.max()) + 1)
    expected = [pair for g in range(int(codes.max()) + 1)
                for pair in itertools.combinations(np.flatnonzero(codes == g).tolist(), 2)]
    assert list(zip(a.tolist(), b.tolist())) == expected


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_extreme_per_group_takes_the_lowest_row_among_ties(largest, seed):
    codes, values = codes_of(seed)
    values[::5] = -0.0 if not largest else values[::5]  # −0.0 ties with 0.0
    got = extreme_per_group(codes, values, largest)
    for g in range(int(codes.max()) + 1):
        rows = np.flatnonzero(codes == g)
        key = (lambda i: (-values[i], i)) if largest else (lambda i: (values[i], i))
        assert got[g] == min(rows, key=key)
    assert got.dtype == np.int64


def test_group_log_mean_exp_matches_a_loop():
    codes, values = codes_of(7)
    x = values * 300.0 - 100.0  # exp(x) alone would overflow
    x[codes == 3] = -np.inf
    x[np.flatnonzero(codes == 4)[0]] = -np.inf
    n_groups = int(codes.max()) + 1
    top, shifted, mean = group_log_mean_exp(codes, n_groups, x)
    for g in range(n_groups):
        xs = x[codes == g]
        assert top[g] == xs.max()
        if g == 3:  # every x is −∞: callers check top
            assert top[g] == -np.inf
            continue
        np.testing.assert_allclose(shifted[codes == g], np.exp(xs - xs.max()), rtol=1e-15)
        lme = xs.max() + np.log(np.mean(np.exp(xs - xs.max())))
        assert top[g] + np.log(mean[g]) == pytest.approx(lme, rel=1e-13)


def test_float_key_orders_floats_and_ties_signed_zeros():
    values = np.array([3.5, -0.0, 0.0, -1e300, 1e-300, -1e-300, np.nextafter(1.0, 2.0), 1.0, -7.25, 5e-324])
    keys = float_key(values)
    assert keys.dtype == np.uint64
    np.testing.assert_array_equal(np.argsort(keys, kind="stable"), np.argsort(values + 0.0, kind="stable"))
    assert keys[1] == keys[2]


def test_packed_sort_is_exact_when_nothing_is_dropped():
    rng = np.random.default_rng(1)
    primary = rng.integers(0, 1000, size=500).astype(np.uint64)
    secondary, high, shift = packed_sort(primary, np.arange(500, dtype=np.uint64), 9)
    assert shift == 0
    np.testing.assert_array_equal(secondary, np.argsort(primary, kind="stable"))
    np.testing.assert_array_equal(high, np.sort(primary) - primary.min())


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_sort_by_group_and_value_is_lexsort_and_the_pandas_rank(seed, wide):
    rng = np.random.default_rng(seed)
    n = 3000
    if wide:
        # Keys over the whole 64-bit range and values that differ in their last bits: both packed
        # sorts drop low bits, and the blocks they leave out of order must be re-sorted.
        base = rng.integers(0, 2**64 - 1, size=40, dtype=np.uint64, endpoint=True)
        keys = np.concatenate([base, base ^ np.uint64(1), base + np.uint64(3)])[rng.integers(0, 120, size=n)]
        level = rng.normal(size=8) * 1e3
        values = level[rng.integers(0, 8, size=n)]
        values = np.where(rng.random(n) < 0.5, values, np.nextafter(values, np.inf))
        values[rng.random(n) < 0.1] = -0.0
    else:
        keys = rng.integers(0, 50, size=n).astype(np.uint64)
        values = rng.integers(0, 10, size=n) / 9
    rows, keys_sorted, values_sorted = sort_by_group_and_value(keys, values)
    expected = np.lexsort((np.arange(n), values, keys))
    np.testing.assert_array_equal(rows, expected)
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(keys_sorted, keys[expected])
    np.testing.assert_array_equal(values_sorted, values[expected])
    # Each row's rank within its group, by (value, row): pandas' groupby rank, method "first".
    rank = np.empty(n, dtype=np.int64)
    rank[rows] = rank_in_group(keys_sorted)
    frame = pd.DataFrame({"key": keys.astype(str), "value": values + 0.0})
    np.testing.assert_array_equal(rank, frame.groupby("key")["value"].rank(method="first").to_numpy() - 1)


def test_sort_by_group_and_value_of_nothing():
    rows, keys, values = sort_by_group_and_value(np.empty(0, np.uint64), np.empty(0))
    assert rows.dtype == np.int64 and len(rows) == len(keys) == len(values) == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_search_sorted_segments_is_searchsorted_in_each_segment(side):
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 12, size=60)  # empty segments too
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate([np.sort(rng.integers(0, 6, size=k).astype(float)) for k in lengths])
    seg = rng.integers(0, 60, size=500)
    targets = rng.integers(-1, 8, size=500) / 1.0
    start, end = offsets[seg], offsets[seg + 1]
    got = search_sorted_segments(values, start, end, targets, side=side)
    expected = [s + np.searchsorted(values[s:e], t, side=side) for s, e, t in zip(start, end, targets)]
    np.testing.assert_array_equal(got, expected)
