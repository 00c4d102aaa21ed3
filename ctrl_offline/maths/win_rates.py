"""Inference-time win rates of a policy against its reference, from sampled candidates (pure numpy).

For each prompt, N candidates from the policy and N from the reference, with rewards. A
selector T turns each side into a selection distribution (p for the policy, q for the
reference); the prompt's win probability is the exact expectation

    w(x) = Σ_ij p_i q_j (1[r_i > s_j] + ½·1[r_i = s_j]),

averaged over prompts, with a percentile bootstrap over prompts for the interval.

The calibrated-reward shortcut replaces the reference's N fresh candidates by the prompt's K
stored reference rewards (its calibration table), taking the reference's N candidates to be N
distinct draws out of the K, every one of the C(K, N) subsets equally likely. For the policy's
pick r (its best of N candidates for best-of-N, its worst for worst-of-N), with b of the K
stored rewards strictly below r, e equal to it and a = K − b − e above it, the policy wins when
its pick is the larger (for worst-of-N too: the policy's worst beats the reference's worst):

    best-of-N   P(ref best-of-N < r)  + ½·P(ref best-of-N = r)  = [C(b, N) + ½·(C(b+e, N) − C(b, N))] / C(K, N)
    worst-of-N  P(ref worst-of-N < r) + ½·P(ref worst-of-N = r) = 1 − [C(a+e, N) + C(a, N)] / (2·C(K, N))
    standard    (b + ½·e) / K = Ĉ, averaged over the policy's N candidates

(the reference's worst is ≥ r exactly when its N lie among the a + e stored rewards ≥ r, and > r
when they lie among the a above r). Because b ~ Binomial(K, F(r)) and E[C(b, N)] / C(K, N) = F(r)^N
(a factorial moment; likewise for a and a + e), these are unbiased for the win rate against the
reference's fresh best-/worst-of-N; the older form
max(Ĉ)^N is not (a policy equal to its reference scores 0.600 at K = N = 4 instead of ½). The
derivation is in docs/evaluation_shortcut.md. N ≤ K is required: N reference candidates cannot
be drawn from fewer stored rewards. KL(π‖π_ref) is summarised per prompt from per-sample
estimates (:func:`kl_summary`): the per-token KL of the policy's own samples, and the sequence-level
mean log-ratio beside it (:func:`kl_estimate`; docs/kl_budget.md).
How an evaluated policy compares with its build's plan is :mod:`ctrl_offline.maths.diagnostics`.
"""

from __future__ import annotations

import warnings

import numpy as np

from ctrl_offline.maths.calibration import CalibrationTables, rank_counts
from ctrl_offline.maths.estimates import Estimate, bootstrap_mean, pairwise_win_matrix, subset_fraction
from ctrl_offline.maths.procedures import get_procedure, procedure_names
from ctrl_offline.maths.procedures import select
# The powered (U-statistic) estimators live in their own module; their names stay importable from here.
from ctrl_offline.maths.u_statistics import (
    MAX_SUBSETS,
    decision_verdict,
    paired_bootstrap_difference,
    subset_selection_weights,
    u_statistic_per_prompt,
    u_statistic_win_rate,
)

__all__ = ["Estimate", "pairwise_win_matrix", "estimate_inference_win_rate", "estimate_standard_win_rate",
           "calibrated_shortcut", "calibrated_shortcut_per_prompt", "shortcut_procedures", "kl_estimate", "kl_summary",
           "bootstrap_mean", "subset_selection_weights", "u_statistic_per_prompt", "u_statistic_win_rate", "paired_bootstrap_difference", "decision_verdict",
           "MAX_SUBSETS"]


def _check(policy_rewards, reference_rewards, n):
    r = np.asarray(policy_rewards, dtype=float)
    s = np.asarray(reference_rewards, dtype=float)
    if r.ndim != 2 or s.ndim != 2 or r.shape[0] != s.shape[0]:
        raise ValueError(f"rewards must be (prompts, candidates) arrays for the same prompts, got {r.shape}, {s.shape}")
    if n > r.shape[1] or n > s.shape[1]:
        raise ValueError(f"N = {n} is larger than the candidates available ({r.shape[1]} policy, {s.shape[1]} reference)")
    return r[:, :n], s[:, :n]


