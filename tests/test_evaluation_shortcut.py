"""The calibrated-reward shortcut (ctrl_offline.maths.win_rates): unbiased best-/worst-of-N from stored reference rewards."""

import itertools
import math

import numpy as np
import pytest

from ctrl_offline.maths.calibration import CalibrationTables
from ctrl_offline.maths.win_rates import calibrated_shortcut, calibrated_shortcut_per_prompt, u_statistic_per_prompt


def tables_of(ref: np.ndarray) -> tuple[CalibrationTables, np.ndarray]:
    ids = np.arange(len(ref))
    return CalibrationTables.from_lists(ids, list(ref)), ids


def brute_force(policy: np.ndarray, ref: np.ndarray, n: int) -> dict:
    """Average over all C(K, N) subsets of the stored rewards as the reference's N candidates."""
    out = {"standard": [], "bon": [], "won": []}
    for r, s in zip(policy, ref):
        r = r[:n]
        standard = np.mean([(x > s).mean() + 0.5 * (x == s).mean() for x in r])
        bon, won = [], []
        for subset in itertools.combinations(s, n):
            best, worst = max(subset), min(subset)
            bon.append((r.max() > best) + 0.5 * (r.max() == best))
            # Worst-of-N: the policy wins when its worst beats (is above) the reference subset's worst.
            won.append((r.min() > worst) + 0.5 * (r.min() == worst))
        out["standard"].append(standard)
        out["bon"].append(np.mean(bon))
        out["won"].append(np.mean(won))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_policy_equal_to_its_reference_scores_one_half(k, n):
    prompts = 20_000
    rng = np.random.default_rng(100 * k + n)
    ref = rng.normal(size=(prompts, k))
    policy = rng.normal(size=(prompts, n))  # the same continuous distribution: the policy is its reference
    tables, ids = tables_of(ref)
    values = calibrated_shortcut_per_prompt(policy, n, tables=tables, prompt_ids=ids)
    for name in ("standard", "bon", "won"):
        v = values[name]
        se = v.std(ddof=1) / math.sqrt(prompts)
        assert abs(v.mean() - 0.5) < 3 * se, (name, v.mean(), se)
    if n > 1:
        # The former estimate max(u)^N (u = Ĉ of each policy candidate) is biased upwards: 0.600 at K = N = 4.
        u = (ref[:, None, :] < policy[:, :, None]).mean(axis=2)
        biased = u.max(axis=1) ** n
        se = biased.std(ddof=1) / math.sqrt(prompts)
        assert biased.mean() - 0.5 > 8 * se
        if (k, n) == (4, 4):
            assert biased.mean() == pytest.approx(0.6, abs=0.01)
            # Exactly E[(b/4)^4]: the policy's best is at rank j + 4 of the 8 draws (b = j reference rewards
            # below it) with probability C(j + 3, 3) / C(8, 4).
            exact = sum(math.comb(j + 3, 3) * (j / 4) ** 4 for j in range(5)) / math.comb(8, 4)
            assert exact == pytest.approx(0.5996, abs=1e-4)


def test_ties_match_enumeration_of_every_subset():
    # Integer rewards with heavy ties, inside the tables and between policy and reference.
    ref = np.array([[1, 1, 2, 2, 2, 3], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 5], [2, 2, 3, 3, 4, 4]], dtype=float)
    policy = np.array([[2, 1, 2, 0], [0, 0, 0, 0], [5, 1, 5, 3], [3, 3, 2, 5]], dtype=float)
    tables, ids = tables_of(ref)
    for n in (1, 2, 3, 4):
        got = calibrated_shortcut_per_prompt(policy, n, tables=tables, prompt_ids=ids)
        want = brute_force(policy, ref, n)
        for name in ("standard", "bon", "won"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-12, err_msg=f"{name} N={n}")
    # All tied: exactly one half for every procedure.
    got = calibrated_shortcut_per_prompt(policy[1:2], 4, tables=tables, prompt_ids=ids[1:2])
    assert got["bon"][0] == got["won"][0] == got["standard"][0] == 0.5


