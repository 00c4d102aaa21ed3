"""CTRL trainers on TRL: soft-label DPO / IPO / distillation on pairs, pointwise and weighted SFT.

Both trainers reuse TRL for everything but the loss — tokenisation, PEFT wrapping (the
reference is the base with adapters disabled, never a second copy), logging, checkpoints and
the fused LM head that gives per-token log-probs without materialising the logits — and
override ``compute_loss`` only, as TRL's customisation docs recommend.

Pairs (``prompt``, ``chosen``, ``rejected``, + ``target_phi_gap`` / ``label`` / ``weight``):
when ``ref_chosen_logps`` and ``ref_rejected_logps`` are stored (recorded at sampling time)
no reference forward pass runs at all; otherwise TRL computes them once, batched, before
training. Pointwise rows (``prompt``, ``completion``, ``target`` or ``weight``, ``ref_logp``)
need one sequence per example instead of two. ``target_phi_gap`` is the Φ difference
Φ(u_chosen) − Φ(u_rejected) that β·Δρ is fitted to; "margin" is left to the trainer's β·Δρ
(TRL's ``rewards/margins`` metric).

Rows that carry the sampled token ids (``prompt_token_ids`` with ``chosen_ids`` / ``rejected_ids``
for pairs, with ``completion_ids`` for single responses: what ``ctrl-data build`` writes) are trained
on those ids as they are, in TRL's batch contract (``input_ids``, ``attention_mask``,
``completion_mask``, pairs stacked [chosen; rejected]), and nothing is re-tokenised: decoded text need
not tokenise back to the ids it came from, while the stored reference log-probs are log-probs of the
ids. They then always apply, and no reference pass runs. Rows with text only are tokenised by TRL.

With ``padding_free=True`` (TRL's config field, which TRL's own DPOTrainer turns off) a pair batch is packed
without padding: the sequences end to end, position ids restarting at each (:mod:`ctrl_offline.training.packing`),
so variable-length data pays for its real tokens only. Grouped rows (one per prompt, each response forwarded once
per step) are :mod:`ctrl_offline.training.grouped`'s.

Completions cut at ``max_new_tokens`` are trained as prefixes. Their sampled ids have no EOS; for
text-only rows TRL appends EOS to every completion when it tokenises, so where a build flags a
completion as cut (``chosen_finished`` / ``rejected_finished`` False for pairs, ``finished`` False
for single responses) the trainers take that EOS off again right after TRL's dataset preparation
(``_prepare_dataset``). The sequence then matches the stored reference log-prob (which has no EOS
term for a cut completion) and the policy is not taught to stop mid-sentence. Finished completions,
and rows without the flags, keep EOS.

A training set with fewer than ``min_train_rows`` rows (default
:data:`~ctrl_offline.training.config.MIN_TRAIN_ROWS`) is refused with a :class:`TrainingDataError` that
names what to change upstream.

β travels with the data: given a training set loaded from a ``ctrl-data build`` folder
(``load_from_disk``) and no ``beta``, the trainers take the ``beta`` recorded in its
``ctrl_build.json`` (the β for Φ rescaled to span 1, which the stored targets were built with).
A ``beta`` that contradicts it is refused — naming the raw-Φ β when that is what was passed —
unless ``allow_beta_mismatch``; an in-memory dataset without metadata needs ``beta``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl import DPOTrainer, SFTTrainer
from trl.trainer.utils import use_adapter

from ctrl_offline.training.config import CTRLConfig, CTRLPointwiseConfig, MIN_TRAIN_ROWS
from ctrl_offline.training.packing import pack_sequences, packed_sequence_logps, row_tokens_for
from ctrl_offline.io.files import read_build_info
from ctrl_offline.maths.losses import get_loss

__all__ = ["CTRLTrainer", "CTRLPointwiseTrainer", "TrainingDataError", "resolve_beta"]

logger = logging.getLogger(__name__)

PAIR_EXTRA_COLUMNS = ("target_phi_gap", "label", "weight")
REF_PAIR_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
POINTWISE_EXTRA_COLUMNS = ("target", "weight", "ref_logp")
#: TRL's token-id columns of a tokenised pair (``DPOTrainer._prepare_dataset``). ``prompt_ids`` there is the
#: prompt's token ids — not the ``prompt_id`` values (hashed prompt ids) of the CTRL datasets.
TRL_TOKEN_COLUMNS = {"prompt": "prompt_ids", "chosen": "chosen_ids", "rejected": "rejected_ids"}
#: Per-row flags of a build: False where the completion was cut at max_new_tokens (no EOS).
#: Token-id column → (text column, flag column).
PAIR_FINISHED_COLUMNS = {TRL_TOKEN_COLUMNS["chosen"]: ("chosen", "chosen_finished"),
                         TRL_TOKEN_COLUMNS["rejected"]: ("rejected", "rejected_finished")}
POINTWISE_FINISHED_COLUMN = "finished"
#: The token ids a build carries when its samples recorded them (:data:`ctrl_offline.stages.build.ID_COLUMNS`):
#: the prompt's as the sampler tokenised it and the completions' as sampled. A set with them is trained on them
#: as they are, never re-tokenised; a set without them (text only) is tokenised by TRL.
PAIR_ID_COLUMNS = ("prompt_token_ids", TRL_TOKEN_COLUMNS["chosen"], TRL_TOKEN_COLUMNS["rejected"])
POINTWISE_ID_COLUMNS = ("prompt_token_ids", "completion_ids")


class TrainingDataError(ValueError):
    """A training set the trainer cannot use; the message names the rows or columns."""


def _rows(mask: list[bool]) -> str:
    bad = [i for i, b in enumerate(mask) if b]
    shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return f"{len(bad)} row(s): {shown}"


def _check_columns(dataset, required, what: str) -> None:
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise TrainingDataError(f"{what} lacks column(s) {', '.join(missing)} (it has: {', '.join(dataset.column_names)})")


def _extra_columns(base: tuple[str, ...], loss: str) -> tuple[str, ...]:
    """The per-example float columns carried to ``compute_loss``: the trainer's own and those the loss reads."""
    return tuple(dict.fromkeys([*base, *(c for alternatives in get_loss(loss).columns for c in alternatives)]))


