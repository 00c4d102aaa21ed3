"""The ``build`` stage: calibrated samples in, a training set out (docs/theory.md §5).

Formats, each a `datasets` folder (``datasets.load_from_disk``) that TRL's DPO trainer and the
project's trainers read without conversion:

* ``pairs``      prompt, chosen, rejected, target_phi_gap, label, weight, ref_chosen_logps, ref_rejected_logps,
  chosen_finished, rejected_finished, prompt_token_ids, chosen_ids, rejected_ids
* ``pointwise``  prompt, completion, target, ref_logp, finished, prompt_token_ids, completion_ids
* ``weights``    prompt, completion, weight, ref_logp, finished, prompt_token_ids, completion_ids
* ``grouped``    one row per prompt: prompt, prompt_token_ids, completions, completion_ids, ref_logp, finished,
  u, phi, target, weight (one entry per completion), pair_chosen, pair_rejected (the pairs, as positions among
  them); every loss trains on it (:mod:`ctrl_offline.rows.grouped`, the grouped trainer)

(each also carries ``prompt_id`` and ``u`` — ``u_chosen`` / ``u_rejected`` for pairs). Column
names are those of docs/data_layout.md: TRL's own (``prompt``, ``chosen``, ``rejected``,
``completion``, ``ref_chosen_logps``, ``ref_rejected_logps``, ``chosen_ids``, ``rejected_ids``) as
TRL names them, CTRL's as there.

The rows carry the token ids that were sampled and scored (:data:`ID_COLUMNS`): the rendered prompt
as the sampler tokenised it and each completion's ``completion_ids``. The trainers train those ids,
not the text, because decoded text need not tokenise back to its ids (207 of 1,600 SmolLM2
completions did not) while the stored reference log-probs are the ids' own: so they always apply and
no reference pass runs. The text stays, for reading, rewards and TRL's own trainers (which tokenise
it). Samples without ``completion_ids``, or without a tokenizer for their prompts, give text-only rows.

``prompt`` is TRL's prompt column: the text the reference model saw (chat template applied), the
calibrated input's ``prompt_text``, not its ``prompt`` (the prompt as given; ``prompt_id`` leads back
to it). ``target_phi_gap`` is Φ(u_chosen) − Φ(u_rejected).

Completions cut at ``max_new_tokens`` before EOS are kept by default, as what they are: prefixes.
Their ids and stored ``ref_logp`` have no EOS, and the ``*finished`` flags (written when the samples
record ``finished``) tell the trainers to append none when they tokenise text-only rows, so the
log-ratio is that of the capped output the policy is decoded with (docs/theory.md §5).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ctrl_offline.io.files import DataError, atomic_output_dir, fingerprint, read_metadata, read_table, require_columns
from ctrl_offline.maths.losses import DATA_FORMATS, GROUPED_FORMAT, get_loss
from ctrl_offline.rows.grouped import make_groups
from ctrl_offline.rows.pairs import make_pairs
from ctrl_offline.rows.pointwise import pointwise_targets, sft_weights
from ctrl_offline.maths.procedures import get_procedure
from ctrl_offline.maths.transforms import Rescaled, family_has_t, get_transform, unit_scale
from ctrl_offline.stages.calibrate import CALIBRATED_FILE, TABLES_FILE, load_tables, tables_applied
from ctrl_offline.stages.lineage import build_round

__all__ = ["BuildResult", "build_dataset", "FORMATS", "BUILD_METADATA", "ID_COLUMNS", "MAX_LEFT_OUT",
           "MIN_ROWS_HINT"]

logger = logging.getLogger(__name__)

#: The build formats: the loss registry's (each loss trains on one of them) and the grouped layout (every loss).
FORMATS = DATA_FORMATS
BUILD_METADATA = "ctrl_build.json"
#: The largest fraction of the calibrated rows the build may leave out (cut before EOS when dropping
#: them, or empty) before it stops: training on the rest would tilt toward the short answers that
#: survived, not toward the calibrated target. ``max_left_out`` overrides it (1 never stops).
MAX_LEFT_OUT = 0.5
#: Below this many rows the build warns that the trainers will refuse the set (their default
#: ``min_train_rows``, :data:`ctrl_offline.training.config.MIN_TRAIN_ROWS`).
MIN_ROWS_HINT = 8
#: The token-id columns a build writes when the samples record their ids (docs/data_layout.md): the prompt's as
#: the sampler tokenised it, and each completion's exactly as sampled. The trainers train these, not the text.
ID_COLUMNS = ("prompt_token_ids", "chosen_ids", "rejected_ids", "completion_ids")


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    format: str
    num_rows: int
    transform: str
    t: float | None
    beta: float
    phi_scale: float = 1.0
    unscaled_beta: float | None = None
    k: int | None = None  # K the plan was made for (None: given outright or planned at K = ∞)


#: The loss a K-aware plan is made for when none is named: the format's natural trainer.
DEFAULT_PLAN_LOSS = {"pairs": "dpo", "pointwise": "pointwise", "weights": "weighted_sft", GROUPED_FORMAT: "dpo"}


def _plan_tables(calibrated: Path):
    """The calibration tables of a calibrate output: its ``tables.parquet``, or the tables it was calibrated against.

    A procedure without a closed form is planned by simulation on them (docs/selector_planning.md).
    """
    recorded = tables_applied(read_metadata(calibrated))
    for candidate in (calibrated.parent / TABLES_FILE, recorded):
        if candidate and Path(candidate).exists():
            return load_tables(candidate)
    raise DataError(f"no calibration tables found for {calibrated} (neither {TABLES_FILE} beside it nor recorded in its "
                    "metadata): a procedure without a closed form is planned by simulation on them; pass the folder "
                    "`ctrl-data calibrate` wrote")


def _choose_transform(transform, t, beta, inference, n, kl, k=None, estimator=None, tables=None,
                      selector_args=None):
    """(Transform, β, planner row or None): given outright, or planned for (inference, N, KL).

    With ``k`` the plan is K-aware: β and t are those at which ``estimator`` trained from K samples
    per prompt meets the budget (docs/finite_k.md). ``tables`` (with ``selector_args``) are for
    procedures planned by simulation.
    """
    planned = None
    if inference is not None or n is not None or kl is not None:
        if None in (inference, n, kl):
            raise ValueError("the planner needs all of --inference, --inference-n and --kl-budget")
        from ctrl_offline.maths.planner import plan

        families = (transform,) if transform else ("identity", "log", "exp", "negexp")
        if k is None:
            result = plan(inference, n, kl, families=families, tables=tables, selector_args=selector_args)
        else:
            result = plan(inference, n, kl, families=families, k=k, loss=estimator.loss,
                          strategy=estimator.strategy, targets=estimator.targets,
                          log_partition=estimator.log_partition)
            for note in result.skipped:
                logger.info("K-aware plan left out %s", note)
        planned = result.best()
        if t is not None or beta is not None:
            raise ValueError("give either t/beta or --inference/--inference-n/--kl-budget, not both")
        return get_transform(planned.transform, planned.t), planned.beta, planned
    if transform is None or beta is None:
        raise ValueError("give --transform and --beta (and --t for exp/negexp), or --inference/--inference-n/--kl-budget to plan them")
    if family_has_t(transform) and t is None:
        raise ValueError(f"transform {transform!r} needs --t")
    return get_transform(transform, t), float(beta), planned


def _ranks_per_row(path: Path, table: pa.Table) -> tuple[np.ndarray, bool]:
    """(K of each row's estimator, whether the rows were ranked against stored tables) (docs/finite_k.md §8).

    K is how many leave-one-out ranks a row's u can take.

    A reference sample (the calibrate stage's leave-one-out u) is ranked among the K − 1 other
    samples of its prompt: K ranks, counted from the rows before any is left out below. A response
    calibrated against stored tables (``ctrl-data calibrate --tables``, e.g. a policy sample of an
    on-policy round) is ranked among all K reference rewards of its prompt: its rank is
    Binomial(K, c), the leave-one-out rank of K + 1 samples, so its estimator is the K + 1 one.
    """
    ids = table["prompt_id"].to_numpy(zero_copy_only=False)
    metadata = read_metadata(path)
    tables_path = tables_applied(metadata)
    if not tables_path:
        codes, _ = pd.factorize(ids)
        return np.bincount(codes)[codes], False
    if not Path(tables_path).exists():
        raise DataError(f"{path} was calibrated against tables {tables_path}, which are gone: the build needs their "
                        "K per prompt to plan for the ranks its rows can take")
    tables = load_tables(tables_path)
    k = tables.k[tables.codes_of(ids)]
    loo_column = metadata["settings"].get("leave_one_out_column")
    if loo_column and loo_column in table.column_names:
        reference = np.asarray(table[loo_column].to_numpy(zero_copy_only=False), dtype=bool)
        return np.where(reference, k, k + 1), True
    return k + 1, True


def _object_array(values: list) -> np.ndarray:
    """A 1-d array of the given Python objects (lists stay lists, whatever their lengths)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _prompt_token_ids(texts: list[str], tokenizer_path: str) -> list[list[int]]:
    """Each rendered prompt's token ids as the sampler had them: the text alone, tokenised with its defaults.

    ``sample`` (and :func:`~ctrl_offline.models.generation.completion_logps`) feed ``tokenizer(prompt_text)``
    to the model and the completion's ids after it; these are the ids its log-probs are conditioned on.
    """
    from transformers import AutoTokenizer

    from ctrl_offline.models.embedded import resolve_model

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer_path))
    except OSError as err:
        raise DataError(f"cannot load tokenizer {tokenizer_path!r} to tokenise the prompts as they were sampled: "
                        f"{err}") from err
    unique = list(dict.fromkeys(texts))
    encoded = dict(zip(unique, tok(unique)["input_ids"])) if unique else {}
    empty = [i for i, t in enumerate(texts) if not encoded[t]]
    if empty:
        raise DataError(f"{len(empty)} prompt(s) tokenise to no ids with {tokenizer_path!r} (rows {empty[:5]}): a "
                        "completion needs a prompt token to be predicted from")
    return [encoded[t] for t in texts]


