import numpy as np
import pytest
from scipy import optimize

from ctrl_offline.maths.selection import (
    best_of_n,
    best_of_tails,
    choose,
    hill_estimate,
    itp,
    regularized_best_of_n,
    soft_best_of_n,
    tsallis_selection,
    worst_of_n,
)
from ctrl_offline.maths.procedures import select


@pytest.fixture
def rewards():
    return np.random.default_rng(0).normal(size=(6, 10))


def test_argmax_selectors(rewards):
    np.testing.assert_array_equal(choose(best_of_n(rewards)), rewards.argmax(axis=1))
    np.testing.assert_array_equal(choose(worst_of_n(rewards)), rewards.argmin(axis=1))
    ref = np.random.default_rng(1).normal(size=rewards.shape)
    np.testing.assert_array_equal(choose(regularized_best_of_n(rewards, ref, 0.7)), (rewards + 0.7 * ref).argmax(1))


def test_soft_best_of_n_is_a_softmax(rewards):
    p = soft_best_of_n(rewards, 0.3)
    expected = np.exp(rewards / 0.3) / np.exp(rewards / 0.3).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-12)


def test_tsallis_limits(rewards):
    # α → 1: soft best-of-N with temperature λ
    np.testing.assert_allclose(tsallis_selection(rewards, 1 + 1e-7, 0.5), soft_best_of_n(rewards, 0.5), atol=1e-6)
    np.testing.assert_allclose(tsallis_selection(rewards, 1.0, 0.5), soft_best_of_n(rewards, 0.5))
    # α = 2: ITP with β = 2λ
    np.testing.assert_allclose(tsallis_selection(rewards, 2.0, 0.3), itp(rewards, 0.6), atol=1e-12)
    # λ → 0: best-of-N
    for alpha in (1.2, 1.5, 2.0):
        np.testing.assert_allclose(tsallis_selection(rewards, alpha, 1e-7), best_of_n(rewards), atol=1e-9)


@pytest.mark.parametrize("alpha,lam", [(1.3, 0.2), (1.5, 0.4), (1.9, 1.0), (2.0, 0.1)])
def test_tsallis_matches_a_generic_constrained_optimiser(alpha, lam):
    x = np.random.default_rng(int(alpha * 10)).normal(size=7)
    n = len(x)

    def negative_objective(p):  # −(Σ p r − λ·D_α(p ‖ uniform))
        return -(p @ x - lam * (np.sum((n * np.maximum(p, 0)) ** alpha) / n - 1) / (alpha - 1))

    res = optimize.minimize(negative_objective, np.ones(n) / n, method="SLSQP", bounds=[(0, 1)] * n,
                            constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}],
                            options={"ftol": 1e-15, "maxiter": 2000})
    np.testing.assert_allclose(tsallis_selection(x, alpha, lam)[0], res.x, atol=1e-6)


def test_itp_weights_are_a_shifted_relu(rewards):
    p = itp(rewards, 0.5)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    for row, probs in zip(rewards, p):
        support = probs > 0
        # On the support, N·p = (r − η)/β with one η: the slope in r is 1/(Nβ).
        slopes = np.diff(probs[support]) / np.diff(row[support])
        np.testing.assert_allclose(slopes, 1 / (len(row) * 0.5))
        assert row[support].min() > row[~support].max(initial=-np.inf)


def test_hill_estimate_orders_tails():
    rng = np.random.default_rng(3)
    light = rng.uniform(size=(400, 64))
    heavy = rng.pareto(1.5, size=(400, 64))  # a few huge rewards per prompt
    assert hill_estimate(heavy).mean() > hill_estimate(light).mean()
    assert hill_estimate(heavy, statistic="mean_excess").mean() > hill_estimate(light, statistic="mean_excess").mean()
    # Invariant to per-prompt affine maps (rewards are normalised first).
    np.testing.assert_allclose(hill_estimate(3 * light + 7), hill_estimate(light), rtol=1e-9)
    # A hand-computed case: N = 4, k = 2, normalised rewards 1, 0.5, 0.25, 0
    x = np.array([[0.0, 0.25, 0.5, 1.0]])
    expected = (np.log(2 / 1.25) + np.log(1.5 / 1.25)) / 2
    assert hill_estimate(x)[0] == pytest.approx(expected)


def test_best_of_tails_is_more_cautious_on_heavy_tails():
    rng = np.random.default_rng(4)
    light = rng.uniform(size=(200, 16))
    heavy = rng.pareto(1.0, size=(200, 16))
    p_light, a_light = best_of_tails(light, lam=0.05)
    p_heavy, a_heavy = best_of_tails(heavy, lam=0.05)
    assert np.all((1 <= a_light) & (a_light < 2)) and np.all((1 <= a_heavy) & (a_heavy < 2))
    assert a_heavy.mean() > a_light.mean()
    np.testing.assert_allclose(p_light.sum(axis=1), 1.0)
    np.testing.assert_allclose(p_heavy.sum(axis=1), 1.0)


def test_nan_candidates_are_excluded_and_counted(rewards):
    r = rewards.copy()
    r[0, :4] = np.nan
    r[1, :] = np.nan
    for method in ("bon", "won", "soft_bon", "itp", "tsallis", "bot"):
        s = select(r, method)
        assert s.num_excluded == 14
        assert np.all(s.probs[0, :4] == 0) and s.probs[0].sum() == pytest.approx(1.0)
        assert s.index[1] == -1 and s.probs[1].sum() == 0
        assert s.index[0] >= 4


def test_sampling_follows_the_distribution():
    p = np.tile([0.2, 0.5, 0.3], (20000, 1))
    counts = np.bincount(choose(p, sample=True, rng=0), minlength=3) / 20000
    np.testing.assert_allclose(counts, [0.2, 0.5, 0.3], atol=0.015)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda r: soft_best_of_n(r, 0.0), "lambda must be"),
        (lambda r: itp(r, -1.0), "beta must be"),
        (lambda r: best_of_tails(r, 0.1, kappa0=0.0), "kappa0 must be"),
        (lambda r: tsallis_selection(r, 2.5, 0.1), r"alpha must lie in \[1, 2\]"),
        (lambda r: select(r, "rbon"), "reference log-probs"),
        (lambda r: select(r, "nope"), "unknown inference procedure 'nope'; choose one of bon, won"),
        (lambda r: select(r, "bon", lamb=0.1), r"unknown selector setting\(s\) \['lamb'\]"),
    ],
)
def test_bad_arguments(rewards, call, message):
    with pytest.raises(ValueError, match=message):
        call(rewards)
