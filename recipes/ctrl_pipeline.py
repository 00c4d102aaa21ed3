"""The whole CTRL pipeline as one resumable run: prompts → sample → score → calibrate → plan/build
→ train → evaluate → push. ``recipes/hh_bon.py`` and ``recipes/hh_won.py`` run it.

With ``rounds: N`` (N > 0) the reference samples are calibrated only for their tables, and
build/train are N on-policy rounds instead (docs/rounds.md): round r samples the policy (round 1
the base, then round r − 1's adapter) into ``round<r>/``, calibrates those samples against the
reference tables, builds pointwise targets Φ(u) − β log Z planned as the K + 1 estimator and trains
the adapter further (:func:`ctrl_offline.stages.rounds.run_round`). The last round's adapter is
evaluated and pushed. Rounds run in one process; a completed round is skipped, a killed one resumes
stage by stage.

Configured like TRL / alignment-handbook scripts: the YAML file given with ``--config`` is the one
source of settings (the dataclasses of :mod:`ctrl_offline.pipeline.recipe` and TRL's config), and any key
can be overridden on the command line. A script run without ``--config`` uses its own YAML
(``hh_bon.py``: ``configs/hh_bon.yaml``). Every stage writes its own folder under ``output_dir``
atomically and is skipped when that folder exists, so a killed run picks up where it stopped
(sampling and scoring also resume shard by shard, training from its last checkpoint). A run folder
remembers its config; running another config into it is refused unless ``--overwrite``.

Training (offline, and in every round) is held to ``kl_budget`` (``hold_kl``, on by default):
every ``kl_every_n_steps`` steps the adapter's KL(π‖π_ref) is estimated on held-out prompts, and
training stops where it reaches the budget, leaving weights bisected back to it
(:mod:`ctrl_offline.training.kl_budget`); the estimates and the KL left go to ``train/kl_budget.json`` (in
rounds: ``round<r>/train/``) and the run summary.

Under ``accelerate launch`` with several processes (``rounds: 0`` only), sampling and scoring
split the prompts by rank, training runs data-parallel (or ZeRO/FSDP, from the accelerate config),
and the single-process stages (calibrate, build, evaluate, push) run on the main process.

Everything here is orchestration; the pieces are the library's: the config
(:mod:`ctrl_offline.pipeline.recipe`), the prompt splits (:mod:`ctrl_offline.pipeline.prompts`), the stages
(:mod:`ctrl_offline.stages`) and training (:func:`ctrl_offline.stages.train.train_from_build`, the
function ``ctrl-data train`` and the benchmarks use too).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from ctrl_offline.training.config import CTRLConfig, CTRLPointwiseConfig
from ctrl_offline.reports.hub import HubError
from ctrl_offline.io.files import BUILD_INFO_FILE, DataError, read_build_info, write_json, write_text
from ctrl_offline.pipeline.recipe import RecipeConfig, RecipeError, model_loading_config, parse_recipe_args
from ctrl_offline.stages.train import KL_BUDGET_FILE, RUN_ONLY_TRAINING_ARGS, TRAIN_INFO_FILE
from ctrl_offline.training.trainer import TrainingDataError

__all__ = ["run_recipe", "summary", "describe_training", "main", "CONFIG_FILE"]

logger = logging.getLogger("recipes.ctrl_pipeline")

CONFIG_FILE = "recipe_config.json"
# Settings that change where results go or how they are logged, not the results themselves.
_NOT_RESULT_SETTINGS = {"output_dir", "overwrite", "push_dataset", *RUN_ONLY_TRAINING_ARGS}


# -- the run folder -------------------------------------------------------------------------------
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


def _training(recipe: RecipeConfig, model_args, training_args, run_dir: Path, checkpoints: Path) -> dict:
    """The recipe's :func:`~ctrl_offline.stages.train.train_from_build` arguments but the data, the adapter folder and
    the model: the loss, the LoRA loading, the TRL arguments, the checkpoints (kept in ``checkpoints``) and the KL
    hold. The offline train stage and every round train with them."""
    from ctrl_offline.pipeline.prompts import kl_prompts

    # No beta from here: the trainer reads it from the build's ctrl_build.json (a --beta given is checked against it).
    overrides = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    for name in ("output_dir", "push_to_hub", "hub_token", "hub_model_id", "hub_private_repo", "hub_revision",
                 "hub_strategy"):
        overrides.pop(name, None)  # checkpoints go to `checkpoints`; the recipe pushes, not the trainer
    loss = overrides.pop("ctrl_loss")  # a loss of the recipe's data_format (checked when the config was read)
    loading = dataclasses.asdict(model_loading_config(model_args, training_args))
    loading.pop("model_name_or_path")
    held = {}
    if recipe.hold_kl:  # the adapter delivered spends the planned KL, whatever the learning rate and steps
        prompts, source = kl_prompts(recipe, run_dir / "prompts", training_args.seed)
        held = dict(kl_budget=recipe.kl_budget, kl_prompts=prompts, kl_prompts_source=source,
                    kl_samples=recipe.kl_eval_samples, kl_every_n_steps=recipe.kl_every_n_steps,
                    kl_max_new_tokens=recipe.max_new_tokens, kl_batch_size=recipe.sampling_batch_size)
    return dict(loss=loss, loading=loading, training_args=overrides, checkpoint_dir=checkpoints,
                keep_checkpoints=True, **held)


def _round(recipe: RecipeConfig, model_args, training_args, run_dir: Path, number: int) -> None:
    """Round ``number`` into ``run_dir/round<number>`` (:func:`~ctrl_offline.stages.rounds.run_round`, docs/rounds.md):
    ``round_samples`` samples per training prompt from the last round's adapter (round 1: the base), scored,
    calibrated against the reference tables in ``calibrated/``, pointwise targets planned like the recipe's build
    (the K + 1 estimator), and that adapter trained further (round 1: a fresh one), held to the KL budget from the
    base. Each stage resumes where it stopped."""
    from ctrl_offline.models.generation import SamplingConfig
    from ctrl_offline.stages.rounds import run_round

    round_dir = (run_dir / f"round{number}").resolve()
    previous = None if number == 1 else (run_dir / f"round{number - 1}" / "adapter").resolve()
    sampling = SamplingConfig(k=recipe.round_samples, max_new_tokens=recipe.max_new_tokens,
                              batch_size=recipe.sampling_batch_size)
    build = dict(transform=recipe.transform, inference=recipe.inference, n=recipe.inference_n, kl=recipe.kl_budget,
                 keep_unfinished=recipe.keep_unfinished, seed=training_args.seed)
    prompts = str((run_dir / "prompts" / "train" / "prompts.jsonl").resolve())
    # Round r samples with seed + r: never the reference samples' own seed.
    result = run_round(prompts, (run_dir / "calibrated").resolve(), [recipe.reward_model], round_dir, adapter=previous,
                       model=model_args.model_name_or_path, sampling=sampling, seed=training_args.seed, build=build,
                       train=_training(recipe, model_args, training_args, run_dir, round_dir / "train"))
    if result.skipped:
        logger.info("[round %d] resumed: %s complete already", number, ", ".join(result.skipped))


def _training_record(recipe: RecipeConfig, adapter_dir: Path) -> dict:
    """How the evaluated adapter was trained (``training`` in the report): offline on the reference samples, or
    on-policy, in which round and from which adapter."""
    if recipe.rounds == 0:
        return {"mode": "offline", "data_format": recipe.data_format, "adapter": str(adapter_dir)}
    info = json.loads((adapter_dir / TRAIN_INFO_FILE).read_text())
    return {"mode": "on-policy", "round": recipe.rounds, "rounds": recipe.rounds, "round_samples": recipe.round_samples,
            "adapter": str(adapter_dir), "init_adapter": info.get("init_adapter")}


def describe_training(training: dict) -> str:
    """``on-policy, round 3 of 3 (…)`` or ``offline, on the reference samples (pairs)``: the report's and the
    summary's line."""
    if training.get("mode") != "on-policy":
        return f"offline, on the reference samples ({training.get('data_format')})"
    start = "a fresh adapter" if training.get("init_adapter") is None else f"round {training['round'] - 1}'s adapter"
    return (f"on-policy, round {training['round']} of {training['rounds']} ({training['round_samples']} policy samples "
            f"per prompt a round, calibrated against the reference tables; trained from {start}; docs/rounds.md)")


