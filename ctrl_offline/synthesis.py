"""Training targets from calibrated rewards (DESIGN.md §2.4, §3): pairs, pointwise targets, weights.

Pure numpy, vectorised over prompts (group arithmetic on integer prompt codes, no loop per
prompt). Inputs are the calibrated rows of the ``build`` stage: a prompt id and Ĉ = u ∈ [0, 1]
per response; outputs index those rows.

* pairs: ``target_margin`` = Φ(u_chosen) − Φ(u_rejected) ≥ 0 and the Bradley–Terry soft label
  ``label`` = σ(target_margin), whose DPO optimum β(ρ₁ − ρ₂) = Φ₁ − Φ₂ is the tilted policy
  π* ∝ π_ref·exp(Φ/β);
* pointwise: ``target`` = Φ(u) − β·log Z (β ρ's value at π*);
* weights: w ∝ exp(Φ(u)/β) within each prompt (reward-weighted regression).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .transforms import Transform, get_transform

__all__ = ["SynthesisError", "Pairs", "PAIR_STRATEGIES", "make_pairs", "pointwise_targets", "sft_weights",
           "log_partition_gap"]

PAIR_STRATEGIES = ("all", "best_vs_rest", "best_vs_worst", "sampled")


class SynthesisError(ValueError):
    """Bad input to target synthesis; the message names the offending rows."""


@dataclass(frozen=True)
class Pairs:
    """Row indices of chosen/rejected responses with their targets (one entry per pair)."""

    chosen: np.ndarray
    rejected: np.ndarray
    target_margin: np.ndarray
    label: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)


def _prepare(prompt_ids, u, transform, beta):
    u = np.asarray(u, dtype=float)
    prompt_ids = np.asarray(prompt_ids)
    if u.ndim != 1 or prompt_ids.shape != u.shape:
        raise SynthesisError(f"prompt ids and u must be 1-D arrays of one length, got {prompt_ids.shape} and {u.shape}")
    bad = ~((u >= 0) & (u <= 1))  # also catches NaN
    if bad.any():
        rows = np.flatnonzero(bad)
        raise SynthesisError(f"{len(rows)} calibrated value(s) are NaN or outside [0, 1]: rows {rows[:5].tolist()}")
    if not (np.isfinite(beta) and beta > 0):
        raise SynthesisError(f"beta must be finite and > 0, got {beta!r}")
    codes, _ = pd.factorize(prompt_ids)
    phi = get_transform(transform).phi(u) if isinstance(transform, str) else transform.phi(u)
    return codes.astype(np.int64), u, np.asarray(phi, dtype=float)


def _group_layout(codes: np.ndarray):
    """Rows sorted by (prompt code, row index), with each group's start and size."""
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return order, starts, sizes


