"""Training configs: TRL's DPO/SFT configs plus the CTRL loss settings (TRL's config/trainer pairing).

``CTRLConfig`` drives :class:`~ctrl_offline.trainer.CTRLTrainer` on preference pairs,
``CTRLPointwiseConfig`` drives :class:`~ctrl_offline.trainer.CTRLPointwiseTrainer` on single
responses. Both default ``bf16`` to what the machine supports instead of TRL's unconditional
``True``, so the same config runs on a CPU and on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig, SFTConfig

from .losses import PAIR_LOSSES, SINGLE_LOSSES

__all__ = ["CTRLConfig", "CTRLPointwiseConfig"]


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class CTRLConfig(DPOConfig):
    r"""Config of the pairwise CTRL trainer. All of [`trl.DPOConfig`] plus:

    ``ctrl_loss`` picks the loss on the stored targets: ``dpo`` (soft labels, the default),
    ``dpo_hard`` (the usual DPO on best-vs-worst pairs, the baseline), ``ipo`` (transformed
    margin as target) or ``distill`` (pairwise reward distillation). ``beta`` is the KL
    coefficient β of the tilted policy, the same β the planner reports.
    """

    ctrl_loss: str = field(
        default="dpo",
        metadata={"help": f"CTRL loss on preference pairs, one of {PAIR_LOSSES}.", "choices": list(PAIR_LOSSES)},
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; defaults to on where the GPU supports it."}
    )

    def __post_init__(self):
        if self.ctrl_loss not in PAIR_LOSSES:
            raise ValueError(f"ctrl_loss must be one of {PAIR_LOSSES}, got {self.ctrl_loss!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.bf16 is None:
            self.bf16 = _bf16_supported() and not self.fp16
        super().__post_init__()


@dataclass
class CTRLPointwiseConfig(SFTConfig):
    r"""Config of the pointwise CTRL trainer. All of [`trl.SFTConfig`] plus:

    ``ctrl_loss``: ``pointwise`` (regress β·ρ onto ``target`` = Φ(Ĉ) − β log Z) or
    ``weighted_sft`` (−``weight``·log π(y|x)). ``beta`` is the KL coefficient β.
    """

    ctrl_loss: str = field(
        default="pointwise",
        metadata={"help": f"CTRL loss on single responses, one of {SINGLE_LOSSES}.", "choices": list(SINGLE_LOSSES)},
    )
    beta: float = field(default=0.1, metadata={"help": "KL coefficient β of the tilted policy."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the one-off reference pass when `ref_logp` is absent."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; defaults to on where the GPU supports it."}
    )

    def __post_init__(self):
        if self.ctrl_loss not in SINGLE_LOSSES:
            raise ValueError(f"ctrl_loss must be one of {SINGLE_LOSSES}, got {self.ctrl_loss!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.bf16 is None:
            self.bf16 = _bf16_supported() and not self.fp16
        super().__post_init__()