def _sampled_token_ids(table: pa.Table, prompt_col: str, tokenizer_path: str | None):
    """(prompt token ids, completion token ids) per row, or None without ``completion_ids`` or a tokenizer.

    The completion ids are kept as sampled (a finished completion's end in its EOS, a cut one's stop
    at the cap): exactly the ids whose log-probs sampling stored.
    """
    if "completion_ids" not in table.column_names or not tokenizer_path:
        return None
    completion_ids = table["completion_ids"].to_pylist()
    bad = [i for i, ids in enumerate(completion_ids) if not ids]
    if bad:
        raise DataError(f"{len(bad)} sample(s) have no completion_ids though their completion is not empty (rows "
                        f"{bad[:5]}): the samples are damaged; sample them again")
    return _prompt_token_ids(table[prompt_col].to_pylist(), tokenizer_path), completion_ids


def _grouped_columns(groups, ids, prompts, completions, u, ref, flags, prompt_token_ids, completion_ids) -> dict:
    """The grouped layout's columns (one row per prompt, one list entry per completion; docs/data_layout.md)."""
    first = np.array([rows[0] for rows in groups.rows], dtype=np.int64)
    per_row = {"completions": (completions, pa.string()), "completion_ids": (completion_ids, pa.list_(pa.int32())),
               "ref_logp": (ref, pa.float64()), "u": (u, pa.float64()), "phi": (groups.phi, pa.float64()),
               "target": (groups.target, pa.float64()), "weight": (groups.weight, pa.float64())}
    if flags is not None:
        per_row["finished"] = (flags, pa.bool_())
    columns = {"prompt_id": pa.array(ids[first]), "prompt": pa.array(list(prompts[first]), pa.string()),
               "prompt_token_ids": pa.array(list(prompt_token_ids[first]), pa.list_(pa.int32()))}
    for name, (values, kind) in per_row.items():
        columns[name] = pa.array([list(values[rows]) for rows in groups.rows], pa.list_(kind))
    for name, positions in (("pair_chosen", groups.pair_chosen), ("pair_rejected", groups.pair_rejected)):
        columns[name] = pa.array([p.tolist() for p in positions], pa.list_(pa.int32()))
    return columns


