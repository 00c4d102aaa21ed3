"""The whole CTRL pipeline as one resumable run: prompts → sample → score → calibrate → plan/build
→ train → evaluate → push.

Configured like TRL / alignment-handbook scripts: dataclasses parsed from a YAML file
(``--config``) with command-line overrides. Every stage writes its own folder under
``output_dir`` atomically and is skipped when that folder exists, so a killed run picks up
where it stopped (sampling and scoring also resume shard by shard, training from its last
checkpoint). A run folder remembers its config; running another config into it is refused
unless ``--overwrite``.

Training is held to ``kl_budget`` (``hold_kl``, on by default): every ``kl_every_n_steps`` steps
the adapter's KL(π‖π_ref) is estimated on held-out prompts, and training stops where it reaches
the budget, leaving weights bisected back to it (:mod:`ctrl_offline.kl_budget`); the estimates
and the KL left go to ``train/kl_budget.json`` and the run summary.

Under ``accelerate launch`` with several processes, sampling and scoring split the prompts by
rank, training runs data-parallel (or ZeRO/FSDP, from the accelerate config), and the
single-process stages (calibrate, build, evaluate, push) run on the main process.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import CTRLConfig, CTRLPointwiseConfig
from .hub import HubError
from .io import BUILD_INFO_FILE, DataError, read_build_info
from .modeling import ModelLoadingConfig
from .procedures import procedure_names
from .stages.train import KL_BUDGET_FILE  # in the train folder: the KL held to the budget while training
from .trainer import TrainingDataError

__all__ = ["ModelArguments", "RecipeConfig", "RecipeError", "parse_recipe_args", "run_recipe", "main"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "recipe_config.json"
# Settings that change where results go or how they are logged, not the results themselves.
_NOT_RESULT_SETTINGS = {
    "output_dir", "logging_dir", "overwrite", "push_to_hub", "hub_model_id", "hub_private_repo", "hub_revision",
    "hub_token", "hub_strategy", "report_to", "logging_steps", "logging_first_step", "run_name", "disable_tqdm",
    "push_dataset", "save_steps", "save_total_limit", "resume_from_checkpoint", "dataloader_num_workers",
}


class RecipeError(RuntimeError):
    """A run that cannot start: bad config, a run folder holding another config, no Hub token."""


@dataclass
class RecipeConfig:
    """What to align for, on which data, with which reward (the model and trainer have their own)."""

    dataset_name: str = field(default="Anthropic/hh-rlhf", metadata={
        "help": "Hub id or local folder in the hh-rlhf layout (<subset>/{train,test}.jsonl); embedded:hh-tiny ships here."})
    dataset_subsets: list[str] = field(default_factory=lambda: ["helpful-base"], metadata={
        "help": "hh-rlhf subsets (data_dir) to draw prompts from."})
    prompts: str | None = field(default=None, metadata={
        "help": "Any prompt source `ctrl-data sample` takes: a JSONL/JSON/Parquet/CSV/TXT file, a datasets folder or "
                "a Hub dataset id (with prompt_column and train_split). Default: dataset_name in the hh-rlhf layout."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts (with prompts)."})
    eval_prompts: str | None = field(default=None, metadata={
        "help": "Held-out evaluation prompts (any source, with prompts). Default: the source's eval_split when it "
                "has one, else num_eval_prompts held out of it by a shuffle seeded with seed."})
    train_split: str = field(default="train", metadata={"help": "Split the training prompts come from."})
    eval_split: str = field(default="test", metadata={"help": "Split the held-out evaluation prompts come from."})
    num_train_prompts: int = field(default=2000, metadata={"help": "Training prompts (unique, in dataset order)."})
    num_eval_prompts: int = field(default=200, metadata={"help": "Held-out evaluation prompts."})
    reward_model: str = field(default="OpenAssistant/reward-model-deberta-v3-large-v2", metadata={
        "help": "Reward: a single-score reward model (Hub id/folder), module:function, or `vader`."})
    num_samples: int = field(default=8, metadata={"help": "K, reference samples per prompt."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled completion, in tokens."})
    sampling_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    inference: str = field(default="bon", metadata={
        "help": f"Inference-time procedure aligned for ({', '.join(procedure_names())}); one without a closed form "
                "is planned by simulation on the calibration tables."})
    inference_n: int = field(default=4, metadata={"help": "N, the candidates of the inference-time procedure."})
    kl_budget: float = field(default=0.5, metadata={"help": "KL(π‖π_ref) budget in nats; the planner picks t and β."})
    hold_kl: bool = field(default=True, metadata={
        "help": "Stop training when the adapter's KL reaches kl_budget, estimated on held-out prompts "
                "(docs/kl_budget.md)."})
    kl_eval_prompts: int = field(default=16, metadata={"help": "Held-out prompts of the KL estimate (hold_kl)."})
    kl_eval_samples: int = field(default=4, metadata={"help": "Policy samples per prompt of the KL estimate."})
    kl_every_n_steps: int = field(default=10, metadata={"help": "Optimizer steps between KL estimates."})
    transform: str | None = field(default=None, metadata={
        "help": "Transform family (identity, log, exp, negexp); default: the planner's best for the procedure."})
    data_format: str = field(default="pairs", metadata={"help": "pairs (DPO/IPO/distill) or pointwise."})
    pair_strategy: str = field(default="all", metadata={"help": "all, best_vs_rest, best_vs_worst or sampled."})
    pairs_per_prompt: int | None = field(default=None, metadata={"help": "Pairs per prompt for pair_strategy=sampled."})
    keep_unfinished: bool = field(default=True, metadata={
        "help": "Train on completions cut at max_new_tokens too, as prefixes without EOS (false: leave them out)."})
    eval_n: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "N values evaluated."})
    eval_selectors: list[str] = field(default_factory=lambda: ["bon", "won"], metadata={
        "help": f"Selectors evaluated ({', '.join(procedure_names())})."})
    eval_policy_samples: int = field(default=16, metadata={
        "help": "m, policy samples per evaluation prompt (≥ max(eval_n)); every win rate is the U-statistic over "
                "all N-subsets of the m and M samples (docs/evaluation.md)."})
    eval_reference_samples: int = field(default=16, metadata={
        "help": "M, reference samples per evaluation prompt (≥ max(eval_n)), drawn once into "
                "<output_dir>/eval_reference_pool and reused from there."})
    push_dataset: bool = field(default=False, metadata={"help": "With --push_to_hub, also push the built dataset."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a run folder that holds another config."})

    def __post_init__(self):
        if self.inference not in procedure_names():
            raise RecipeError(f"unknown inference {self.inference!r}; choose from {', '.join(procedure_names())}")
        if self.data_format not in ("pairs", "pointwise"):
            raise RecipeError(f"data_format must be 'pairs' or 'pointwise', got {self.data_format!r}")
        for name in ("num_train_prompts", "num_eval_prompts", "inference_n", "max_new_tokens", "sampling_batch_size",
                     "kl_eval_prompts", "kl_eval_samples", "kl_every_n_steps"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.eval_n or any(int(n) != n or n < 1 for n in self.eval_n):
            raise RecipeError(f"eval_n must be positive integers, got {self.eval_n}")
        unknown = [name for name in self.eval_selectors if name not in procedure_names()]
        if unknown:
            raise RecipeError(f"unknown eval_selectors {unknown}; choose from {', '.join(procedure_names())}")
        least = max(max(self.eval_n), 2)
        for name in ("eval_policy_samples", "eval_reference_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < least:
                raise RecipeError(f"{name} must be an integer ≥ max(eval_n) = {max(self.eval_n)} (and ≥ 2), "
                                  f"got {value}")
        if self.num_samples < 2:
            raise RecipeError(f"num_samples (K) must be ≥ 2, got {self.num_samples}")
        if not (self.kl_budget > 0 and math.isfinite(self.kl_budget)):
            raise RecipeError(f"kl_budget must be a finite KL > 0 in nats, got {self.kl_budget}")


# -- configuration --------------------------------------------------------------------------------
# The training config already has these two; the model's values are taken from it.
_FROM_TRAINING = ("gradient_checkpointing", "trust_remote_code")


def _copy_field(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    if f.default is not dataclasses.MISSING:
        return field(default=f.default, metadata=f.metadata)
    return field(metadata=f.metadata)


#: ModelLoadingConfig without the fields the training config owns (one parser cannot hold both).
ModelArguments = dataclasses.make_dataclass(
    "ModelArguments",
    [(f.name, f.type, _copy_field(f)) for f in dataclasses.fields(ModelLoadingConfig) if f.name not in _FROM_TRAINING],
)


def model_loading_config(model_args, training_args) -> ModelLoadingConfig:
    return ModelLoadingConfig(**dataclasses.asdict(model_args),
                              **{name: getattr(training_args, name) for name in _FROM_TRAINING})


def _field_names(types) -> list[str]:
    return [f.name for t in types for f in dataclasses.fields(t) if f.init]


def _unknown_key_message(keys: list[str], known: list[str], where: str) -> str:
    lines = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        lines.append(f"unknown config key {key!r} {where}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return "\n".join(lines)


def parse_recipe_args(argv: list[str] | None = None, defaults: dict | None = None):
    """(RecipeConfig, ModelArguments, CTRLConfig) from ``--config file.yaml`` and flags.

    ``defaults`` are the script's own defaults (a YAML file and the command line override them).
    An unknown key, in the file or on the command line, is named with the closest known key.
    """
    import yaml
    from trl import TrlParser

    types = (RecipeConfig, ModelArguments, CTRLConfig)
    parser = TrlParser(types)
    parser.allow_abbrev = False  # --num_sample must not silently mean --num_samples
    known = _field_names(types)
    if defaults:
        parser.set_defaults_with_config(**defaults)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv and argv.index("--config") + 1 >= len(argv):
        raise RecipeError("--config needs a YAML file")
    where = f"in {argv[argv.index('--config') + 1]}" if "--config" in argv else ""
    try:
        *configs, from_file, from_cli = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except FileNotFoundError as err:
        raise RecipeError(f"config file not found: {err.filename}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"config file {where[3:]} is not valid YAML: {err}") from err
    unknown_file = [s[2:] for s in from_file[::2]]
    unknown_cli = [s[2:].split("=")[0] for s in from_cli if s.startswith("--")]
    if unknown_file or unknown_cli or [s for s in from_cli if not s.startswith("--")]:
        message = "\n".join(m for m in (_unknown_key_message(unknown_file, known, where),
                                         _unknown_key_message(unknown_cli, known, "on the command line")) if m)
        raise RecipeError(message or f"unexpected arguments: {from_cli}")
    return tuple(configs)


def _result_settings(recipe, model_args, training_args) -> dict:
    settings = {"recipe": dataclasses.asdict(recipe), "model": dataclasses.asdict(model_args),
                "training": {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args)
                             if f.init}}
    cleaned = {}
    for group, values in settings.items():
        cleaned[group] = {k: v for k, v in values.items() if k not in _NOT_RESULT_SETTINGS}
    return json.loads(json.dumps(cleaned, default=str))


def _check_run_folder(run_dir: Path, settings: dict, overwrite: bool) -> None:
    saved = run_dir / CONFIG_FILE
    if saved.exists():
        old = json.loads(saved.read_text())
        changed = [f"{group}.{key}: {old.get(group, {}).get(key)!r} → {settings[group].get(key)!r}"
                   for group in settings for key in sorted(set(old.get(group, {})) | set(settings[group]))
                   if old.get(group, {}).get(key) != settings[group].get(key)]
        if changed and not overwrite:
            shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise RecipeError(f"{run_dir} holds a run with a different config ({shown}). "
                              "Use another --output_dir, or --overwrite to replace it.")
        if changed:
            logger.warning("--overwrite: removing the run in %s (its config differs)", run_dir)
            shutil.rmtree(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RecipeError(f"{run_dir} is not empty and holds no recipe run; use another --output_dir or --overwrite")
    elif run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings, indent=2))


# -- the run --------------------------------------------------------------------------------------
def _stage(name: str, done: bool):
    if done:
        logger.info("[%s] done already, skipped", name)
    else:
        logger.info("[%s] running", name)
    return not done


def _write_prompts(path: Path, prompts: list) -> None:
    from .io import atomic_output_dir

    with atomic_output_dir(path, overwrite=False) as tmp:
        with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
            for p in prompts:
                f.write(json.dumps({"prompt": p}) + "\n")


def _read_prompts(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def _unique(prompts: list) -> list:
    from .generation import prompt_id

    seen, kept = set(), []
    for p in prompts:
        if prompt_id(p) not in seen:
            seen.add(prompt_id(p))
            kept.append(p)
    return kept


def _has_split(source: str, split: str) -> bool:
    """Whether a prompt source holds ``split`` (a file holds none; a plain datasets folder neither)."""
    import datasets

    path = Path(source)
    if path.is_file():
        return False
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return isinstance(loaded, datasets.DatasetDict) and split in loaded
        return split in datasets.get_dataset_split_names(source)
    except Exception:  # unreadable here: the training load says why
        return False


def _prompt_source(recipe, seed: int) -> tuple[list, list]:
    """(the prompts training draws from, in the order it takes them; the held-out evaluation prompts).

    hh-rlhf layout: the train and eval splits in dataset order. Any other source (``prompts``): its
    ``train_split``, held out against ``eval_prompts``, else its ``eval_split`` when it has one, else
    ``num_eval_prompts`` taken out of it by a shuffle seeded with ``seed``.
    """
    if recipe.prompts is None:
        from .hh import hh_prompts

        limit = recipe.num_train_prompts + recipe.num_eval_prompts + recipe.kl_eval_prompts
        pool = hh_prompts(recipe.dataset_name, recipe.dataset_subsets, recipe.train_split, limit)
        return pool, hh_prompts(recipe.dataset_name, recipe.dataset_subsets, recipe.eval_split, recipe.num_eval_prompts)
    import numpy as np

    from .stages.sample import load_prompts

    column = recipe.prompt_column
    pool = _unique(load_prompts(recipe.prompts, column=column, split=recipe.train_split))
    if recipe.eval_prompts is not None:
        held_out = load_prompts(recipe.eval_prompts, column=column, split=recipe.eval_split)
    elif _has_split(recipe.prompts, recipe.eval_split):
        held_out = load_prompts(recipe.prompts, column=column, split=recipe.eval_split)
    else:
        order = np.random.default_rng(seed).permutation(len(pool))
        pool = [pool[i] for i in order]
        held_out, pool = pool[: recipe.num_eval_prompts], pool[recipe.num_eval_prompts:]
        logger.info("%s has no %s split: %d prompts held out by a shuffle seeded with %d", recipe.prompts,
                    recipe.eval_split, len(held_out), seed)
    return pool, _unique(held_out)[: recipe.num_eval_prompts]


def _prompt_splits(recipe, seed: int) -> tuple[list, list]:
    """(training prompts, held-out evaluation prompts): no evaluation prompt is trained on."""
    from .generation import prompt_id

    pool, held_out = _prompt_source(recipe, seed)
    evaluated = {prompt_id(p) for p in held_out}
    train = [p for p in pool if prompt_id(p) not in evaluated][: recipe.num_train_prompts]
    where = recipe.prompts or f"{recipe.dataset_name} ({', '.join(recipe.dataset_subsets)})"
    if not train or not held_out:
        raise RecipeError(f"no prompts in {where} for the {'training' if not train else 'evaluation'} split")
    if len(train) < recipe.num_train_prompts or len(held_out) < recipe.num_eval_prompts:
        logger.warning("%s gives %d training and %d evaluation prompts (asked: %d and %d)", where, len(train),
                       len(held_out), recipe.num_train_prompts, recipe.num_eval_prompts)
    return train, held_out


def _kl_prompts(recipe, prompts_dir: Path, seed: int = 0) -> tuple[list, str]:
    """The prompts of the KL estimate while training, and where they come from.

    The training source's prompts past the training ones, less any evaluation prompt: neither
    trained on nor evaluated on. A source with fewer than 2 of those (the embedded hh-tiny, all 36
    of whose prompts the tiny config trains on) leaves the first training prompts, with a warning.
    """
    from .generation import prompt_id

    train = _read_prompts(prompts_dir / "train" / "prompts.jsonl")
    evaluated = _read_prompts(prompts_dir / "eval" / "prompts.jsonl")
    taken = {prompt_id(p) for p in train + evaluated}
    pool, _ = _prompt_source(recipe, seed)
    held_out = [p for p in pool if prompt_id(p) not in taken][: recipe.kl_eval_prompts]
    split = recipe.prompts or f"{recipe.train_split} split"
    if len(held_out) >= 2:
        if len(held_out) < recipe.kl_eval_prompts:
            logger.warning("only %d held-out prompts for the KL estimate (kl_eval_prompts=%d)", len(held_out),
                           recipe.kl_eval_prompts)
        return held_out, f"{split}, past the training prompts"
    logger.warning("no held-out prompts left in the %s past the %d training prompts: the KL held to the budget "
                   "is estimated on the first %d training prompts", split, len(train),
                   min(len(train), recipe.kl_eval_prompts))
    return train[: recipe.kl_eval_prompts], "training prompts"


def _kl_budget_callback(recipe, training_args, tokenizer, prompts_dir: Path):
    """(the callback holding training to ``kl_budget``, what its estimate is made of)."""
    from .kl_budget import KLBudgetCallback, SampledKL

    prompts, source = _kl_prompts(recipe, prompts_dir, training_args.seed)
    estimator = SampledKL(prompts, tokenizer, num_samples=recipe.kl_eval_samples, max_new_tokens=recipe.max_new_tokens,
                          batch_size=recipe.sampling_batch_size, seed=training_args.seed)
    callback = KLBudgetCallback(recipe.kl_budget, estimator, every_n_steps=recipe.kl_every_n_steps)
    return callback, {"prompts": len(prompts), "prompts_source": source, "samples_per_prompt": recipe.kl_eval_samples,
                      "max_new_tokens": recipe.max_new_tokens, "every_n_steps": recipe.kl_every_n_steps}


def _train(recipe, model_args, training_args, data_dir: Path, adapter_dir: Path) -> None:
    from .stages.train import DEFAULT_LOSS, train_adapter, training_config

    # No beta here: the trainer reads it from data_dir's ctrl_build.json (a --beta given is checked against it).
    shared = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    shared.update(output_dir=str(data_dir.parent / "train"), push_to_hub=False)
    loss = shared.pop("ctrl_loss") if recipe.data_format == "pairs" else DEFAULT_LOSS[recipe.data_format]
    if recipe.data_format != "pairs":  # the pair-only DPOConfig fields do not exist in SFTConfig
        names = {f.name for f in dataclasses.fields(CTRLPointwiseConfig) if f.init}
        shared = {k: v for k, v in shared.items() if k in names and k != "ctrl_loss"}
    args = training_config(recipe.data_format, loss, shared)
    loading = model_loading_config(model_args, training_args)
    callback, estimate_info = None, None
    if recipe.hold_kl:  # the adapter delivered spends the planned KL, whatever the learning rate and steps
        from transformers import AutoTokenizer

        from .embedded import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_args.model_name_or_path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        callback, estimate_info = _kl_budget_callback(recipe, training_args, tokenizer, data_dir.parent / "prompts")
    train_adapter(data_dir, adapter_dir, loading, args, kl_callback=callback, kl_info=estimate_info,
                  train_info={"loss": loss})


def run_recipe(recipe: RecipeConfig, model_args, training_args: CTRLConfig,
               command: str | None = None) -> dict:
    """Run (or resume) the pipeline into ``training_args.output_dir``; returns the evaluation report."""
    from accelerate import PartialState

    from .generation import SamplingConfig
    from .stages.build import build_dataset
    from .stages.calibrate import calibrate_scored
    from .stages.evaluate import BUILD_REPORT_KEYS, evaluate_policy
    from .stages._shards import is_complete
    from .stages.sample import sample_prompts
    from .stages.score import score_samples

    state = PartialState()
    run_dir = Path(training_args.output_dir)
    if training_args.push_to_hub:
        from .hub import resolve_token

        if not training_args.hub_model_id:
            raise RecipeError("--push_to_hub needs --hub_model_id (the repo to push to)")
        resolve_token(training_args.hub_token)  # no token: fail now, not after hours of work
    settings = _result_settings(recipe, model_args, training_args)
    if state.is_main_process:
        _check_run_folder(run_dir, settings, recipe.overwrite)
    state.wait_for_everyone()
    started = time.perf_counter()
    model = model_args.model_name_or_path

    prompts_dir = run_dir / "prompts"
    if state.is_main_process and _stage("prompts", (prompts_dir / "eval" / "prompts.jsonl").exists()):
        train, held_out = _prompt_splits(recipe, training_args.seed)
        _write_prompts(prompts_dir / "train", train)
        _write_prompts(prompts_dir / "eval", held_out)
    state.wait_for_everyone()

    sampling = SamplingConfig(k=recipe.num_samples, max_new_tokens=recipe.max_new_tokens,
                              batch_size=recipe.sampling_batch_size)
    # sample/score resume shard by shard and split shards across ranks themselves.
    if _stage("sample", is_complete(run_dir / "samples")):
        sample_prompts(str(prompts_dir / "train" / "prompts.jsonl"), run_dir / "samples", model, sampling=sampling,
                       seed=training_args.seed)
    state.wait_for_everyone()
    if _stage("score", is_complete(run_dir / "scored")):
        score_samples(run_dir / "samples", run_dir / "scored", [recipe.reward_model])
    state.wait_for_everyone()

    data_dir = run_dir / "data"
    if state.is_main_process:
        if _stage("calibrate", (run_dir / "calibrated").exists()):
            calibrate_scored(run_dir / "scored", run_dir / "calibrated")
        if _stage("build", data_dir.exists()):
            build_dataset(run_dir / "calibrated", data_dir, format=recipe.data_format, transform=recipe.transform,
                          inference=recipe.inference, n=recipe.inference_n, kl=recipe.kl_budget,
                          strategy=recipe.pair_strategy, pairs_per_prompt=recipe.pairs_per_prompt,
                          keep_unfinished=recipe.keep_unfinished, seed=training_args.seed)
    state.wait_for_everyone()
    build_info = read_build_info(data_dir)
    if build_info is None:
        raise DataError(f"{data_dir} holds no build metadata ({BUILD_INFO_FILE}): remove the folder to rebuild it")

    adapter_dir = run_dir / "adapter"
    if _stage("train", (adapter_dir / "adapter_config.json").exists()):
        _train(recipe, model_args, training_args, data_dir, adapter_dir)

    if not state.is_main_process:
        return None  # evaluation and push are single-process: no barrier left to wait at
    eval_dir = run_dir / "eval"
    if _stage("evaluate", (eval_dir / "report.json").exists()):
        evaluate_policy(str(prompts_dir / "eval" / "prompts.jsonl"), eval_dir, model, recipe.reward_model,
                        adapter=str(adapter_dir), n=tuple(recipe.eval_n), selectors=tuple(recipe.eval_selectors),
                        max_new_tokens=recipe.max_new_tokens, seed=training_args.seed,
                        train_data=str(data_dir), transform=build_info["transform"], t=build_info["t"],
                        build_info=build_info, policy_samples=recipe.eval_policy_samples,
                        reference_samples=recipe.eval_reference_samples,
                        reference_pool=run_dir / "eval_reference_pool")
    report = json.loads((eval_dir / "report.json").read_text())
    if not report.get("build"):  # a report written before evaluate recorded the build
        report["build"] = {k: build_info.get(k) for k in BUILD_REPORT_KEYS}
    if (run_dir / "train" / KL_BUDGET_FILE).exists():
        report["training_kl"] = json.loads((run_dir / "train" / KL_BUDGET_FILE).read_text())
    if training_args.push_to_hub:
        _push(recipe, model_args, training_args, run_dir, report, command)
    logger.info("run finished in %.0f s: %s", time.perf_counter() - started, run_dir)
    return report


def _push(recipe, model_args, training_args, run_dir: Path, report: dict, command: str | None) -> None:
    from .hub import ModelCardInfo, push_adapter

    adapter_dir = run_dir / "adapter"
    info = ModelCardInfo(
        base_model=model_args.model_name_or_path, dataset=f"{recipe.dataset_name} ({', '.join(recipe.dataset_subsets)})",
        k=recipe.num_samples, reward_model=recipe.reward_model, transform=report["build"]["transform"],
        t=report["build"]["t"], beta=report["build"]["beta"], phi_scale=report["build"].get("phi_scale"),
        unscaled_beta=report["build"].get("unscaled_beta"), inference=recipe.inference, n=recipe.inference_n,
        win_rates=report["win_rates"], kl=report["kl"]["value"], plots=sorted(str(p) for p in (run_dir / "eval").glob("*.png")),
        command=command)
    url = push_adapter(adapter_dir, training_args.hub_model_id, info, private=bool(training_args.hub_private_repo),
                       revision=getattr(training_args, "hub_revision", None),
                       dataset_dir=run_dir / "data" if recipe.push_dataset else None, token=training_args.hub_token)
    logger.info("pushed: %s", url)


def summary(report: dict) -> str:
    """Before/after table: the reference against itself wins 0.5 by definition."""
    lines = [f"{'procedure':<10} {'reference':>9} {'aligned':>8}   95% CI"]
    for row in report["win_rates"]:
        lines.append(f"{row['selector'] + '-' + str(row['n']):<10} {0.5:>9.3f} {row['value']:>8.3f}   "
                     f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    from .reporting import describe_build

    kl = report["kl"]
    lines.append(f"KL(aligned ‖ reference) = {kl['value']:.3f} nats [{kl['ci_low']:.3f}, {kl['ci_high']:.3f}]"
                 f"   transform {describe_build(report.get('build') or {})}")
    held = report.get("training_kl")
    if held and held.get("final"):
        final = held["final"]
        status = "reached, training stopped there" if held["reached"] else "not reached: more steps or a higher learning rate"
        lines.append(f"KL held while training = {final['value']:.3f} ± {final['stderr']:.3f} nats "
                     f"(budget {held['budget']:.3g}: {status})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, defaults: dict | None = None) -> int:
    """Entry point of ``recipes/*.py``: parse, run, print the before/after summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe, model_args, training_args = parse_recipe_args(argv, defaults)
        command = " ".join([Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None else argv))
        report = run_recipe(recipe, model_args, training_args, command=command)
    except (RecipeError, HubError, DataError, TrainingDataError, OSError, ValueError) as err:
        # Input and environment problems: one line, no traceback from deep inside a library.
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(summary(report))
        print(f"adapter: {Path(training_args.output_dir) / 'adapter'}   report: "
              f"{Path(training_args.output_dir) / 'eval' / 'report.md'}")
    return 0
