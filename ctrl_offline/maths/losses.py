"""Offline CTRL losses as pure functions of per-sequence log-probabilities (docs/theory.md §4).

With ρ(x, y) = log π_θ(y|x) − log π_ref(y|x), the tilted policy π* ∝ π_ref·exp(Φ(C)/β) is the
unique solution of β·ρ(x, y) = Φ(C(x, y)) − β·log Z for every response. Each loss below is
minimised exactly there (given enough data and capacity):

* ``pointwise_loss``  (Φ(Ĉ) − β log Z − β ρ)²                 one response at a time
* ``distill_loss``    (β(ρ₁ − ρ₂) − (Φ₁ − Φ₂))²               pairwise reward distillation
* ``dpo_loss``        −[p log σ(βΔρ) + (1−p) log σ(−βΔρ)],  p = σ(Φ₁ − Φ₂)   soft labels
* ``ipo_loss``        (Δρ − (Φ₁ − Φ₂)/β)²                      IPO with the transformed margin
* ``weighted_sft_loss``  −w·log π_θ(y|x), w ∝ exp(Φ(Ĉ)/β) within a prompt
* ``bonbon_loss``     α·(−log π_θ(y_best)) + (1−α)(Δρ − 1/(2β))²   BoNBoN, a baseline (docs/theory.md §4.1)

Every function returns one loss per example (shape ``(B,)``); callers weight and average.
Hard-label DPO (p = 1, best vs worst) is ``dpo_loss(..., label=1.0)``: the familiar baseline,
which discards the transform's shape.

**The registry.** Each trainable loss is one :class:`Loss`: its name (``ctrl_loss``, ``ctrl-data train
--loss``), the build format whose rows it trains on, the columns it reads and how it turns a batch into
per-example losses. The trainers, the configs' choices, the train stage and the CLI read it; adding a
loss is one :func:`register_loss` call (see docs/architecture.md). This module imports torch only when a
loss is computed, so the CLI can list the losses without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    import torch

__all__ = [
    "Loss",
    "register_loss",
    "unregister_loss",
    "get_loss",
    "loss_names",
    "format_losses",
    "LOSS_FORMATS",
    "GROUPED_FORMAT",
    "DATA_FORMATS",
    "GROUPED_BATCH_COLUMNS",
    "LOSS_TYPES",
    "PAIR_LOSSES",
    "SINGLE_LOSSES",
    "soft_label",
    "dpo_loss",
    "ipo_loss",
    "distill_loss",
    "pointwise_loss",
    "weighted_sft_loss",
    "bonbon_margin",
    "bonbon_beta",
    "bonbon_loss",
    "BONBON_ALPHA",
]

#: The build formats (``ctrl-data build --data-format``), in order: pairs train the pairwise trainer, the
#: others the pointwise one.
LOSS_FORMATS = ("pairs", "pointwise", "weights")
#: The layout that serves every loss: one row per prompt with its K completions (docs/data_layout.md), trained by
#: the grouped trainer, which forwards each response once and forms the loss of any pair from the K log-probs.
GROUPED_FORMAT = "grouped"
#: What ``ctrl-data build --data-format`` writes: each loss's format, and the grouped layout.
DATA_FORMATS = LOSS_FORMATS + (GROUPED_FORMAT,)
#: The columns a grouped batch hands a loss of each format (``batch`` of :attr:`Loss.compute`), formed from a
#: group's stored values: per pair Φ(u_chosen) − Φ(u_rejected), its soft label, weight 1 and both u; per
#: completion its target, SFT weight, u and stored reference log-prob.
GROUPED_BATCH_COLUMNS = {
    "pairs": ("target_phi_gap", "label", "weight", "u_chosen", "u_rejected"),
    "pointwise": ("target", "weight", "u", "ref_logp"),
    "weights": ("target", "weight", "u", "ref_logp"),
}


def soft_label(target_phi_gap: "torch.Tensor") -> "torch.Tensor":
    """Bradley–Terry probability that the first response wins: σ(Φ₁ − Φ₂).

    DPO's implicit reward is β·ρ, so its Bradley–Terry optimum σ(β(ρ₁ − ρ₂)) = σ(Φ₁ − Φ₂) is
    exactly β·ρ = Φ − β log Z, the tilted policy (Φ in the units of β, as the planner's β is).
    """
    return target_phi_gap.sigmoid()


def dpo_loss(chosen_logratio: "torch.Tensor", rejected_logratio: "torch.Tensor", beta: float,
             label: "torch.Tensor | float" = 1.0) -> "torch.Tensor":
    """Soft-label DPO: −[p log σ(β(ρ₁−ρ₂)) + (1−p) log σ(β(ρ₂−ρ₁))]; p = 1 gives DPO."""
    import torch
    import torch.nn.functional as F

    logits = beta * (chosen_logratio - rejected_logratio)
    label = torch.as_tensor(label, dtype=logits.dtype, device=logits.device)
    return -(label * F.logsigmoid(logits) + (1.0 - label) * F.logsigmoid(-logits))


def ipo_loss(chosen_logratio: "torch.Tensor", rejected_logratio: "torch.Tensor", beta: float,
             target_phi_gap: "torch.Tensor") -> "torch.Tensor":
    """IPO with the transformed gap as target: ((ρ₁ − ρ₂) − (Φ₁ − Φ₂)/β)²."""
    return (chosen_logratio - rejected_logratio - target_phi_gap / beta) ** 2


def distill_loss(chosen_logratio: "torch.Tensor", rejected_logratio: "torch.Tensor", beta: float,
                 target_phi_gap: "torch.Tensor") -> "torch.Tensor":
    """Pairwise reward distillation: (β(ρ₁ − ρ₂) − (Φ₁ − Φ₂))²."""
    return (beta * (chosen_logratio - rejected_logratio) - target_phi_gap) ** 2


def pointwise_loss(logratio: "torch.Tensor", beta: float, target: "torch.Tensor") -> "torch.Tensor":
    """Pointwise regression (QRPO-style): (target − β ρ)², target = Φ(Ĉ) − β log Z."""
    return (target - beta * logratio) ** 2


def weighted_sft_loss(logps: "torch.Tensor", weight: "torch.Tensor") -> "torch.Tensor":
    """Reward-weighted regression: −w · log π_θ(y|x)."""
    return -weight * logps


def bonbon_margin(n: int) -> float:
    """(n − 1)·H_{n−1}: the mean log-ratio gap log π_n/π_ref between the best and the worst of n reference
    samples under π_n, the best-of-n policy (docs/theory.md §4.1); BoNBoN's IPO target."""
    if int(n) != n or n < 2:
        raise ValueError(f"best-of-n needs an integer n ≥ 2, got {n!r}")
    n = int(n)
    return (n - 1) * sum(1.0 / k for k in range(1, n))


def bonbon_beta(n: int) -> float:
    """β*_n = 1 / (2 (n − 1) H_{n−1}): the β at which IPO's margin 1/(2β) is :func:`bonbon_margin` (BoNBoN)."""
    return 1.0 / (2.0 * bonbon_margin(n))


#: BoNBoN's weight on the NLL of the best sample, α in α·L_SFT + (1 − α)·L_IPO. Its role is to pin the
#: chosen response's likelihood, which IPO on differences leaves free; small, since the sequence NLL is large
#: beside the squared gap once the gap nears its target. Redefine with ``register_loss(..., replace=True)``.
BONBON_ALPHA = 0.005


def bonbon_loss(chosen_logratio: "torch.Tensor", rejected_logratio: "torch.Tensor", beta: float,
                chosen_logps: "torch.Tensor", alpha: float = BONBON_ALPHA) -> "torch.Tensor":
    """BoNBoN (Gui et al., 2024) on best-vs-worst-of-n pairs: α·(−log π_θ(y_best|x)) + (1 − α)(Δρ − 1/(2β))².

    With β = :func:`bonbon_beta` (n) the IPO term's target is :func:`bonbon_margin` (n), which the best-of-n
    policy meets in expectation; the NLL term is supervised fine-tuning on the best samples.
    """
    return alpha * -chosen_logps + (1.0 - alpha) * (chosen_logratio - rejected_logratio - 0.5 / beta) ** 2


# -- the registry --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loss:
    """One trainable loss.

    ``compute`` gives the per-example losses. For a ``pairs`` loss it is called as
    ``compute(chosen_logratio, rejected_logratio, beta, batch)``, ``batch`` holding also the policy's
    summed log-probs ``chosen_logps`` and ``rejected_logps`` (with their gradients); for a single-response loss
    (``pointwise`` or ``weights`` format) as ``compute(logps, logratio, beta, batch)``, with
    ``logratio`` None when ``needs_ref_logps`` is False. ``batch`` maps column names to tensors.
    ``columns`` are the build columns it reads beyond the format's own text columns, each entry a
    tuple of alternatives (any one present will do).
    """

    name: str
    data_format: str
    compute: Callable[..., "torch.Tensor"]
    columns: tuple[tuple[str, ...], ...] = ()
    needs_beta: bool = True
    needs_ref_logps: bool = True
    description: str = ""

    def __post_init__(self):
        if self.data_format not in LOSS_FORMATS:
            raise ValueError(f"loss {self.name!r}: data_format must be one of {LOSS_FORMATS}, got {self.data_format!r}")

    @property
    def pairwise(self) -> bool:
        return self.data_format == "pairs"

    def missing_columns(self, names) -> list[str]:
        """The entries of ``columns`` none of whose alternatives is among ``names``, spelt ``a`` or ``a|b``."""
        names = set(names)
        return ["|".join(alts) for alts in self.columns if not names.intersection(alts)]


_LOSSES: dict[str, Loss] = {}


def register_loss(loss: Loss, *, replace: bool = False) -> Loss:
    """Add ``loss`` to the registry (``replace=True`` to redefine a name)."""
    if loss.name in _LOSSES and not replace:
        raise ValueError(f"a loss named {loss.name!r} is already registered (pass replace=True to redefine it)")
    _LOSSES[loss.name] = loss
    return loss


def unregister_loss(name: str) -> None:
    """Remove a loss (a test's, say) from the registry."""
    if name not in _LOSSES:
        raise ValueError(f"no loss named {name!r} is registered")
    del _LOSSES[name]


def get_loss(name: str) -> Loss:
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(_LOSSES)}") from None