def estimate_inference_win_rate(policy_rewards, reference_rewards, selector: str, n: int, *, policy_ref_logps=None,
                                reference_ref_logps=None, num_boot: int = 2000, rng=0, **selector_args) -> dict:
    """Win rate of T(policy) over T(reference) with the first ``n`` candidates of each side (one duel per prompt;
    :func:`u_statistic_win_rate` averages over every N-subset instead)."""
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


def estimate_standard_win_rate(policy_rewards, reference_rewards, *, num_boot: int = 2000, rng=0) -> Estimate:
    """P(a policy sample beats a reference sample), all pairs within each prompt."""
    w = pairwise_win_matrix(policy_rewards, reference_rewards)
    with np.errstate(invalid="ignore"):
        per_prompt = np.nanmean(w.reshape(w.shape[0], -1), axis=1) if w.size else np.array([])
    return bootstrap_mean(per_prompt, num_boot=num_boot, rng=rng)


def shortcut_procedures() -> tuple[str, ...]:
    """The procedures the calibrated shortcut covers: those whose pick is the largest or the smallest reward
    (an :class:`~ctrl_offline.maths.procedures.OrderStatistic` of the reward itself: ``bon``, ``won``)."""
    return tuple(name for name in procedure_names()
                 if get_procedure(name).order is not None and get_procedure(name).order.key is None)


def _shortcut_win(r: np.ndarray, below: np.ndarray, equal: np.ndarray, k: np.ndarray, n: int,
                  largest: bool) -> np.ndarray:
    """Per row: P(the policy's best (``largest``) or worst of its N beats the reference's, N of the K stored)."""
    rows = np.arange(r.shape[0])
    pick = np.argmax(r, axis=1) if largest else np.argmin(r, axis=1)
    b, e = below[rows, pick], equal[rows, pick]
    if largest:
        return subset_fraction(b, k, n) + 0.5 * (subset_fraction(b + e, k, n) - subset_fraction(b, k, n))
    # The policy's worst r beats the reference's worst when that is below r: 1 − P(ref worst ≥ r) + ½·P(= r),
    # with P(ref worst ≥ r) = C(a+e, N)/C(K, N) and P(ref worst > r) = C(a, N)/C(K, N).
    a = k - b - e
    return 1.0 - 0.5 * (subset_fraction(a + e, k, n) + subset_fraction(a, k, n))


def calibrated_shortcut_per_prompt(policy_rewards, n: int, *, tables: CalibrationTables, prompt_ids) -> dict:
    """Per-prompt values of :func:`calibrated_shortcut`: ``{"standard", "bon", "won"}`` arrays of one value per row
    (one per :func:`shortcut_procedures`).

    ``policy_rewards`` is a (prompts, candidates) array of the policy's rewards (the first ``n``
    candidates of each row are used), ``prompt_ids[i]`` names row i's table in ``tables`` (the
    sorted reference rewards of each prompt, :class:`~ctrl_offline.maths.calibration.CalibrationTables`).
    """
    r = np.asarray(policy_rewards, dtype=float)
    ids = np.asarray(prompt_ids)
    if r.ndim != 2:
        raise ValueError(f"policy rewards must be a (prompts, candidates) array, got shape {r.shape}")
    if ids.shape != (r.shape[0],):
        raise ValueError(f"prompt_ids must name one table per row of the policy rewards ({r.shape[0]}), "
                         f"got shape {ids.shape}")
    if n < 1:
        raise ValueError(f"N must be ≥ 1, got {n}")
    if n > r.shape[1]:
        raise ValueError(f"N = {n} is larger than the candidates available ({r.shape[1]})")
    r = r[:, :n]
    below, equal, k = (c.reshape(r.shape) for c in rank_counts(tables, np.repeat(ids, n), r.ravel()))
    k = k[:, 0]
    if r.shape[0] and n > k.min():
        few = k < n
        shown = ", ".join(repr(p.item() if isinstance(p, np.generic) else p) for p in ids[few][:5])
        raise ValueError(f"N = {n} is larger than K, the stored reference rewards, of {few.sum()} prompt(s) "
                         f"(smallest K = {k.min()}; prompt_id {shown}): the reference's best-/worst-of-N cannot be "
                         "formed from fewer stored samples than N")
    standard = ((below + 0.5 * equal) / k[:, None]).mean(axis=1)
    return {"standard": standard, **{name: _shortcut_win(r, below, equal, k, n, get_procedure(name).order.largest)
                                     for name in shortcut_procedures()}}


