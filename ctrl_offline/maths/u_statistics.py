"""U-statistic win rates: m policy and M reference samples per prompt, every N-subset of each side (pure numpy).

The powered evaluation (docs/evaluation.md): each side's selection weights are averaged over all of
its N-subsets (or over random ones past ``max_subsets``), so every sample counts; a paired bootstrap
compares two evaluations on the same prompts, and :func:`decision_verdict` applies a rule fixed before
the run. Re-exported by :mod:`ctrl_offline.maths.win_rates`.
"""

from __future__ import annotations

import numpy as np

from ctrl_offline.maths.estimates import Estimate, bootstrap_mean, pairwise_win_matrix, subset_fraction
from ctrl_offline.maths.procedures import Procedure, get_procedure
from ctrl_offline.maths.procedures import select

__all__ = ["MAX_SUBSETS", "subset_selection_weights", "u_statistic_per_prompt", "u_statistic_win_rate",
           "decision_verdict", "paired_bootstrap_difference"]

#: Default cap on the N-subsets enumerated per prompt; above it, this many random N-subsets are averaged.
MAX_SUBSETS = 1000


def _order_weights(keys: np.ndarray, valid: np.ndarray, n: int, largest: bool) -> np.ndarray:
    """Subset-averaged weights of "the candidate ranked first by ``keys``" over all N-subsets of a row.

    Candidates are ranked in a total order — ``keys``, ties broken by position the way numpy's
    argmax / argmin do (the earlier candidate wins) — so the pick of a subset is its top element.
    With the row's m available candidates in ascending order, the i-th smallest (i = 1..m) is the
    largest of a uniformly random N-subset with probability C(i−1, N−1)/C(m, N) (the other N − 1
    members come from the i − 1 below it) and the smallest with probability C(m−i, N−1)/C(m, N).
    """
    width = keys.shape[1]
    m = valid.sum(axis=1)
    position = np.broadcast_to(np.arange(width), keys.shape)
    # Ascending in the total order: for the largest, ties go to the earlier position (so it must sort
    # last among equal keys: secondary key −position); for the smallest, the earlier position sorts first.
    secondary = -position if largest else position
    order = np.lexsort((secondary, np.where(valid, keys, np.inf)), axis=1)  # missing candidates last
    rank = np.arange(1, width + 1)[None, :]  # 1-based rank in the ascending order
    mm = np.maximum(m[:, None], n).astype(float)  # rows with m < N are the caller's to mark; keep them finite
    if largest:  # C(i−1, N−1)/C(m, N) = (N/m)·C(i−1, N−1)/C(m−1, N−1)
        w = (n / mm) * subset_fraction(np.minimum(rank - 1, mm - 1), mm - 1, n - 1)
    else:  # C(m−i, N−1)/C(m, N)
        w = (n / mm) * subset_fraction(np.maximum(mm - rank, 0), mm - 1, n - 1)
    w = np.where(rank <= m[:, None], w, 0.0)
    weights = np.zeros_like(w)
    np.put_along_axis(weights, order, w, axis=1)
    return weights