def _check_loss_columns(dataset, loss: str, what: str) -> None:
    """The columns the registered loss reads (``Loss.columns``: any one of each entry's alternatives)."""
    missing = get_loss(loss).missing_columns(dataset.column_names)
    if missing:
        spelt = ", ".join(m.replace("|", " or ") for m in missing)
        raise TrainingDataError(f"{what} lacks column(s) {spelt} (it has: {', '.join(dataset.column_names)})")


def _check_text(dataset, columns, what: str) -> None:
    for column in columns:
        empty = [not (isinstance(v, str) and v.strip()) if not isinstance(v, list) else not v for v in dataset[column]]
        if any(empty):
            raise TrainingDataError(f"{what}: empty {column!r} in {_rows(empty)}")


def _check_finite(dataset, columns, what: str) -> None:
    for column in columns:
        if column in dataset.column_names:
            bad = [v is None or not math.isfinite(v) for v in dataset[column]]
            if any(bad):
                raise TrainingDataError(f"{what}: NaN, infinite or missing {column!r} in {_rows(bad)}")


def _check_size(num_rows: int | None, args, build_info: dict | None, what: str = "pairs", note: str = "") -> None:
    """Refuse a training set of fewer than ``args.min_train_rows`` rows, saying what to change."""
    minimum = getattr(args, "min_train_rows", MIN_TRAIN_ROWS)
    if num_rows is None or not minimum or num_rows >= minimum:
        return
    fixes = []
    left_out = (build_info or {}).get("left_out") or {}
    if left_out.get("cut"):
        fixes.append(f"keep the {left_out['cut']} completions its build left out for being cut at max_new_tokens "
                     "(build with keep_unfinished=True, the default) or sample with a larger max_new_tokens")
    elif build_info is None:
        fixes.append("keep the completions cut at max_new_tokens (the build's default) or sample with a larger "
                     "max_new_tokens")
    fixes.append("sample more prompts or a larger K")
    if what == "pairs":
        fixes.append("build more pairs per prompt (strategy 'all')")
    raise TrainingDataError(
        f"train_dataset has {num_rows} {what}{note}, fewer than min_train_rows={minimum}: too few to train on. "
        f"To get more: {'; '.join(fixes)}. Set min_train_rows=0 to train on it anyway.")


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else list(next(iter(dataset)).keys())


