"""Training configs: TRL's DPO/SFT configs plus the CTRL loss settings (TRL's config/trainer pairing).

``CTRLConfig`` drives :class:`~ctrl_offline.training.trainer.CTRLTrainer` on preference pairs,
``CTRLPointwiseConfig`` drives :class:`~ctrl_offline.training.trainer.CTRLPointwiseTrainer` on single
responses, ``CTRLGroupedConfig`` drives :class:`~ctrl_offline.training.grouped.CTRLGroupedTrainer` on
grouped rows (one per prompt; any registered loss). Both default ``bf16`` to what the machine supports instead of TRL's unconditional
``True``, so the same config runs on a CPU and on a GPU.

β travels with the data: ``ctrl-data build`` writes the training targets with Φ rescaled to
span 1 on [0, 1] and records in the dataset folder's ``ctrl_build.json`` the ``beta`` that goes
with them (= the planner's raw-Φ β, ``unscaled_beta``, divided by ``phi_scale``, the raw Φ's
span). ``beta`` defaults to None: the trainer then reads it from that metadata. A ``beta`` given
anyway must agree with it (relative tolerance 1e-6) unless ``allow_beta_mismatch``.

``min_train_rows`` (default :data:`MIN_TRAIN_ROWS`): the trainers refuse a smaller training set
with a message that says what to change upstream, instead of training on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig, SFTConfig

from ctrl_offline.maths.losses import PAIR_LOSSES, SINGLE_LOSSES, get_loss, loss_names

__all__ = ["CTRLConfig", "CTRLPointwiseConfig", "CTRLGroupedConfig", "MIN_TRAIN_ROWS"]

#: Fewest training rows (pairs, or single responses) the trainers accept by default: a smaller set
#: usually means the build left out most samples (cut completions, ties) and a run on it would be
#: a handful of steps on a handful of rows. ``min_train_rows`` overrides it (0 turns the check off).
MIN_TRAIN_ROWS = 8

_BETA_HELP = (
    "KL coefficient β of the tilted policy for Φ rescaled to span 1 on [0, 1] (= the planner's raw-Φ β, "
    "`unscaled_beta`, divided by `phi_scale`). Default: read from the training set's build metadata "
    "(ctrl_build.json); a value given must agree with it unless allow_beta_mismatch."
)
_MIN_ROWS_HELP = (
    f"Fewest training rows the trainer accepts (default {MIN_TRAIN_ROWS}); a smaller training set is refused with a "
    "message naming what to change (more prompts or K, keep cut completions, a larger max_new_tokens). 0: no check."
)
_ALLOW_MISMATCH_HELP = (
    "Train with the given beta even where it differs from the beta recorded in the training set's build "
    "metadata (a different tilt of the same targets, not the planned one)."
)
_ROW_TOKENS_HELP = (
    "Tokens per packed row under the eager / sdpa attentions, which mask a whole row (default 512): a batch goes "
    "into as many rows as that takes, balanced. FlashAttention packs the whole batch in one row."
)


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class _CTRLSettings:
    """The fields and checks both CTRL configs add to their TRL config (listed before it in the bases,
    so these fields and this ``__post_init__`` come first; ``super()`` then reaches TRL's)."""

    _pairwise = True  # which trainer's losses (the registry's pairs losses, the single-response ones, None: all)

    beta: float | None = field(default=None, metadata={"help": _BETA_HELP})
    allow_beta_mismatch: bool = field(default=False, metadata={"help": _ALLOW_MISMATCH_HELP})
    min_train_rows: int = field(default=MIN_TRAIN_ROWS, metadata={"help": _MIN_ROWS_HELP})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; defaults to on where the GPU supports it."}
    )

    def __post_init__(self):
        names = tuple(n for n in loss_names() if self._pairwise is None or get_loss(n).pairwise == self._pairwise)
        if self.ctrl_loss not in names:
            raise ValueError(f"ctrl_loss must be one of {names}, got {self.ctrl_loss!r}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be > 0 (or None to read it from the build metadata), got {self.beta!r}")
        if self.min_train_rows < 0:
            raise ValueError(f"min_train_rows must be ≥ 0, got {self.min_train_rows!r}")
        if self.bf16 is None:
            self.bf16 = _bf16_supported() and not self.fp16
        super().__post_init__()


@dataclass
class CTRLConfig(_CTRLSettings, DPOConfig):
    r"""Config of the pairwise CTRL trainer. All of [`trl.DPOConfig`] plus:

    ``ctrl_loss`` picks the loss on the stored targets: ``dpo`` (soft labels, the default),
    ``dpo_hard`` (the usual DPO on best-vs-worst pairs, the baseline), ``ipo`` (transformed
    margin as target) or ``distill`` (pairwise reward distillation). ``beta`` is the KL
    coefficient β of the tilted policy for Φ rescaled to span 1 — the planner's β divided by
    ``phi_scale``, not the planner's β itself — and by default (None) is read from the
    training set's build metadata; ``allow_beta_mismatch`` lets a different one through.
    ``padding_free`` (TRL's field, which TRL's own DPOTrainer turns off) packs the batch's sequences end to end
    without padding when the rows carry their token ids (:mod:`ctrl_offline.training.packing`).
    """

    _pairwise = True

    ctrl_loss: str = field(
        default="dpo",
        # No argparse `choices`: the registry (losses.register_loss) may hold more than the built-ins by then.
        metadata={"help": f"CTRL loss on preference pairs: a registered pairs loss ({', '.join(PAIR_LOSSES)}, …)."},
    )
    packing_row_tokens: int | None = field(default=None, metadata={"help": _ROW_TOKENS_HELP})


@dataclass
class CTRLPointwiseConfig(_CTRLSettings, SFTConfig):
    r"""Config of the pointwise CTRL trainer. All of [`trl.SFTConfig`] plus:

    ``ctrl_loss``: ``pointwise`` (regress β·ρ onto ``target`` = Φ(Ĉ) − β log Z) or
    ``weighted_sft`` (−``weight``·log π(y|x); β is already in the weights). ``beta`` is the KL
    coefficient β for Φ rescaled to span 1, read from the build metadata by default, as in
    :class:`CTRLConfig`.
    """

    _pairwise = False

    ctrl_loss: str = field(
        default="pointwise",
        metadata={"help": f"CTRL loss on single responses: a registered one ({', '.join(SINGLE_LOSSES)}, …)."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the one-off reference pass when `ref_logp` is absent."}
    )



@dataclass
class CTRLGroupedConfig(_CTRLSettings, DPOConfig):
    r"""Config of the grouped CTRL trainer (one row per prompt, each response forwarded once per step). All of
    [`trl.DPOConfig`] plus:

    ``ctrl_loss``: any registered loss — a pairs loss runs over the group's stored pairs, a single-response
    one over its completions. ``per_device_train_batch_size`` counts prompts (groups), each bringing its K
    completions. ``beta`` as in :class:`CTRLConfig`. Batches are always padding-free (``packing_row_tokens``).
    """

    _pairwise = None

    ctrl_loss: str = field(
        default="dpo",
        metadata={"help": f"CTRL loss: any registered loss ({', '.join(PAIR_LOSSES + SINGLE_LOSSES)}, …)."},
    )
    packing_row_tokens: int | None = field(default=None, metadata={"help": _ROW_TOKENS_HELP})
