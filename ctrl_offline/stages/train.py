"""The train stage: the adapter a ``ctrl-data build`` folder was made for.

Everything the build decided travels with the data, so nothing is copied by hand:

* the trainer: pairs train with :class:`~ctrl_offline.training.trainer.CTRLTrainer` (TRL's DPOTrainer),
  pointwise targets and weights with :class:`~ctrl_offline.training.trainer.CTRLPointwiseTrainer`, grouped rows
  (one per prompt, any loss, each response forwarded once per step) with
  :class:`~ctrl_offline.training.grouped.CTRLGroupedTrainer`;
* the loss the plan was made for (``planner.estimator.loss`` in ``ctrl_build.json``; a K-aware plan
  promises its KL and win rate for that loss only, docs/finite_k.md), overridable within the format;
* β, which the trainers read from ``ctrl_build.json`` themselves;
* the reference model whose token ids and log-probs the build stored: training another model with them is
  refused.

``init_adapter`` (``ctrl-data train --init-adapter PREV``) trains PREV's LoRA weights further instead
of a fresh adapter — the train step of an on-policy round (docs/rounds.md). PREV fixes the LoRA shape
(its rank, α and target modules; a different one asked for is refused, the dropout may change) and
must have been trained on the same base. The reference stays the base with the adapter disabled, so
the targets and stored reference log-probs keep meaning π_ref, not PREV. ``ctrl_train.json`` records
``init_adapter`` (absolute path, or null) and ``round`` (the build's; :mod:`ctrl_offline.stages.rounds`).

The adapter folder appears under its final name only once complete (written as ``<out>.partial``
and renamed), with the tokenizer, the build's ``ctrl_build.json`` (so ``ctrl-data eval --adapter``
and the Hub card find the transform, t and β) and ``ctrl_train.json`` (loss, β, steps, the KL held).
Checkpoints go to ``<out>.checkpoints`` and a re-run resumes from the newest one; they are removed
once the adapter is written unless ``keep_checkpoints``. Under ``accelerate launch`` every process
trains and the main one writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ctrl_offline.io.files import BUILD_INFO_FILE, DataError, read_build_info, read_metadata, write_json

__all__ = ["TrainResult", "build_loss", "build_reference_model", "config_class", "training_config", "make_trainer", "train_adapter",
           "train_from_build", "TRAIN_INFO_FILE", "KL_BUDGET_FILE", "DEFAULT_LOSS",
           "RUN_ONLY_TRAINING_ARGS"]

logger = logging.getLogger(__name__)

TRAIN_INFO_FILE = "ctrl_train.json"
KL_BUDGET_FILE = "kl_budget.json"
SETTINGS_FILE = "ctrl_train_settings.json"  # in the checkpoint folder: what its checkpoints were trained with

#: The loss each build format trains by default. Which losses a format can serve is the loss registry's
#: (:func:`ctrl_offline.maths.losses.format_losses`).
DEFAULT_LOSS = {"pairs": "dpo", "pointwise": "pointwise", "weights": "weighted_sft", "grouped": "dpo"}
#: Training arguments that change how a run is logged or saved, not what it trains: checkpoints
#: trained with other values of these are still resumed (and ``hub_token`` is never written down).
RUN_ONLY_TRAINING_ARGS = frozenset({
    "logging_dir", "logging_steps", "logging_first_step", "report_to", "run_name", "disable_tqdm",
    "save_steps", "save_total_limit", "dataloader_num_workers", "resume_from_checkpoint", "push_to_hub",
    "hub_model_id", "hub_private_repo", "hub_revision", "hub_token", "hub_strategy"})


@dataclass
class TrainResult:
    adapter_dir: Path
    loss: str
    beta: float
    steps: int
    kl: dict | None  # the KL held to the budget (``kl_budget.json``), None when not held
    seconds: float


def build_loss(info: dict) -> str:
    """The loss a build was made for: its K-aware plan's estimator, else its format's natural loss."""
    estimator = (info.get("planner") or {}).get("estimator") or {}
    return info.get("loss") or estimator.get("loss") or DEFAULT_LOSS[info["format"]]


def build_reference_model(info: dict) -> str | None:
    """The reference model of a build's samples (whose log-probs it may store), when recorded."""
    if info.get("reference_model"):
        return info["reference_model"]
    calibrated = ((info.get("inputs") or {}).get("calibrated") or {}).get("path")
    if calibrated and Path(calibrated).is_file():
        try:
            return read_metadata(calibrated).get("reference_model")
        except Exception:  # an unreadable file only loses the check
            return None
    return None