def loss_names(data_format: str | None = None) -> tuple[str, ...]:
    """The registered losses (of one build format when given), in registration order."""
    return tuple(n for n, loss in _LOSSES.items() if data_format is None or loss.data_format == data_format)


def format_losses() -> dict[str, tuple[str, ...]]:
    """Build format → the registered losses its rows serve (``{"pairs": ("dpo", …), …}``)."""
    return {fmt: loss_names(fmt) for fmt in LOSS_FORMATS}


def _column(batch: Mapping, name: str, like: "torch.Tensor") -> "torch.Tensor":
    return batch[name].to(like.dtype)


def _dpo(chosen, rejected, beta, batch):
    label = batch["label"] if "label" in batch else soft_label(batch["target_phi_gap"])
    return dpo_loss(chosen, rejected, beta, label.to(chosen.dtype))


register_loss(Loss("dpo", "pairs", _dpo, columns=(("label", "target_phi_gap"),),
                   description="soft-label DPO on σ(Φ₁ − Φ₂) (the default)"))
register_loss(Loss("dpo_hard", "pairs", lambda c, r, beta, batch: dpo_loss(c, r, beta, 1.0),
                   description="hard-label DPO, chosen always wins (the usual DPO; the baseline)"))
register_loss(Loss("ipo", "pairs",
                   lambda c, r, beta, batch: ipo_loss(c, r, beta, _column(batch, "target_phi_gap", c)),
                   columns=(("target_phi_gap",),), description="IPO with the transformed gap as target"))