def _map_kwargs(dataset, args, desc: str) -> dict:
    import datasets

    if isinstance(dataset, datasets.Dataset):  # IterableDataset.map takes neither
        return {"num_proc": args.dataset_num_proc, "desc": desc}
    return {}


def _strip_appended_eos(dataset, args, tokenizer, columns: dict, name: str):
    """Take off the EOS TRL appended to each completion whose flag says it was cut (pairs).

    ``columns`` maps a token-id column to its (text column, flag column); a flag column the
    dataset lacks means every completion in it finished, as TRL assumes.
    """
    names = _column_names(dataset)
    present = {ids: text_flag for ids, text_flag in columns.items() if text_flag[1] in names}
    if not present:
        return dataset
    eos_id, eos = tokenizer.eos_token_id, tokenizer.eos_token or ""

    def strip(example):
        out = {}
        for ids_column, (text_column, flag_column) in present.items():
            ids, text = example[ids_column], example[text_column]
            if example[flag_column] is not None and not example[flag_column] and ids and ids[-1] == eos_id:
                ids = ids[:-1]
                text = text[: -len(eos)] if eos and text.endswith(eos) else text
            out[ids_column], out[text_column] = ids, text
        return out

    return dataset.map(strip, **_map_kwargs(dataset, args, f"Leaving EOS off the cut completions of the {name} dataset"))


def _has_token_ids(dataset, columns: tuple[str, ...], name: str, model=None) -> bool:
    """Whether ``dataset`` carries the sampled token ids (all of ``columns``), once checked.

    Some of the columns without the others are refused (the prompt and completion ids only make a
    sequence together), as are missing, empty or negative ids and, given ``model``, ids past its
    embedding rows: ids of another model's tokenizer would train silently on the wrong tokens.
    """
    names = _column_names(dataset)
    present = [c for c in columns if c in names]
    if not present:
        return False
    if len(present) < len(columns):
        missing = [c for c in columns if c not in names]
        raise TrainingDataError(f"{name} has {', '.join(present)} but lacks {', '.join(missing)}: give the token ids of "
                                "the prompt and the completions together (a build writes them all), or none, and "
                                "the text is tokenised")
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(dataset, datasets.Dataset):  # an IterableDataset is not read ahead to check its ids
        return True
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocabulary = getattr(embeddings, "num_embeddings", None)
    table = dataset.with_format("arrow")
    for column in columns:
        values = table[column]
        if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)) or not (
                pa.types.is_integer(values.type.value_type) or pa.types.is_null(values.type.value_type)):
            raise TrainingDataError(f"{name}: {column!r} must hold lists of token ids (integers), not {values.type}")
        empty = pc.fill_null(pc.equal(pc.list_value_length(values), 0), True).to_pylist()
        if any(empty):
            raise TrainingDataError(f"{name}: missing or empty {column!r} in {_rows(empty)}")
        extremes = pc.min_max(pc.list_flatten(values))
        low, high = extremes["min"].as_py(), extremes["max"].as_py()
        if low < 0 or (vocabulary is not None and high >= vocabulary):
            bad = low if low < 0 else high
            raise TrainingDataError(
                f"{name}: {column!r} holds token id {bad}, " + ("not a token id" if bad < 0 else
                f"outside the model's vocabulary of {vocabulary}: the ids were sampled with another model's "
                "tokenizer. Train the model that sampled them (the build's reference_model) or rebuild from samples "
                "of this one"))
    return True