def _check_loss(info: dict, loss: str | None) -> str:
    from ctrl_offline.maths.losses import DATA_FORMATS, GROUPED_BATCH_COLUMNS, GROUPED_FORMAT, get_loss

    fmt = info.get("format")
    if fmt not in DATA_FORMATS:
        raise DataError(f"{info['path']}: unknown build format {fmt!r}")
    planned = build_loss(info)
    if loss is None:
        return planned
    try:
        spec = get_loss(loss)
    except ValueError as err:
        raise DataError(str(err)) from None
    served = spec.data_format
    if fmt == GROUPED_FORMAT:  # any loss whose columns a grouped batch gives
        given = GROUPED_BATCH_COLUMNS[served]
        missing = [" or ".join(alts) for alts in spec.columns if not set(alts) & set(given)]
        if missing:
            raise DataError(f"a grouped build cannot train loss {loss!r}: it reads {', '.join(missing)}, which grouped "
                            f"batches do not give (rebuild with --data-format {served})")
    elif served != fmt:
        raise DataError(f"a {fmt} build cannot train loss {loss!r}: it trains on {served} rows "
                        f"(rebuild with --data-format {served})")
    if loss != planned and info.get("planner"):
        logger.warning("the build was planned for loss %r: %r trains another tilt, so the planned KL and win rate "
                       "do not hold (rebuild with --loss %s for a plan made for it)", planned, loss, loss)
    return loss


def config_class(fmt: str, loss: str | None = None):
    """The config class that trains ``fmt`` rows: CTRLGroupedConfig for grouped ones, else by the loss (CTRLConfig for
    a pairs loss, CTRLPointwiseConfig for a single-response one; without a loss, by the format)."""
    from ctrl_offline.maths.losses import GROUPED_FORMAT, get_loss
    from ctrl_offline.training.config import CTRLConfig, CTRLGroupedConfig, CTRLPointwiseConfig

    if fmt == GROUPED_FORMAT:
        return CTRLGroupedConfig
    pairwise = get_loss(loss).pairwise if loss is not None else fmt == "pairs"
    return CTRLConfig if pairwise else CTRLPointwiseConfig


def training_config(fmt: str, loss: str, overrides: dict):
    """The TRL config (CTRLGroupedConfig for grouped rows, CTRLConfig for pairs, CTRLPointwiseConfig otherwise) for
    ``loss``.

    ``overrides`` are TrainingArguments / DPOConfig / SFTConfig fields; ``beta`` is left out so
    the trainer reads it from the build. A field the config does not have is refused by name.
    """
    cls = config_class(fmt, loss)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DataError(f"unknown training argument(s) for {cls.__name__}: {', '.join(unknown)}")
    values = {"report_to": "none", **overrides, "ctrl_loss": loss}
    return cls(**values)


