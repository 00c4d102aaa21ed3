"""Inference-time win rates of a policy against its reference, from sampled candidates (pure numpy).

For each prompt, N candidates from the policy and N from the reference, with rewards. A
selector T turns each side into a selection distribution (p for the policy, q for the
reference); the prompt's win probability is the exact expectation

    w(x) = Σ_ij p_i q_j (1[r_i > s_j] + ½·1[r_i = s_j]),

averaged over prompts, with a percentile bootstrap over prompts for the interval. The
calibrated-reward shortcut replaces the reference's fresh samples by its quantile tables:
with the policy candidates' calibrated rewards u, best-of-N wins with probability
max(u)^N and worst-of-N with 1 − (1 − min(u))^N (the reference's best/worst of N calibrated
values has CDF u^N / 1 − (1 − u)^N). KL(π‖π_ref) is estimated by the mean log-ratio of the
policy's own samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .selection import select

__all__ = ["Estimate", "pairwise_win_matrix", "inference_win_rate", "standard_win_rate", "calibrated_shortcut",
           "kl_estimate", "bootstrap_mean"]


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


def pairwise_win_matrix(policy_rewards: np.ndarray, reference_rewards: np.ndarray) -> np.ndarray:
    """W[b, i, j] = 1[r_i > s_j] + ½·1[r_i = s_j] per prompt b (NaN pairs give NaN)."""
    r = np.asarray(policy_rewards, dtype=float)[:, :, None]
    s = np.asarray(reference_rewards, dtype=float)[:, None, :]
    w = (r > s) + 0.5 * (r == s)
    return np.where(np.isnan(r) | np.isnan(s), np.nan, w)


def _check(policy_rewards, reference_rewards, n):
    r = np.asarray(policy_rewards, dtype=float)
    s = np.asarray(reference_rewards, dtype=float)
    if r.ndim != 2 or s.ndim != 2 or r.shape[0] != s.shape[0]:
        raise ValueError(f"rewards must be (prompts, candidates) arrays for the same prompts, got {r.shape}, {s.shape}")
    if n > r.shape[1] or n > s.shape[1]:
        raise ValueError(f"N = {n} is larger than the candidates available ({r.shape[1]} policy, {s.shape[1]} reference)")
    return r[:, :n], s[:, :n]


def inference_win_rate(policy_rewards, reference_rewards, selector: str, n: int, *, policy_ref_logps=None,
                       reference_ref_logps=None, num_boot: int = 2000, rng=0, **selector_args) -> dict:
    """Win rate of T(policy) over T(reference) with the first ``n`` candidates of each side."""
    r, s = _check(policy_rewards, reference_rewards, n)
    extra_p = {} if policy_ref_logps is None else {"ref_logps": np.asarray(policy_ref_logps)[:, :n]}
    extra_q = {} if reference_ref_logps is None else {"ref_logps": np.asarray(reference_ref_logps)[:, :n]}
    pol = select(r, selector, **selector_args, **extra_p)
    ref = select(s, selector, **selector_args, **extra_q)
    w = np.nan_to_num(pairwise_win_matrix(r, s))
    # A probability: clip the float rounding of the weighted sum (it can land at 1 + 2e-16).
    per_prompt = np.clip(np.einsum("bi,bij,bj->b", pol.probs, w, ref.probs), 0.0, 1.0)
    empty = (pol.probs.sum(axis=1) == 0) | (ref.probs.sum(axis=1) == 0)
    per_prompt = np.where(empty, np.nan, per_prompt)
    est = bootstrap_mean(per_prompt, num_boot=num_boot, rng=rng)
    return {**est.to_dict(), "selector": selector, "n": n,
            "excluded_candidates": pol.num_excluded + ref.num_excluded, "prompts_without_candidates": int(empty.sum())}


def standard_win_rate(policy_rewards, reference_rewards, *, num_boot: int = 2000, rng=0) -> Estimate:
    """P(a policy sample beats a reference sample), all pairs within each prompt."""
    w = pairwise_win_matrix(policy_rewards, reference_rewards)
    with np.errstate(invalid="ignore"):
        per_prompt = np.nanmean(w.reshape(w.shape[0], -1), axis=1) if w.size else np.array([])
    return bootstrap_mean(per_prompt, num_boot=num_boot, rng=rng)


def calibrated_shortcut(policy_u, n: int, *, num_boot: int = 2000, rng=0) -> dict:
    """Win rates predicted from the policy candidates' calibrated rewards against the reference tables."""
    u = np.asarray(policy_u, dtype=float)
    if n > u.shape[1]:
        raise ValueError(f"N = {n} is larger than the candidates available ({u.shape[1]})")
    u = u[:, :n]
    with np.errstate(invalid="ignore"):
        best, worst = np.nanmax(u, axis=1), np.nanmin(u, axis=1)
        mean = np.nanmean(u, axis=1)
    return {
        "n": n,
        "standard": bootstrap_mean(mean, num_boot=num_boot, rng=rng).to_dict(),
        "bon": bootstrap_mean(best**n, num_boot=num_boot, rng=rng).to_dict(),
        "won": bootstrap_mean(1 - (1 - worst) ** n, num_boot=num_boot, rng=rng).to_dict(),
    }


def kl_estimate(policy_logps, reference_logps, *, num_boot: int = 2000, rng=0) -> Estimate:
    """KL(π‖π_ref) ≈ mean over the policy's samples of log π(y|x) − log π_ref(y|x)."""
    ratio = np.asarray(policy_logps, dtype=float) - np.asarray(reference_logps, dtype=float)
    per_prompt = ratio.mean(axis=1) if ratio.ndim == 2 else ratio
    return bootstrap_mean(per_prompt, num_boot=num_boot, rng=rng)
