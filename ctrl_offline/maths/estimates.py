"""What the win-rate estimators share (pure numpy; :mod:`ctrl_offline.maths.win_rates`, :mod:`ctrl_offline.maths.u_statistics`):
a per-prompt quantity's mean over prompts with its percentile bootstrap interval, the pairwise win matrix, and the
subset fraction C(j, N)/C(K, N)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Estimate", "bootstrap_mean", "percentile_estimate", "pairwise_win_matrix", "subset_fraction"]


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float
    ci_high: float
    num_prompts: int

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean(per_prompt: np.ndarray, num_boot: int = 2000, level: float = 0.95,
                   rng: np.random.Generator | int | None = 0) -> Estimate:
    """Mean over prompts with a percentile bootstrap interval."""
    per_prompt = np.asarray(per_prompt, dtype=float)
    per_prompt = per_prompt[~np.isnan(per_prompt)]
    if len(per_prompt) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(rng)
    draws = rng.integers(0, len(per_prompt), size=(num_boot, len(per_prompt)))
    means = per_prompt[draws].mean(axis=1)
    tail = (1 - level) / 2
    # A mean lies in [min, max]; clipping removes the summation's last-bit rounding.
    lo, hi = per_prompt.min(), per_prompt.max()
    low, high = np.clip(np.quantile(means, [tail, 1 - tail]), lo, hi)
    return Estimate(float(np.clip(per_prompt.mean(), lo, hi)), float(low), float(high), len(per_prompt))


def percentile_estimate(value: float, draws: np.ndarray, level: float, num_prompts: int) -> Estimate:
    """``value`` with the percentile interval of its bootstrap ``draws`` (NaN draws left out; NaN bounds if all are)."""
    draws = np.asarray(draws, dtype=float)
    finite = draws[~np.isnan(draws)]
    tail = (1 - level) / 2
    low, high = np.quantile(finite, [tail, 1 - tail]) if len(finite) else (np.nan, np.nan)
    return Estimate(float(value), float(low), float(high), num_prompts)


def pairwise_win_matrix(policy_rewards: np.ndarray, reference_rewards: np.ndarray) -> np.ndarray:
    """W[b, i, j] = 1[r_i > s_j] + ½·1[r_i = s_j] per prompt b (NaN pairs give NaN)."""
    r = np.asarray(policy_rewards, dtype=float)[:, :, None]
    s = np.asarray(reference_rewards, dtype=float)[:, None, :]
    w = (r > s) + 0.5 * (r == s)
    return np.where(np.isnan(r) | np.isnan(s), np.nan, w)


def subset_fraction(j: np.ndarray, k: np.ndarray, n: int) -> np.ndarray:
    """C(j, n) / C(k, n) for 0 ≤ j ≤ k, n ≤ k, as Π_{i<n} (j − i)/(k − i): no overflow at large K."""
    i = np.arange(n)
    j = np.asarray(j, dtype=float)[..., None]
    k = np.asarray(k, dtype=float)[..., None]
    return np.prod(np.clip((j - i) / (k - i), 0.0, None), axis=-1)