def _latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def make_trainer(data_dir, loading, args, *, callbacks=(), init_adapter=None):
    """The CTRL trainer of ``args`` on the training set in ``data_dir``, not yet trained.

    ``loading`` is a :class:`~ctrl_offline.models.modeling.ModelLoadingConfig` (the base model, LoRA/QLoRA);
    ``args`` a :class:`~ctrl_offline.training.config.CTRLConfig` (pairs: :class:`~ctrl_offline.training.trainer.CTRLTrainer`)
    or :class:`~ctrl_offline.training.config.CTRLPointwiseConfig` (:class:`~ctrl_offline.training.trainer.CTRLPointwiseTrainer`),
    e.g. from :func:`training_config`. No β is passed: the trainers read it from ``data_dir``'s
    ``ctrl_build.json``. The tokenizer is the trainer's ``processing_class``.

    With ``init_adapter`` (a saved PEFT adapter of the same base and LoRA shape) the trainer's adapter
    starts from its weights. The trainer is built with a fresh adapter of that adapter's config and the
    weights are copied in afterwards: the reference stays the base with the adapter disabled (TRL would
    take a pretrained adapter handed to it as the reference of DPO).
    """
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from ctrl_offline.training.config import CTRLConfig, CTRLGroupedConfig
    from ctrl_offline.training.grouped import CTRLGroupedTrainer
    from ctrl_offline.models.embedded import load_error_message, resolve_model
    from ctrl_offline.models.modeling import continued_lora_config, load_adapter_weights, load_policy
    from ctrl_offline.training.trainer import CTRLPointwiseTrainer, CTRLTrainer

    dataset = load_from_disk(str(data_dir))
    model, lora = load_policy(loading)
    if init_adapter is not None:
        lora = continued_lora_config(init_adapter, loading.lora_dropout)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(loading.model_name_or_path))
    except OSError as err:
        raise OSError(load_error_message("tokenizer", loading.model_name_or_path, err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer_cls = (CTRLGroupedTrainer if isinstance(args, CTRLGroupedConfig) else CTRLTrainer if isinstance(args, CTRLConfig)
                   else CTRLPointwiseTrainer)
    trainer = trainer_cls(model, args, dataset, processing_class=tokenizer, peft_config=lora)
    if init_adapter is not None:
        load_adapter_weights(trainer.model, init_adapter)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def train_adapter(data_dir, adapter_dir, loading, args, *, callbacks=(), kl_callback=None, kl_info: dict | None = None,
                  train_info: dict | None = None, init_adapter=None) -> tuple[int, dict | None]:
    """Train ``args`` (a CTRL config whose ``output_dir`` holds the checkpoints) on a build folder.

    The trainer is :func:`make_trainer`'s (from ``init_adapter``'s weights when given). Resumes from the
    newest checkpoint in ``args.output_dir``;
    writes the adapter atomically into ``adapter_dir`` with the tokenizer, the build metadata and
    ``ctrl_train.json``; the KL record of ``kl_callback`` goes to ``args.output_dir/kl_budget.json``
    and the adapter folder. Returns (optimizer steps, KL record or None). Every process of a
    distributed run calls it.
    """
    data_dir, adapter_dir = Path(data_dir), Path(adapter_dir)
    trainer = make_trainer(data_dir, loading, args,
                           callbacks=(*callbacks, *([kl_callback] if kl_callback is not None else [])),
                           init_adapter=init_adapter)
    tokenizer = trainer.processing_class
    checkpoint = _latest_checkpoint(Path(args.output_dir))
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    kl_record = None
    if kl_callback is not None:
        final = dataclasses.asdict(kl_callback.final) if kl_callback.final is not None else None
        kl_record = {"budget": kl_callback.budget, "reached": kl_callback.reached, "final": final,
                     "history": kl_callback.history, **(kl_info or {})}
        if trainer.accelerator.is_main_process:
            write_json(Path(args.output_dir) / KL_BUDGET_FILE, kl_record)
    # Every rank calls save_model (ZeRO-3 and FSDP gather the weights collectively); the folder
    # appears under its final name only once complete.
    staging = adapter_dir.with_name(adapter_dir.name + ".partial")
    trainer.save_model(str(staging))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(staging))
        build_file = data_dir / BUILD_INFO_FILE
        if build_file.is_file():
            shutil.copyfile(build_file, staging / BUILD_INFO_FILE)
        record = {**(train_info or {}), "base_model": loading.model_name_or_path, "data": str(data_dir),
                  "steps": trainer.state.global_step, "kl": kl_record}
        write_json(staging / TRAIN_INFO_FILE, record)
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        staging.rename(adapter_dir)
    trainer.accelerator.wait_for_everyone()
    return trainer.state.global_step, kl_record


def train_from_build(
    data,
    out,
    model: str | None = None,
    *,
    loss: str | None = None,
    loading: dict | None = None,
    training_args: dict | None = None,
    kl_budget: float | None = None,
    kl_prompts=None,
    kl_samples: int = 4,
    kl_every_n_steps: int = 10,
    kl_max_new_tokens: int = 64,
    kl_batch_size: int = 8,
    kl_tolerance: float = 0.01,
    kl_max_bisections: int = 12,
    kl_column: str = "prompt",
    kl_prompts_source: str | None = None,
    checkpoint_dir=None,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    callbacks=(),
    init_adapter=None,
) -> TrainResult:
    """Train the adapter a ``ctrl-data build`` folder was made for into ``out``.

    ``model`` defaults to the reference model recorded at sampling; ``loss`` to the loss the build
    was planned for. ``loading`` holds :class:`~ctrl_offline.models.modeling.ModelLoadingConfig` fields
    (``load_in_4bit``, ``lora_r``, …; 4-bit is off unless asked for), ``training_args`` any TRL
    config field (``learning_rate``, ``num_train_epochs``, ``per_device_train_batch_size``, …).

    ``init_adapter`` (an adapter folder) trains that adapter's weights further instead of a fresh
    adapter: its base must be ``model`` and its LoRA shape is taken as saved (``lora_r``,
    ``lora_alpha`` or ``lora_target_modules`` in ``loading`` that contradict it are refused). A build
    whose samples came from another adapter than ``init_adapter`` (its ``parent_adapter``) is trained
    with a warning.

    With ``kl_prompts`` (held-out prompts: a file, folder, Hub id or list) training is held to
    ``kl_budget`` — by default the KL the build was planned for — by
    :class:`~ctrl_offline.training.kl_budget.KLBudgetCallback` with a :class:`~ctrl_offline.training.kl_budget.SampledKL`
    estimate every ``kl_every_n_steps`` steps, bisecting back to within ``kl_tolerance`` nats of the budget
    in at most ``kl_max_bisections`` estimates once it is crossed (docs/kl_budget.md); ``kl_prompts_source`` says where the
    prompts came from in the KL record (default: the path given). The KL record (``kl`` in
    ``ctrl_train.json``) lists the prompts (``prompt_list``) with the seed and batch size they were
    sampled with, so that ``ctrl-data eval`` of the adapter reports the KL on them too. Checkpoints
    (in ``checkpoint_dir``, default ``<out>.checkpoints``) are resumed only when trained with the same
    data, model, loss and arguments, :data:`RUN_ONLY_TRAINING_ARGS` aside. Input errors (not a build folder,
    a loss the rows cannot serve, another model than the stored log-probs', an existing ``out``)
    raise :class:`~ctrl_offline.io.files.DataError` before any model is loaded.
    """
    from accelerate import PartialState

    from ctrl_offline.models.modeling import ModelLoadingConfig

    started = time.perf_counter()
    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise DataError(f"training data {data} is not a folder (pass a `ctrl-data build` output folder)")
    info = read_build_info(data)
    if info is None:
        raise DataError(f"{data} is not a `ctrl-data build` output (no {BUILD_INFO_FILE}); build it with ctrl-data build")
    loss = _check_loss(info, loss)
    try:
        import datasets

        datasets.load_from_disk(str(data))
    except Exception as err:  # datasets raises several types; say which folder and why
        raise DataError(f"cannot load the training set in {data}: {err}") from err

    reference = build_reference_model(info)
    if model is None:
        if reference is None:
            raise DataError(f"{data} does not record its reference model: pass --model")
        model = reference
    loading = dict(loading or {})
    if init_adapter is not None:  # before the build's own check: the adapter's base decides which model can train it
        init_adapter, loading = _continued(init_adapter, model, loading, info)
    # Token ids belong to the reference's tokenizer, stored log-probs to the reference itself.
    stored = " and ".join(what for what, key in (("token ids", "token_ids"), ("reference log-probs", "stored_ref_logps"))
                          if info.get(key))
    if reference is not None and stored and str(model) != str(reference):
        raise DataError(f"{data} stores {stored} of {reference}, not of {model}: train {reference} (--model), or "
                        "rebuild from samples of this model")
    if init_adapter is None and info.get("parent_adapter"):
        logger.warning("%s holds samples of the adapter %s: training a fresh adapter on them (pass --init-adapter %s "
                       "to train that adapter further, as a round does)", data, info["parent_adapter"],
                       info["parent_adapter"])

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"output {out} exists and is not empty (pass --overwrite to replace it)")
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + ".checkpoints")
    settings = {"data": str(data.resolve()), "build_num_rows": info.get("num_rows"), "model": str(model),
                "loss": loss, "loading": loading,
                "training_args": {k: v for k, v in (training_args or {}).items() if k not in RUN_ONLY_TRAINING_ARGS},
                **({} if init_adapter is None else {"init_adapter": init_adapter})}
    kl_callback, kl_info = None, None
    if kl_prompts is not None:
        planned_kl = (info.get("planner") or {}).get("kl")
        budget = kl_budget if kl_budget is not None else planned_kl
        if budget is None:
            raise DataError(f"{data} was not planned for a KL: pass --kl-budget to hold one")
        kl_callback, kl_info = _kl_callback(budget, kl_prompts, model, kl_samples, kl_every_n_steps,
                                            kl_max_new_tokens, kl_batch_size, kl_column,
                                            (training_args or {}).get("seed", 42), kl_tolerance, kl_max_bisections)
        source = kl_prompts_source or (str(kl_prompts) if isinstance(kl_prompts, (str, Path)) else None)
        if source is not None:
            kl_info["prompts_source"] = source
    elif kl_budget is not None:
        raise DataError("holding a KL budget needs held-out prompts to estimate it on (--kl-prompts)")
    loading_config = ModelLoadingConfig(model_name_or_path=str(model), **{"load_in_4bit": False, **loading})
    # The config first: it sets up the distributed state (its use_cpu decides gloo on CPU), which is shared.
    args = training_config(info["format"], loss, {**(training_args or {}), "output_dir": str(checkpoints)})
    args.device  # noqa: B018  (TrainingArguments sets the state up on first use of its device)
    _check_model(model)
    state = PartialState()
    fresh = not checkpoints.exists()
    if state.is_main_process:
        _check_checkpoints(checkpoints, settings, overwrite)
    state.wait_for_everyone()

    try:
        steps, kl_record = train_adapter(data, out, loading_config, args, callbacks=callbacks, kl_callback=kl_callback,
                                         kl_info=kl_info, init_adapter=init_adapter,
                                         train_info={"loss": loss, "beta": info["beta"], "round": info.get("round"),
                                                     "init_adapter": init_adapter})
    except BaseException:
        if state.is_main_process and fresh and _latest_checkpoint(checkpoints) is None:
            shutil.rmtree(checkpoints, ignore_errors=True)  # nothing to resume: leave nothing behind
        raise
    if state.is_main_process and not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return TrainResult(out, loss, float(info["beta"]), steps, kl_record, time.perf_counter() - started)