def build_dataset(
    calibrated: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str = "pairs",
    transform: str | None = None,
    t: float | None = None,
    beta: float | None = None,
    inference: str | None = None,
    n: int | None = None,
    kl: float | None = None,
    strategy: str = "all",
    pairs_per_prompt: int | None = None,
    log_partition: str = "population",
    targets: str = "loo",
    loss: str | None = None,
    k_aware: bool = True,
    selector_args: dict | None = None,
    keep_unfinished: bool = True,
    max_left_out: float = MAX_LEFT_OUT,
    tokenizer: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> BuildResult:
    """Build a training set from a calibrate output (folder or ``calibrated.parquet``).

    The rows carry the sampled token ids (module docstring): each prompt tokenised with ``tokenizer``
    (by default the reference model's, recorded at sampling) as the sampler did, and the completions'
    ``completion_ids``. The trainers train on them, so the stored reference log-probs always apply.
    Without ``completion_ids`` or a tokenizer the rows are text only (with a warning).

    Completions cut at ``max_new_tokens`` before EOS (``finished`` False) are kept by default
    (``keep_unfinished``) and flagged (``chosen_finished`` / ``rejected_finished``, ``finished``):
    their ids and stored reference log-probs have no EOS (nor, for text-only rows, does the trainers'
    tokenisation), so they train as the prefixes they are, and the policy is not taught to stop
    mid-sentence. Why keep them: each u was ranked among all K samples of its prompt, cut ones
    included, and the policy is decoded (and evaluated) under the same cap; leaving them out trains
    only on the answers short enough to finish — for an instruction model under a cap often a
    small, short-biased minority. ``keep_unfinished=False`` leaves them out. Either way, when more than
    ``max_left_out`` (default :data:`MAX_LEFT_OUT`, one half) of the rows are left out (cut when
    dropping them, or empty) the build stops with a DataError naming what to change instead of
    writing a set that trains on what is left.

    Planned builds (``inference``/``n``/``kl``) are K-aware by default: K is the number of reference
    samples per prompt in the calibrated input, and t and β are chosen so that the tilt ``loss``
    (default: dpo for pairs, pointwise for pointwise, weighted_sft for weights) actually trains
    from K samples meets the KL budget (docs/finite_k.md). ``k_aware=False`` plans the exact
    K = ∞ tilt instead. ``targets`` (``"loo"`` or ``"cell"``) and ``log_partition`` are the node
    values and the pointwise normaliser (:mod:`ctrl_offline.synthesis`). ``inference`` is any
    registered procedure (:mod:`ctrl_offline.maths.procedures`); one without a closed form is planned for
    the exact tilt by simulation on the calibration tables the calibrated input came with
    (``tables.parquet`` beside it), with its settings from ``selector_args``
    (docs/selector_planning.md).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    path = Path(calibrated)
    if path.is_dir() and (path / CALIBRATED_FILE).exists():
        path = path / CALIBRATED_FILE
    table = read_table(path)
    require_columns(table, ["prompt_id", "prompt", "completion", "u"], f"calibrated input {path}")
    k_of_row, against_tables = _ranks_per_row(path, table)
    # The grouped layout trains any loss; it is planned (and its pairs judged) for the one named, dpo by default.
    pairwise = format == "pairs" or (format == GROUPED_FORMAT and get_loss(loss or DEFAULT_PLAN_LOSS[format]).pairwise)
    if against_tables and targets == "cell":
        raise ValueError("cell targets share a prompt's quantile cells among its reference samples; rows calibrated "
                         "against stored tables are outside samples: use targets='loo'")
    if against_tables and pairwise:
        logger.warning("pairs of responses calibrated against stored tables: the finite-K pair theory assumes a "
                       "prompt's samples ranked among each other, so the K-aware plan is approximate; the pointwise "
                       "format is exact for them (docs/finite_k.md §8)")
    k_plan = int(np.bincount(k_of_row).argmax()) if len(k_of_row) else None
    planned_k, estimator, tables = None, None, None
    procedure = None if inference is None else get_procedure(inference)
    if procedure is not None and procedure.win_rate is None:
        tables = _plan_tables(path)
    if k_aware and procedure is not None and k_plan is not None and k_plan >= 2:
        from ctrl_offline.maths.finite_k import THEORY_STRATEGIES, Estimator

        if procedure.win_rate is None or procedure.trained_win_rate is None:
            logger.warning("no finite-K theory for %s (%s): planning the exact K = ∞ tilt", inference,
                           procedure.description)
        elif pairwise and strategy not in THEORY_STRATEGIES:
            logger.warning("no finite-K theory for pair strategy %r: planning the exact K = ∞ tilt", strategy)
        else:
            estimator = Estimator(loss=loss or DEFAULT_PLAN_LOSS[format], strategy=strategy, targets=targets,
                                  log_partition=log_partition)
            planned_k = k_plan
    # From here on `transform` is the Transform object (the argument only names its family).
    transform, planner_beta, planned = _choose_transform(transform, t, beta, inference, n, kl, planned_k, estimator,
                                                         tables, selector_args)
    # Same π*, Φ in units where it spans 1: keeps soft labels σ(ΔΦ) and IPO targets in range.
    scale = unit_scale(transform)
    transform, beta = Rescaled(transform, scale), planner_beta / scale
    table = table.append_column("_k", pa.array(k_of_row.astype(np.int64)))
    prompt_col = "prompt_text" if "prompt_text" in table.column_names else "prompt"
    if not 0 <= max_left_out <= 1:
        raise ValueError(f"max_left_out must lie in [0, 1], got {max_left_out!r}")
    total = table.num_rows
    has_flags = "finished" in table.column_names
    cut = 0
    if has_flags and not keep_unfinished:
        finished = np.asarray(table["finished"].to_numpy(zero_copy_only=False), dtype=bool)
        cut = int((~finished).sum())
        if cut:
            logger.warning("left out %d of %d completion(s) that hit max_new_tokens before EOS (keep_unfinished=False)",
                           cut, total)
            table = table.filter(pa.array(finished))
    nonempty = np.array([bool(c and c.strip()) for c in table["completion"].to_pylist()], dtype=bool)
    empty = int((~nonempty).sum())
    if empty:
        # The trainers refuse empty responses (nothing to score token by token).
        logger.warning("left out %d empty completion(s)", empty)
        table = table.filter(pa.array(nonempty))
    keep_hint = ("keep the cut completions (keep_unfinished=True, the default; --keep-unfinished on the command line) "
                 "or sample again with a larger max_new_tokens")
    if table.num_rows == 0:
        raise DataError(f"no usable completions left in {path}: every one was cut at max_new_tokens or empty. "
                        + (keep_hint[0].upper() + keep_hint[1:] if cut else
                           "Sample again (a larger max_new_tokens, another prompt set)") + ".")
    left_out = cut + empty
    if left_out > max_left_out * total:
        reasons = ", ".join(r for r in (f"{cut} cut at max_new_tokens before EOS" if cut else "",
                                        f"{empty} empty" if empty else "") if r)
        fix = keep_hint if cut else "sample again with a larger max_new_tokens or a prompt format the model answers"
        raise DataError(
            f"the build would leave out {left_out} of {total} completions in {path} ({reasons}), more than "
            f"max_left_out={max_left_out:g} of them: the {table.num_rows} left are not the samples the u were "
            f"ranked among. To fix it, {fix}; or pass max_left_out=1 (--max-left-out 1) to build from what is left "
            "anyway.")
    if has_flags:
        flags = np.asarray(table["finished"].to_numpy(zero_copy_only=False), dtype=bool)
        if not flags.all():
            logger.info("%d of %d completion(s) were cut at max_new_tokens before EOS: kept as prefixes (no EOS in "
                        "training or in their reference log-probs)", int((~flags).sum()), table.num_rows)
    else:
        flags = None
    ids = table["prompt_id"].to_numpy(zero_copy_only=False)
    u = table["u"].to_numpy()
    k_row = table["_k"].to_numpy()
    prompts = np.asarray(table[prompt_col].to_pylist(), dtype=object)
    completions = np.asarray(table["completion"].to_pylist(), dtype=object)
    ref = table["ref_logp"].to_numpy() if "ref_logp" in table.column_names else None
    tokenizer = tokenizer or read_metadata(path).get("reference_model")
    token_ids = _sampled_token_ids(table, prompt_col, tokenizer)
    if token_ids is None:
        logger.warning("the samples carry no %s: the rows hold text only, which the trainer tokenises%s",
                       "completion_ids" if "completion_ids" not in table.column_names
                       else "recorded reference model to tokenise their prompts with (pass tokenizer)",
                       "; the stored reference log-probs hold only where that gives back the sampled ids"
                       if ref is not None else "")
    else:
        prompt_token_ids, completion_ids = map(_object_array, token_ids)
    if format == GROUPED_FORMAT and (token_ids is None or ref is None):
        lacks = " and ".join(what for what, missing in (("completion_ids (with a tokenizer for the prompts)",
                                                         token_ids is None), ("ref_logp", ref is None)) if missing)
        raise DataError(f"the grouped format trains the sampled token ids against their stored reference log-probs; "
                        f"the samples in {path} lack {lacks}. Sample again with `ctrl-data sample` (it records both), "
                        "pass --tokenizer, or build --data-format pairs / pointwise / weights for text rows")

    groups = None
    if format == GROUPED_FORMAT:
        groups = make_groups(ids, u, transform, beta, strategy=strategy, pairs_per_prompt=pairs_per_prompt, seed=seed,
                             targets=targets, k=k_row, log_partition=log_partition)
        columns = _grouped_columns(groups, ids, prompts, completions, u, ref, flags, prompt_token_ids, completion_ids)
    elif format == "pairs":
        pairs = make_pairs(ids, u, transform, beta, strategy=strategy, pairs_per_prompt=pairs_per_prompt, seed=seed,
                           targets=targets, k=k_row)
        columns = {
            "prompt_id": ids[pairs.chosen],
            "prompt": prompts[pairs.chosen],
            "chosen": completions[pairs.chosen],
            "rejected": completions[pairs.rejected],
            "target_phi_gap": pairs.target_phi_gap,
            "label": pairs.label,
            "weight": pairs.weight,
            "u_chosen": u[pairs.chosen],
            "u_rejected": u[pairs.rejected],
        }
        if ref is not None:
            columns["ref_chosen_logps"] = ref[pairs.chosen]
            columns["ref_rejected_logps"] = ref[pairs.rejected]
        if flags is not None:
            columns["chosen_finished"] = flags[pairs.chosen]
            columns["rejected_finished"] = flags[pairs.rejected]
        if token_ids is not None:
            columns["prompt_token_ids"] = prompt_token_ids[pairs.chosen]
            columns["chosen_ids"] = completion_ids[pairs.chosen]
            columns["rejected_ids"] = completion_ids[pairs.rejected]
    else:
        columns = {"prompt_id": ids, "prompt": prompts, "completion": completions, "u": u}
        if format == "pointwise":
            columns["target"] = pointwise_targets(ids, u, transform, beta, log_partition=log_partition, targets=targets,
                                                  k=k_row)
        else:
            columns["weight"] = sft_weights(ids, u, transform, beta, targets=targets, k=k_row)
        if ref is not None:
            columns["ref_logp"] = ref
        if flags is not None:
            columns["finished"] = flags
        if token_ids is not None:
            columns["prompt_token_ids"] = prompt_token_ids
            columns["completion_ids"] = completion_ids

    import datasets

    if groups is not None:
        dataset = datasets.Dataset.from_dict(columns)
    else:
        dataset = datasets.Dataset.from_dict({k: pa.array(list(v), pa.list_(pa.int32())) if k in ID_COLUMNS
                                              else list(v) if v.dtype == object else v for k, v in columns.items()})
    # What the trainers count against min_train_rows: pairs (or rows); a grouped set's pairs, as it trains them.
    units = (groups.num_pairs if pairwise else len(u)) if groups is not None else len(dataset)
    if units < MIN_ROWS_HINT:
        logger.warning(
            "the %s set has only %d %s: the trainers refuse fewer than min_train_rows=%d by default. Sample more "
            "prompts or a larger K%s%s", format, units, "pair(s)" if groups is not None and pairwise else "row(s)",
            MIN_ROWS_HINT, ", keep the cut completions (keep_unfinished=True)" if cut else "",
            ", or use --pair-strategy all" if pairwise and strategy != "all" else "")
    metadata = {
        "stage": "build",
        "format": format,
        "transform": transform.name,
        "t": transform.t,
        "beta": beta,  # the trainer's β (Φ rescaled by phi_scale)
        "phi_scale": scale,
        "unscaled_beta": planner_beta,
        "planner": None if planned is None else {
            "inference": inference, "n": n, "kl": kl, "row": planned.to_dict(), "k": planned_k,
            "estimator": None if estimator is None else estimator.to_dict(), "simulated": tables is not None,
            "selector_args": selector_args},
        "k": k_plan,
        "targets": targets,
        "strategy": strategy if format in ("pairs", GROUPED_FORMAT) else None,
        "pairs_per_prompt": pairs_per_prompt,
        "log_partition": log_partition if format in ("pointwise", GROUPED_FORMAT) else None,
        "seed": seed,
        "stored_ref_logps": ref is not None,
        "token_ids": token_ids is not None,
        "keep_unfinished": keep_unfinished,
        "unfinished_rows": None if flags is None else int((~flags).sum()),
        "left_out": {"cut": cut, "empty": empty, "of": total},
        # The model whose samples (and stored log-probs) these are: `ctrl-data train` trains it by default.
        "reference_model": read_metadata(path).get("reference_model"),
        # Which on-policy round the samples are of, and the adapter that drew them (docs/rounds.md).
        **build_round(path),
        "inputs": {"calibrated": {"path": str(path.resolve()), "fingerprint": fingerprint(path)}},
        "num_rows": len(dataset),
        **({} if groups is None else {"num_pairs": groups.num_pairs, "num_completions": len(u)}),
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / BUILD_METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    return BuildResult(Path(out_dir), format, len(dataset), transform.name, transform.t, beta, scale, planner_beta,
                       planned_k)