register_loss(Loss("distill", "pairs",
                   lambda c, r, beta, batch: distill_loss(c, r, beta, _column(batch, "target_phi_gap", c)),
                   columns=(("target_phi_gap",),), description="pairwise reward distillation"))
register_loss(Loss("bonbon", "pairs",
                   lambda c, r, beta, batch: bonbon_loss(c, r, beta, batch["chosen_logps"].to(c.dtype)),
                   description="BoNBoN baseline: IPO with margin 1/(2β) + α·NLL of the chosen, on best-vs-worst "
                               "pairs with β = β*_n (ctrl_offline.maths.losses.bonbon_beta)"))
register_loss(Loss("pointwise", "pointwise",
                   lambda logps, ratio, beta, batch: pointwise_loss(ratio, beta, _column(batch, "target", logps)),
                   columns=(("target",),), description="regress β·ρ onto Φ(Ĉ) − β log Z, one response at a time"))
register_loss(Loss("weighted_sft", "weights",
                   lambda logps, ratio, beta, batch: weighted_sft_loss(logps, _column(batch, "weight", logps)),
                   columns=(("weight",),), needs_beta=False, needs_ref_logps=False,
                   description="−w·log π(y|x), w ∝ exp(Φ/β) within a prompt (β is in the weights)"))

#: The built-in losses (registered above); read :func:`loss_names` for the registry as it is now.
PAIR_LOSSES = loss_names("pairs")
SINGLE_LOSSES = tuple(n for n in loss_names() if n not in PAIR_LOSSES)
LOSS_TYPES = PAIR_LOSSES + SINGLE_LOSSES
