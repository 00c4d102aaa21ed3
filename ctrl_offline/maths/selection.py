"""Inference-time selectors over N candidates, vectorised over a batch of prompts (docs/selector_planning.md).

Each selector maps rewards of shape ``(B, N)`` (and reference log-probs where needed) to a
selection distribution ``probs`` of the same shape; :func:`choose` turns it into indices,
greedily or by sampling. NaN rewards mark missing candidates: they get probability 0 and are
counted in ``Selection.num_excluded``. The procedures are known by name through the registry in
:mod:`ctrl_offline.maths.procedures`, above this module; :func:`ctrl_offline.maths.procedures.select` applies one by name.

* best-of-N / worst-of-N: argmax / argmin;
* soft best-of-N: p ∝ exp(r/λ);
* regularised best-of-N: argmax r + β·log π_ref(y|x);
* ITP (χ²-style): N·p_i = [(r_i − η)/β]_+ with η normalising;
* Tsallis-regularised selection of order α: N·p_i = [(α−1)/(αλ)·(r_i − η)]_+^{1/(α−1)}, the
  maximiser of Σ p_i r_i − λ·D_α(p ‖ uniform), η by bisection; α → 1 gives soft best-of-N,
  α = 2 gives ITP with β = 2λ, λ → 0 gives best-of-N;
* Best-of-Tails (Hsu, Lei & Chen 2026): rewards min–max normalised per prompt, a Hill estimate
  κ̂ of the top tail from the top-k order statistics, α = 1 + κ̂/(κ̂ + κ₀), then the Tsallis
  selection of order α — heavier tails select more cautiously.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "as_rewards",
    "Selection",
    "best_of_n",
    "worst_of_n",
    "soft_best_of_n",
    "regularized_best_of_n",
    "itp",
    "tsallis_selection",
    "hill_estimate",
    "best_of_tails",
    "choose",
]


@dataclass(frozen=True)
class Selection:
    """The chosen candidate of each prompt (−1 where all are missing) and the selection distribution."""

    index: np.ndarray
    probs: np.ndarray
    num_excluded: int


def as_rewards(rewards) -> tuple[np.ndarray, np.ndarray]:
    """(rewards as a (B, N) float array, the mask of present candidates); ValueError for a bad shape or ±inf."""
    r = np.asarray(rewards, dtype=float)
    if r.ndim == 1:
        r = r[None, :]
    if r.ndim != 2 or r.shape[1] == 0:
        raise ValueError(f"rewards must have shape (prompts, N) with N ≥ 1, got {np.shape(rewards)}")
    if np.isinf(r).any():
        raise ValueError("rewards must be finite (NaN marks a missing candidate)")
    return r, ~np.isnan(r)


def _check_positive(name: str, value: float) -> None:
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _one_hot(index: np.ndarray, valid: np.ndarray) -> np.ndarray:
    probs = np.zeros(valid.shape)
    rows = np.flatnonzero(valid.any(axis=1))
    probs[rows, index[rows]] = 1.0
    return probs


def best_of_n(rewards) -> np.ndarray:
    """One-hot on the largest reward (first one on ties)."""
    r, valid = as_rewards(rewards)
    return _one_hot(np.argmax(np.where(valid, r, -np.inf), axis=1), valid)


def worst_of_n(rewards) -> np.ndarray:
    """One-hot on the smallest reward (first one on ties)."""
    r, valid = as_rewards(rewards)
    return _one_hot(np.argmin(np.where(valid, r, np.inf), axis=1), valid)


def soft_best_of_n(rewards, lam: float) -> np.ndarray:
    """p ∝ exp(r/λ) over the available candidates."""
    _check_positive("lambda", lam)
    r, valid = as_rewards(rewards)
    z = np.where(valid, r / lam, -np.inf)
    top = np.max(z, axis=1, keepdims=True)
    w = np.where(valid, np.exp(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def regularized_best_of_n(rewards, ref_logps, beta: float) -> np.ndarray:
    """One-hot on argmax r + β·log π_ref(y|x)."""
    _check_positive("beta", beta)
    r, valid = as_rewards(rewards)
    ref = np.asarray(ref_logps, dtype=float).reshape(r.shape)
    return _one_hot(np.argmax(np.where(valid, r + beta * ref, -np.inf), axis=1), valid)


def _power_distribution(r, valid, scale, exponent):
    """N·p_i = [scale·(r_i − η)]_+^exponent with η found by bisection so Σp = 1 (per row).

    ``scale`` and ``exponent`` are scalars or one value per row.
    """
    scale = np.broadcast_to(np.asarray(scale, dtype=float), (r.shape[0],))
    exponent = np.broadcast_to(np.asarray(exponent, dtype=float), (r.shape[0],))[:, None]
    n = valid.sum(axis=1)
    rmax = np.where(valid, r, -np.inf).max(axis=1)
    rmin = np.where(valid, r, np.inf).min(axis=1)
    ok = n > 0
    hi = np.where(ok, rmax, 0.0)  # Σp = 0 there
    lo = np.where(ok, rmin - 1.0 / scale, 0.0)  # every term ≥ 1 there, so Σp ≥ 1
    safe_r = np.where(valid, r, 0.0)

    def log_mass(eta):
        gap = scale[:, None] * (safe_r - eta[:, None])
        with np.errstate(divide="ignore"):
            logs = np.where(valid & (gap > 0), exponent * np.log(np.maximum(gap, 1e-300)), -np.inf)
        top = logs.max(axis=1)
        top_safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):  # an empty row has log mass −inf
            total = np.log(np.exp(logs - top_safe[:, None]).sum(axis=1))
        return top_safe + total - np.log(np.maximum(n, 1)), logs

    for _ in range(200):  # bisection halves the bracket: 200 steps reach double precision
        mid = 0.5 * (lo + hi)
        value, _ = log_mass(mid)
        above = value > 0
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    _, logs = log_mass(lo)
    w = np.where(np.isfinite(logs), np.exp(logs - np.where(ok, logs.max(axis=1), 0.0)[:, None]), 0.0)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def itp(rewards, beta: float) -> np.ndarray:
    """χ²-style selection: N·p_i = [(r_i − η)/β]_+, η chosen so the probabilities sum to 1."""
    _check_positive("beta", beta)
    r, valid = as_rewards(rewards)
    return _power_distribution(r, valid, 1.0 / beta, 1.0)


def tsallis_selection(rewards, alpha, lam: float) -> np.ndarray:
    """Tsallis-regularised selection of order α ∈ [1, 2] (per prompt when α is an array).

    Maximises Σ p_i r_i − λ·D_α(p ‖ uniform), D_α(p‖q) = (Σ p_i^α q_i^{1−α} − 1)/(α − 1):
    N·p_i = [(α−1)/(αλ)·(r_i − η)]_+^{1/(α−1)}. At α = 1 it is soft best-of-N.
    """
    _check_positive("lambda", lam)
    r, valid = as_rewards(rewards)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=float), (r.shape[0],))
    if np.any((alpha < 1) | (alpha > 2) | ~np.isfinite(alpha)):
        raise ValueError("alpha must lie in [1, 2]")
    probs = np.empty_like(r)
    near_one = alpha < 1 + 1e-9
    if near_one.any():
        probs[near_one] = soft_best_of_n(np.where(valid[near_one], r[near_one], np.nan), lam)
    rows = ~near_one
    if rows.any():
        a = alpha[rows]
        probs[rows] = _power_distribution(r[rows], valid[rows], (a - 1) / (a * lam), 1.0 / (a - 1))
    return probs


def hill_estimate(rewards, k: int | None = None, statistic: str = "hill") -> np.ndarray:
    """Per-prompt heaviness κ̂ of the top tail of the N rewards, from the top-k order statistics.

    Rewards are min–max normalised to [0, 1] per prompt first. ``hill``: the Hill estimator on
    x = 1 + r, (1/k) Σ_{i≤k} log(x_(i)/x_(k+1)); ``mean_excess``: (1/k) Σ_{i≤k} (r_(i) − r_(k+1)).
    Default k = ⌊√N⌋ (of the available candidates, at least 1 and at most N − 1).
    """
    r, valid = as_rewards(rewards)
    if statistic not in ("hill", "mean_excess"):
        raise ValueError(f"statistic must be 'hill' or 'mean_excess', got {statistic!r}")
    n = valid.sum(axis=1)
    lo = np.where(valid, r, np.inf).min(axis=1, keepdims=True)
    hi = np.where(valid, r, -np.inf).max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = np.where(valid, (r - lo) / span, -np.inf)
    ordered = -np.sort(-norm, axis=1)  # descending, missing last
    ordered = np.where(np.isfinite(ordered), ordered, 0.0)  # masked out below; keeps the logs finite
    kk = np.floor(np.sqrt(n)).astype(int) if k is None else np.full(len(n), int(k))
    if k is not None and k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    kk = np.clip(kk, 1, np.maximum(n - 1, 1))
    cols = np.arange(r.shape[1])[None, :]
    top = cols < kk[:, None]
    anchor = np.take_along_axis(ordered, np.minimum(kk, r.shape[1] - 1)[:, None], axis=1)
    terms = np.log1p(ordered) - np.log1p(anchor) if statistic == "hill" else ordered - anchor
    kappa = np.where(top, terms, 0.0).sum(axis=1) / kk
    return np.where(n >= 2, np.maximum(kappa, 0.0), 0.0)


def best_of_tails(rewards, lam: float, kappa0: float = 0.1, k: int | None = None, statistic: str = "hill"):
    """Best-of-Tails: Tsallis selection with per-prompt order α = 1 + κ̂/(κ̂ + κ₀) ∈ [1, 2).

    Returns (probs, alpha). Rewards are normalised to [0, 1] per prompt before selection.
    """
    _check_positive("kappa0", kappa0)
    _check_positive("lambda", lam)
    r, valid = as_rewards(rewards)
    kappa = hill_estimate(r, k=k, statistic=statistic)
    alpha = 1.0 + kappa / (kappa + kappa0)
    lo = np.where(valid, r, np.inf).min(axis=1, keepdims=True)
    hi = np.where(valid, r, -np.inf).max(axis=1, keepdims=True)
    norm = np.where(valid, (r - lo) / np.where(hi > lo, hi - lo, 1.0), np.nan)
    return tsallis_selection(norm, alpha, lam), alpha


def choose(probs: np.ndarray, sample: bool = False, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Chosen index per row: the mode (greedy) or a draw from the distribution; −1 for empty rows."""
    probs = np.asarray(probs, dtype=float)
    empty = probs.sum(axis=1) <= 0
    if sample:
        rng = np.random.default_rng(rng)
        cdf = np.cumsum(probs, axis=1)
        draws = rng.random(len(probs)) * cdf[:, -1]
        index = np.minimum((cdf < draws[:, None]).sum(axis=1), probs.shape[1] - 1)
    else:
        index = np.argmax(probs, axis=1)
    return np.where(empty, -1, index)