def _record_training(eval_dir: Path, training: dict) -> None:
    """Say in ``eval/report.json`` (``training``) and ``report.md`` (a line under the model's) how the evaluated adapter
    was trained; files that say so already are left as they are."""
    path = eval_dir / "report.json"
    report = json.loads(path.read_text())
    if report.get("training") != training:
        write_json(path, {**report, "training": training})
    markdown = eval_dir / "report.md"
    line = f"- training: {describe_training(training)}"
    if markdown.is_file() and line not in markdown.read_text().split("\n"):
        lines = [old for old in markdown.read_text().split("\n") if not old.startswith("- training: ")]
        at = next((i + 1 for i, old in enumerate(lines) if old.startswith("- model:")), len(lines))
        write_text(markdown, "\n".join(lines[:at] + [line] + lines[at:]))


def run_recipe(recipe: RecipeConfig, model_args, training_args: CTRLConfig | CTRLPointwiseConfig,
               command: str | None = None) -> dict | None:
    """Run (or resume) the pipeline into ``training_args.output_dir``; returns the evaluation report
    (None on processes other than the main one)."""
    from accelerate import PartialState

    from ctrl_offline.models.generation import SamplingConfig
    from ctrl_offline.pipeline.prompts import prompt_splits, write_prompts
    from ctrl_offline.stages._shards import is_complete
    from ctrl_offline.stages.build import build_dataset
    from ctrl_offline.stages.calibrate import calibrate_scored
    from ctrl_offline.stages.evaluate import BUILD_REPORT_KEYS, evaluate_policy
    from ctrl_offline.stages.sample import sample_prompts
    from ctrl_offline.stages.score import score_samples
    from ctrl_offline.stages.train import train_from_build

    state = PartialState()
    run_dir = Path(training_args.output_dir)
    if recipe.rounds and state.num_processes > 1:
        raise RecipeError(f"rounds: {recipe.rounds} runs in one process (ctrl_offline.stages.rounds.run_round), not "
                          f"{state.num_processes}: launch it with one process, or set rounds: 0 for the offline "
                          "pipeline, which trains data-parallel")
    if training_args.push_to_hub:
        from ctrl_offline.reports.hub import resolve_token

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
        train, held_out = prompt_splits(recipe, training_args.seed)
        write_prompts(prompts_dir / "train", train)
        write_prompts(prompts_dir / "eval", held_out)
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

    if state.is_main_process and _stage("calibrate", (run_dir / "calibrated").exists()):
        calibrate_scored(run_dir / "scored", run_dir / "calibrated")
    state.wait_for_everyone()

    if recipe.rounds == 0:  # offline: the reference samples themselves are the training set
        data_dir, adapter_dir = run_dir / "data", run_dir / "adapter"
        if state.is_main_process and _stage("build", data_dir.exists()):
            build_dataset(run_dir / "calibrated", data_dir, format=recipe.data_format, transform=recipe.transform,
                          inference=recipe.inference, n=recipe.inference_n, kl=recipe.kl_budget,
                          strategy=recipe.pair_strategy, pairs_per_prompt=recipe.pairs_per_prompt,
                          keep_unfinished=recipe.keep_unfinished, seed=training_args.seed)
        state.wait_for_everyone()
        train_dir = run_dir / "train"
        if _stage("train", (adapter_dir / "adapter_config.json").exists()):
            training = _training(recipe, model_args, training_args, run_dir, train_dir)
            train_from_build(data_dir, adapter_dir, model, **training)
    else:  # on-policy: the reference samples give the tables; each round samples the policy and trains it further
        for number in range(1, recipe.rounds + 1):
            round_dir = run_dir / f"round{number}"
            if _stage(f"round {number}", (round_dir / "adapter" / TRAIN_INFO_FILE).is_file()):
                _round(recipe, model_args, training_args, run_dir, number)
        data_dir, adapter_dir, train_dir = round_dir / "build", round_dir / "adapter", round_dir / "train"
    build_info = read_build_info(data_dir)
    if build_info is None:
        raise DataError(f"{data_dir} holds no build metadata ({BUILD_INFO_FILE}): remove the folder to rebuild it")

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
                        reference_pool=run_dir / "eval_reference_pool", tilt_fidelity=recipe.eval_tilt_fidelity)
    _record_training(eval_dir, _training_record(recipe, adapter_dir))
    report = json.loads((eval_dir / "report.json").read_text())
    if not report.get("build"):  # a report written before evaluate recorded the build
        report["build"] = {k: build_info.get(k) for k in BUILD_REPORT_KEYS}
    if (train_dir / KL_BUDGET_FILE).exists():
        report["training_kl"] = json.loads((train_dir / KL_BUDGET_FILE).read_text())
    if training_args.push_to_hub:
        _push(recipe, model_args, training_args, run_dir, adapter_dir, data_dir, report, command)
    logger.info("run finished in %.0f s: %s", time.perf_counter() - started, run_dir)
    return report