def _pairs_from_token_ids(dataset, args, name: str):
    """TRL's tokenised pair columns straight from the sampled ids, nothing re-tokenised.

    ``prompt_token_ids`` becomes TRL's ``prompt_ids``; ``chosen_ids`` / ``rejected_ids`` are already
    TRL's and end in EOS exactly where sampling drew one. As TRL's own preparation does, rows whose
    prompt alone fills ``max_length`` are dropped.
    """
    if "prompt_ids" in _column_names(dataset):
        dataset = dataset.remove_columns("prompt_ids")
    dataset = dataset.rename_column("prompt_token_ids", TRL_TOKEN_COLUMNS["prompt"])
    if args.max_length is not None and args.truncation_mode == "keep_start":
        limit = args.max_length
        dataset = dataset.filter(lambda prompts: [len(p) < limit for p in prompts], batched=True,
                                 input_columns=TRL_TOKEN_COLUMNS["prompt"],
                                 **_map_kwargs(dataset, args, f"Dropping fully truncated examples from {name} dataset"))
    return dataset


def _sequences_from_token_ids(dataset, args, name: str):
    """TRL's tokenised single-response columns from the sampled ids: ``input_ids`` (prompt + completion ids) and
    ``completion_mask`` (1 on the completion). TRL then takes the set as tokenised: it builds the labels and
    truncates, and appends no EOS."""

    def join(example):
        prompt, completion = example["prompt_token_ids"], example["completion_ids"]
        return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}

    return dataset.map(join, remove_columns=list(POINTWISE_ID_COLUMNS),
                       **_map_kwargs(dataset, args, f"Joining the sampled token ids of the {name} dataset"))


def _named(train_dataset, eval_dataset) -> dict:
    """The datasets to validate, by the argument names the messages use."""
    return {"train_dataset": train_dataset, **({"eval_dataset": eval_dataset} if eval_dataset is not None else {})}


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


def resolve_beta(args, train_dataset, eval_dataset=None, *, required: bool = True) -> dict | None:
    """Set ``args.beta`` from the training set's build metadata, or check the given one against it.

    Returns the build metadata (:func:`ctrl_offline.io.files.read_build_info`) of ``train_dataset``, or
    None when it has none. Raises ValueError when ``args.beta`` contradicts the metadata's
    ``beta`` (relative tolerance 1e-6; saying so when the value passed is the raw-Φ
    ``unscaled_beta``) unless ``args.allow_beta_mismatch``, and when there is neither a ``beta``
    nor metadata to read one from (unless not ``required``: a loss that does not use β). A β read
    from metadata is marked as such, so the same ``args`` can serve another training set.
    """
    info = read_build_info(train_dataset)
    recorded = [(name, i) for name, i in (("train_dataset", info),
                                          ("eval_dataset", read_build_info(eval_dataset) if eval_dataset is not None
                                           else None)) if i is not None and i.get("beta") is not None]
    passed = None if getattr(args, "_beta_read_from", None) else args.beta
    given = passed
    if given is None:
        if not recorded and not required:
            args.beta = None
            return info
        if not recorded:
            raise ValueError(
                "beta is needed: the training set has no build metadata (ctrl_build.json) to read it from. Load it "
                "with datasets.load_from_disk from a `ctrl-data build` folder, or pass beta (the β for Φ rescaled to "
                "span 1, that build records: the planner's β divided by phi_scale).")
        given = float(recorded[0][1]["beta"])
        logger.info("beta=%.6g from %s", given, recorded[0][1]["path"])
        args._beta_read_from = recorded[0][1]["path"]
    for name, meta in recorded:
        beta = float(meta["beta"])
        if _same(given, beta):
            continue
        where = f"{name}'s build metadata {meta['path']}"
        if passed is None:  # read from the training set, contradicted by the evaluation set's
            message = f"the training set's beta={given!r} differs from beta={beta!r} in the {where}"
        else:
            message = f"beta={given!r} was passed, but the {where} records beta={beta!r}"
        scale, raw = meta.get("phi_scale"), meta.get("unscaled_beta")
        if passed is not None and raw is not None and scale is not None and _same(given, float(raw)):
            message += (f". You passed the raw-Φ β (unscaled_beta={raw!r}, what the planner prints); the trainer "
                        f"needs the β for Φ rescaled to span 1: beta = unscaled_beta / phi_scale = {raw:.6g} / "
                        f"{scale:.6g} = {beta!r}")
        elif scale is not None:
            message += f" (the β for Φ rescaled by phi_scale={scale:.6g}; the raw-Φ β is unscaled_beta={raw!r})"
        if not args.allow_beta_mismatch:
            raise ValueError(message + ". Leave beta unset to use the recorded one, or set allow_beta_mismatch=True "
                             "to train with the given beta anyway.")
        logger.warning("%s; training with beta=%r anyway (allow_beta_mismatch)", message, given)
    if passed is not None:
        args._beta_read_from = None
    args.beta = given
    return info