def test_matches_enumeration_on_a_random_case():
    rng = np.random.default_rng(7)
    k = 7
    ref = rng.integers(0, 5, size=(30, k)).astype(float) + rng.choice([0.0, 0.5], size=(30, k))
    policy = rng.integers(0, 6, size=(30, 5)).astype(float)
    tables, ids = tables_of(ref)
    for n in range(1, 6):
        got = calibrated_shortcut_per_prompt(policy, n, tables=tables, prompt_ids=ids)
        want = brute_force(policy, ref, n)
        for name in ("standard", "bon", "won"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-12, err_msg=f"{name} N={n}")


def test_tables_of_different_sizes_and_string_ids():
    ids = np.array(["a", "b"])
    tables = CalibrationTables.from_lists(["b", "a"], [[3.0, 1.0, 2.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
    policy = np.array([[2.5, 0.5], [2.5, 0.5]])
    got = calibrated_shortcut_per_prompt(policy, 2, tables=tables, prompt_ids=ids)
    want_a = brute_force(policy[:1], np.array([[1.0, 2.0, 3.0]]), 2)
    want_b = brute_force(policy[1:], np.array([[0.0, 1.0, 2.0, 3.0, 5.0]]), 2)
    for name in ("standard", "bon", "won"):
        np.testing.assert_allclose(got[name], [want_a[name][0], want_b[name][0]], atol=1e-12)


def test_report_keys_and_refusals():
    rng = np.random.default_rng(0)
    tables, ids = tables_of(rng.normal(size=(10, 4)))
    policy = rng.normal(size=(10, 6))
    out = calibrated_shortcut(policy, 2, tables=tables, prompt_ids=ids, num_boot=50)
    assert set(out) == {"n", "standard", "bon", "won"} and out["n"] == 2
    for name in ("standard", "bon", "won"):
        assert set(out[name]) == {"value", "ci_low", "ci_high", "num_prompts"}
        assert 0 <= out[name]["ci_low"] <= out[name]["value"] <= out[name]["ci_high"] <= 1
    with pytest.raises(ValueError, match=r"N = 5 is larger than K.*smallest K = 4.*fewer stored samples than N"):
        calibrated_shortcut(policy, 5, tables=tables, prompt_ids=ids)
    with pytest.raises(ValueError, match=r"N = 7 is larger than the candidates available \(6\)"):
        calibrated_shortcut(policy, 7, tables=tables, prompt_ids=ids)
    with pytest.raises(ValueError, match="one table per row"):
        calibrated_shortcut(policy, 2, tables=tables, prompt_ids=ids[:3])



@pytest.mark.parametrize("n", [2, 4])
def test_a_policy_shifted_up_wins_worst_of_n_like_the_u_statistic(n):
    # A policy shifted +0.5 above its reference has a better worst of N, so won must read above ½. With the
    # policy's N candidates and the reference's K stored rewards, the U-statistic (M = K: every N-subset of
    # the K as the reference's N) is the very quantity the shortcut computes: they agree prompt by prompt.
    prompts, k = 4000, 8
    rng = np.random.default_rng(11 + n)
    ref = rng.normal(size=(prompts, k))
    policy = rng.normal(size=(prompts, n)) + 0.5
    tables, ids = tables_of(ref)
    shortcut = calibrated_shortcut_per_prompt(policy, n, tables=tables, prompt_ids=ids)
    for selector in ("bon", "won"):
        u = u_statistic_per_prompt(policy, ref, n, selector)
        assert shortcut[selector].mean() > 0.55, (selector, shortcut[selector].mean())
        np.testing.assert_allclose(shortcut[selector], u, rtol=0, atol=1e-12, err_msg=selector)
    # And the mean is the exact worst-of-N win probability P(policy's worst > reference's worst) of two
    # normals 0.5 apart, ∫ f_{policy worst}(x)·(1 − (1 − Φ(x))^N) dx, by a Riemann sum on a fine grid.
    from scipy.stats import norm

    x, dx = np.linspace(-9.0, 9.0, 36001, retstep=True)
    pdf_policy_worst = n * norm.pdf(x - 0.5) * norm.sf(x - 0.5) ** (n - 1)
    exact = float(np.sum(pdf_policy_worst * (1.0 - norm.sf(x) ** n)) * dx)
    assert exact > 0.6
    se = shortcut["won"].std(ddof=1) / math.sqrt(prompts)
    assert abs(shortcut["won"].mean() - exact) < 4 * se, (shortcut["won"].mean(), exact, se)
