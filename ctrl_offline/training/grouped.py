"""Grouped CTRL training: a prompt's K samples in one row, each response forwarded once per step.

Pair rows forward a response once per pair it is in — K − 1 times per step with all pairs of K — and
the prompt twice per pair. Yet every pairwise, pointwise and weighted loss of a prompt is a function
of its K sequence log-probs alone. The grouped trainer takes the ``grouped`` layout of
``ctrl-data build --data-format grouped`` (one row per prompt: its ``prompt_token_ids`` once, each
completion's ``completion_ids``, stored ``ref_logp``, ``u``, node value ``phi``, pointwise ``target``
and SFT ``weight``, and the build's pairs as positions ``pair_chosen`` / ``pair_rejected``;
docs/data_layout.md), packs the batch's distinct responses end to end without padding
(:mod:`ctrl_offline.training.packing`), runs one forward and backward over them, and forms the loss
from the log-probs: a registered pairs loss over the stored pairs (Φ gap ``phi[c] − phi[r]``, soft
label σ of it, weight 1: the values the pairs format stores for the same pairs), a single-response
loss over the completions. Responses in no pair are not forwarded at all.

Same loss, same pairs, so the same population objective (docs/finite_k.md §9): the loss is the sum
over the batch's pairs (or completions) divided by the batch's groups times the training set's mean
pairs (completions) per group, so a step's expected loss and gradient are those of pair rows drawn
uniformly, and a batch holding whole prompts gives exactly the pair rows' mean
(``tests/test_grouped.py``). What differs is only which pairs share a step: a prompt's pairs all at once.

The rows must carry the sampled token ids and stored reference log-probs (the build refuses the
layout without them): nothing is tokenised and no reference pass runs. β, the metrics and the
size check are the other CTRL trainers'; the model, PEFT / QLoRA wrapping, the fused LM head and
checkpoints are TRL's DPOTrainer's, as for :class:`~ctrl_offline.training.trainer.CTRLTrainer`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from trl import DPOTrainer

from ctrl_offline.maths.losses import GROUPED_BATCH_COLUMNS, get_loss
from ctrl_offline.training.config import CTRLGroupedConfig
from ctrl_offline.training.packing import pack_sequences, packed_sequence_logps, row_tokens_for
from ctrl_offline.training.trainer import TrainingDataError, _check_columns, _column_names, _CTRLMixin, _len, _named, \
    _rows, _soft_label_loss_gap

__all__ = ["CTRLGroupedTrainer", "GroupedCollator", "GROUP_ID_COLUMNS", "group_units"]

logger = logging.getLogger(__name__)

#: The sampled token ids of a group: its prompt's once, each completion's as sampled.
GROUP_ID_COLUMNS = ("prompt_token_ids", "completion_ids")
#: Per-completion float columns (lists as long as ``completion_ids``).
GROUP_VALUE_COLUMNS = ("ref_logp", "u", "phi", "target", "weight")
PAIR_INDEX_COLUMNS = ("pair_chosen", "pair_rejected")
#: Where each batch column a loss may read comes from: pairs (``phi`` gives the gap and the label) and completions.
_PAIR_SOURCES = {"target_phi_gap": "phi", "label": "phi", "weight": None, "u_chosen": "u", "u_rejected": "u"}
_SINGLE_SOURCES = {"target": "target", "weight": "weight", "u": "u", "ref_logp": "ref_logp"}


def _sources(loss) -> dict:
    return _PAIR_SOURCES if loss.pairwise else _SINGLE_SOURCES


def _required(dataset_columns, loss, what: str) -> list[str]:
    """The grouped columns ``loss`` needs, refusing one whose reads a grouped batch cannot give."""
    sources = _sources(loss)
    given = set(GROUPED_BATCH_COLUMNS[loss.data_format])
    needed = [*(("ref_logp",) if loss.pairwise or loss.needs_ref_logps else ()),
              *(PAIR_INDEX_COLUMNS if loss.pairwise else ())]
    for alternatives in loss.columns:
        usable = [c for c in alternatives if c in given]
        if not usable:
            raise TrainingDataError(f"{what}: loss {loss.name!r} reads {' or '.join(alternatives)}, which a grouped "
                                    f"batch does not give (it gives {', '.join(sorted(given))}); train it on "
                                    f"{loss.data_format} rows")
        present = [c for c in usable if sources[c] is None or sources[c] in dataset_columns]
        source = sources[(present or usable)[0]]
        if source is not None:
            needed.append(source)
    return list(dict.fromkeys(needed))


def group_units(dataset, pairwise: bool) -> int:
    """What a grouped set trains on: its pairs (pair losses) or completions (single-response losses)."""
    import pyarrow.compute as pc

    column = "pair_chosen" if pairwise else "completion_ids"
    lengths = pc.list_value_length(dataset.with_format("arrow")[column])
    return int(pc.sum(pc.fill_null(lengths, 0)).as_py() or 0)


def _check_group_values(dataset, columns, name: str, model=None) -> None:
    """Lists as long as the group's completions, finite values, pair positions inside the group, valid ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    k = pc.fill_null(pc.list_value_length(table["completion_ids"]), 0)
    empty = pc.equal(k, 0).to_pylist()
    if any(empty):
        raise TrainingDataError(f"{name}: no completions in {_rows(empty)}")
    for column in [c for c in GROUP_VALUE_COLUMNS + ("finished",) if c in columns]:
        wrong = pc.not_equal(pc.fill_null(pc.list_value_length(table[column]), -1), k).to_pylist()
        if any(wrong):
            raise TrainingDataError(f"{name}: {column!r} must hold one value per completion; it does not in "
                                    f"{_rows(wrong)}")
        if column != "finished":
            values = pc.list_flatten(table[column])
            bad = pc.invert(pc.fill_null(pc.is_finite(pc.cast(values, pa.float64())), False))
            if pc.any(bad).as_py():
                rows = pc.list_parent_indices(table[column]).filter(bad)
                mask = [False] * len(dataset)
                for row in rows.to_pylist():
                    mask[row] = True
                raise TrainingDataError(f"{name}: NaN, infinite or missing {column!r} in {_rows(mask)}")
    if "pair_chosen" in columns:
        for column in PAIR_INDEX_COLUMNS:
            lists = table[column]
            parents = pc.list_parent_indices(lists)
            values = pc.list_flatten(lists)
            outside = pc.or_(pc.less(values, 0), pc.greater_equal(values, pc.take(k, parents)))
            if pc.any(outside).as_py():
                mask = [False] * len(dataset)
                for row in parents.filter(outside).to_pylist():
                    mask[row] = True
                raise TrainingDataError(f"{name}: {column!r} names a completion the group does not have in "
                                        f"{_rows(mask)}")
        same = pc.not_equal(pc.list_value_length(table["pair_chosen"]), pc.list_value_length(table["pair_rejected"]))
        if pc.any(same).as_py():
            raise TrainingDataError(f"{name}: pair_chosen and pair_rejected differ in length in "
                                    f"{_rows(same.to_pylist())}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocabulary = getattr(embeddings, "num_embeddings", None)
    prompts, completions = table["prompt_token_ids"], pc.list_flatten(table["completion_ids"])
    for column, values in (("prompt_token_ids", prompts), ("completion_ids", completions)):
        if not pa.types.is_integer(values.type.value_type):
            raise TrainingDataError(f"{name}: {column!r} must hold lists of token ids (integers), not {values.type}")
        lengths = pc.fill_null(pc.list_value_length(values), 0)
        if pc.any(pc.equal(lengths, 0)).as_py():
            which = "a prompt" if column == "prompt_token_ids" else "a completion"
            raise TrainingDataError(f"{name}: {which} without token ids in {column!r}")
        extremes = pc.min_max(pc.list_flatten(values))
        low, high = extremes["min"].as_py(), extremes["max"].as_py()
        if low < 0 or (vocabulary is not None and high >= vocabulary):
            bad = low if low < 0 else high
            raise TrainingDataError(f"{name}: {column!r} holds token id {bad}, " + (
                "not a token id" if bad < 0 else f"outside the model's vocabulary of {vocabulary}: the ids were "
                "sampled with another model's tokenizer. Train the model that sampled them (the build's "
                "reference_model)"))


class GroupedCollator:
    """Grouped rows → one padding-free batch of the responses the loss reads, each once.

    Per sequence: ``ref_logp`` and, for single-response losses, ``seq_<column>`` (target, weight, u);
    per pair: ``pair_chosen`` / ``pair_rejected`` (sequence indices) and ``pair_<column>`` (the Φ gap and its
    soft label, computed in float64 as the pairs format does, weight, u of both sides); ``num_groups``.
    """

    def __init__(self, pairwise: bool, columns, *, max_length: int | None = None, row_tokens: int | None = None,
                 pad_token_id: int = 0):
        self.pairwise = pairwise
        self.columns = set(columns)
        self.max_length, self.row_tokens, self.pad_token_id = max_length, row_tokens, pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        sequences, per_sequence, per_pair = [], defaultdict(list), defaultdict(list)
        chosen, rejected = [], []
        singles = [c for c in ("target", "weight", "u") if c in self.columns]
        for example in examples:
            completions = example["completion_ids"]
            if self.pairwise:
                pairs = list(zip(example["pair_chosen"], example["pair_rejected"]))
                used = sorted({j for pair in pairs for j in pair})
            else:
                pairs, used = [], range(len(completions))
            at = {}
            for j in used:
                at[j] = len(sequences)
                sequences.append((example["prompt_token_ids"], completions[j]))
                if "ref_logp" in self.columns:
                    per_sequence["ref_logp"].append(example["ref_logp"][j])
                for column in singles:
                    per_sequence[f"seq_{column}"].append(example[column][j])
            phi, u = example.get("phi"), example.get("u")
            for a, b in pairs:
                chosen.append(at[a])
                rejected.append(at[b])
                per_pair["pair_weight"].append(1.0)
                if phi is not None:
                    gap = phi[a] - phi[b]
                    per_pair["pair_target_phi_gap"].append(gap)
                    per_pair["pair_label"].append(1.0 / (1.0 + math.exp(-gap)))
                if u is not None:
                    per_pair["pair_u_chosen"].append(u[a])
                    per_pair["pair_u_rejected"].append(u[b])
        if not sequences:
            raise TrainingDataError("a grouped batch with no pair to train: build pairs for every group, or train a "
                                    "single-response loss")
        batch = pack_sequences(sequences, max_length=self.max_length, row_tokens=self.row_tokens,
                               pad_token_id=self.pad_token_id)
        for name, values in (*per_sequence.items(), *per_pair.items()):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        if self.pairwise:
            batch["pair_chosen"] = torch.tensor(chosen, dtype=torch.long)
            batch["pair_rejected"] = torch.tensor(rejected, dtype=torch.long)
        batch["num_groups"] = torch.tensor(len(examples), dtype=torch.long)
        return batch


class CTRLGroupedTrainer(_CTRLMixin, DPOTrainer):
    """Offline CTRL on grouped rows: any registered loss, each response forwarded once per step."""

    _tag_names = ["trl", "ctrl-offline", "ctrl-grouped"]
    _name = "CTRL-grouped"

    def __init__(self, model, args: CTRLGroupedConfig, train_dataset, eval_dataset=None, processing_class=None,
                 peft_config=None, **kwargs):
        loss = get_loss(args.ctrl_loss) if isinstance(args, CTRLGroupedConfig) else None
        self.pairwise = bool(loss and loss.pairwise)
        train_dataset, eval_dataset = self._check_inputs(
            args, CTRLGroupedConfig, train_dataset, eval_dataset, self._validate,
            "pairs" if self.pairwise else "rows", beta_required=loss.needs_beta if loss else True,
            count=lambda d: group_units(d, self.pairwise))
        datasets = _named(train_dataset, eval_dataset)
        for name, dataset in datasets.items():
            _check_group_values(dataset, _column_names(dataset), name, model)
        if args.max_length is not None and args.truncation_mode != "keep_start":
            raise ValueError("the grouped trainer cuts sequences at max_length keeping their start "
                             f"(truncation_mode='keep_start'), not {args.truncation_mode!r}")
        self.uses_stored_token_ids = self.uses_stored_ref_logps = True
        args.precompute_ref_log_probs = False  # stored, always
        args.padding_free = False  # TRL's DPOTrainer would warn; grouped batches are always padding-free
        self._columns = _required(_column_names(train_dataset), loss, "train_dataset")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        pad = getattr(tokenizer, "pad_token_id", None)
        collator = GroupedCollator(self.pairwise, self._columns, max_length=args.max_length,
                                   row_tokens=row_tokens_for(model, args.packing_row_tokens),
                                   pad_token_id=pad if pad is not None else getattr(tokenizer, "eos_token_id", 0) or 0)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._units_per_group = {mode: group_units(d, self.pairwise) / max(len(d), 1)
                                 for mode, d in (("train", self.train_dataset), ("eval", self.eval_dataset))
                                 if d is not None}
        self._report_truncation()

    def _validate(self, dataset, args: CTRLGroupedConfig, name: str) -> None:
        what = f"{name} for ctrl_loss={args.ctrl_loss!r}"
        names = _column_names(dataset)
        _check_columns(dataset, list(GROUP_ID_COLUMNS), what)
        _check_columns(dataset, _required(names, get_loss(args.ctrl_loss), what), what)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Nothing to tokenise; groups whose prompt alone fills ``max_length`` are dropped (as TRL drops such
        pairs), and, for a pairs loss, groups without a pair."""
        names = _column_names(dataset)
        keep_columns = [c for c in ("prompt_id", *GROUP_ID_COLUMNS, *self._columns, *PAIR_INDEX_COLUMNS)
                        if c in names]
        dataset = dataset.select_columns(list(dict.fromkeys(keep_columns)))
        before = len(dataset)
        limit = args.max_length
        if limit is not None:
            dataset = dataset.filter(lambda prompts: [len(p) < limit for p in prompts], batched=True,
                                     input_columns="prompt_token_ids")
        if self.pairwise:
            dataset = dataset.filter(lambda chosen: [len(c) > 0 for c in chosen], batched=True,
                                     input_columns="pair_chosen")
        if len(dataset) < before:
            logger.warning("%d of %d groups of the %s set were dropped: their prompt alone fills max_length=%s, or "
                           "they hold no pair", before - len(dataset), before, dataset_name, limit)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(dict.fromkeys([*GROUP_ID_COLUMNS, *self._columns, *PAIR_INDEX_COLUMNS]))

    def _report_truncation(self) -> None:
        self.num_truncated = 0
        if self.args.max_length is None:
            return
        import pyarrow.compute as pc

        table = self.train_dataset.with_format("arrow")
        prompt = pc.list_value_length(table["prompt_token_ids"])
        lengths = pc.list_value_length(table["completion_ids"])
        completion = pc.list_value_length(pc.list_flatten(table["completion_ids"]))
        total = pc.add(pc.take(prompt, pc.list_parent_indices(table["completion_ids"])), completion)
        long = int(pc.sum(pc.cast(pc.greater(total, self.args.max_length), "int64")).as_py() or 0)
        if long:
            logger.warning("%d of %d completions exceed max_length=%d with their prompt: they are truncated (their "
                           "stored reference log-probs cover the full responses: raise max_length or drop them)", long,
                           int(pc.sum(lengths).as_py()), self.args.max_length)
        self.num_truncated = long

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        loss_spec = get_loss(self.args.ctrl_loss)
        beta = self.args.beta
        logps = packed_sequence_logps(model, inputs)
        ratio = logps - inputs["ref_logp"].to(logps.dtype) if "ref_logp" in inputs else None
        # Σ over the batch's pairs / (groups × the set's mean pairs per group): the pair rows' mean, in expectation.
        units = inputs["num_groups"].to(logps.dtype) * self._units_per_group.get(mode, 1.0)
        if self.pairwise:
            chosen, rejected = inputs["pair_chosen"], inputs["pair_rejected"]
            batch = {name: inputs[f"pair_{name}"].to(logps.dtype) for name in GROUPED_BATCH_COLUMNS["pairs"]
                     if f"pair_{name}" in inputs}
            batch.update(chosen_logps=logps[chosen], rejected_logps=logps[rejected])
            chosen_ratio, rejected_ratio = ratio[chosen], ratio[rejected]
            per_pair = loss_spec.compute(chosen_ratio, rejected_ratio, beta, batch) * batch["weight"]
            loss = per_pair.sum() / units
            margin = beta * (chosen_ratio - rejected_ratio)
            self._record(mode, **{"rewards/margins": margin, "rewards/accuracies": (margin > 0).float(),
                                  "logps/chosen": logps[chosen], "logps/rejected": logps[rejected]})
            if self.args.ctrl_loss == "dpo":
                self._record(mode, loss_gap=_soft_label_loss_gap(per_pair.mean(), batch))
        else:
            batch = {name: inputs[f"seq_{name}"].to(logps.dtype) for name in ("target", "weight", "u")
                     if f"seq_{name}" in inputs}
            if ratio is not None:
                batch["ref_logp"] = inputs["ref_logp"].to(logps.dtype)
            per_example = loss_spec.compute(logps, ratio if loss_spec.needs_ref_logps else None, beta, batch)
            loss = per_example.sum() / units
            if loss_spec.needs_ref_logps:
                self._record(mode, logratio=ratio)
            if "target" in batch:
                self._record(mode, target=batch["target"])
            self._record(mode, logps=logps)
        return (loss, {"logps": logps}) if return_outputs else loss

    def _record(self, mode: str, **values: torch.Tensor) -> None:
        """Batch means: processes hold different numbers of pairs, and gathering needs one shape."""
        super()._record(mode, **{name: value.float().mean().reshape(1) for name, value in values.items()})

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss only (there are no logits to return: the fused head gives log-probs)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