class _CarryColumns:
    """Wraps a TRL collator so the per-example float columns reach ``compute_loss``."""

    def __init__(self, collator, columns):
        self.collator = collator
        self.columns = tuple(columns)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for column in self.columns:
            if column in examples[0] and column not in batch:
                batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch


class _PackedPairs:
    """TRL's pair batch without padding: the [chosen; rejected] sequences packed end to end with their position ids
    (:func:`~ctrl_offline.training.packing.pack_sequences`), the per-pair float columns carried as ``_CarryColumns``
    does."""

    def __init__(self, columns, *, max_length: int | None, row_tokens: int | None, pad_token_id: int):
        self.columns = tuple(columns)
        self.max_length, self.row_tokens, self.pad_token_id = max_length, row_tokens, pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [e[TRL_TOKEN_COLUMNS["prompt"]] for e in examples]
        sequences = [(p, e[TRL_TOKEN_COLUMNS[side]]) for side in ("chosen", "rejected") for p, e in zip(prompts, examples)]
        batch = pack_sequences(sequences, max_length=self.max_length, row_tokens=self.row_tokens,
                               pad_token_id=self.pad_token_id)
        for column in self.columns:
            if column in examples[0]:
                batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch


def _sequence_logps(model, input_ids, attention_mask, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the tokens where ``loss_mask`` is 1, and their count, per sequence."""
    labels = input_ids.masked_fill(loss_mask == 0, -100)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                    fused_lm_head=True)
    # Prompt-learning PEFT prepends virtual tokens; keep the positions of the real ones.
    per_token = outputs.log_probs[:, -(input_ids.size(1) - 1):]
    return per_token.sum(dim=1), loss_mask[:, 1:].sum(dim=1)


class _CTRLMixin:
    """What both CTRL trainers do around TRL's: check the config type and the data, resolve β, count rows;
    record and log their own metrics."""

    def _check_inputs(self, args, config_cls, train_dataset, eval_dataset, validate, unit: str,
                      beta_required: bool = True, count=None) -> tuple:
        """The (train, eval) datasets, once checked. ``count``: the training set's size in ``unit`` (default: rows)."""
        if not isinstance(args, config_cls):
            raise TypeError(f"args must be a {config_cls.__name__}, got {type(args).__name__}")
        for name, dataset in _named(train_dataset, eval_dataset).items():
            validate(dataset, args, name)
        self.build_info = resolve_beta(args, train_dataset, eval_dataset, required=beta_required)
        _check_size((count or _len)(train_dataset), args, self.build_info, unit)
        return train_dataset, eval_dataset

    def _record(self, mode: str, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).float().mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()


class CTRLTrainer(_CTRLMixin, DPOTrainer):
    """Offline CTRL on preference pairs: TRL's DPO trainer with CTRL's losses and targets."""

    _tag_names = ["trl", "dpo", "ctrl-offline"]
    _name = "CTRL"

    def __init__(self, model, args: CTRLConfig, train_dataset, eval_dataset=None, processing_class=None,
                 peft_config=None, **kwargs):
        train_dataset, eval_dataset = self._check_inputs(args, CTRLConfig, train_dataset, eval_dataset, self._validate,
                                                         "pairs")
        datasets = _named(train_dataset, eval_dataset)
        # Every set trains on its sampled token ids when it carries them (checked here, used in _prepare_dataset).
        self.uses_stored_token_ids = all([_has_token_ids(d, PAIR_ID_COLUMNS, name, model)
                                          for name, d in datasets.items()])
        stored = all(all(c in d.column_names for c in REF_PAIR_COLUMNS) for d in datasets.values())
        # Stored reference log-probs: TRL must not recompute them; absent: TRL computes them once, batched.
        args.precompute_ref_log_probs = not stored
        self.uses_stored_ref_logps = stored
        # Padding-free batches are this trainer's (TRL's DPOTrainer turns padding_free off with a warning).
        self.packs_sequences = bool(args.padding_free)
        row_tokens = row_tokens_for(model, args.packing_row_tokens) if self.packs_sequences else None
        args.padding_free = False
        raw_rows = len(train_dataset)
        try:
            super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, peft_config=peft_config, **kwargs)
        finally:
            args.padding_free = self.packs_sequences
        self.precompute_ref_logps = True  # the batch always carries the reference log-probs now
        columns = _extra_columns(PAIR_EXTRA_COLUMNS, args.ctrl_loss) + REF_PAIR_COLUMNS
        if self.packs_sequences:
            self.data_collator = _PackedPairs(columns, max_length=args.max_length, row_tokens=row_tokens,
                                              pad_token_id=self._tokenizer.pad_token_id or 0)
        else:
            self.data_collator = _CarryColumns(self.data_collator, columns)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._report_truncation(raw_rows)
        if _len(self.train_dataset) != raw_rows:
            _check_size(_len(self.train_dataset), args, self.build_info, "pairs",
                        f" left once TRL dropped those whose prompt alone fills max_length={args.max_length}")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """The sampled token ids as TRL's columns when the set carries them; else TRL's preparation (EOS
        appended, tokenised), then EOS taken off again where a completion was cut."""
        if set(PAIR_ID_COLUMNS) <= set(_column_names(dataset)):
            return _pairs_from_token_ids(dataset, args, dataset_name)
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return _strip_appended_eos(dataset, args, self._tokenizer, PAIR_FINISHED_COLUMNS, dataset_name)

    @staticmethod
    def _validate(dataset, args: CTRLConfig, name: str) -> None:
        what = f"{name} for ctrl_loss={args.ctrl_loss!r}"
        _check_columns(dataset, ["prompt", "chosen", "rejected"], what)
        _check_loss_columns(dataset, args.ctrl_loss, what)
        _check_text(dataset, ["prompt", "chosen", "rejected"], name)
        _check_finite(dataset, _extra_columns(PAIR_EXTRA_COLUMNS, args.ctrl_loss) + REF_PAIR_COLUMNS, name)
        if "label" in dataset.column_names and any(not 0 <= p <= 1 for p in dataset["label"]):
            raise TrainingDataError(f"{name}: soft labels must lie in [0, 1]")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = _extra_columns(PAIR_EXTRA_COLUMNS, self.args.ctrl_loss)
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _report_truncation(self, raw_rows: int) -> None:
        dropped = raw_rows - len(self.train_dataset)
        if dropped:
            logger.warning("%d of %d pairs were dropped: their prompt alone fills max_length=%s", dropped, raw_rows,
                           self.args.max_length)
        if self.args.max_length is None:
            return
        lengths = zip(*(self.train_dataset[TRL_TOKEN_COLUMNS[c]] for c in ("prompt", "chosen", "rejected")))
        long = sum(len(p) + max(len(c), len(r)) > self.args.max_length for p, c, r in lengths)
        if long:
            logger.warning(
                "%d of %d pairs exceed max_length=%d: their responses are truncated%s", long, len(self.train_dataset),
                self.args.max_length,
                " (their stored reference log-probs cover the full responses: raise max_length or drop them)"
                if self.uses_stored_ref_logps else "",
            )
        self.num_truncated = long

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if "position_ids" in inputs:  # padding-free
            logps = packed_sequence_logps(model, inputs)
        else:
            logps, _ = _sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # the batch is [all chosen; all rejected]
        chosen_ratio = chosen_logps - inputs["ref_chosen_logps"].to(logps.dtype)
        rejected_ratio = rejected_logps - inputs["ref_rejected_logps"].to(logps.dtype)
        beta = self.args.beta
        batch = {**inputs, "chosen_logps": chosen_logps, "rejected_logps": rejected_logps}
        per_pair = get_loss(self.args.ctrl_loss).compute(chosen_ratio, rejected_ratio, beta, batch)
        weight = inputs.get("weight")
        loss = (per_pair * weight.to(per_pair.dtype)).mean() if weight is not None else per_pair.mean()
        margin = beta * (chosen_ratio - rejected_ratio)  # TRL's `rewards/margins`: β·Δρ, not the target Φ gap
        self._record(mode, **{"rewards/margins": margin, "rewards/accuracies": (margin > 0).float(),
                              "logps/chosen": chosen_logps, "logps/rejected": rejected_logps})
        if self.args.ctrl_loss == "dpo":
            self._record(mode, loss_gap=_soft_label_loss_gap(loss, inputs))
        return (loss, {"margins": margin}) if return_outputs else loss


