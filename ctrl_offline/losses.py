"""Offline CTRL losses as pure functions of per-sequence log-probabilities (docs/theory.md §4).

With ρ(x, y) = log π_θ(y|x) − log π_ref(y|x), the tilted policy π* ∝ π_ref·exp(Φ(C)/β) is the
unique solution of β·ρ(x, y) = Φ(C(x, y)) − β·log Z for every response. Each loss below is
minimised exactly there (given enough data and capacity):

* ``pointwise_loss``  (Φ(Ĉ) − β log Z − β ρ)²                 one response at a time
* ``distill_loss``    (β(ρ₁ − ρ₂) − (Φ₁ − Φ₂))²               pairwise reward distillation
* ``dpo_loss``        −[p log σ(βΔρ) + (1−p) log σ(−βΔρ)],  p = σ(Φ₁ − Φ₂)   soft labels
* ``ipo_loss``        (Δρ − (Φ₁ − Φ₂)/β)²                      IPO with the transformed margin
* ``weighted_sft_loss``  −w·log π_θ(y|x), w ∝ exp(Φ(Ĉ)/β) within a prompt

Every function returns one loss per example (shape ``(B,)``); callers weight and average.
Hard-label DPO (p = 1, best vs worst) is ``dpo_loss(..., label=1.0)``: the familiar baseline,
which discards the transform's shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES",
    "PAIR_LOSSES",
    "SINGLE_LOSSES",
    "soft_label",
    "dpo_loss",
    "ipo_loss",
    "distill_loss",
    "pointwise_loss",
    "weighted_sft_loss",
]

PAIR_LOSSES = ("dpo", "dpo_hard", "ipo", "distill")
SINGLE_LOSSES = ("pointwise", "weighted_sft")
LOSS_TYPES = PAIR_LOSSES + SINGLE_LOSSES


def soft_label(target_margin: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry probability that the first response wins: σ(Φ₁ − Φ₂).

    DPO's implicit reward is β·ρ, so its Bradley–Terry optimum σ(β(ρ₁ − ρ₂)) = σ(Φ₁ − Φ₂) is
    exactly β·ρ = Φ − β log Z, the tilted policy (Φ in the units of β, as the planner's β is).
    """
    return torch.sigmoid(target_margin)


def dpo_loss(
    chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, label: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Soft-label DPO: −[p log σ(β(ρ₁−ρ₂)) + (1−p) log σ(β(ρ₂−ρ₁))]; p = 1 gives DPO."""
    logits = beta * (chosen_logratio - rejected_logratio)
    label = torch.as_tensor(label, dtype=logits.dtype, device=logits.device)
    return -(label * F.logsigmoid(logits) + (1.0 - label) * F.logsigmoid(-logits))


def ipo_loss(
    chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, target_margin: torch.Tensor
) -> torch.Tensor:
    """IPO with the transformed margin as target: ((ρ₁ − ρ₂) − (Φ₁ − Φ₂)/β)²."""
    return (chosen_logratio - rejected_logratio - target_margin / beta) ** 2


def distill_loss(
    chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, target_margin: torch.Tensor
) -> torch.Tensor:
    """Pairwise reward distillation: (β(ρ₁ − ρ₂) − (Φ₁ − Φ₂))²."""
    return (beta * (chosen_logratio - rejected_logratio) - target_margin) ** 2


def pointwise_loss(logratio: torch.Tensor, beta: float, target: torch.Tensor) -> torch.Tensor:
    """Pointwise regression (QRPO-style): (target − β ρ)², target = Φ(Ĉ) − β log Z."""
    return (target - beta * logratio) ** 2


def weighted_sft_loss(logps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reward-weighted regression: −w · log π_θ(y|x)."""
    return -weight * logps