def _subset_average(r: np.ndarray, valid: np.ndarray, n: int, selector: str, ref_logps, max_subsets: int,
                    rng: np.random.Generator, selector_args: dict) -> tuple[np.ndarray, str]:
    """Weights averaged over every N-subset (≤ ``max_subsets`` of them) or over ``max_subsets`` random ones.

    Rows are grouped by their number m of available candidates; within a group each row's subsets
    are the index combinations of its available positions.
    """
    import itertools
    import math

    b, width = r.shape
    weights = np.zeros((b, width))
    m_of_row = valid.sum(axis=1)
    # Available positions first, in their original order (a stable sort of "missing").
    positions = np.argsort(~valid, axis=1, kind="stable")
    methods = set()
    for m in np.unique(m_of_row):
        m = int(m)
        if m < n:
            continue
        rows = np.flatnonzero(m_of_row == m)
        count = math.comb(m, n)
        every = count <= max_subsets
        methods.add("all_subsets" if every else "random_subsets")
        combos = np.array(list(itertools.combinations(range(m), n))) if every else None  # (C, N) in 0..m−1
        subsets = count if every else max_subsets
        # Chunks of rows keep the (rows × subsets × N) arrays near a million entries.
        step = max(1, 2**20 // (subsets * max(n, m)))
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            if every:
                local = np.broadcast_to(combos, (len(chunk), *combos.shape))
            else:  # a uniformly random N-subset: the N smallest of m independent uniforms, per draw
                local = np.argpartition(rng.random((len(chunk), subsets, m)), n - 1, axis=2)[:, :, :n]
            # Local index t of row c's available candidates → its column positions[c, t].
            cols = np.take_along_axis(positions[chunk], local.reshape(len(chunk), -1), axis=1).reshape(-1, n)
            row_of = np.repeat(chunk, subsets)
            sub_r = r[row_of[:, None], cols]
            extra = {} if ref_logps is None else {"ref_logps": ref_logps[row_of[:, None], cols]}
            probs = select(sub_r, selector, **selector_args, **extra).probs
            acc = np.zeros((len(chunk), width))
            np.add.at(acc, (np.repeat(np.arange(len(chunk)), subsets)[:, None], cols), probs)
            weights[chunk] = acc / subsets
    method = "random_subsets" if "random_subsets" in methods else "all_subsets"
    return weights, method


def _checked_ref_logps(procedure: Procedure, ref_logps, valid: np.ndarray) -> np.ndarray:
    """The reference log-probs a procedure reads: the rewards' shape, finite for every available candidate."""
    if ref_logps is None:
        raise ValueError(f"{procedure.description} ({procedure.name}) needs the candidates' reference log-probs")
    logps = np.asarray(ref_logps, dtype=float)
    if logps.shape != valid.shape:
        raise ValueError(f"ref_logps must have the rewards' shape {valid.shape}, got {logps.shape}")
    if not np.isfinite(logps[valid]).all():
        raise ValueError("ref_logps of the available candidates must be finite")
    return logps


def _order_keys(procedure: Procedure, r: np.ndarray, valid: np.ndarray, logps, selector_args: dict) -> np.ndarray:
    """The keys whose largest (or smallest) is the procedure's pick: the rewards, or its ``order.key`` of them."""
    if procedure.order.key is None:
        return r
    safe = None if logps is None else np.where(valid, logps, 0.0)
    return np.asarray(procedure.order.key(r, safe, **procedure.settings(selector_args)), dtype=float)


def subset_selection_weights(rewards, n: int, selector: str = "bon", *, ref_logps=None, max_subsets: int = MAX_SUBSETS,
                             rng: np.random.Generator | int | None = 0, **selector_args) -> tuple[np.ndarray, str]:
    """How often the selector picks each candidate, averaged over all N-subsets of a prompt's candidates.

    ``rewards``: (prompts, m) with NaN marking a missing candidate. Row b's weights are

        P̄_i = (1/C(m_b, N)) Σ_{A ⊆ available, |A| = N} T_A(i)      (T_A(i) = 0 for i ∉ A),

    the selection distribution of T on the N-subset A averaged over every A; they sum to 1. The
    method says how: ``closed_form`` for procedures whose pick is an order statistic (best-of-N,
    worst-of-N, regularised best-of-N: the pick is the top of a total order, weights
    C(i−1, N−1)/C(m, N) on the i-th in it, see :func:`_order_weights`) and for N = 1 (every
    selector picks the single candidate: 1/m each);
    ``all_subsets`` when every prompt has C(m, N) ≤ ``max_subsets`` subsets, enumerated;
    ``random_subsets`` when some prompt has more: ``max_subsets`` uniformly random N-subsets
    (seeded by ``rng``) are averaged instead, still unbiased for the same expectation. Rows with
    fewer than N available candidates get NaN weights. ``selector_args`` (lam, beta, kappa0, k, …)
    go to :func:`ctrl_offline.maths.procedures.select`; procedures that read reference log-probs (``rbon``)
    need ``ref_logps`` of the same shape.
    """
    r = np.asarray(rewards, dtype=float)
    if r.ndim != 2 or r.shape[1] == 0:
        raise ValueError(f"rewards must be a (prompts, candidates) array, got shape {r.shape}")
    if np.isinf(r).any():
        raise ValueError("rewards must be finite (NaN marks a missing candidate)")
    if int(n) != n or n < 1:
        raise ValueError(f"N must be a positive integer, got {n}")
    n = int(n)
    if n > r.shape[1]:
        raise ValueError(f"N = {n} is larger than the candidates available ({r.shape[1]})")
    procedure = get_procedure(selector)
    if not isinstance(max_subsets, (int, np.integer)) or max_subsets < 1:
        raise ValueError(f"max_subsets must be a positive integer, got {max_subsets!r}")
    valid = ~np.isnan(r)
    logps = _checked_ref_logps(procedure, ref_logps, valid) if procedure.needs_ref_logps else None
    few = valid.sum(axis=1) < n
    if n == 1:
        weights, method = valid / np.maximum(valid.sum(axis=1, keepdims=True), 1), "closed_form"
    elif procedure.order is not None:
        weights, method = _order_weights(_order_keys(procedure, r, valid, logps, selector_args), valid, n,
                                         largest=procedure.order.largest), "closed_form"
    else:
        weights, method = _subset_average(r, valid, n, selector, logps, max_subsets, np.random.default_rng(rng),
                                          selector_args)
    weights = np.where(few[:, None], np.nan, weights)
    return weights, method


def u_statistic_per_prompt(policy_rewards, reference_rewards, n: int, selector: str = "bon", *,
                           policy_ref_logps=None, reference_ref_logps=None, max_subsets: int = MAX_SUBSETS,
                           rng: np.random.Generator | int | None = 0, return_methods: bool = False, **selector_args):
    """Per-prompt win rate of T(policy N-subset) over T(reference N-subset), averaged over all subsets.

    With m policy and M reference rewards r, s per prompt (m, M ≥ N; NaN marks a missing one),

        w = (1/(C(m,N)·C(M,N))) Σ_A Σ_B Σ_ij T_A(i) T_B(j) (1[r_i > s_j] + ½·1[r_i = s_j])
          = Σ_ij P̄_i Q̄_j (1[r_i > s_j] + ½·1[r_i = s_j]),

    A, B running over the N-subsets of each side and P̄, Q̄ the subset-averaged selection weights
    (:func:`subset_selection_weights`; the sums over A and B factorise). It is the U-statistic of
    the one-duel win rate: unbiased for P(T(N policy draws) beats T(N reference draws)) and, as the
    average of that duel over every way of choosing the N candidates, of smaller variance than any
    single duel (Hoeffding). For best-of-N it is Σ_ij p_i q_j (1[r_(i) > s_(j)] + ½·1[r_(i) = s_(j)])
    with p_i = C(i−1, N−1)/C(m, N), q_j = C(j−1, N−1)/C(M, N) on the ascending order statistics
    (worst-of-N: C(m−i, N−1)/C(m, N)); at N = 1 it is the mean over all m × M pairs (the standard
    win rate). Prompts with fewer than N available candidates on either side are NaN. Returns the
    (prompts,) array, and the two sides' methods when ``return_methods``.
    """
    r = np.asarray(policy_rewards, dtype=float)
    s = np.asarray(reference_rewards, dtype=float)
    if r.ndim != 2 or s.ndim != 2 or r.shape[0] != s.shape[0]:
        raise ValueError(f"rewards must be (prompts, candidates) arrays for the same prompts, got {r.shape}, {s.shape}")
    p, method_p = subset_selection_weights(r, n, selector, ref_logps=policy_ref_logps, max_subsets=max_subsets,
                                           rng=rng, **selector_args)
    # A different stream for the reference's random subsets (the same seed would pair the draws).
    seed = np.random.default_rng(rng).integers(2**63) if not isinstance(rng, np.random.Generator) else rng
    q, method_q = subset_selection_weights(s, n, selector, ref_logps=reference_ref_logps, max_subsets=max_subsets,
                                           rng=seed, **selector_args)
    out = np.empty(r.shape[0])
    # Chunks of prompts keep the (prompts × m × M) comparison array near a few million entries.
    step = max(1, 2**22 // max(1, r.shape[1] * s.shape[1]))
    for start in range(0, r.shape[0], step):
        sl = slice(start, start + step)
        w = np.nan_to_num(pairwise_win_matrix(r[sl], s[sl]))
        out[sl] = np.einsum("bi,bij,bj->b", np.nan_to_num(p[sl]), w, np.nan_to_num(q[sl]))
    # A probability: clip the float rounding of the weighted sum.
    out = np.clip(out, 0.0, 1.0)
    out = np.where(np.isnan(p).any(axis=1) | np.isnan(q).any(axis=1), np.nan, out)
    return (out, (method_p, method_q)) if return_methods else out


def u_statistic_win_rate(policy_rewards, reference_rewards, n: int, selector: str = "bon", *, policy_ref_logps=None,
                         reference_ref_logps=None, max_subsets: int = MAX_SUBSETS, num_boot: int = 2000, rng=0,
                         **selector_args) -> dict:
    """:func:`u_statistic_per_prompt` averaged over prompts with a percentile bootstrap interval.

    Returns the :class:`Estimate` fields plus ``selector``, ``n``, ``policy_samples`` (m) and
    ``reference_samples`` (M) (the widths of the arrays), ``method`` (``closed_form``,
    ``all_subsets`` or ``random_subsets``; the less exact of the two sides), ``max_subsets``,
    ``excluded_candidates`` (NaN entries) and ``prompts_without_candidates`` (prompts with fewer
    than N candidates on a side, left out of the mean), and ``per_prompt`` (the array).
    """
    per_prompt, methods = u_statistic_per_prompt(
        policy_rewards, reference_rewards, n, selector, policy_ref_logps=policy_ref_logps,
        reference_ref_logps=reference_ref_logps, max_subsets=max_subsets, rng=rng, return_methods=True, **selector_args)
    r = np.asarray(policy_rewards, dtype=float)
    s = np.asarray(reference_rewards, dtype=float)
    order = ("closed_form", "all_subsets", "random_subsets")
    est = bootstrap_mean(per_prompt, num_boot=num_boot, rng=rng)
    return {**est.to_dict(), "selector": selector, "n": int(n), "policy_samples": r.shape[1],
            "reference_samples": s.shape[1], "method": max(methods, key=order.index), "max_subsets": max_subsets,
            "excluded_candidates": int(np.isnan(r).sum() + np.isnan(s).sum()),
            "prompts_without_candidates": int(np.isnan(per_prompt).sum()), "per_prompt": per_prompt}


def decision_verdict(gap: float, ci_low: float, ci_high: float, *, effect: float = 0.03, null: float = 0.01) -> str:
    """The verdict of a method − baseline win-rate gap under a rule fixed before the run.

    ``"shows the effect"`` when gap ≥ ``effect`` and the interval excludes 0 (ci_low > 0);
    ``"refutes it"`` when gap ≤ ``null`` and ci_high < ``effect`` (a method behind its baseline
    refutes it too); ``"inconclusive"`` otherwise. Win rates as fractions (0.03 = 3 points).
    """
    if gap >= effect and ci_low > 0:
        return "shows the effect"
    if gap <= null and ci_high < effect:
        return "refutes it"
    return "inconclusive"


def paired_bootstrap_difference(a, b, *, num_boot: int = 2000, level: float = 0.95,
                                rng: np.random.Generator | int | None = 0) -> Estimate:
    """Mean over prompts of a − b with a paired percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are two evaluations' values on the same prompt i; resampling prompts
    (the pairs together) keeps the per-prompt correlation, so the interval of the difference is
    narrower than the two separate intervals suggest when both share prompts (and a reference
    pool). Prompts where either value is NaN are left out. Raises ValueError for arrays of
    different shapes.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired values must be two 1-d arrays over the same prompts, got shapes {a.shape}, {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    return bootstrap_mean(a - b, num_boot=num_boot, level=level, rng=rng)