def _push(recipe, model_args, training_args, run_dir: Path, adapter_dir: Path, data_dir: Path, report: dict,
          command: str | None) -> None:
    from ctrl_offline.reports.hub import ModelCardInfo, push_adapter

    info = ModelCardInfo(
        base_model=model_args.model_name_or_path, dataset=f"{recipe.dataset_name} ({', '.join(recipe.dataset_subsets)})",
        k=recipe.num_samples, reward_model=recipe.reward_model, transform=report["build"]["transform"],
        t=report["build"]["t"], beta=report["build"]["beta"], phi_scale=report["build"].get("phi_scale"),
        unscaled_beta=report["build"].get("unscaled_beta"), inference=recipe.inference, n=recipe.inference_n,
        win_rates=report["win_rates"], kl=report["kl"]["value"], plots=sorted(str(p) for p in (run_dir / "eval").glob("*.png")),
        command=command)
    url = push_adapter(adapter_dir, training_args.hub_model_id, info, private=bool(training_args.hub_private_repo),
                       revision=getattr(training_args, "hub_revision", None),
                       dataset_dir=data_dir if recipe.push_dataset else None, token=training_args.hub_token)
    logger.info("pushed: %s", url)


def summary(report: dict) -> str:
    """Before/after table (the reference against itself wins 0.5 by definition), how the adapter was trained,
    the KL it spent and, for a planned build, the plan against what training reached (docs/diagnostics.md)."""
    from ctrl_offline.maths.diagnostics import PlanDiagnostics
    from ctrl_offline.reports.reporting import describe_build

    lines = [f"{'procedure':<10} {'reference':>9} {'aligned':>8}   95% CI"]
    for row in report["win_rates"]:
        lines.append(f"{row['selector'] + '-' + str(row['n']):<10} {0.5:>9.3f} {row['value']:>8.3f}   "
                     f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    kl = report["kl"]
    if report.get("training"):
        lines.append(f"training: {describe_training(report['training'])}")
    lines.append(f"KL(aligned ‖ reference) = {kl['value']:.3f} nats [{kl['ci_low']:.3f}, {kl['ci_high']:.3f}]"
                 f"   transform {describe_build(report.get('build') or {})}")
    held = report.get("training_kl")
    if held and held.get("final"):
        final = held["final"]
        status = "reached, training stopped there" if held["reached"] else "not reached: more steps or a higher learning rate"
        lines.append(f"KL held while training = {final['value']:.3f} ± {final['stderr']:.3f} nats "
                     f"(budget {held['budget']:.3g}: {status})")
    if report.get("plan_diagnostics"):
        lines.append(f"against the plan: {PlanDiagnostics(**report['plan_diagnostics']).line()}")
    return "\n".join(lines)


def _with_config(argv: list[str], default_config: str | Path | None) -> list[str]:
    """``argv`` with ``--config default_config`` in front when it names no config file."""
    if default_config is None or any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    logger.info("no --config given: using %s", default_config)
    return ["--config", str(default_config), *argv]


def main(argv: list[str] | None = None, default_config: str | Path | None = None) -> int:
    """Entry point of ``recipes/*.py``: parse, run, print the before/after summary.

    ``default_config`` is the script's own YAML, read when the command line names no ``--config``.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        argv = _with_config(list(sys.argv[1:] if argv is None else argv), default_config)
        recipe, model_args, training_args = parse_recipe_args(argv)
        command = " ".join([Path(sys.argv[0]).name] + argv)
        report = run_recipe(recipe, model_args, training_args, command=command)
    except (RecipeError, HubError, DataError, TrainingDataError, OSError, ValueError) as err:
        # Input and environment problems: one line, no traceback from deep inside a library.
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(summary(report))
        print(f"adapter: {report['adapter']}   report: "
              f"{Path(training_args.output_dir) / 'eval' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