def _continued(init_adapter, model, loading: dict, info: dict) -> tuple[str, dict]:
    """(the adapter's absolute path, ``loading`` with its LoRA shape) for training ``init_adapter`` further.

    Refuses an adapter that does not exist, was trained on another base than ``model``, or whose
    LoRA shape contradicts one asked for in ``loading``; warns when the build's samples came from
    another adapter.
    """
    from ctrl_offline.models.modeling import saved_lora_settings
    from ctrl_offline.stages.lineage import check_base_model, read_adapter, same_model

    record = read_adapter(init_adapter, "--init-adapter")
    check_base_model(record, str(model), "--init-adapter")
    saved = saved_lora_settings(record.path)
    conflicts = [f"{key}={loading[key]!r} (the adapter has {value!r})" for key, value in saved.items()
                 if key != "lora_dropout" and loading.get(key) is not None and not _same_setting(loading[key], value)]
    if conflicts:
        raise DataError(f"--init-adapter {record.path} fixes the LoRA shape its weights have; asked for "
                        f"{', '.join(conflicts)}: leave the --lora-* flags out to train it further, or train a fresh "
                        "adapter without --init-adapter")
    parent = info.get("parent_adapter")
    if parent and not same_model(parent, record.path):
        logger.warning("%s holds samples of %s, not of %s: its adapter continues another policy than the one that "
                       "drew the samples", info.get("path", "the build"), parent, record.path)
    return str(record.path), {**loading, **{k: v for k, v in saved.items() if loading.get(k) is None}}


