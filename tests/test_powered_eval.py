"""The powered evaluation: U-statistic win rates over every N-subset, paired comparisons, the eval stage's
reference pool and a null run (ctrl_offline.evaluation, ctrl_offline.stages.evaluate/compare)."""

import itertools
import json
import math

import numpy as np
import pytest

from ctrl_offline.evaluation import (
    bootstrap_mean,
    paired_bootstrap_difference,
    subset_selection_weights,
    u_statistic_per_prompt,
    u_statistic_win_rate,
)
from ctrl_offline.selection import select

SETTINGS = {"lam": 0.3, "beta": 0.5, "kappa0": 0.1}


def brute_force(policy, reference, n, selector, policy_logps=None, reference_logps=None):
    """Mean over every pair (policy N-subset, reference N-subset) of the exact one-duel win probability."""
    out = []
    for b in range(len(policy)):
        pi = [i for i in range(policy.shape[1]) if not np.isnan(policy[b, i])]
        ri = [j for j in range(reference.shape[1]) if not np.isnan(reference[b, j])]
        if len(pi) < n or len(ri) < n:
            out.append(np.nan)
            continue
        def picks(values, logps, subset):
            extra = {} if logps is None else {"ref_logps": logps[b, list(subset)][None]}
            return values[b, list(subset)], select(values[b, list(subset)][None], selector, **SETTINGS, **extra).probs[0]

        refs = [picks(reference, reference_logps, c) for c in itertools.combinations(ri, n)]
        duels = []
        for a in itertools.combinations(pi, n):
            r, p = picks(policy, policy_logps, a)
            for s, q in refs:
                w = (r[:, None] > s[None, :]) + 0.5 * (r[:, None] == s[None, :])
                duels.append(p @ w @ q)
        out.append(np.mean(duels))
    return np.array(out)