def _all_pairs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair (i < j in group order) of rows sharing a prompt."""
    order, starts, sizes = _group_layout(codes)
    n = len(codes)
    local = np.arange(n) - np.repeat(starts, sizes)  # position of each sorted row within its group
    later = np.repeat(sizes, sizes) - 1 - local  # partners after it in the group
    first = np.repeat(np.arange(n), later)
    block_start = np.repeat(np.cumsum(later) - later, later)
    second = first + 1 + (np.arange(len(first)) - block_start)
    return order[first], order[second]


def _extreme_per_group(codes: np.ndarray, u: np.ndarray, best: bool) -> np.ndarray:
    """Row of the largest (or smallest) u per prompt, ties to the lowest row index; in code order."""
    key = -u if best else u
    order = np.lexsort((np.arange(len(u)), key, codes))
    first = np.ones(len(u), dtype=bool)
    first[1:] = codes[order][1:] != codes[order][:-1]
    return order[first]


def make_pairs(prompt_ids, u, transform: Transform | str, beta: float, *, strategy: str = "all",
               pairs_per_prompt: int | None = None, drop_ties: bool = True, seed: int = 0) -> Pairs:
    """Preference pairs within each prompt, oriented so the chosen response has the larger u.

    Strategies: ``all`` (every pair), ``best_vs_rest`` (the top response against each other),
    ``best_vs_worst`` (one pair per prompt: the familiar hard-label baseline) and ``sampled``
    (``pairs_per_prompt`` of the prompt's pairs, uniformly without replacement, seeded).
    ``drop_ties`` skips pairs with equal u; keeping them gives margin 0 and label ½, which the
    soft-label, IPO and distillation losses can still use.
    """
    if strategy not in PAIR_STRATEGIES:
        raise SynthesisError(f"unknown pair strategy {strategy!r}; choose one of {PAIR_STRATEGIES}")
    if strategy == "sampled" and (pairs_per_prompt is None or pairs_per_prompt < 1):
        raise SynthesisError(f"strategy 'sampled' needs pairs_per_prompt ≥ 1, got {pairs_per_prompt!r}")
    codes, u, phi = _prepare(prompt_ids, u, transform, beta)
    if strategy in ("all", "sampled"):
        a, b = _all_pairs(codes)
    elif strategy == "best_vs_rest":
        best = _extreme_per_group(codes, u, best=True)
        best_of = np.empty(codes.max() + 1 if len(codes) else 0, dtype=np.int64)
        best_of[codes[best]] = best
        others = np.flatnonzero(best_of[codes] != np.arange(len(codes)))
        a, b = best_of[codes[others]], others
    else:
        a, b = _extreme_per_group(codes, u, best=True), _extreme_per_group(codes, u, best=False)
        keep = a != b
        a, b = a[keep], b[keep]
    swap = u[b] > u[a]
    chosen, rejected = np.where(swap, b, a), np.where(swap, a, b)
    if drop_ties:
        distinct = u[chosen] != u[rejected]
        chosen, rejected = chosen[distinct], rejected[distinct]
    if strategy == "sampled":
        keys = np.random.default_rng(seed).random(len(chosen))
        order = np.lexsort((keys, codes[chosen]))
        group = codes[chosen][order]
        new_group = np.ones(len(order), dtype=bool)
        new_group[1:] = group[1:] != group[:-1]
        rank = np.arange(len(order)) - np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))
        picked = order[rank < pairs_per_prompt]
        chosen, rejected = chosen[picked], rejected[picked]
    order = np.lexsort((rejected, chosen, codes[chosen]))
    chosen, rejected = chosen[order], rejected[order]
    margin = phi[chosen] - phi[rejected]
    return Pairs(chosen=chosen, rejected=rejected, target_margin=margin,
                 label=1.0 / (1.0 + np.exp(-margin)), weight=np.ones(len(chosen)))


def _group_log_mean_exp(codes: np.ndarray, x: np.ndarray):
    """Per row: log of the mean of exp(x) over its prompt's rows (stable), and the shifted exponentials."""
    top = np.full(codes.max() + 1, -np.inf)
    np.maximum.at(top, codes, x)
    shifted = np.exp(x - top[codes])
    sums = np.bincount(codes, weights=shifted)
    counts = np.bincount(codes)
    return (top + np.log(sums / counts))[codes], shifted, (sums / counts)[codes]


def pointwise_targets(prompt_ids, u, transform: Transform | str, beta: float, *,
                      log_partition: str = "empirical") -> np.ndarray:
    """target = Φ(u) − β·log Z, the value of β·(log π* − log π_ref) at each response.

    ``empirical`` (the default): log Z of each prompt is the log of the mean of exp(Φ(u)/β) over
    that prompt's rows — exact for the data at hand. Ĉ from K reference samples lives on a grid
    (steps of 1/(K−1)), so the continuous-limit log Z of §2.3 mis-states the normaliser by an
    amount that grows with t/β (see ``docs/log_partition.md``); since the offset is shared by
    every response of the prompt, the pointwise optimum would then raise or lower all sampled
    responses together instead of tilting between them. ``continuous``: the prompt-independent
    ``transform.log_partition(beta)``.
    """
    codes, u, phi = _prepare(prompt_ids, u, transform, beta)
    if log_partition == "continuous":
        t = get_transform(transform) if isinstance(transform, str) else transform
        return phi - beta * float(t.log_partition(beta))
    if log_partition != "empirical":
        raise SynthesisError(f"log_partition must be 'empirical' or 'continuous', got {log_partition!r}")
    if len(u) == 0:
        return phi
    log_z, _, _ = _group_log_mean_exp(codes, phi / beta)
    return phi - beta * log_z


def sft_weights(prompt_ids, u, transform: Transform | str, beta: float) -> np.ndarray:
    """w ∝ exp(Φ(u)/β) within each prompt, scaled so each prompt's weights average 1."""
    codes, u, phi = _prepare(prompt_ids, u, transform, beta)
    if len(u) == 0:
        return phi
    _, shifted, mean = _group_log_mean_exp(codes, phi / beta)
    return shifted / mean


def log_partition_gap(transform: Transform | str, beta: float, k: int) -> float:
    """Empirical minus continuous log Z for a tie-free prompt with K reference samples.

    Its leave-one-out values are exactly j/(K−1), j = 0..K−1, so the empirical log Z is
    log mean_j exp(Φ(j/(K−1))/β).
    """
    if k < 2:
        raise SynthesisError(f"K must be at least 2, got {k}")
    t = get_transform(transform) if isinstance(transform, str) else transform
    x = t.phi(np.arange(k) / (k - 1)) / beta
    empirical = x.max() + np.log(np.mean(np.exp(x - x.max())))
    return float(empirical - t.log_partition(beta))
