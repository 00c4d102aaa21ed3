"""Preference pairs within prompts from calibrated rows (docs/theory.md §4, docs/finite_k.md §4).

With ρ = log π_θ − log π_ref, the tilted policy π* ∝ π_ref·exp(Φ(Ĉ)/β) solves
β·ρ(x, y) = Φ(Ĉ(x, y)) − β·log Z, so for a pair of responses to one prompt, ``target_phi_gap`` =
Φ(u_chosen) − Φ(u_rejected) = β(ρ*₁ − ρ*₂) ≥ 0 (the IPO and distillation target) and the
Bradley–Terry soft label ``label`` = σ(target_phi_gap) = σ(β(ρ*₁ − ρ*₂)), which is exactly what
``losses.dpo_loss`` (logits β·Δρ) is fitted to at π*. The rows, their checks and node values Φ:
:mod:`ctrl_offline.rows.calibrated_rows`; the pairs are group arithmetic on prompt codes
(:mod:`ctrl_offline.maths.groups`), no loop per prompt.

>>> import numpy as np
>>> pairs = make_pairs(["a", "a", "b", "b"], [0.0, 1.0, 0.5, 0.5], "identity", 0.5)
>>> pairs.chosen.tolist(), pairs.rejected.tolist(), pairs.target_phi_gap.tolist()
([1], [0], [1.0])
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctrl_offline.maths.transforms import SynthesisError
from ctrl_offline.rows.calibrated_rows import prepare
from ctrl_offline.maths.groups import all_pairs, extreme_per_group, group_layout, rank_in_group
from ctrl_offline.maths.transforms import Transform

__all__ = ["Pairs", "PAIR_STRATEGIES", "make_pairs"]

PAIR_STRATEGIES = ("all", "best_vs_rest", "best_vs_worst", "sampled")


@dataclass(frozen=True)
class Pairs:
    """Preference pairs within prompts, one entry per pair (arrays of equal length).

    ``chosen`` / ``rejected``: row indices into the input arrays; ``target_phi_gap``:
    Φ(u_chosen) − Φ(u_rejected) ≥ 0, the Φ difference β·Δρ is fitted to; ``label``: the soft
    label σ(target_phi_gap) (Φ in the units of β — see :func:`make_pairs`); ``weight``: per-pair
    weight, 1.0. ("margin" is left to the trainer's β·Δρ, TRL's ``rewards/margins``.)
    """

    chosen: np.ndarray
    rejected: np.ndarray
    target_phi_gap: np.ndarray
    label: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 values (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _check_strategy(strategy, pairs_per_prompt, seed) -> None:
    if strategy not in PAIR_STRATEGIES:
        raise SynthesisError(f"unknown pair strategy {strategy!r}; choose one of {', '.join(PAIR_STRATEGIES)}")
    if pairs_per_prompt is not None:
        integral = isinstance(pairs_per_prompt, numbers.Integral) and not isinstance(pairs_per_prompt, bool)
        if not integral or pairs_per_prompt < 1:
            raise SynthesisError(f"pairs_per_prompt must be an integer ≥ 1, got {pairs_per_prompt!r}")
        if strategy != "sampled":
            raise SynthesisError(f"pairs_per_prompt applies only to strategy 'sampled', not {strategy!r}")
    elif strategy == "sampled":
        raise SynthesisError("strategy 'sampled' needs pairs_per_prompt (an integer ≥ 1)")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise SynthesisError(f"seed must be an integer, got {seed!r}")


def _sample(chosen, rejected, codes, uniques, pairs_per_prompt: int, seed: int):
    """``pairs_per_prompt`` of each prompt's pairs, uniformly without replacement, by hash keys of
    (seed, prompt id, the pair's positions among the prompt's rows): the smallest keys win."""
    n_groups = len(uniques)
    _, _, _, rank_of_row = group_layout(codes, n_groups)
    lo = np.minimum(rank_of_row[chosen], rank_of_row[rejected]).astype(np.uint64)
    hi = np.maximum(rank_of_row[chosen], rank_of_row[rejected]).astype(np.uint64)
    salt = _mix64(np.array([int(seed) % 2**64], dtype=np.uint64))[0]
    prompt_key = _mix64(pd.util.hash_array(uniques) ^ salt)
    group = codes[chosen]
    # Distinct (lo, hi) of one prompt get distinct keys (_mix64 is a bijection). One stable
    # argsort of (prompt code in the high bits, the key's top bits below) orders each prompt's
    # pairs by key; a collision of the kept bits falls back on the (lo, hi) order.
    key = _mix64(prompt_key[group] ^ ((lo << np.uint64(32)) | hi))
    shift = np.uint64(max(int(n_groups - 1).bit_length(), 1))
    order = np.argsort((group.astype(np.uint64) << (np.uint64(64) - shift)) | (key >> shift), kind="stable")
    picked = order[rank_in_group(group[order]) < pairs_per_prompt]
    return chosen[picked], rejected[picked]


def make_pairs(
    prompt_ids,
    u,
    transform: Transform | str,
    beta: float,
    *,
    strategy: str = "all",
    pairs_per_prompt: int | None = None,
    drop_ties: bool = True,
    seed: int = 0,
    targets: str = "loo",
    k=None,
) -> Pairs:
    """Preference pairs within each prompt, oriented so the chosen response has the larger u.

    For a pair (1 = chosen, 2 = rejected)::

        target_phi_gap = Φ(u₁) − Φ(u₂)  (≥ 0)         label = σ(target_phi_gap)        weight = 1

    At π*, β(ρ₁ − ρ₂) = Φ(u₁) − Φ(u₂): the Φ gap is the IPO / distillation target and the label is
    the Bradley–Terry probability σ(β(ρ₁ − ρ₂)) that ``losses.dpo_loss`` (logits β·Δρ) is fitted to,
    so its optimum is π*. (Φ is in the units of β, as the planner's β is: the label is σ(ΔΦ), not
    σ(ΔΦ/β).)

    Strategies:

    * ``all`` — every unordered pair of rows of a prompt (K(K−1)/2 for K rows);
    * ``best_vs_rest`` — the row with the largest u (ties to the lowest row index) against every
      other row of its prompt (K − 1);
    * ``best_vs_worst`` — one pair per prompt, largest u against smallest u (ties to the lowest row
      index): the familiar hard-label baseline, which discards the transform's shape;
    * ``sampled`` — ``pairs_per_prompt`` of the prompt's ``all`` pairs (after ``drop_ties``), drawn
      uniformly without replacement (all of them when fewer exist). The draw of a prompt depends
      only on ``seed``, its prompt id and its own rows (their order and u), not on the other
      prompts or where the prompt's rows sit in the input: each pair gets a hash key of
      (seed, prompt id, the pair's positions among the prompt's rows) and the smallest keys win.

    ``targets``: the node value Φ stands for — ``"loo"``, Φ(u); ``"cell"``, the tilt's mass on the
    row's quantile cell among the prompt's K samples (``k``: K, an integer or one per row; default the
    prompt's row count), finite for ``log`` (docs/finite_k.md §5).

    ``drop_ties`` skips pairs with equal u: they carry no preference under hard labels.
    ``drop_ties=False`` keeps them with Φ gap 0 and label ½ (chosen = the earlier row), which
    the soft-label DPO, IPO and distillation losses can use (they pull ρ₁ − ρ₂ to 0).

    Output order: by the prompt's first appearance in ``prompt_ids``, then chosen row, then
    rejected row.
    """
    _check_strategy(strategy, pairs_per_prompt, seed)
    codes, uniques, u, phi, _, transform = prepare(prompt_ids, u, transform, beta, targets=targets, k=k)
    n_groups = len(uniques)

    if strategy in ("all", "sampled"):
        a, b = all_pairs(codes, n_groups)
    elif strategy == "best_vs_rest":
        best_of = np.empty(n_groups, dtype=np.int64)
        best = extreme_per_group(codes, u, largest=True)
        best_of[codes[best]] = best
        b = np.flatnonzero(best_of[codes] != np.arange(len(codes)))
        a = best_of[codes[b]]
    else:
        a, b = extreme_per_group(codes, u, largest=True), extreme_per_group(codes, u, largest=False)
        keep = a != b  # single-row prompts give no pair
        a, b = a[keep], b[keep]

    swap = u[b] > u[a]
    chosen, rejected = np.where(swap, b, a), np.where(swap, a, b)
    if drop_ties:
        distinct = u[chosen] != u[rejected]
        chosen, rejected = chosen[distinct], rejected[distinct]
    if strategy == "sampled":
        chosen, rejected = _sample(chosen, rejected, codes, uniques, pairs_per_prompt, seed)

    order = np.lexsort((rejected, chosen, codes[chosen]))
    chosen, rejected = chosen[order], rejected[order]
    phi_gap = phi[chosen] - phi[rejected]
    if np.any(phi_gap < 0):
        wrong = np.flatnonzero(phi_gap < 0)
        raise SynthesisError(
            f"transform {transform.spec!r} is not increasing: Φ(u_chosen) < Φ(u_rejected) for "
            f"{len(wrong)} pair(s), e.g. rows {chosen[wrong[0]]} (u = {u[chosen[wrong[0]]]}) and "
            f"{rejected[wrong[0]]} (u = {u[rejected[wrong[0]]]})"
        )
    return Pairs(
        chosen=chosen,
        rejected=rejected,
        target_phi_gap=phi_gap,
        label=1.0 / (1.0 + np.exp(-phi_gap)),  # phi_gap ≥ 0: no overflow
        weight=np.ones(len(chosen)),
    )
