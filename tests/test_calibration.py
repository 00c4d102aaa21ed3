import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ctrl_offline.maths.calibration import (
    CalibrationError,
    CalibrationTables,
    build_tables,
    calibrate,
    calibrate_reference,
)


def brute_force(ref_ids, ref_rewards, ids, rewards, leave_one_out):
    """Ĉ straight from the definition, one response at a time."""
    out = []
    for pid, r in zip(ids, rewards):
        table = list(ref_rewards[ref_ids == pid])
        if leave_one_out:
            table.remove(r)
        table = np.array(table)
        out.append(((table < r).sum() + 0.5 * (table == r).sum()) / len(table))
    return np.array(out)


def random_reference(rng, prompts=40, k_range=(2, 9), levels=5):
    k = rng.integers(*k_range, size=prompts)
    ids = np.repeat(np.arange(prompts) * 7 + 3, k)  # non-dense ids
    rewards = rng.integers(0, levels, size=len(ids)).astype(float)  # many ties
    perm = rng.permutation(len(ids))
    return ids[perm], rewards[perm]


@pytest.mark.parametrize("seed", range(5))
def test_reference_matches_definition_with_ties_and_leave_one_out(seed):
    rng = np.random.default_rng(seed)
    ids, rewards = random_reference(rng)
    tables, u = calibrate_reference(ids, rewards)
    np.testing.assert_allclose(u, brute_force(ids, rewards, ids, rewards, leave_one_out=True), atol=1e-15)
    # Same as the familiar mid-rank formula (rank − 1)/(K − 1).
    frame = pd.DataFrame({"p": ids, "r": rewards})
    ranks = frame.groupby("p")["r"].rank(method="average")
    sizes = frame.groupby("p")["r"].transform("size")
    np.testing.assert_allclose(u, (ranks - 1) / (sizes - 1), atol=1e-15)
    assert tables.k.sum() == len(ids)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("queries", [5, 300])  # fewer ids than tables, and a bulk lookup
@pytest.mark.parametrize("k_range", [(2, 9), (2, 70)])  # 3 to 7 bisection passes
def test_new_responses_match_definition(seed, queries, k_range):
    rng = np.random.default_rng(seed)
    ids, rewards = random_reference(rng, k_range=k_range)
    tables = build_tables(ids, rewards)
    q_ids = rng.choice(np.unique(ids), queries)
    q_rewards = rng.integers(-1, 7, size=queries).astype(float)
    u = calibrate(tables, q_ids, q_rewards)
    np.testing.assert_allclose(u, brute_force(ids, rewards, q_ids, q_rewards, leave_one_out=False), atol=1e-15)


def test_single_sample_tables_and_rewards_at_the_ends():
    tables = CalibrationTables.from_lists(["one", "two"], [[1.0], [1.0, 2.0]])
    u = calibrate(tables, ["one"] * 3 + ["two"] * 4, [0.0, 1.0, 5.0, 0.0, 1.0, 2.0, 3.0])
    assert u.tolist() == [0.0, 0.5, 1.0, 0.0, 0.25, 0.75, 1.0]


