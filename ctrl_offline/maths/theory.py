"""Exact properties of the tilted policy π* ∝ π_ref·exp(Φ(C)/β) (docs/theory.md §3).

Under π_ref the calibrated reward u = C(x, y) is Uniform[0, 1] on every prompt, so every
quantity below depends on (Φ, β) only, not on the prompt or the model:

    f(u) = exp(Φ(u)/β)/Z,  F its CDF
    KL(π*‖π_ref)                       = ∫ f log f
    standard win rate  P(π* ≻ π_ref)   = ∫ u f(u) du = 1 − ∫ F
    best-of-N  win rate vs BoN(π_ref)  = 1 − ∫ N u^{N−1} F(u)^N du
    worst-of-N win rate vs WoN(π_ref)  = ∫ N (1−u)^{N−1} (1 − F(u))^N du

Integrals use a fixed composite Gauss–Legendre rule graded toward u = 1 (where the densities
of increasing transforms peak); F comes from each transform's closed form. The registry
(:mod:`ctrl_offline.maths.procedures`) names these closed forms (``Procedure.win_rate``; by name:
:func:`ctrl_offline.maths.procedures.tilted_win_rate`) and sits above this module; any other selection
rule is handled by :func:`monte_carlo_win_rate`.

Nothing here plans or looks at a prompt: this module is the tilt in calibrated space, where every
prompt is the same. Procedures that read raw reward values depend on each prompt's reward
distribution and are simulated on the calibration tables (:mod:`ctrl_offline.maths.simulation`);
:mod:`ctrl_offline.maths.planner` plans on either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ctrl_offline.maths._quadrature import nodes_and_weights, panel_breaks
from ctrl_offline.maths.transforms import Transform, get_transform

__all__ = [
    "tilted_density",
    "kl_divergence",
    "tilted_standard_win_rate",
    "cell_values",
    "bon_win_rate",
    "won_win_rate",
    "sample_tilted",
    "monte_carlo_win_rate",
    "MonteCarloEstimate",
]


def _check_n(n: int) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f"N must be a positive integer, got {n!r}")
    return int(n)


def _density_on_grid(transform: Transform, beta: float):
    nodes, weights = nodes_and_weights()
    log_f = transform.log_density(nodes, beta)
    return nodes, weights, log_f


def _cdf_on_grid(transform: Transform, beta: float):
    nodes, weights = nodes_and_weights()
    return nodes, weights, np.exp(transform.log_cdf(nodes, beta))


def tilted_density(transform: Transform | str, beta: float, u) -> np.ndarray:
    """f(u) = exp(Φ(u)/β) / Z(β), the density of the calibrated reward under π*."""
    transform = get_transform(transform)
    return np.exp(transform.log_density(u, beta))


def kl_divergence(transform: Transform | str, beta: float) -> float:
    """KL(π* ‖ π_ref) = ∫₀¹ f log f  (= E_f[Φ]/β − log Z), in nats."""
    transform = get_transform(transform)
    _, weights, log_f = _density_on_grid(transform, beta)
    f = np.exp(log_f)
    # f log f → 0 where f underflows to 0.
    return float(max(np.sum(weights * np.where(f > 0, f * log_f, 0.0)), 0.0))


def tilted_standard_win_rate(transform: Transform | str, beta: float) -> float:
    """P(y ~ π* beats y' ~ π_ref) = E_f[u] = 1 − ∫ F: the tilted policy's standard win rate, exactly."""
    transform = get_transform(transform)
    _, weights, cdf = _cdf_on_grid(transform, beta)
    return float(1.0 - np.sum(weights * cdf))


def bon_win_rate(transform: Transform | str, beta: float, n: int) -> float:
    """P(best-of-N from π* beats best-of-N from π_ref) = 1 − ∫ N u^{N−1} F(u)^N du."""
    transform, n = get_transform(transform), _check_n(n)
    nodes, weights, cdf = _cdf_on_grid(transform, beta)
    return float(1.0 - np.sum(weights * n * nodes ** (n - 1) * cdf**n))


def won_win_rate(transform: Transform | str, beta: float, n: int) -> float:
    """P(worst-of-N from π* beats worst-of-N from π_ref) = ∫ N (1−u)^{N−1} (1−F(u))^N du."""
    transform, n = get_transform(transform), _check_n(n)
    nodes, weights, cdf = _cdf_on_grid(transform, beta)
    return float(np.sum(weights * n * (1.0 - nodes) ** (n - 1) * (1.0 - cdf) ** n))


def cell_values(transform: Transform | str, beta: float, lo, hi) -> np.ndarray:
    """β·log( ∫_lo^hi e^{Φ/β} / (hi − lo) ): the tilt's mass on the quantile cell [lo, hi] per unit width.

    ``β·[log Z + log(F(hi) − F(lo)) − log(hi − lo)]``, every term in log space (finite for ``log``).
    """
    transform = get_transform(transform)
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    log_hi = np.asarray(transform.log_cdf(hi, beta), dtype=float)
    log_lo = np.asarray(transform.log_cdf(lo, beta), dtype=float)
    with np.errstate(divide="ignore"):
        log_mass = log_hi + np.log(-np.expm1(log_lo - log_hi))
    return beta * (float(transform.log_partition(beta)) + log_mass - np.log(hi - lo))


# -- Monte Carlo for any selection rule ----------------------------------------------------------


def _inverse_cdf_table(transform: Transform, beta: float) -> tuple[np.ndarray, np.ndarray]:
    grid = np.unique(np.concatenate([panel_breaks(), np.linspace(0.0, 1.0, 8193)]))
    cdf = np.exp(transform.log_cdf(grid, beta))
    cdf[0], cdf[-1] = 0.0, 1.0
    return np.maximum.accumulate(cdf), grid


def sample_tilted(transform: Transform | str, beta: float, size, rng: np.random.Generator | int | None = None):
    """Draws of the calibrated reward u under π* (inverse-CDF sampling on a fine table)."""
    transform = get_transform(transform)
    rng = np.random.default_rng(rng)
    cdf, grid = _inverse_cdf_table(transform, beta)
    return np.interp(rng.random(size), cdf, grid)


@dataclass(frozen=True)
class MonteCarloEstimate:
    win_rate: float
    stderr: float
    trials: int


def monte_carlo_win_rate(
    transform: Transform | str,
    beta: float,
    select: Callable[[np.ndarray], np.ndarray],
    n: int,
    trials: int = 100_000,
    rng: np.random.Generator | int | None = 0,
) -> MonteCarloEstimate:
    """Win rate of T(π*) over T(π_ref) for a selection rule T, by simulation in calibrated space.

    ``select`` maps an array of calibrated values of shape ``(trials, n)`` to the chosen index per
    row (a registered procedure's: :func:`ctrl_offline.maths.procedures.drawn_pick`). Each trial draws N
    candidates from π* (u ~ f) and N from π_ref (u ~ Uniform), applies the rule to each side and
    scores a win (ties count ½).
    """
    transform, n = get_transform(transform), _check_n(n)
    rng = np.random.default_rng(rng)
    rows = np.arange(trials)
    policy = sample_tilted(transform, beta, (trials, n), rng)
    reference = rng.random((trials, n))
    chosen_policy = policy[rows, np.asarray(select(policy))]
    chosen_reference = reference[rows, np.asarray(select(reference))]
    outcome = (chosen_policy > chosen_reference) + 0.5 * (chosen_policy == chosen_reference)
    return MonteCarloEstimate(
        win_rate=float(outcome.mean()), stderr=float(outcome.std(ddof=1) / np.sqrt(trials)), trials=trials
    )