def calibrated_shortcut(policy_rewards, n: int, *, tables: CalibrationTables, prompt_ids, num_boot: int = 2000,
                        rng=0) -> dict:
    """Win rates of the policy's N candidates against the reference's best-/worst-of-N from its stored rewards.

    Unbiased: the reference's N candidates are N distinct draws out of each prompt's K stored
    reference rewards (module docstring, docs/evaluation_shortcut.md). ``policy_rewards``:
    (prompts, candidates), rewards on the scale of the tables; ``prompt_ids``: each row's prompt
    in ``tables``. Raises ValueError when N exceeds the candidates or any prompt's K. Returns
    ``{"n", "standard", "bon", "won"}`` (one key per :func:`shortcut_procedures`), each win rate an
    :class:`Estimate` dict.
    """
    values = calibrated_shortcut_per_prompt(policy_rewards, n, tables=tables, prompt_ids=prompt_ids)
    return {"n": n, **{name: bootstrap_mean(value, num_boot=num_boot, rng=rng).to_dict()
                       for name, value in values.items()}}


def kl_estimate(policy_logps, reference_logps, *, num_boot: int = 2000, rng=0) -> Estimate:
    """The sequence-level KL(π‖π_ref) ≈ mean over the policy's samples of log π(y|x) − log π_ref(y|x).

    Unbiased but noisy: :func:`kl_summary` of the per-token KL sums
    (:func:`ctrl_offline.models.generation.completion_kl`) estimates the same KL with far less variance.
    """
    ratio = np.asarray(policy_logps, dtype=float) - np.asarray(reference_logps, dtype=float)
    per_prompt = ratio.mean(axis=1) if ratio.ndim == 2 else ratio
    return bootstrap_mean(per_prompt, num_boot=num_boot, rng=rng)


def kl_summary(per_sample, *, num_boot: int = 2000, rng=0) -> dict:
    """KL(π‖π_ref) over prompts from per-sample estimates, with its per-prompt values and their spread.

    ``per_sample`` is a (prompts, samples) array of unbiased per-sample estimates of each prompt's
    KL — the per-token sums Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)), or the sequence log-ratios
    log π(y|x) − log π_ref(y|x) — of samples y ~ π(·|x) (NaN for a missing sample). With m_x the
    mean of prompt x's row, returns ``{"value", "ci_low", "ci_high", "num_prompts"}`` of
    (1/P) Σ_x m_x with a percentile bootstrap over prompts, ``"sd"`` = std_x(m_x) (ddof 1; the
    prompt-to-prompt spread; None below 2 prompts), ``"stderr"`` = sd / √P (None likewise) and
    ``"per_prompt"``, the m_x in row order.
    """
    values = np.asarray(per_sample, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"per-sample KL estimates must be a (prompts, samples) array, got shape {values.shape}")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a prompt with no sample is NaN, said by num_prompts
        per_prompt = np.nanmean(values, axis=1) if values.size else np.full(values.shape[0], np.nan)
    estimate = bootstrap_mean(per_prompt, num_boot=num_boot, rng=rng).to_dict()
    held = per_prompt[~np.isnan(per_prompt)]
    sd = float(held.std(ddof=1)) if len(held) > 1 else None
    return {**estimate, "sd": sd, "stderr": None if sd is None else sd / float(np.sqrt(len(held))),
            "per_prompt": [float(v) for v in per_prompt]}