def _same_setting(given, saved) -> bool:
    if isinstance(given, (list, tuple, set)) and isinstance(saved, (list, tuple, set)):
        return set(given) == set(saved)
    return given == saved


def _check_model(model) -> None:
    """A base model that cannot be found fails here, before anything is written."""
    from transformers import AutoConfig

    from ctrl_offline.models.embedded import load_error_message, resolve_model

    try:
        AutoConfig.from_pretrained(resolve_model(str(model)))
    except (OSError, ValueError) as err:
        raise DataError(load_error_message("model", str(model), err)) from err


def _check_checkpoints(folder: Path, settings: dict, overwrite: bool) -> None:
    """Checkpoints are resumed only if they were trained with the same settings."""
    record = folder / SETTINGS_FILE
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    if folder.exists() and _latest_checkpoint(folder) is not None:
        previous = json.loads(record.read_text()) if record.is_file() else None
        if previous != json.loads(json.dumps(settings, default=str)):
            raise DataError(f"{folder} holds checkpoints of another training run (other data, model or arguments): "
                            "pass --overwrite to start afresh")
    write_json(record, settings)


def _kl_callback(budget, prompts, model, num_samples, every_n_steps, max_new_tokens, batch_size, column, seed,
                 tolerance, max_bisections):
    from transformers import AutoTokenizer

    from ctrl_offline.models.embedded import resolve_model
    from ctrl_offline.training.kl_budget import KLBudgetCallback, SampledKL
    from ctrl_offline.stages.sample import load_prompts

    if isinstance(prompts, (str, Path)):
        prompts = load_prompts(str(prompts), column=column)
    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts for the KL estimate")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(str(model)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    estimator = SampledKL(prompts, tokenizer, num_samples=num_samples, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, seed=seed)
    callback = KLBudgetCallback(budget, estimator, every_n_steps=every_n_steps, tolerance=tolerance,
                                max_bisections=max_bisections)
    # The prompts themselves and how they were sampled: `ctrl-data eval` of the adapter re-estimates the
    # KL there exactly as the callback did (the same fixed set, seed and batches).
    return callback, {"prompts": len(prompts), "samples_per_prompt": num_samples, "max_new_tokens": max_new_tokens,
                      "every_n_steps": every_n_steps, "tolerance": tolerance, "max_bisections": max_bisections,
                      "estimator": "per_token", "seed": seed,
                      "batch_size": batch_size, "prompt_list": prompts}
