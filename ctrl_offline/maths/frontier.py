"""Win rate against KL as a frontier, not a point (docs/evaluation.md, "A frontier, not a point").

Pure maths (numpy / scipy; no I/O). A trained policy is one point (KL, win rate); a method is the
curve through its points (several budgets, or the checkpoints of one run). Two methods are
compared where both curves exist, at common KLs, and both against the cheapest policy of all:

* **the best-of-n sampling frontier.** Best-of-n of the reference, taken as a policy, has the
  quantile density n·c^{n−1} on every prompt (tie-free reward): the exact tilt of the ``log``
  transform at β = 1/(n − 1). So its KL is log n − (n − 1)/n and its win rate under any
  closed-form procedure is that tilt's (docs/theory.md §3), for real n ≥ 1 as well — a
  continuous curve with the integer n as points on it. For rank-based procedures (best- and
  worst-of-N) that win rate does not depend on the reward distribution at all; for procedures
  that read reward values, :func:`pool_best_of_n_win_rate` estimates it from a reference pool.
* **interpolation at a common KL.** A method's win rate at KL κ is read off the piecewise-linear
  curve in √KL through its points, sorted by KL, starting from the reference itself (KL 0, win
  rate ½). √KL, because a small tilt of amplitude ε moves a win rate by O(ε) and the KL by O(ε²):
  win rates are near-linear in √KL at small KL. A KL beyond a method's largest point is not
  reached: no extrapolation.
* **paired bootstrap on both axes.** Every point's KL and win rate are means over the same
  prompts; a bootstrap resample of the prompts moves both axes of every point of both methods
  together, and the interpolated values (and their difference) are recomputed on each resample.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize

from ctrl_offline.maths.estimates import Estimate, bootstrap_mean, percentile_estimate

__all__ = [
    "best_of_n_kl",
    "best_of_n_for_kl",
    "best_of_n_win_rate",
    "best_of_n_at_kl",
    "pool_best_of_n_win_rate",
    "interpolate_at_kl",
    "frontier_at_kl",
    "paired_frontier_difference",
]


def _check_n(n: float) -> float:
    n = float(n)
    if not (math.isfinite(n) and n >= 1):
        raise ValueError(f"best-of-n needs a real n ≥ 1, got {n!r}")
    return n


def best_of_n_kl(n: float) -> float:
    """KL(best-of-n(π_ref) ‖ π_ref) = log n − (n − 1)/n for a tie-free reward (real n ≥ 1)."""
    n = _check_n(n)
    return math.log(n) - (n - 1) / n


def best_of_n_for_kl(kl: float) -> float:
    """The real n ≥ 1 whose best-of-n spends ``kl`` nats (the inverse of :func:`best_of_n_kl`)."""
    kl = float(kl)
    if not (math.isfinite(kl) and kl >= 0):
        raise ValueError(f"a KL is a finite number ≥ 0 nats, got {kl!r}")
    if kl == 0:
        return 1.0
    # KL(1 + x) grows from 0 like x²/2 and without bound like log x: one root in x.
    gap = lambda log_x: best_of_n_kl(1.0 + math.exp(log_x)) - kl  # noqa: E731
    return 1.0 + math.exp(optimize.brentq(gap, -40.0, 60.0, xtol=1e-13))


def best_of_n_win_rate(inference: str, size: int, n: float) -> float:
    """The win rate of ``inference``-``size`` when the policy is best-of-n of the reference (tie-free reward).

    The exact tilt of the ``log`` transform at β = 1/(n − 1) under the procedure's closed form; ½ at
    n = 1. ValueError for a procedure without one (estimate it with :func:`pool_best_of_n_win_rate`).
    """
    from ctrl_offline.maths.procedures import tilted_win_rate

    n = _check_n(n)
    if n == 1:
        return 0.5
    return tilted_win_rate("log", 1.0 / (n - 1.0), inference, size)


def best_of_n_at_kl(inference: str, size: int, kl: float) -> float:
    """The best-of-n sampling frontier at ``kl``: :func:`best_of_n_win_rate` at n = :func:`best_of_n_for_kl`."""
    return best_of_n_win_rate(inference, size, best_of_n_for_kl(kl))


def pool_best_of_n_win_rate(reference_rewards, n: int, inference: str, size: int, *, reference_logps=None,
                            draws: int = 256, num_boot: int = 2000, rng: np.random.Generator | int | None = 0,
                            **settings) -> Estimate:
    """The win rate of best-of-n of the reference under ``inference``-``size``, estimated from a pool.

    ``reference_rewards`` (prompts, M): each prompt's reference samples, drawn from π_ref. The
    policy is best-of-n over each prompt's empirical distribution: ``draws`` policy samples per
    prompt, each the best of n pool samples drawn with replacement, carrying its log π_ref
    (``reference_logps``, for procedures that read it), against as many plain draws from the same
    empirical distribution: their U-statistic win rate
    (:func:`ctrl_offline.maths.u_statistics.u_statistic_per_prompt`), ties counted ½, with a bootstrap
    interval over prompts. This is a plug-in estimate: on M atoms draws tie more often than a
    continuous reward's would, so for best-/worst-of-N prefer the exact :func:`best_of_n_win_rate`.
    """
    from ctrl_offline.maths.u_statistics import u_statistic_per_prompt

    rewards = np.asarray(reference_rewards, dtype=float)
    if rewards.ndim != 2 or rewards.shape[1] < 2 or np.isnan(rewards).any():
        raise ValueError(f"reference rewards must be a (prompts, M ≥ 2) array without NaN, got shape {rewards.shape}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"best-of-n needs an integer n ≥ 1 here, got {n!r}")
    logps = None if reference_logps is None else np.asarray(reference_logps, dtype=float)
    if logps is not None and logps.shape != rewards.shape:
        raise ValueError(f"reference log-probs {logps.shape} do not match the rewards {rewards.shape}")
    generator = np.random.default_rng(rng)
    prompts, big_m = rewards.shape
    rows = np.arange(prompts)[:, None]

    def best_of(k):  # ``draws`` indices per prompt, each the best of k drawn with replacement
        picks = generator.integers(0, big_m, size=(prompts, draws, k))
        return np.take_along_axis(picks, rewards[rows[..., None], picks].argmax(axis=2)[..., None], axis=2)[..., 0]

    # Both sides drawn from the empirical distribution, so that n = 1 is ½ in expectation: the policy's
    # draws repeat pool samples, and the pool itself (all distinct) would have larger best-of-N.
    policy, reference = best_of(int(n)), best_of(1)
    per_prompt = u_statistic_per_prompt(
        rewards[rows, policy], rewards[rows, reference], size, inference, rng=generator,
        policy_ref_logps=None if logps is None else logps[rows, policy],
        reference_ref_logps=None if logps is None else logps[rows, reference], **settings)
    return bootstrap_mean(per_prompt, num_boot=num_boot, rng=generator)


def interpolate_at_kl(kls, win_rates, at, *, anchor: float | None = 0.5) -> np.ndarray:
    """A method's win rate at the KLs ``at``: piecewise linear in √KL through its points (module docstring).

    ``kls`` / ``win_rates``: the method's points, in any order. ``anchor``: the win rate at KL 0
    (the reference, ½; None leaves the curve to start at the smallest point). NaN where ``at`` lies
    beyond the largest KL (or below the smallest without an anchor).
    """
    kls, win_rates = np.asarray(kls, dtype=float), np.asarray(win_rates, dtype=float)
    if kls.ndim != 1 or kls.shape != win_rates.shape or not len(kls):
        raise ValueError(f"points need matching 1-d KL and win-rate arrays, got shapes {kls.shape}, {win_rates.shape}")
    at = np.asarray(at, dtype=float)
    keep = ~(np.isnan(kls) | np.isnan(win_rates))
    # A KL estimate may dip below 0 (the sequence-level one can): it sits at the reference.
    x, y = np.sqrt(np.clip(kls[keep], 0.0, None)), win_rates[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if anchor is not None:
        x, y = np.concatenate([[0.0], x]), np.concatenate([[float(anchor)], y])
    if not len(x):
        return np.full(at.shape, np.nan)
    root = np.sqrt(np.clip(at, 0.0, None))
    out = np.interp(root, x, y)
    return np.where((root > x[-1]) | (root < x[0]), np.nan, out)


def _points(kl_per_prompt, win_per_prompt) -> tuple[np.ndarray, np.ndarray]:
    kl, win = np.asarray(kl_per_prompt, dtype=float), np.asarray(win_per_prompt, dtype=float)
    if kl.ndim == 1:
        kl, win = kl[None], win[None]
    if kl.ndim != 2 or kl.shape != win.shape:
        raise ValueError("a method's points need (points, prompts) arrays of per-prompt KL and win rate of one shape, "
                         f"got {kl.shape} and {win.shape}")
    return kl, win


def _resampled_curves(kl, win, at, index, anchor) -> np.ndarray:
    """(resamples, len(at)): the interpolated win rates on each resample of the prompts."""
    out = np.empty((len(index), len(at)))
    for b, rows in enumerate(index):
        out[b] = interpolate_at_kl(np.nanmean(kl[:, rows], axis=1), np.nanmean(win[:, rows], axis=1), at,
                                   anchor=anchor)
    return out


def _estimate(value: float, draws: np.ndarray, level: float, num_prompts: int) -> dict:
    """An Estimate dict from a point value and its bootstrap draws (NaN draws — not reached there — left out)."""
    reached = float(np.mean(~np.isnan(draws))) if len(draws) else math.nan
    return {**percentile_estimate(value, draws, level, num_prompts).to_dict(), "reached_share": reached}


def frontier_at_kl(kl_per_prompt, win_per_prompt, at, *, num_boot: int = 2000, level: float = 0.95,
                   rng: np.random.Generator | int | None = 0, anchor: float | None = 0.5) -> list[dict | None]:
    """One method's interpolated win rate at each KL of ``at``, with a bootstrap interval over prompts.

    ``kl_per_prompt`` / ``win_per_prompt``: (points, prompts) arrays, row i the per-prompt KL and
    win rate of the method's point i on the same prompts. Each entry is an Estimate dict (``value``,
    ``ci_low``, ``ci_high``, ``num_prompts``) plus ``reached_share`` (the resamples whose largest
    KL reaches that KL: the interval is over those), or None where the method's largest KL does not
    reach it.
    """
    kl, win = _points(kl_per_prompt, win_per_prompt)
    at = np.atleast_1d(np.asarray(at, dtype=float))
    value = interpolate_at_kl(np.nanmean(kl, axis=1), np.nanmean(win, axis=1), at, anchor=anchor)
    index = np.random.default_rng(rng).integers(0, kl.shape[1], size=(num_boot, kl.shape[1]))
    draws = _resampled_curves(kl, win, at, index, anchor)
    return [None if np.isnan(v) else _estimate(v, draws[:, j], level, kl.shape[1]) for j, v in enumerate(value)]


def paired_frontier_difference(a_kl, a_win, b_kl, b_win, at, *, num_boot: int = 2000, level: float = 0.95,
                               rng: np.random.Generator | int | None = 0,
                               anchor: float | None = 0.5) -> list[dict]:
    """Method A − method B at each common KL of ``at``, with a paired bootstrap interval over prompts.

    Both methods' points (the (points, prompts) arrays of :func:`frontier_at_kl`) are on the same
    prompts, in the same order: one resample of the prompts moves every point of both, on both
    axes. Each row: ``kl``, ``a`` and ``b`` (Estimate dicts, None where that method does not reach
    the KL) and ``difference`` (A − B, None unless both reach it).
    """
    a_kl, a_win = _points(a_kl, a_win)
    b_kl, b_win = _points(b_kl, b_win)
    if a_kl.shape[1] != b_kl.shape[1]:
        raise ValueError(f"a paired comparison needs the same prompts: {a_kl.shape[1]} and {b_kl.shape[1]} prompts")
    at = np.atleast_1d(np.asarray(at, dtype=float))
    prompts = a_kl.shape[1]
    index = np.random.default_rng(rng).integers(0, prompts, size=(num_boot, prompts))
    a_value = interpolate_at_kl(np.nanmean(a_kl, axis=1), np.nanmean(a_win, axis=1), at, anchor=anchor)
    b_value = interpolate_at_kl(np.nanmean(b_kl, axis=1), np.nanmean(b_win, axis=1), at, anchor=anchor)
    a_draws = _resampled_curves(a_kl, a_win, at, index, anchor)
    b_draws = _resampled_curves(b_kl, b_win, at, index, anchor)
    rows = []
    for j, kl in enumerate(at):
        a = None if np.isnan(a_value[j]) else _estimate(a_value[j], a_draws[:, j], level, prompts)
        b = None if np.isnan(b_value[j]) else _estimate(b_value[j], b_draws[:, j], level, prompts)
        both = a is not None and b is not None
        rows.append({"kl": float(kl), "a": a, "b": b,
                     "difference": _estimate(a_value[j] - b_value[j], a_draws[:, j] - b_draws[:, j], level, prompts)
                     if both else None})
    return rows
