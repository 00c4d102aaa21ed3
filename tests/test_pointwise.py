"""Pointwise targets and SFT weights (ctrl_offline.rows.pointwise) against loops and closed forms; the
log-partition gap (ctrl_offline.maths.finite_k.log_partition_gap) that separates their normalisers."""

import math

import numpy as np
import pytest
from calibrated_rows_data import EXP, NEGEXP, rows

from ctrl_offline.maths.transforms import SynthesisError
from ctrl_offline.maths.calibration import calibrate_reference
from ctrl_offline.maths.finite_k import log_partition_gap
from ctrl_offline.rows.pointwise import pointwise_targets, sft_weights
from ctrl_offline.maths.transforms import get_transform


# -- pointwise targets ------------------------------------------------------------------------------
@pytest.mark.parametrize("transform,beta", [(EXP, 1.5), (NEGEXP, 0.05), (get_transform("identity"), 0.2)])
def test_pointwise_targets_both_normalisers(transform, beta):
    ids, u = rows(5)
    continuous = pointwise_targets(ids, u, transform, beta, log_partition="continuous")
    np.testing.assert_allclose(continuous, transform.phi(u) - beta * float(transform.log_partition(beta)), rtol=1e-14)
    empirical = pointwise_targets(ids, u, transform, beta, log_partition="empirical")
    for p in set(ids.tolist()):
        sel = ids == p
        phi = transform.phi(u[sel])
        expected = phi - beta * np.log(np.mean(np.exp(phi / beta)))
        np.testing.assert_allclose(empirical[sel], expected, rtol=1e-12, atol=1e-12)
        # Self-normalised: the mean over the prompt's rows of exp(target/β) is exactly 1.
        assert np.mean(np.exp(empirical[sel] / beta)) == pytest.approx(1.0, rel=1e-13)


def test_pointwise_targets_do_not_overflow_for_sharp_tilts():
    ids, u = rows(6)
    transform, beta = get_transform("exp", 40.0), 1e-3  # Φ/β up to 2e20
    for kind in ("empirical", "continuous"):
        assert np.all(np.isfinite(pointwise_targets(ids, u, transform, beta, log_partition=kind)))
    empirical = pointwise_targets(ids, u, transform, beta, log_partition="empirical")
    for p in set(ids.tolist()):
        assert np.mean(np.exp(empirical[ids == p] / beta)) == pytest.approx(1.0, rel=1e-12)


def test_empirical_minus_continuous_is_the_log_partition_gap_on_calibrated_reference_samples():
    # Tie-free reference rewards, K = 8: calibrate_reference puts every prompt on the grid j/7.
    rng = np.random.default_rng(2)
    k, beta = 8, 0.25
    ids = np.repeat([f"q{i}" for i in range(50)], k)
    _, u = calibrate_reference(ids, rng.normal(size=len(ids)))
    np.testing.assert_allclose(np.sort(u.reshape(50, k), axis=1), np.tile(np.arange(k) / (k - 1), (50, 1)))
    for transform in (EXP, NEGEXP, get_transform("identity")):
        shift = pointwise_targets(ids, u, transform, beta, log_partition="continuous") - pointwise_targets(
            ids, u, transform, beta, log_partition="empirical"
        )
        np.testing.assert_allclose(shift, beta * log_partition_gap(transform, beta, k), rtol=1e-9, atol=1e-12)


def test_population_normaliser_normalises_the_bernstein_mean_of_the_targets():
    # The default normaliser: with targets T_j = Φ(j/(K−1)) − β·L, the fit a generalising policy makes is
    # E[T | c] = Σ_j T_j·Binom(j; K−1, c); L is chosen so that ∫ exp(E[T | c]/β) dc = 1 exactly.
    from scipy import integrate, stats

    rng = np.random.default_rng(3)
    k, beta = 6, 0.3
    ids = np.repeat([f"q{i}" for i in range(4)], k)
    _, u = calibrate_reference(ids, rng.normal(size=len(ids)))
    for transform in (EXP, NEGEXP, get_transform("identity")):
        target = pointwise_targets(ids, u, transform, beta)
        by_rank = np.empty(k)
        by_rank[np.rint(u[:k] * (k - 1)).astype(int)] = target[:k]
        mean = lambda c: stats.binom.pmf(np.arange(k), k - 1, c) @ by_rank  # noqa: E731
        mass, _ = integrate.quad(lambda c: math.exp(mean(c) / beta), 0, 1, epsabs=1e-12, epsrel=1e-12)
        assert mass == pytest.approx(1.0, rel=1e-9)


def test_cell_targets_are_the_tilts_mass_per_cell_and_finite_for_log():
    rng = np.random.default_rng(4)
    k, beta = 5, 0.5
    ids = np.repeat(["a", "b"], k)
    _, u = calibrate_reference(ids, rng.normal(size=len(ids)))
    log = get_transform("log")
    weights = sft_weights(ids, u, log, beta, targets="cell")
    # log at β: e^{Φ/β} = u^{1/β}, so the cell mass is ∫ v^{1/β} dv over [j/K, (j+1)/K] in closed form.
    j = np.rint(u * (k - 1))
    power = 1 + 1 / beta
    mass = ((j + 1) / k) ** power - (j / k) ** power
    np.testing.assert_allclose(weights, mass / mass[:k].mean(), rtol=1e-10)
    # β = 1/(N−1): the weights are the exact best-of-N law over the K stored samples (with replacement).
    n = 3
    w = sft_weights(ids, u, log, 1 / (n - 1), targets="cell")
    np.testing.assert_allclose(w / k, ((j + 1) / k) ** n - (j / k) ** n, rtol=1e-10)
    assert np.all(np.isfinite(pointwise_targets(ids, u, log, beta, targets="cell")))
    with pytest.raises(SynthesisError, match="non-finite"):
        pointwise_targets(ids, u, log, beta)
    # Ties share their block of cells: two tied rows of four get the mean mass of cells 1 and 2.
    tied = sft_weights(["p"] * 4, [0.0, 0.5, 0.5, 1.0], "identity", 0.2, targets="cell")
    assert tied[1] == tied[2]
    assert tied[0] < tied[1] < tied[3]