def _soft_label_loss_gap(loss: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The batch's soft-label DPO loss less its floor, mean w·H(p) (docs/diagnostics.md §6).

    Cross-entropy against a soft label p is ≥ its binary entropy H(p), so the batch's loss (the mean
    of w·loss over its pairs) is ≥ :func:`~ctrl_offline.maths.diagnostics.label_entropy_floor` of its labels
    and weights: a gap near 0 is a fit as good as the labels allow (a loss at ln 2 with p ≈ ½ is
    done), a large one a stalled fit. The labels are the loss's own (``label``, or σ(ΔΦ) of
    ``target_phi_gap``).
    """
    from ctrl_offline.maths.diagnostics import label_entropy_floor
    from ctrl_offline.maths.losses import soft_label

    label = inputs["label"] if "label" in inputs else soft_label(inputs["target_phi_gap"])
    weight = inputs.get("weight")
    floor = label_entropy_floor(label.detach().double().cpu().numpy(),
                                None if weight is None else weight.detach().double().cpu().numpy())
    return loss.detach() - floor


class CTRLPointwiseTrainer(_CTRLMixin, SFTTrainer):
    """Offline CTRL one response at a time: pointwise regression or weighted SFT, on TRL's SFT trainer."""

    _tag_names = ["trl", "sft", "ctrl-offline"]
    _name = "CTRL-pointwise"

    def __init__(self, model, args: CTRLPointwiseConfig, train_dataset, eval_dataset=None, processing_class=None,
                 peft_config=None, **kwargs):
        # weighted_sft's weights already hold β: it needs none to train.
        train_dataset, eval_dataset = self._check_inputs(args, CTRLPointwiseConfig, train_dataset, eval_dataset,
                                                         self._validate, "rows",
                                                         beta_required=get_loss(args.ctrl_loss).needs_beta)
        self.uses_stored_token_ids = all([_has_token_ids(d, POINTWISE_ID_COLUMNS, name, model)
                                          for name, d in _named(train_dataset, eval_dataset).items()])
        args.completion_only_loss = True
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config, **kwargs)
        self.data_collator = _CarryColumns(self.data_collator, _extra_columns(POINTWISE_EXTRA_COLUMNS, args.ctrl_loss))
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        if get_loss(args.ctrl_loss).needs_ref_logps:
            if "ref_logp" not in self.train_dataset.column_names:
                self.train_dataset = self._add_ref_logps(self.train_dataset, "train")
            if self.eval_dataset is not None and "ref_logp" not in self.eval_dataset.column_names:
                self.eval_dataset = self._add_ref_logps(self.eval_dataset, "eval")

    @staticmethod
    def _validate(dataset, args: CTRLPointwiseConfig, name: str) -> None:
        what = f"{name} for ctrl_loss={args.ctrl_loss!r}"
        _check_columns(dataset, ["prompt", "completion"], what)
        _check_loss_columns(dataset, args.ctrl_loss, what)
        _check_text(dataset, ["prompt", "completion"], name)
        _check_finite(dataset, _extra_columns(POINTWISE_EXTRA_COLUMNS, args.ctrl_loss), name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = _extra_columns(POINTWISE_EXTRA_COLUMNS, self.args.ctrl_loss)
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation (EOS appended, tokenised, truncated), then EOS taken off again where a completion was cut.

        A set that carries the sampled token ids is joined into TRL's tokenised columns first, so TRL
        tokenises nothing and appends no EOS: the ids are trained as sampled.
        """
        names = _column_names(dataset)
        if set(POINTWISE_ID_COLUMNS) <= set(names) and "input_ids" not in names:
            dataset = _sequences_from_token_ids(dataset, args, dataset_name)
            names = _column_names(dataset)
        cut_rows = POINTWISE_FINISHED_COLUMN in names and "input_ids" not in names
        if cut_rows and packing:
            raise TrainingDataError(f"{dataset_name}_dataset: packing cannot leave EOS off the completions cut at "
                                    "max_new_tokens (column 'finished'); train without packing")
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if not cut_rows:
            return dataset
        eos_id = self._tokenizer.eos_token_id
        per_token = [c for c in ("input_ids", "labels", "attention_mask", "token_type_ids") if c in _column_names(dataset)]

        def strip(example):
            ids, labels = example["input_ids"], example.get("labels")
            cut = example[POINTWISE_FINISHED_COLUMN] is not None and not example[POINTWISE_FINISHED_COLUMN]
            # TRL's EOS is the last token unless truncation removed it (then there is nothing to take off).
            if cut and ids and ids[-1] == eos_id and (labels is None or labels[-1] != -100):
                return {c: example[c][:-1] for c in per_token}
            return {c: example[c] for c in per_token}

        return dataset.map(strip, **_map_kwargs(dataset, args,
                                                f"Leaving EOS off the cut completions of the {dataset_name} dataset"))

    @torch.no_grad()
    def _add_ref_logps(self, dataset, name: str):
        """One batched pass of the reference (adapters disabled) over ``dataset``; adds ``ref_logp``."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        tokens = dataset.select_columns(["input_ids", "labels"] if "labels" in dataset.column_names else ["input_ids"])
        loader = DataLoader(tokens, batch_size=batch_size, collate_fn=self.data_collator.collator, shuffle=False)
        context = use_adapter(unwrapped, None) if hasattr(unwrapped, "disable_adapter") else contextlib.nullcontext()
        was_training = unwrapped.training
        unwrapped.eval()
        values = []
        with context:
            for batch in tqdm(loader, desc=f"Reference log-probs for the {name} set"):
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                logps = _pointwise_logps(unwrapped, batch)
                values.extend(logps.float().cpu().tolist())
        unwrapped.train(was_training)
        return dataset.add_column("ref_logp", values)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logps = _pointwise_logps(model, inputs)
        loss_spec = get_loss(self.args.ctrl_loss)
        ratio = logps - inputs["ref_logp"].to(logps.dtype) if loss_spec.needs_ref_logps else None
        per_example = loss_spec.compute(logps, ratio, self.args.beta, inputs)
        if ratio is not None:
            self._record(mode, logratio=ratio)
        if "target" in inputs:
            self._record(mode, target=inputs["target"])
        self._record(mode, **{"logps": logps})
        loss = per_example.mean()
        return (loss, {"logps": logps}) if return_outputs else loss


def _len(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an IterableDataset
        return None


def _pointwise_logps(model, inputs) -> torch.Tensor:
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask", torch.ones_like(input_ids))
    labels = inputs.get("labels", input_ids)
    loss_mask = (labels != -100).long()
    logps, _ = _sequence_logps(model, input_ids, attention_mask, loss_mask)
    return logps