def cases(seed, ties):
    rng = np.random.default_rng(seed)
    m, big_m = 5, 6
    if ties:
        policy = rng.integers(0, 4, size=(6, m)).astype(float)
        reference = rng.integers(0, 4, size=(6, big_m)).astype(float)
    else:
        policy = rng.normal(size=(6, m)) + 0.3
        reference = rng.normal(size=(6, big_m))
    return policy, reference, rng.normal(size=(6, m)), rng.normal(size=(6, big_m))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("selector", ["bon", "won", "rbon", "soft_bon", "itp"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_brute_force_over_every_subset(selector, n, ties):
    policy, reference, lp, lr = cases(10 * n + ties, ties)
    logps = {"policy_ref_logps": lp, "reference_ref_logps": lr} if selector == "rbon" else {}
    got, methods = u_statistic_per_prompt(policy, reference, n, selector, **logps, **SETTINGS, return_methods=True)
    want = brute_force(policy, reference, n, selector, lp if logps else None, lr if logps else None)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    expected = "closed_form" if n == 1 or selector in ("bon", "won", "rbon") else "all_subsets"
    assert methods == (expected, expected)


def test_best_of_n_weights_are_the_order_statistic_formula():
    # Ascending order statistics: the i-th smallest of m is the max of a random N-subset w.p. C(i−1, N−1)/C(m, N).
    r = np.array([[3.0, 1.0, 4.0, 1.5, 9.0, 2.6]])
    order = np.argsort(r[0])
    for n in (1, 2, 3, 6):
        bon, method = subset_selection_weights(r, n, "bon")
        won, _ = subset_selection_weights(r, n, "won")
        assert method == "closed_form"
        want_bon = [math.comb(i - 1, n - 1) / math.comb(6, n) for i in range(1, 7)]
        want_won = [math.comb(6 - i, n - 1) / math.comb(6, n) for i in range(1, 7)]
        np.testing.assert_allclose(bon[0, order], want_bon, atol=1e-15)
        np.testing.assert_allclose(won[0, order], want_won, atol=1e-15)
        assert bon.sum() == pytest.approx(1.0) and won.sum() == pytest.approx(1.0)


def test_ragged_rows_and_too_few_candidates():
    rng = np.random.default_rng(3)
    policy = rng.integers(0, 3, size=(4, 5)).astype(float)
    reference = rng.integers(0, 3, size=(4, 5)).astype(float)
    policy[0, [1, 3]] = np.nan  # 3 left
    reference[1, 0] = np.nan  # 4 left
    policy[2, :4] = np.nan  # 1 left: too few for N = 2
    for selector in ("bon", "won", "soft_bon"):
        got = u_statistic_per_prompt(policy, reference, 2, selector, **SETTINGS)
        want = brute_force(policy, reference, 2, selector)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert np.isnan(got[2]) and np.isfinite(got[[0, 1, 3]]).all()
    out = u_statistic_win_rate(policy, reference, 2, "bon", num_boot=50)
    assert out["prompts_without_candidates"] == 1 and out["num_prompts"] == 3 and out["excluded_candidates"] == 7
    assert (out["policy_samples"], out["reference_samples"], out["method"]) == (5, 5, "closed_form")


def test_random_subsets_above_the_cap_are_close_and_seeded():
    rng = np.random.default_rng(5)
    policy, reference = rng.normal(size=(3, 9)), rng.normal(size=(3, 9))
    exact, methods = u_statistic_per_prompt(policy, reference, 4, "soft_bon", lam=0.3, return_methods=True)
    assert methods == ("all_subsets", "all_subsets")  # C(9, 4) = 126
    approx, methods = u_statistic_per_prompt(policy, reference, 4, "soft_bon", lam=0.3, max_subsets=100, rng=1,
                                             return_methods=True)
    assert methods == ("random_subsets", "random_subsets")
    np.testing.assert_allclose(approx, exact, atol=0.03)
    again = u_statistic_per_prompt(policy, reference, 4, "soft_bon", lam=0.3, max_subsets=100, rng=1)
    np.testing.assert_array_equal(approx, again)
    assert u_statistic_win_rate(policy, reference, 4, "soft_bon", lam=0.3, max_subsets=100,
                                num_boot=20)["method"] == "random_subsets"


@pytest.mark.parametrize(("selector", "prompts"), [("bon", 3000), ("won", 3000), ("soft_bon", 3000), ("bot", 300)])
def test_policy_equal_to_reference_averages_one_half(selector, prompts):
    m, big_m, n = 6, 8, 3
    rng = np.random.default_rng(11)
    policy = rng.normal(size=(prompts, m))
    reference = rng.normal(size=(prompts, big_m))
    v = u_statistic_per_prompt(policy, reference, n, selector, lam=0.3)
    se = v.std(ddof=1) / math.sqrt(prompts)
    assert abs(v.mean() - 0.5) < 3 * se, (v.mean(), se)


@pytest.mark.parametrize("selector", ["bon", "won", "soft_bon", "itp", "bot"])
def test_the_same_multiset_on_both_sides_is_exactly_one_half(selector):
    rng = np.random.default_rng(2)
    reference = rng.integers(0, 4, size=(20, 6)).astype(float)  # ties
    policy = rng.permuted(reference, axis=1)  # the same samples per prompt, in another order
    for n in (1, 2, 4, 6):
        got = u_statistic_per_prompt(policy, reference, n, selector, **SETTINGS)
        np.testing.assert_allclose(got, 0.5, rtol=0, atol=1e-12)


def test_lower_variance_than_one_duel_per_prompt():
    # The U-statistic over m = M = 8 samples against a single best-of-4 duel on the first 4 of each side.
    prompts = 4000
    rng = np.random.default_rng(4)
    policy, reference = rng.normal(size=(prompts, 8)) + 0.2, rng.normal(size=(prompts, 8))
    u = u_statistic_per_prompt(policy, reference, 4, "bon")
    duel = u_statistic_per_prompt(policy[:, :4], reference[:, :4], 4, "bon")
    assert abs(u.mean() - duel.mean()) < 3 * duel.std() / math.sqrt(prompts)
    assert u.var() < 0.5 * duel.var()


def test_refusals():
    r = np.zeros((2, 3))
    with pytest.raises(ValueError, match="larger than the candidates available"):
        u_statistic_per_prompt(r, r, 4)
    with pytest.raises(ValueError, match="unknown selector"):
        u_statistic_per_prompt(r, r, 2, "nope")
    with pytest.raises(ValueError, match="reference log-probs"):
        u_statistic_per_prompt(r, r, 2, "rbon")
    with pytest.raises(ValueError, match="same prompts"):
        u_statistic_per_prompt(r, np.zeros((3, 3)), 2)
    with pytest.raises(ValueError, match="finite"):
        u_statistic_per_prompt(np.full((2, 3), np.inf), r, 2)
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap_difference(np.zeros(3), np.zeros(4))


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=200)
    a, b = base + 0.02, base + rng.normal(scale=0.01, size=200)
    est = paired_bootstrap_difference(a, b, num_boot=500)
    assert est.num_prompts == 200 and est.ci_low < 0.02 < est.ci_high
    assert est.ci_low > 0  # pairing removes the shared prompt effect
    unpaired = bootstrap_mean(a, num_boot=500)
    assert est.ci_high - est.ci_low < 0.2 * (unpaired.ci_high - unpaired.ci_low)
    a[3] = np.nan
    assert paired_bootstrap_difference(a, b, num_boot=50).num_prompts == 199
