import math

import numpy as np
import pytest

from ctrl_offline.maths.theory import (
    bon_win_rate,
    kl_divergence,
    monte_carlo_win_rate,
    sample_tilted,
    tilted_density,
    tilted_standard_win_rate,
    won_win_rate,
)
from ctrl_offline.maths.procedures import drawn_pick, tilted_win_rate
from ctrl_offline.maths.transforms import get_transform


@pytest.mark.parametrize("n", [2, 3, 4, 8, 32, 128])
def test_log_transform_at_beta_one_over_n_minus_one_is_best_of_n(n):
    beta = 1.0 / (n - 1)
    u = np.linspace(0.01, 1.0, 50)
    # The best-of-N policy puts density N u^{N−1} on the calibrated reward.
    np.testing.assert_allclose(tilted_density("log", beta, u), n * u ** (n - 1), rtol=1e-12)
    # Published identities (Beirami et al. 2024): KL = log N − (N−1)/N, win rate N/(N+1).
    assert kl_divergence("log", beta) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    assert tilted_standard_win_rate("log", beta) == pytest.approx(n / (n + 1), abs=1e-12)


def test_win_rates_against_exact_integrals():
    # Identity at β: F(u) = expm1(u/β)/expm1(1/β); check BoN/WoN with an independent quadrature.
    from scipy import integrate

    beta, n = 0.2, 4
    cdf = lambda u: math.expm1(u / beta) / math.expm1(1 / beta)  # noqa: E731
    bon = 1 - integrate.quad(lambda u: n * u ** (n - 1) * cdf(u) ** n, 0, 1, epsabs=1e-13)[0]
    won = integrate.quad(lambda u: n * (1 - u) ** (n - 1) * (1 - cdf(u)) ** n, 0, 1, epsabs=1e-13)[0]
    assert bon_win_rate("identity", beta, n) == pytest.approx(bon, abs=1e-11)
    assert won_win_rate("identity", beta, n) == pytest.approx(won, abs=1e-11)
    # N = 1 is the standard win rate for either procedure.
    assert bon_win_rate("identity", beta, 1) == pytest.approx(tilted_standard_win_rate("identity", beta), abs=1e-12)
    assert won_win_rate("identity", beta, 1) == pytest.approx(tilted_standard_win_rate("identity", beta), abs=1e-12)


@pytest.mark.parametrize("name,t", [("identity", None), ("log", None), ("exp", 3.0), ("exp", 20.0), ("negexp", 5.0)])
def test_half_at_large_beta_and_kl_vanishes(name, t):
    transform = get_transform(name, t)
    beta = 1e7 if name != "exp" else 1e7 * math.exp(t)
    assert kl_divergence(transform, beta) < 1e-9
    for n in (1, 4, 16):
        assert bon_win_rate(transform, beta, n) == pytest.approx(0.5, abs=1e-5)
        assert won_win_rate(transform, beta, n) == pytest.approx(0.5, abs=1e-5)


@pytest.mark.parametrize("name,t", [("identity", None), ("log", None), ("exp", 6.0), ("negexp", 6.0)])
def test_kl_decreases_and_win_rates_increase_as_beta_shrinks(name, t):
    transform = get_transform(name, t)
    scale = 1.0 if name != "exp" else math.exp(t)
    betas = scale * np.geomspace(10.0, 0.01, 12)
    kls = [kl_divergence(transform, b) for b in betas]
    bons = [bon_win_rate(transform, b, 4) for b in betas]
    assert np.all(np.diff(kls) > 0)
    assert np.all(np.diff(bons) > 0)
    # KL = E_f[Φ]/β − log Z, the design notes' second form.
    from ctrl_offline.maths._quadrature import nodes_and_weights

    nodes, weights = nodes_and_weights()
    b = betas[6]
    f = tilted_density(transform, b, nodes)
    expected = np.sum(weights * f * transform(nodes)) / b - float(transform.log_partition(b))
    assert kl_divergence(transform, b) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize(
    "name,t,beta",
    [("identity", None, 0.3), ("log", None, 0.5), ("exp", 4.0, 20.0), ("negexp", 8.0, 0.05), ("exp", 10.0, 2000.0)],
)
def test_closed_form_win_rates_match_monte_carlo(name, t, beta):
    transform = get_transform(name, t)
    for n in (2, 4):
        bon = monte_carlo_win_rate(transform, beta, drawn_pick("bon", rng=n), n, trials=60_000, rng=n)
        won = monte_carlo_win_rate(transform, beta, drawn_pick("won", rng=n + 10), n, trials=60_000, rng=n + 10)
        assert abs(bon.win_rate - bon_win_rate(transform, beta, n)) < 4 * bon.stderr + 1e-4
        assert abs(won.win_rate - won_win_rate(transform, beta, n)) < 4 * won.stderr + 1e-4


def test_monte_carlo_handles_any_rule():
    # "Second best of 3" has no closed form here; check it against direct simulation of u.
    def second_best(u):
        return np.argsort(u, axis=1)[:, -2]

    est = monte_carlo_win_rate("identity", 0.25, second_best, 3, trials=80_000, rng=1)
    rng = np.random.default_rng(2)
    pol = np.sort(sample_tilted("identity", 0.25, (80_000, 3), rng), axis=1)[:, -2]
    ref = np.sort(rng.random((80_000, 3)), axis=1)[:, -2]
    assert abs(est.win_rate - np.mean(pol > ref)) < 5 * est.stderr
    assert est.win_rate > 0.5


def test_samples_follow_the_tilted_cdf():
    from scipy import stats

    transform = get_transform("exp", 5.0)
    beta = 30.0
    draws = sample_tilted(transform, beta, 20_000, rng=0)
    cdf = lambda x: np.exp(transform.log_cdf(np.clip(x, 0, 1), beta))  # noqa: E731
    assert stats.kstest(draws, cdf).pvalue > 1e-3


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive integer"):
        bon_win_rate("identity", 1.0, 0)
    with pytest.raises(ValueError, match="unknown inference procedure"):
        tilted_win_rate("identity", 1.0, "nope", 4)
    with pytest.raises(ValueError, match="'bot' has no closed-form win rate"):
        tilted_win_rate("identity", 1.0, "bot", 4)
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        kl_divergence("identity", -1.0)
