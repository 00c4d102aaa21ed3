"""Win rates of selectors that look at raw rewards, by simulation on the quantile tables (docs/selector_planning.md).

Best-of-N and worst-of-N depend on rewards only through their order, so their win rates have
closed forms in calibrated space. Soft best-of-N, regularised BoN, ITP and Best-of-Tails look at
the reward *values* (their gaps, their tails), which differ from prompt to prompt. Here the
reward distribution of each prompt under π_ref is its stored quantile table (inverse-CDF
sampling, linear between order statistics); the tilted policy's rewards are the same quantile
function at u drawn from the tilted density f. Win rates of T(π*) over T(π_ref) are then
estimated by Monte Carlo over prompts, with common random numbers across candidates (t, β) so
the search over t is smooth. :func:`ctrl_offline.maths.planner.plan` plans on these win rates for every
registered procedure without a closed form (``plan(..., tables=...)``). This module does not plan:
it is the per-prompt counterpart of :mod:`ctrl_offline.maths.theory` (the prompt-free tilt in calibrated space).
"""

from __future__ import annotations

import numpy as np

from ctrl_offline.maths.calibration import CalibrationTables
from ctrl_offline.maths.win_rates import pairwise_win_matrix
from ctrl_offline.maths.procedures import select
from ctrl_offline.maths.theory import _inverse_cdf_table
from ctrl_offline.maths.transforms import Transform, get_transform

__all__ = ["quantile_rewards", "simulated_win_rate"]


def quantile_rewards(tables: CalibrationTables, codes: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Q_x(u): each prompt's reward quantile at u, linear between its sorted reference rewards."""
    codes = np.asarray(codes)
    k = tables.k[codes]
    k = k.reshape(k.shape + (1,) * (u.ndim - k.ndim))
    start = tables.offsets[codes].reshape(k.shape)
    position = u * (k - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), k - 1)
    upper = np.minimum(lower + 1, k - 1)
    frac = position - lower
    return (1 - frac) * tables.rewards[start + lower] + frac * tables.rewards[start + upper]


def simulated_win_rate(tables: CalibrationTables, transform: Transform | str, beta: float, selector: str, n: int, *,
                       prompts: int = 4000, seed: int = 0, selector_args: dict | None = None) -> float:
    """Predicted win rate of T(π*) over T(π_ref) for a registered procedure ``selector``, on the stored tables.

    ``selector_args`` go to :func:`ctrl_offline.maths.procedures.select` (``lam``, ``beta``, ``kappa0``, ``k``, …).
    """
    selector_args = selector_args or {}
    transform = get_transform(transform)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, len(tables), size=prompts)
    u_ref = rng.random((prompts, n))
    # Common random numbers: the policy's u are the tilted quantiles of fixed uniforms.
    q = np.random.default_rng(seed + 1).random((prompts, n))
    u_pol = np.interp(q, *_inverse_cdf_table(transform, beta))
    r_pol, r_ref = quantile_rewards(tables, codes, u_pol), quantile_rewards(tables, codes, u_ref)
    p = select(r_pol, selector, **selector_args).probs
    s = select(r_ref, selector, **selector_args).probs
    return float(np.einsum("bi,bij,bj->b", p, pairwise_win_matrix(r_pol, r_ref), s).mean())