def test_ids_of_another_type_do_not_match():
    tables = build_tables(np.array([7, 7, 8, 8]), np.array([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(CalibrationError, match="prompt_id '7'"):
        calibrate(tables, np.array(["7"] * 5), np.zeros(5))
    assert calibrate(tables, np.array([7, 8, 8, 7, 7]), np.full(5, 2.0)).tolist() == [1.0, 0.25, 0.25, 1.0, 1.0]


def test_tables_are_sorted_reference_rewards():
    ids = np.array(["b", "a", "b", "a", "b"])
    rewards = np.array([3.0, 1.0, -1.0, 0.5, 2.0])
    tables = build_tables(ids, rewards)
    assert tables.table("a").tolist() == [0.5, 1.0]
    assert tables.table("b").tolist() == [-1.0, 2.0, 3.0]


def test_ties_count_one_half():
    tables, u = calibrate_reference(np.zeros(4, int), np.array([1.0, 1.0, 1.0, 5.0]))
    # each 1.0 sees two equal others and one larger: (0 + ½·2)/3
    np.testing.assert_allclose(u, [1 / 3, 1 / 3, 1 / 3, 1.0])
    np.testing.assert_allclose(calibrate(tables, np.zeros(3, int), np.array([1.0, 0.0, 9.0])), [3 / 8, 0.0, 1.0])


def test_leave_one_out_on_applied_tables_equals_reference_calibration():
    rng = np.random.default_rng(1)
    ids, rewards = random_reference(rng)
    tables, u = calibrate_reference(ids, rewards)
    np.testing.assert_allclose(calibrate(tables, ids, rewards, leave_one_out=True), u)
    mask = rng.random(len(ids)) < 0.5
    mixed = calibrate(tables, ids, rewards, leave_one_out=mask)
    np.testing.assert_allclose(mixed[mask], u[mask])
    np.testing.assert_allclose(mixed[~mask], calibrate(tables, ids[~mask], rewards[~mask]))


def test_values_in_unit_interval():
    rng = np.random.default_rng(2)
    ids, rewards = random_reference(rng, levels=3)
    tables, u = calibrate_reference(ids, rewards)
    assert u.min() >= 0 and u.max() <= 1
    q = calibrate(tables, ids, rng.normal(size=len(ids)) * 10)
    assert q.min() >= 0 and q.max() <= 1


def test_uniform_under_reference_policy():
    # Tie-free rewards, each prompt its own reward distribution: new reference draws are
    # calibrated to (discrete) Uniform[0, 1] on every prompt and overall.
    rng = np.random.default_rng(3)
    prompts, k = 2000, 32
    loc, scale = rng.normal(size=prompts) * 5, rng.gamma(2.0, size=prompts)
    ids = np.repeat(np.arange(prompts), k)
    ref_rewards = loc[ids] + scale[ids] * rng.standard_t(3, size=len(ids))
    tables = build_tables(ids, ref_rewards)
    fresh_ids = np.repeat(np.arange(prompts), 8)
    u = calibrate(tables, fresh_ids, loc[fresh_ids] + scale[fresh_ids] * rng.standard_t(3, size=len(fresh_ids)))
    # Ĉ takes values j/K: each of the K+1 cells has probability 1/(K+1).
    counts = np.bincount(np.rint(u * k).astype(int), minlength=k + 1)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert abs(u.mean() - 0.5) < 0.01
    # Leave-one-out u of the reference set is exactly uniform on {0, 1/(K−1), …, 1} per prompt.
    _, u_ref = calibrate_reference(ids, ref_rewards)
    per_prompt = np.sort(u_ref.reshape(prompts, k), axis=1)
    np.testing.assert_allclose(per_prompt, np.tile(np.arange(k) / (k - 1), (prompts, 1)))


def test_invariant_to_monotone_and_per_prompt_affine_maps():
    rng = np.random.default_rng(4)
    ids, rewards = random_reference(rng, levels=7)
    q_ids = rng.choice(np.unique(ids), 200)
    q_rewards = rng.integers(0, 7, size=200).astype(float)
    base_tables, base_u = calibrate_reference(ids, rewards)
    base_q = calibrate(base_tables, q_ids, q_rewards)
    scale = dict(zip(np.unique(ids), rng.uniform(0.1, 10.0, size=len(np.unique(ids)))))
    shift = dict(zip(np.unique(ids), rng.normal(size=len(np.unique(ids))) * 100))
    maps = {
        "exp": lambda p, r: np.exp(r),
        "arctan": lambda p, r: np.arctan(r - 3),
        "cube": lambda p, r: (r - 2.5) ** 3,
        "affine per prompt": lambda p, r: np.vectorize(scale.get)(p) * r + np.vectorize(shift.get)(p),
    }
    for name, f in maps.items():
        tables, u = calibrate_reference(ids, f(ids, rewards))
        np.testing.assert_array_equal(u, base_u, err_msg=name)
        np.testing.assert_array_equal(calibrate(tables, q_ids, f(q_ids, q_rewards)), base_q, err_msg=name)


def test_tables_round_trip_through_lists():
    rng = np.random.default_rng(5)
    ids, rewards = random_reference(rng)
    tables = build_tables(ids, rewards)
    lists = [tables.rewards[a:b][::-1] for a, b in zip(tables.offsets[:-1], tables.offsets[1:])]
    again = CalibrationTables.from_lists(tables.prompt_ids[::-1], lists[::-1])
    for pid in tables.prompt_ids:
        np.testing.assert_array_equal(again.table(pid), tables.table(pid))


def test_from_flat_sorts_only_inside_each_table():
    # Tables in descending order of their values are each sorted: nothing may move between them.
    tables = CalibrationTables.from_flat(["hi", "lo"], [0, 2, 4], [5.0, 6.0, 1.0, 2.0])
    assert tables.rewards.tolist() == [5.0, 6.0, 1.0, 2.0]
    unsorted = CalibrationTables.from_flat(["hi", "lo"], [0, 2, 4], [6.0, 5.0, 1.0, 2.0])
    assert unsorted.rewards.tolist() == [5.0, 6.0, 1.0, 2.0]
    assert calibrate(unsorted, ["hi", "lo"], [5.5, 1.5]).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rewards_are_named(bad):
    ids = np.array(["p1", "p1", "p2", "p2"])
    rewards = np.array([1.0, 2.0, bad, 0.0])
    with pytest.raises(CalibrationError, match=r"NaN or infinite.*row 2.*'p2'"):
        calibrate_reference(ids, rewards)


def test_too_few_samples_are_named():
    ids = np.array(["a", "a", "b", "c", "c", "c"])
    with pytest.raises(CalibrationError, match=r"1 prompt\(s\) have fewer than min_k=2.*'b'"):
        build_tables(ids, np.arange(6.0))
    with pytest.raises(CalibrationError, match=r"fewer than min_k=3.*'a'"):
        build_tables(ids, np.arange(6.0), min_k=3)
    with pytest.raises(CalibrationError, match="min_k must be at least 2"):
        build_tables(ids, np.arange(6.0), min_k=1)


def test_duplicate_samples_are_named():
    ids = np.array(["a", "a", "b", "b"])
    with pytest.raises(CalibrationError, match=r"duplicate \(prompt_id, sample_idx\).*\('b', 1\)"):
        build_tables(ids, np.arange(4.0), sample_idx=np.array([0, 1, 1, 1]))


def test_missing_table_is_named():
    tables = build_tables(np.array(["a", "a"]), np.array([0.0, 1.0]))
    with pytest.raises(CalibrationError, match=r"no calibration table: prompt_id 'zz'"):
        calibrate(tables, np.array(["a", "zz"]), np.array([0.5, 0.5]))


def test_leave_one_out_of_a_reward_not_in_the_table_is_refused():
    tables = build_tables(np.array(["a", "a"]), np.array([0.0, 1.0]))
    with pytest.raises(CalibrationError, match="not in their prompt's table: row 1"):
        calibrate(tables, np.array(["a", "a"]), np.array([1.0, 0.5]), leave_one_out=True)


def test_mismatched_shapes_are_refused():
    with pytest.raises(CalibrationError, match="one length"):
        build_tables(np.array([1, 1, 2]), np.array([0.0, 1.0]))


# --- prompt ids: integers (what `sample` writes) and strings ------------------------------------------------


def _pandas_u(ids, rewards):
    frame = pd.DataFrame({"p": ids, "r": rewards})
    groups = frame.groupby("p")["r"]
    return ((groups.rank(method="average") - 1) / (groups.transform("size") - 1)).to_numpy()


@pytest.mark.parametrize("seed", range(4))
def test_integer_ids_give_the_values_of_the_same_ids_as_strings(seed):
    rng = np.random.default_rng(seed)
    prompts = 60
    # 64-bit hashes (negative ones too), with a few tiny ids among them: the packed sort keeps only the high
    # bits of so wide a range, so 0, 1, 2 share them and must be told apart exactly.
    uid = np.concatenate([rng.integers(-(2**63), 2**63 - 1, size=prompts - 3, dtype=np.int64), [0, 1, 2]])
    k = rng.integers(2, 9, size=prompts)
    codes = rng.permutation(np.repeat(np.arange(prompts), k))
    # Rewards that differ only in their last bits, next to huge ones (the same for the reward sort), -0.0 and 0.0.
    levels = np.array([1.0, 1.0 + 2**-52, 1.0 + 2**-51, -1e308, 1e308, 0.0, -0.0, -3.5])
    rewards = rng.choice(levels, size=len(codes))
    int_ids = uid[codes]
    str_ids = np.array([f"{v & (2**64 - 1):016x}" for v in int_ids.tolist()], dtype=object)
    int_tables, int_u = calibrate_reference(int_ids, rewards, sample_idx=np.arange(len(codes)))
    str_tables, str_u = calibrate_reference(str_ids, rewards, sample_idx=np.arange(len(codes)))
    np.testing.assert_array_equal(int_u, str_u)
    np.testing.assert_allclose(int_u, _pandas_u(int_ids, rewards), atol=1e-15)
    ids = int_tables.prompt_ids  # integer ids: tables in ascending order
    assert ids.dtype == np.int64 and np.all(ids[1:] > ids[:-1])
    for pid, hex_id in zip(int_ids[:20], str_ids[:20]):
        np.testing.assert_array_equal(int_tables.table(pid), str_tables.table(hex_id))
        np.testing.assert_array_equal(int_tables.table(pid), np.sort(rewards[int_ids == pid]))
    queries = rng.integers(0, len(codes), size=500)  # a bulk lookup: more rows than tables
    new = rng.choice(levels, size=500)
    np.testing.assert_array_equal(calibrate(int_tables, int_ids[queries], new),
                                  calibrate(str_tables, str_ids[queries], new))
    np.testing.assert_allclose(calibrate(int_tables, int_ids[queries], new),
                               brute_force(int_ids, rewards, int_ids[queries], new, leave_one_out=False), atol=1e-15)


@pytest.mark.parametrize("ids", [
    np.array([2**64 - 1, 2**64 - 1, 0, 0, 5, 5], dtype=np.uint64),  # uint64 beyond int64
    np.array([3, 3, 1, 1, 2, 2], dtype=np.int8),
    np.array([2**40, 2**40, 7, 7, 9, 9], dtype=object),  # Python ints, e.g. from a to_pylist()
])
def test_integer_ids_of_any_width(ids):
    rewards = np.array([1.0, 0.0, 2.0, 2.0, 5.0, 4.0])
    tables, u = calibrate_reference(ids, rewards)
    assert u.tolist() == [1.0, 0.0, 0.5, 0.5, 1.0, 0.0]
    assert calibrate(tables, ids[:2], [0.5, 1.0]).tolist() == [0.5, 0.75]


@pytest.mark.parametrize("ids,message", [
    (np.array(["a", 1, "a", 1], dtype=object), r"all integers or all strings, got a mix: str \(e.g. row 0: 'a'\), int"),
    (np.array([1.0, 1.0, 2.0, 2.0]), r"integers or strings, got float64 ids \(integer ids with missing values"),
    (np.array(["a", None, "a", "b"], dtype=object), r"1 row\(s\) have a missing prompt_id: row 1"),
    (np.array([True, True, False, False]), "integers or strings, got bool"),
    (np.array([[1, 1], [2, 2]]), "1-D"),
])
def test_mixed_and_invalid_ids_are_refused(ids, message):
    with pytest.raises(CalibrationError, match=message):
        calibrate_reference(ids, np.arange(4.0))
    tables = build_tables(np.array([1, 1]), np.array([0.0, 1.0]))
    with pytest.raises(CalibrationError, match=message):
        calibrate(tables, ids, np.zeros(np.shape(ids)))


def test_hex_string_ids_of_earlier_runs_match_integer_ids():
    import hashlib

    from ctrl_offline.maths.calibration import int_prompt_ids

    # What `sample` wrote before (16 hex digits of the SHA-256) and writes now (those 64 bits as an int64).
    digests = [hashlib.sha256(p.encode()).digest() for p in ("Tell me a joke.", "Why is the sky blue?", "hi")]
    hexes = np.array([d.hex()[:16] for d in digests], dtype=object)
    ints = np.array([int.from_bytes(d[:8], "big", signed=True) for d in digests])
    np.testing.assert_array_equal(int_prompt_ids(hexes), ints)
    np.testing.assert_array_equal(int_prompt_ids(np.char.upper(hexes.astype(str))), ints)
    np.testing.assert_array_equal(int_prompt_ids(ints), ints)
    rewards = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    old_tables = build_tables(np.repeat(hexes, 2), rewards)  # tables of an earlier run, new integer ids
    assert calibrate(old_tables, ints, [0.5, 2.5, 9.0]).tolist() == [0.5, 0.5, 1.0]
    new_tables = build_tables(np.repeat(ints, 2), rewards)
    assert calibrate(new_tables, hexes, [0.5, 2.5, 9.0]).tolist() == [0.5, 0.5, 1.0]
    with pytest.raises(CalibrationError, match="neither integers nor 16-hex-digit"):
        int_prompt_ids(["p1"])
    with pytest.raises(CalibrationError, match=r"no calibration table: prompt_id 'p1' \(these prompt ids are strings, "
                                               r"the tables' are integers\)"):
        calibrate(new_tables, ["p1"], [0.0])