# -- weighted SFT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("transform,beta", [(EXP, 0.7), (NEGEXP, 0.01), (get_transform("exp", 40.0), 1e-3)])
def test_sft_weights_average_one_and_follow_exp_phi_over_beta(transform, beta):
    ids, u = rows(6)
    w = sft_weights(ids, u, transform, beta)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    for p in set(ids.tolist()):
        sel = ids == p
        assert w[sel].mean() == pytest.approx(1.0, rel=1e-13)
        x = transform.phi(u[sel]) / beta
        expected = np.exp(x - x.max()) / np.mean(np.exp(x - x.max()))
        np.testing.assert_allclose(w[sel], expected, rtol=1e-12)


def test_sft_weights_give_zero_to_log_transform_at_u_zero():
    w = sft_weights(["a", "a", "a"], [0.0, 0.5, 1.0], "log", 0.5)
    np.testing.assert_allclose(w, [0.0, 3 * 0.25 / 1.25, 3 * 1.0 / 1.25])
    with pytest.raises(SynthesisError, match=r"Φ\(u\) = −∞ for every row of 1 prompt\(s\): prompt_id 'b'"):
        sft_weights(["a", "b", "b"], [0.5, 0.0, 0.0], "log", 0.5)


# -- the log-partition gap ---------------------------------------------------------------------------
def test_log_partition_gap_closed_form_for_identity():
    # Σ_j exp(j h/β) is geometric, Z = β(e^{1/β} − 1): no quadrature, no special functions.
    for beta, k in [(0.1, 4), (0.243, 8), (1.0, 16), (0.5, 64)]:
        h = 1 / (k - 1)
        r = math.exp(h / beta)
        empirical = math.log((r**k - 1) / (r - 1) / k)
        continuous = math.log(beta * math.expm1(1 / beta))
        assert log_partition_gap("identity", beta, k) == pytest.approx(empirical - continuous, rel=1e-12)


def test_log_partition_gap_matches_direct_computation():
    for transform, beta, k in [(EXP, 0.5, 4), (NEGEXP, 0.05, 8), (get_transform("exp", 10.0), 1e3, 16)]:
        phi = transform.phi(np.arange(k) / (k - 1))
        direct = np.log(np.mean(np.exp(phi / beta))) - float(transform.log_partition(beta))
        assert log_partition_gap(transform, beta, k) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("transform,beta", [(EXP, 2.0), (NEGEXP, 0.5), (get_transform("identity"), 0.243)])
def test_log_partition_gap_vanishes_like_one_over_k(transform, beta):
    gaps = [log_partition_gap(transform, beta, k) for k in (4, 16, 256, 4096)]
    assert np.all(np.diff(np.abs(gaps)) < 0) and abs(gaps[-1]) < 5e-3
    # The grid keeps both end points: K·gap → (f(0) + f(1))/2 − 1, f = exp(Φ/β)/Z the tilted density.
    ends = np.exp(transform.phi(np.array([0.0, 1.0])) / beta - float(transform.log_partition(beta)))
    assert (4096 - 1) * gaps[-1] == pytest.approx(ends.mean() - 1, rel=2e-3)


# -- empty input, validation ------------------------------------------------------------------------
def test_empty_input():
    empty_ids, empty_u = np.array([], dtype=object), np.array([])
    assert len(pointwise_targets(empty_ids, empty_u, EXP, 1.0)) == 0
    assert len(pointwise_targets(empty_ids, empty_u, EXP, 1.0, log_partition="continuous")) == 0
    assert len(pointwise_targets(empty_ids, empty_u, EXP, 1.0, log_partition="empirical")) == 0
    assert len(sft_weights(empty_ids, empty_u, EXP, 1.0)) == 0


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: pointwise_targets(["a"], [0.2], "identity", 1.0, log_partition="x"), "log_partition must be one of"),
        (lambda: pointwise_targets(["a", "b"], [0.5, 0.0], "log", 1.0), r"non-finite Φ\(u\).*rows 1 \(prompt_id 'b'\)"),
        # The population normaliser needs K ≥ 2: the message names the rows and prompts (ids given as a list too).
        (lambda: pointwise_targets(["a", "a", "b"], [0.0, 1.0, 0.5], "identity", 1.0),
         r"need K ≥ 2 reference samples per prompt: rows 2 \(prompt_id 'b'\)"),
        (lambda: pointwise_targets(["a", "a"], [0.0, 1.0], "identity", 1.0, k=2.0), "k must be an integer"),
        (lambda: log_partition_gap("identity", 1.0, 1), "K must be an integer ≥ 2"),
        (lambda: log_partition_gap("identity", 0.0, 8), "beta"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(SynthesisError, match=message):
        call()


def test_vectorised_at_scale():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(100_000), 8)
    u = rng.integers(0, 8, size=len(ids)) / 7
    for kind in ("population", "empirical"):
        assert len(pointwise_targets(ids, u, EXP, 1.0, log_partition=kind)) == len(u)
    assert len(sft_weights(ids, u, EXP, 1.0)) == len(u)
