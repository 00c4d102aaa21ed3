import itertools
import time

import numpy as np
import pytest

from ctrl_offline.synthesis import SynthesisError, log_partition_gap, make_pairs, pointwise_targets, sft_weights
from ctrl_offline.transforms import get_transform

EXP = get_transform("exp", 3.0)


def rows(seed=0, prompts=12):
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 7, size=prompts)
    ids = np.repeat([f"p{i}" for i in range(prompts)], k)
    perm = rng.permutation(len(ids))
    u = rng.integers(0, 4, size=len(ids)) / 3  # ties on purpose
    return ids[perm], u[perm]


def brute_pairs(ids, u, strategy):
    out = set()
    for p in dict.fromkeys(ids):
        idx = [i for i in range(len(ids)) if ids[i] == p]
        if strategy == "all":
            cand = itertools.combinations(idx, 2)
        else:
            best = max(idx, key=lambda i: (u[i], -i))
            if strategy == "best_vs_rest":
                cand = [(best, j) for j in idx if j != best]
            else:
                worst = min(idx, key=lambda i: (u[i], i))
                cand = [(best, worst)] if best != worst else []
        for a, b in cand:
            if u[a] != u[b]:
                out.add((a, b) if u[a] > u[b] else (b, a))
    return out


@pytest.mark.parametrize("strategy", ["all", "best_vs_rest", "best_vs_worst"])
@pytest.mark.parametrize("seed", range(3))
def test_pairs_match_enumeration(strategy, seed):
    ids, u = rows(seed)
    pairs = make_pairs(ids, u, EXP, 2.0, strategy=strategy)
    got = set(zip(pairs.chosen.tolist(), pairs.rejected.tolist()))
    assert got == brute_pairs(ids, u, strategy)
    assert len(got) == len(pairs)  # no duplicates
    np.testing.assert_allclose(pairs.target_margin, EXP.phi(u[pairs.chosen]) - EXP.phi(u[pairs.rejected]))
    np.testing.assert_allclose(pairs.label, 1 / (1 + np.exp(-pairs.target_margin)))
    assert np.all(pairs.target_margin > 0) and np.all(ids[pairs.chosen] == ids[pairs.rejected])


def test_ties_kept_on_request():
    ids, u = np.array(["a", "a", "a"]), np.array([0.5, 0.5, 1.0])
    pairs = make_pairs(ids, u, "identity", 1.0, drop_ties=False)
    assert len(pairs) == 3 and sorted(pairs.label.round(6).tolist())[0] == 0.5


def test_sampled_pairs_are_a_reproducible_subset():
    ids, u = rows(4, prompts=30)
    everything = set(zip(*map(list, (make_pairs(ids, u, EXP, 1.0).chosen, make_pairs(ids, u, EXP, 1.0).rejected))))
    a = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=2, seed=7)
    b = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=2, seed=7)
    np.testing.assert_array_equal(a.chosen, b.chosen)
    assert set(zip(a.chosen.tolist(), a.rejected.tolist())) <= everything
    per_prompt = {p: 0 for p in ids}
    available = {p: 0 for p in ids}
    for c, r in everything:
        available[ids[c]] += 1
    for c in a.chosen:
        per_prompt[ids[c]] += 1
    assert all(per_prompt[p] == min(2, available[p]) for p in per_prompt)


def test_pointwise_targets_both_normalisers():
    ids, u = rows(5)
    beta = 1.5
    cont = pointwise_targets(ids, u, EXP, beta, log_partition="continuous")
    np.testing.assert_allclose(cont, EXP.phi(u) - beta * float(EXP.log_partition(beta)))
    emp = pointwise_targets(ids, u, EXP, beta)
    for p in set(ids):
        sel = ids == p
        # Self-normalised: the mean of exp(target/β) over the prompt's rows is exactly 1.
        assert np.mean(np.exp(emp[sel] / beta)) == pytest.approx(1.0)
        expected = EXP.phi(u[sel]) - beta * np.log(np.mean(np.exp(EXP.phi(u[sel]) / beta)))
        np.testing.assert_allclose(emp[sel], expected)


def test_sft_weights():
    ids, u = rows(6)
    w = sft_weights(ids, u, EXP, 0.7)
    for p in set(ids):
        sel = ids == p
        assert w[sel].mean() == pytest.approx(1.0)
        ratio = w[sel] / np.exp(EXP.phi(u[sel]) / 0.7)
        np.testing.assert_allclose(ratio, ratio[0])


def test_log_partition_gap():
    beta = 0.5
    direct = np.log(np.mean(np.exp(EXP.phi(np.arange(4) / 3) / beta))) - float(EXP.log_partition(beta))
    assert log_partition_gap(EXP, beta, 4) == pytest.approx(direct)
    gaps = [abs(log_partition_gap(EXP, 2.0, k)) for k in (4, 16, 256, 4096)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01
    # The grid j/(K−1) includes both ends, so the gap shrinks like 1/K.
    assert gaps[-1] * 4096 == pytest.approx(gaps[-2] * 256, rel=0.1)


def test_vectorised_at_scale():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(100_000), 8)
    u = rng.integers(0, 8, size=len(ids)) / 7
    start = time.perf_counter()
    pairs = make_pairs(ids, u, EXP, 1.0, drop_ties=False)
    assert len(pairs) == 100_000 * 28
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: make_pairs(["a", "a"], [0.2, 1.5], "identity", 1.0), r"outside \[0, 1\]: rows \[1\]"),
        (lambda: make_pairs(["a", "a"], [0.2, np.nan], "identity", 1.0), "NaN"),
        (lambda: make_pairs(["a"], [0.2, 0.3], "identity", 1.0), "one length"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 0.0), "beta"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="x"), "unknown pair strategy"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="sampled"), "pairs_per_prompt"),
        (lambda: pointwise_targets(["a"], [0.2], "identity", 1.0, log_partition="x"), "log_partition"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(SynthesisError, match=message):
        call()
