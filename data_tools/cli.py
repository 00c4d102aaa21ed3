"""`ctrl-data <stage>`: thin argument parsing over ctrl_offline's library functions.

Errors in the input (bad files, bad values, bad arguments) print one clear line on stderr and
exit with status 2; nothing half-written is left behind.

One name per setting, the recipe config's (``recipes/configs/*.yaml``) with dashes: ``--num-samples``
(K), ``--inference-n`` and ``--kl-budget`` (what a build is planned for), ``--data-format``,
``--pair-strategy``, ``--eval-n``, ``--eval-selectors``, ``--eval-policy-samples``,
``--eval-reference-samples``, ``--kl-eval-samples``, ``--kl-every-n-steps``; no abbreviations. Choice lists
come from the library (the procedure and transform registries, the formats, strategies, losses and estimator
settings it defines).

``ctrl-data round`` chains sample (from the previous round's adapter) → score → calibrate against the
reference tables → build (pointwise) → train (from that adapter) for one on-policy round
(:func:`ctrl_offline.stages.rounds.run_round`, docs/rounds.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXAMPLES_CALIBRATE = """examples:
  ctrl-data calibrate scored.parquet --out calib/
      tables of the reference samples + every row's leave-one-out u
  ctrl-data calibrate policy_scored.parquet --tables calib/ --out policy_calib/
      calibrate other responses (e.g. policy samples) against existing tables
"""

EXAMPLES_SAMPLE = """examples:
  ctrl-data sample prompts.jsonl --model HuggingFaceTB/SmolLM2-135M-Instruct --num-samples 8 --out samples/
  ctrl-data sample Anthropic/hh-rlhf --prompt-column chosen --limit 1000 --model ./sft-model --out samples/
  ctrl-data sample prompts.jsonl --adapter round1/adapter --num-samples 4 --seed 2 --out round2/samples/
      from the policy (its base + the adapter): logp under the policy, ref_logp under the base
  accelerate launch -m data_tools sample prompts.jsonl --model ./sft --out samples/   # one share per process
A killed run resumes where it stopped when re-run with the same arguments.
"""

EXAMPLES_SCORE = """examples:
  ctrl-data score samples/ --reward OpenAssistant/reward-model-deberta-v3-large-v2 --out scored/
  ctrl-data score samples/ --reward helpful=./rm-helpful --reward length=mymodule:length_reward --out scored/
The first reward is also written as the `reward` column that `calibrate` reads.
"""

EXAMPLES_BUILD = """examples:
  ctrl-data build calib/ --data-format pairs --inference bon --inference-n 4 --kl-budget 0.5 --out pairs/
  ctrl-data build calib/ --inference soft_bon --inference-n 4 --kl-budget 0.5 --selector-arg lam=0.2 --out pairs/
      a procedure without a closed form is planned by simulation on calib/'s tables
  ctrl-data build calib/ --data-format pointwise --transform exp --t 5 --beta 30 --out pointwise/
  ctrl-data build calib/ --pair-strategy best_vs_worst --transform identity --beta 0.1 --out baseline/
"""

EXAMPLES_TRAIN = """examples:
  ctrl-data train pairs/ --out adapter/
      the loss, β and reference model the build recorded; LoRA on a full-precision base
  ctrl-data train pairs/ --out adapter/ --load-in-4bit --learning_rate 1e-4 --num_train_epochs 2
      QLoRA (bitsandbytes); any TRL training argument passes through as --name value
  ctrl-data train pairs/ --out adapter/ --kl-prompts heldout.jsonl
      held to the KL the build was planned for (--kl-budget to name another), estimated on held-out prompts
  accelerate launch -m data_tools train pairs/ --out adapter/ --per_device_train_batch_size 4
  ctrl-data train round2/build/ --out round2/adapter/ --init-adapter round1/adapter/
      train round 1's adapter further (its LoRA shape and base; the reference stays the base)
A killed run resumes from its newest checkpoint (in ADAPTER.checkpoints) when re-run with the same arguments.
"""

EXAMPLES_ROUND = """examples:
  ctrl-data round prompts.jsonl --reference calib/ --reward rm=./rm --out round1/ \\
      --inference bon --inference-n 4 --kl-budget 0.5 --max_steps 200 --learning_rate 1e-4
      round 1: samples of the base, calibrated against calib/'s tables, a fresh adapter in round1/adapter
  ctrl-data round prompts.jsonl --reference calib/ --reward rm=./rm --out round2/ --adapter round1/adapter \\
      --inference bon --inference-n 4 --kl-budget 0.5 --max_steps 200 --learning_rate 1e-4
      round 2: samples of round 1's adapter, which is trained further into round2/adapter
Each stage is skipped when its folder is complete: a killed round resumes when re-run with the same arguments.
"""

EXAMPLES_PLAN = """examples:
  ctrl-data plan --inference bon --inference-n 4 --kl-budget 0.5
  ctrl-data plan --inference won --inference-n 8 --kl-budget 1 --json
  ctrl-data plan --inference bon --inference-n 4 --kl-budget 0.5 --plot tradeoff.png
  ctrl-data plan --inference bon --inference-n 4 --kl-budget 0.5 --num-samples 8 --on-policy
      the plan ctrl-data round trains (policy samples ranked among 8 reference rewards)
  ctrl-data plan --inference bot --inference-n 8 --kl-budget 0.5 --tables calib/
      a procedure without a closed form, simulated on the calibration tables
"""


EXAMPLES_EVAL = """examples:
  ctrl-data eval heldout.jsonl --model ./base --adapter ./ctrl-bon4 --reward ./rm --eval-n 1 2 4 8 \\
      --eval-selectors bon won bot --out report/
  ctrl-data eval heldout.jsonl --model ./base --adapter ./ctrl-bon4 --reward ./rm --eval-n 1 4 \\
      --eval-policy-samples 16 --eval-reference-samples 16 --reference-pool pool/ --out report-a/
      win rates averaged over every N-subset of 16 policy and 16 reference samples per prompt; the
      reference samples are drawn once into pool/ and read back by later runs on the same prompts
  ctrl-data eval heldout.jsonl --model ./base --adapter ./ctrl-exp --reward ./rm --eval-n 1 4 \\
      --eval-policy-samples 16 --reference-pool pool/ --out report-b/
  ctrl-data compare report-a/ report-b/
      A − B per selector and N with a paired bootstrap interval over the prompts
  ctrl-data eval heldout.jsonl --model ./base --adapter ./ctrl-kl0.1 ./ctrl-kl0.25 ./ctrl-kl0.5 --reward ./rm \\
      --eval-n 1 4 --eval-policy-samples 16 --out frontier-ctrl/
  ctrl-data eval heldout.jsonl --model ./base --adapter ./ctrl.checkpoints --reward ./rm --out frontier-run/
      a frontier: every adapter (or checkpoint) into frontier-ctrl/<label>/ against frontier-ctrl/pool,
      and frontier.md / frontier.png: win rate against KL beside best-of-n sampling and each plan's curve
"""

EXAMPLES_COMPARE = """examples:
  ctrl-data compare report-a/ report-b/
  ctrl-data compare report-a/ report-b/ --json
  ctrl-data compare frontier-ctrl/ frontier-dpo/ --at-kl 0.1 0.25 0.5
      each method's win rates interpolated at those KLs between its points (ctrl-data eval --adapter with
      several adapters or a run's checkpoints), A − B with a paired bootstrap on both axes, a verdict, and
      each against best-of-n sampling of the reference at the same KL
  ctrl-data compare frontier-ctrl/ --at-kl 0.25
Both sides must cover the same prompts (ideally against the same --reference-pool).
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _selector_arg(text: str) -> tuple[str, float | int | None]:
    """``NAME=VALUE``: a setting of a registered procedure (an int, a float, or ``none``)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if value.lower() == "none":
        return name, None
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{name}: expected a number or none, got {value!r}")


def _add_selector_arg(parser) -> None:
    from ctrl_offline.maths.procedures import get_procedure, procedure_names

    settings = sorted({p for name in procedure_names() for p in get_procedure(name).params})
    parser.add_argument("--selector-arg", type=_selector_arg, action="append", default=[], metavar="NAME=VALUE",
                        help=f"a procedure's setting ({', '.join(settings)}); repeat for several")


def _add_model_args(parser) -> None:
    """How the base is loaded and the adapter shaped (ModelLoadingConfig); the --lora-* flags default to None so
    that an adapter trained further keeps its own shape (:func:`_loading`)."""
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="QLoRA: quantise the base to 4-bit NF4 (bitsandbytes)")
    parser.add_argument("--lora-r", type=_positive_int,
                        help="LoRA rank (default 16; an adapter trained further: its own)")
    parser.add_argument("--lora-alpha", type=_positive_int,
                        help="LoRA α (default 32; an adapter trained further: its own)")
    parser.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    parser.add_argument("--lora-target-modules", nargs="+", help="default: every attention and MLP projection")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")


def _add_kl_hold_args(parser) -> None:
    parser.add_argument("--kl-eval-samples", type=_positive_int, default=4,
                        help="policy samples per KL prompt per estimate")
    parser.add_argument("--kl-every-n-steps", type=_positive_int, default=10,
                        help="optimizer steps between KL estimates")
    parser.add_argument("--kl-max-new-tokens", type=_positive_int, default=64)
    parser.add_argument("--kl-tolerance", type=_positive_float, default=0.01,
                        help="once past the budget, bisect back to within this many nats of it")
    parser.add_argument("--kl-max-bisections", type=_positive_int, default=12,
                        help="KL estimates the bisection may spend once the budget is passed")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep ADAPTER.checkpoints once the adapter is written")


def _loading(args, overrides: dict, continued: bool) -> dict:
    """The ModelLoadingConfig fields given on the command line. A fresh adapter gets the defaults of the flags left
    out; one trained further (``continued``) only the flags given, the rest is its own."""
    from dataclasses import fields

    from ctrl_offline.models.modeling import ModelLoadingConfig

    # One switch for the model and the trainer (TRL's --gradient_checkpointing wins when given).
    checkpointing = overrides.setdefault("gradient_checkpointing", not args.no_gradient_checkpointing)
    lora = {name: getattr(args, name) for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}
    if continued:
        lora = {k: v for k, v in lora.items() if v is not None}
    else:
        defaults = {f.name: f.default for f in fields(ModelLoadingConfig) if f.name in lora}
        lora = {k: defaults[k] if v is None else v for k, v in lora.items()}
    return {"load_in_4bit": args.load_in_4bit, **lora, "gradient_checkpointing": checkpointing}


def build_parser() -> argparse.ArgumentParser:
    # The registered procedures at the time the parser is built (one registered before main() runs is known).
    from ctrl_offline.maths.finite_k import THEORY_STRATEGIES
    from ctrl_offline.rows.pairs import PAIR_STRATEGIES
    from ctrl_offline.maths.procedures import closed_form_names, procedure_names
    from ctrl_offline.maths.losses import DATA_FORMATS, loss_names
    from ctrl_offline.maths.transforms import available_transforms

    procedures = list(procedure_names())
    transforms = list(available_transforms())
    parser = argparse.ArgumentParser(prog="ctrl-data", description="Build calibrated, inference-aware training data.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    cal = stages.add_parser(
        "calibrate",
        help="per-prompt quantile tables and calibrated rewards u",
        description="Build per-prompt quantile tables from scored reference samples and add the calibrated "
        "reward u to every row (leave-one-out for the reference set itself).",
        epilog=EXAMPLES_CALIBRATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cal.add_argument("scored", help="Parquet file, Parquet folder or datasets folder with prompt_id, sample_idx, reward")
    cal.add_argument("--out", required=True, help="output folder (tables.parquet, calibrated.parquet)")
    cal.add_argument("--tables", help="existing tables (file or calibrate output folder) to apply instead of building")
    cal.add_argument("--min-k", type=int, default=2, help="fewest reference samples a prompt may have (default 2)")
    cal.add_argument("--reward-column", default="reward", help="column holding the reward (default: reward)")
    cal.add_argument(
        "--leave-one-out-column",
        help="with --tables: boolean column marking rows that are their prompt's own reference samples",
    )
    cal.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    cal.add_argument("--force", action="store_true", help="calibrate outputs of different models together anyway")
    cal.set_defaults(func=_run_calibrate)

    sa = stages.add_parser("sample", help="K reference completions per prompt", epilog=EXAMPLES_SAMPLE,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Draw K completions per prompt from the reference model, with their "
                           "reference log-probs (sharded, resumable).")
    sa.add_argument("prompts", help="JSONL/JSON/Parquet/CSV/TXT file, datasets folder, or Hub dataset id")
    sa.add_argument("--model", help="reference model: Hub id or local folder (with --adapter: its base, by default "
                    "the one the adapter records)")
    sa.add_argument("--adapter", help="PEFT adapter folder: sample the policy (base + adapter) for an on-policy round; "
                    "rows get logp (the policy's) beside ref_logp (the base's)")
    sa.add_argument("--out", required=True, help="output folder (shard-*.parquet)")
    _add_prompt_source(sa)
    sa.add_argument("--num-samples", type=int, default=4, metavar="K",
                    help="K, samples per prompt (default 4, at least 2)")
    sa.add_argument("--max-new-tokens", type=_positive_int, default=128)
    sa.add_argument("--temperature", type=_positive_float, default=1.0, help="1.0 samples π_ref itself")
    sa.add_argument("--top-p", type=_positive_float, default=1.0)
    sa.add_argument("--sampling-batch-size", type=_positive_int, default=8,
                    help="prompts per generate call (default 8)")
    sa.add_argument("--shard-size", type=_positive_int, default=32, help="prompts per output shard")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    sa.add_argument("--overwrite", action="store_true", help="replace an output folder holding another run")
    sa.set_defaults(func=_run_sample)

    sc = stages.add_parser("score", help="rewards for sampled completions", epilog=EXAMPLES_SCORE,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Score every sample with one or more rewards (sharded, resumable).")
    sc.add_argument("samples", help="output folder of `ctrl-data sample`")
    sc.add_argument("--reward", action="append", required=True,
                    help="[NAME=]reward model id/folder or module:function; repeat for several")
    sc.add_argument("--out", required=True)
    sc.add_argument("--batch-size", type=_positive_int, default=16)
    sc.add_argument("--overwrite", action="store_true")
    sc.set_defaults(func=_run_score)

    bu = stages.add_parser("build", help="training pairs / pointwise targets / weights", epilog=EXAMPLES_BUILD,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Turn calibrated samples into a training set for the CTRL trainers "
                           "(and TRL's DPO trainer).")
    bu.add_argument("calibrated", help="output folder of `ctrl-data calibrate` (or its calibrated.parquet)")
    bu.add_argument("--out", required=True)
    bu.add_argument("--data-format", choices=list(DATA_FORMATS), default="pairs",
                    help="pairs (TRL's DPO columns), pointwise, weights, or grouped: one row per prompt with its K "
                    "completions, for any loss, each response forwarded once per training step (needs the samples' "
                    "token ids and reference log-probs)")
    bu.add_argument("--transform", choices=transforms, help="transform family (default: the planner's best)")
    bu.add_argument("--t", type=_positive_float, help="shape parameter of exp/negexp")
    bu.add_argument("--beta", type=_positive_float, help="KL coefficient β")
    bu.add_argument("--inference", choices=procedures,
                    help="plan transform, t and β for this procedure (simulated on the calibrated input's tables "
                    "when it has no closed form)")
    bu.add_argument("--inference-n", type=_positive_int, metavar="N",
                    help="N of the inference procedure (with --inference)")
    bu.add_argument("--kl-budget", type=_positive_float, metavar="KL",
                    help="KL(π‖π_ref) budget in nats (with --inference)")
    bu.add_argument("--pair-strategy", default="all", choices=list(PAIR_STRATEGIES))
    bu.add_argument("--pairs-per-prompt", type=_positive_int, help="with --pair-strategy sampled")
    _add_selector_arg(bu)
    _add_estimator_args(bu)
    bu.add_argument("--k-infinity", action="store_true",
                    help="plan the exact K = ∞ tilt instead of the one trained from the K samples per prompt")
    unfinished = bu.add_mutually_exclusive_group()
    unfinished.add_argument("--keep-unfinished", dest="keep_unfinished", action="store_true", default=True,
                            help="keep completions cut at max_new_tokens, trained as prefixes without EOS (default)")
    unfinished.add_argument("--drop-unfinished", dest="keep_unfinished", action="store_false",
                            help="leave out completions cut before EOS")
    bu.add_argument("--max-left-out", type=float, default=None,
                    help="stop if the build would leave out more than this fraction of the rows (default 0.5; 1: never)")
    bu.add_argument("--tokenizer", help="tokenizer that turns the rendered prompts into prompt_token_ids, as the "
                    "sampler did (default: the reference model recorded at sampling)")
    bu.add_argument("--seed", type=int, default=0)
    bu.add_argument("--overwrite", action="store_true")
    bu.set_defaults(func=_run_build)

    tr = stages.add_parser("train", help="the adapter a build was made for (TRL DPO / SFT trainers + PEFT)",
                           description="Train a LoRA/QLoRA adapter on a `ctrl-data build` folder with the loss, β and "
                           "reference model the build recorded. Arguments this command does not know are TRL training "
                           "arguments (DPOConfig for pairs and grouped rows, SFTConfig otherwise), e.g. --learning_rate 1e-4.",
                           epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)  # a TRL argument must not be read as an abbreviation of ours
    tr.add_argument("data", help="output folder of `ctrl-data build`")
    tr.add_argument("--out", required=True, help="adapter folder (written once training ends)")
    tr.add_argument("--model", help="base model (default: the reference model recorded at sampling)")
    tr.add_argument("--loss", choices=list(loss_names()),
                    help="override the loss the build was planned for (within its format; any on a grouped build)")
    tr.add_argument("--init-adapter", metavar="PREV",
                    help="train this adapter's LoRA weights further instead of a fresh adapter (same base; its LoRA "
                    "shape: --lora-r/--lora-alpha/--lora-target-modules must agree with it or be left out)")
    _add_model_args(tr)
    tr.add_argument("--kl-prompts", help="held-out prompts (file, folder or Hub id): hold training to a KL budget")
    tr.add_argument("--kl-budget", type=_positive_float, help="KL to hold (default: the build's planned KL)")
    _add_kl_hold_args(tr)
    tr.add_argument("--overwrite", action="store_true", help="replace an existing adapter and its checkpoints")
    tr.set_defaults(func=_run_train, accepts_extra=True)

    rd = stages.add_parser("round", help="one on-policy round: sample the policy, calibrate against the reference "
                           "tables, build pointwise targets, train the adapter further",
                           description="Sample the previous round's adapter (the base for round 1), score the samples, "
                           "calibrate them against the reference set's stored tables, build pointwise targets "
                           "Φ(u) − β log Z and train the adapter further, into OUT/{samples,scored,calibrated,build,"
                           "adapter} (docs/rounds.md). Arguments this command does not know are TRL training arguments "
                           "(SFTConfig), e.g. --max_steps 200 --learning_rate 1e-4.",
                           epilog=EXAMPLES_ROUND, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    rd.add_argument("prompts", help="training prompts (file, datasets folder or Hub id)")
    rd.add_argument("--reference", required=True, metavar="REF_CAL",
                    help="the reference samples' calibrate output (its tables.parquet calibrates every round)")
    rd.add_argument("--reward", action="append", required=True,
                    help="[NAME=]reward model id/folder or module:function, as for the reference samples")
    rd.add_argument("--out", required=True, metavar="ROUND_DIR", help="round folder")
    rd.add_argument("--adapter", metavar="PREV",
                    help="the previous round's adapter: sampled, then trained further (omit for round 1: the base)")
    rd.add_argument("--model", help="base model (default: the adapter's, else the reference samples' model)")
    _add_prompt_source(rd)
    rd.add_argument("--num-samples", type=int, default=4, metavar="M",
                    help="policy samples per prompt (default 4, at least 2)")
    rd.add_argument("--max-new-tokens", type=_positive_int, default=128)
    rd.add_argument("--sampling-batch-size", type=_positive_int, default=8,
                    help="prompts per generate call (default 8)")
    rd.add_argument("--shard-size", type=_positive_int, default=32, help="prompts per sample shard")
    rd.add_argument("--seed", type=int, default=0, help="round r samples with seed SEED + r (default 0)")
    rd.add_argument("--score-batch-size", type=_positive_int, default=16)
    rd.add_argument("--transform", choices=transforms, help="transform family (default: the planner's best)")
    rd.add_argument("--t", type=_positive_float, help="shape parameter of exp/negexp")
    rd.add_argument("--beta", type=_positive_float, help="KL coefficient β")
    rd.add_argument("--inference", choices=procedures, help="plan transform, t and β for this procedure")
    rd.add_argument("--inference-n", type=_positive_int, metavar="N", help="N of the inference procedure")
    rd.add_argument("--kl-budget", type=_positive_float, metavar="KL",
                    help="with --inference: the KL(π‖π_ref) budget planned for (and held with --kl-prompts); with "
                    "--transform/--beta: the KL held with --kl-prompts")
    _add_selector_arg(rd)
    from ctrl_offline.maths.finite_k import POINTWISE_NORMALISERS

    rd.add_argument("--log-partition", choices=POINTWISE_NORMALISERS, default="population",
                    help="normaliser of the pointwise targets (default population)")
    rd.add_argument("--k-infinity", action="store_true", help="plan the exact K = ∞ tilt instead of the K + 1 one")
    rd.add_argument("--drop-unfinished", dest="keep_unfinished", action="store_false", default=True,
                    help="leave out completions cut before EOS (default: kept as prefixes)")
    _add_model_args(rd)
    rd.add_argument("--kl-prompts", help="held-out prompts: hold training to the KL budget")
    _add_kl_hold_args(rd)
    rd.add_argument("--overwrite", action="store_true", help="start the round folder over")
    rd.set_defaults(func=_run_round, accepts_extra=True)

    ev = stages.add_parser("eval", help="inference-time win rates of a policy against its reference",
                           description="Draw m candidates per prompt from the policy (base + adapter) and M from the "
                           "reference (or read them from a shared reference pool) on held-out prompts, score them, and "
                           "report win rates of T(policy) over T(reference) for each selector and N — averaged over "
                           "every N-subset of both sides (a U-statistic) —, the standard win rate, the calibrated-reward "
                           "shortcut and KL, with plots and per-prompt values for `ctrl-data compare`.",
                           epilog=EXAMPLES_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("prompts", help="held-out prompts (file, datasets folder or Hub id)")
    ev.add_argument("--model", required=True, help="base (reference) model")
    ev.add_argument("--adapter", nargs="+", metavar="ADAPTER",
                    help="PEFT adapter folder of the aligned policy (omit to evaluate the base); several adapters, or "
                    "a folder of a run's checkpoint-<step> adapters, evaluate a frontier: each into --out/<label>/ "
                    "against one reference pool, with frontier.json/.md/.png in --out")
    ev.add_argument("--reward", required=True, help="reward model id/folder or module:function")
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument("--eval-n", nargs="+", type=_positive_int, default=[1, 2, 4], metavar="N",
                    help="N values evaluated (default 1 2 4)")
    ev.add_argument("--eval-selectors", nargs="+", default=["bon", "won"], choices=procedures,
                    help="procedures evaluated (default bon won)")
    ev.add_argument("--prompt-column", default="prompt", help="prompt column (default: prompt)")
    ev.add_argument("--limit", type=_positive_int)
    ev.add_argument("--max-new-tokens", type=_positive_int, default=64)
    ev.add_argument("--lam", type=_positive_float, default=0.1, help="λ of soft-BoN and Best-of-Tails")
    ev.add_argument("--beta", type=_positive_float, default=0.1, help="β of RBoN and ITP")
    ev.add_argument("--kappa0", type=_positive_float, default=0.1, help="κ₀ of Best-of-Tails")
    _add_selector_arg(ev)
    ev.add_argument("--train-data", help="training set, to warn about evaluation prompts seen in training; a "
                    "`ctrl-data build` folder's transform, t and β are recorded in the report")
    ev.add_argument("--eval-policy-samples", type=_positive_int, metavar="M_POLICY",
                    help="samples per prompt from the policy, ≥ max(N) (default max(N))")
    ev.add_argument("--eval-reference-samples", type=_positive_int, metavar="M_REF",
                    help="samples per prompt from the reference, ≥ max(N) (default max(N), or all of a reused pool's)")
    ev.add_argument("--reference-pool", metavar="DIR",
                    help="shared reference samples: read when DIR holds a pool for the same prompts, model, reward "
                    "and --max-new-tokens; drawn and written there when DIR does not exist")
    ev.add_argument("--max-subsets", type=_positive_int, default=None,
                    help="N-subsets per prompt enumerated for soft_bon/itp/bot before random subsets are used "
                    "(default 1000)")
    ev.add_argument("--no-tilt-fidelity", action="store_true",
                    help="skip the tilt-fidelity curve of a planned build's adapter (one more pass of both models "
                    "over the reference samples; docs/diagnostics.md §5)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--overwrite", action="store_true")
    ev.set_defaults(func=_run_eval)

    co = stages.add_parser("compare", help="paired comparison of eval reports (or frontiers) on the same prompts",
                           description="Per selector and N: value A, value B and A − B with a paired bootstrap "
                           "interval over prompts, plus the standard win rate and KL of each (from the reports' "
                           "per_prompt.parquet). With --at-kl, A and B are methods as curves (frontier folders or "
                           "single reports): win rates interpolated at those KLs, A − B with a paired bootstrap on "
                           "both axes and a verdict, and each against the best-of-n sampling frontier.",
                           epilog=EXAMPLES_COMPARE, formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_argument("a", help="report folder A (ctrl-data eval --out), or with --at-kl a frontier folder")
    co.add_argument("b", nargs="?", help="report (or frontier) folder B, on the same prompts; with --at-kl it may be "
                    "left out to compare A with the best-of-n sampling frontier only")
    co.add_argument("--at-kl", nargs="+", type=_positive_float, metavar="KL",
                    help="compare at these KLs (nats): each side's win rates interpolated between its points")
    co.add_argument("--num-boot", type=_positive_int, default=2000, help="bootstrap resamples (default 2000)")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--json", action="store_true", help="print the comparison as JSON")
    co.set_defaults(func=_run_compare)

    ins = stages.add_parser("inspect", help="summary of any stage's output",
                            description="Rows, prompts, K, reward stats, the calibration histogram and metadata.")
    ins.add_argument("path", help="output folder or Parquet file of any stage")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.add_argument("--plot", metavar="FILE.png", help="histograms of reward and u")
    ins.set_defaults(func=_run_inspect)

    pl = stages.add_parser(
        "plan",
        help="choose transform, t and β for an inference procedure and a KL budget",
        description="Predict the inference-time win rate of each transform family at a KL budget "
        "(closed forms of the tilted policy, or a simulation on calibration tables for procedures without one) "
        "and pick exp/negexp's best t.",
        epilog=EXAMPLES_PLAN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("--inference", required=True, choices=procedures,
                    help="the procedure planned for: closed forms for " + ", ".join(closed_form_names())
                    + "; the others are simulated on --tables")
    pl.add_argument("--tables", help="calibration tables (calibrate output) for procedures without a closed form")
    pl.add_argument("--lam", type=_positive_float, default=0.1, help="λ of soft_bon / tsallis / bot (simulated)")
    pl.add_argument("--beta-selector", type=_positive_float, default=0.1, help="β of rbon / itp (simulated)")
    _add_selector_arg(pl)
    pl.add_argument("--inference-n", required=True, type=_positive_int, metavar="N",
                    help="number of candidates N")
    pl.add_argument("--kl-budget", required=True, type=_positive_float, metavar="KL",
                    help="KL(π‖π_ref) budget in nats")
    pl.add_argument("--transforms", nargs="+", default=None, choices=transforms,
                    help="families to tune (default: identity log exp negexp)")
    pl.add_argument("--t-range", nargs=2, type=_positive_float, default=None, metavar=("LOW", "HIGH"),
                    help="search range of t for exp/negexp (default 0.01 40)")
    pl.add_argument("--min-beta", type=float, default=None,
                    help="smallest trainable β with Φ rescaled to span 1 (default 1e-3; 0 turns the guard off)")
    pl.add_argument("--num-samples", type=_positive_int, default=None, metavar="K",
                    help="reference samples per prompt: plan the tilt actually trained from K samples "
                    "(default: the exact tilt, K = ∞)")
    pl.add_argument("--pair-strategy", default="all", choices=list(THEORY_STRATEGIES),
                    help="how pairs are drawn (K-aware plans of pair losses; both draw pairs uniformly)")
    _add_estimator_args(pl)
    pl.add_argument("--on-policy", action="store_true",
                    help="plan for on-policy rounds (ctrl-data round): policy samples ranked among the K reference "
                    "rewards, trained pointwise; their ranks take K + 1 values (docs/finite_k.md §8). Needs "
                    "--num-samples")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    pl.add_argument("--plot", metavar="FILE.png", help="draw win rate vs KL for the planned transforms")
    pl.set_defaults(func=_run_plan)
    for sub in [parser, *stages.choices.values()]:  # one name per flag: no prefix of it stands for it
        sub.allow_abbrev = False
    return parser


def _run_calibrate(args) -> int:
    from ctrl_offline.stages.calibrate import calibrate_scored

    if args.leave_one_out_column and not args.tables:
        raise ValueError("--leave-one-out-column only applies with --tables (the reference set is always leave-one-out)")
    result = calibrate_scored(
        args.scored,
        args.out,
        tables=args.tables,
        min_k=args.min_k,
        reward_column=args.reward_column,
        leave_one_out_column=args.leave_one_out_column,
        overwrite=args.overwrite,
        force=args.force,
    )
    written = [p for p in (result.tables_path, result.calibrated_path) if p is not None]
    print(f"calibrated {result.num_rows:,} rows over {result.num_prompts:,} prompts in {result.seconds:.1f}s")
    for path in written:
        print(f"  wrote {path}")
    return 0


def _run_sample(args) -> int:
    from ctrl_offline.models.generation import SamplingConfig
    from ctrl_offline.stages.sample import sample_prompts

    sampling = SamplingConfig(k=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, batch_size=args.sampling_batch_size)
    result = sample_prompts(args.prompts, args.out, args.model, column=args.prompt_column, split=args.split,
                            limit=args.limit, sampling=sampling, seed=args.seed, shard_size=args.shard_size,
                            overwrite=args.overwrite, backend=args.backend, adapter=args.adapter)
    state = "complete" if result.complete else "this process's shards done"
    source = f" from {args.adapter}" if args.adapter else ""
    print(f"sampled {result.num_prompts:,} prompts × {args.num_samples}{source} into {result.num_shards} shard(s) "
          f"({result.shards_written} written now, {state}): {result.out_dir}")
    return 0


def _run_score(args) -> int:
    from ctrl_offline.stages.score import score_samples

    result = score_samples(args.samples, args.out, args.reward, batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"scored {result.num_shards} shard(s) ({result.shards_written} written now) into "
          f"{', '.join(result.reward_columns)}: {result.out_dir}")
    return 0


def _run_build(args) -> int:
    from ctrl_offline.stages.build import build_dataset

    result = build_dataset(args.calibrated, args.out, format=args.data_format, transform=args.transform, t=args.t,
                           beta=args.beta, inference=args.inference, n=args.inference_n, kl=args.kl_budget,
                           strategy=args.pair_strategy,
                           pairs_per_prompt=args.pairs_per_prompt, log_partition=args.log_partition,
                           selector_args=dict(args.selector_arg) or None,
                           targets=args.targets, loss=args.loss, k_aware=not args.k_infinity,
                           keep_unfinished=args.keep_unfinished, tokenizer=args.tokenizer, seed=args.seed,
                           **({} if args.max_left_out is None else {"max_left_out": args.max_left_out}),
                           overwrite=args.overwrite)
    t = "" if result.t is None else f" t={result.t:.4g}"
    print(f"built {result.num_rows:,} {result.format} rows with {result.transform}{t} beta={result.beta:.4g} "
          f"(the trainer's β, Φ rescaled by phi_scale={result.phi_scale:.4g}; unscaled_beta={result.unscaled_beta:.4g}"
          + ("" if result.k is None else f"; planned for K={result.k}") + f"): {result.out_dir}")
    return 0


def training_overrides(cls, extra: list[str]) -> dict:
    """The TRL config fields given on the command line (``--learning_rate 1e-4``), typed by TRL's own parser."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, allow_abbrev=False)
    for action in parser._actions:  # keep only what was given (set_defaults would also type-convert them)
        action.default, action.required = argparse.SUPPRESS, False
    try:
        given, unknown = parser.parse_known_args(extra)
    except SystemExit as err:  # argparse already printed why
        raise ValueError(f"bad training argument in {' '.join(extra)}") from err
    if unknown:
        raise ValueError(f"unrecognized argument(s): {' '.join(unknown)} (TRL's {cls.__name__} has no such field)")
    given = vars(given)
    for name in ("output_dir", "ctrl_loss", "beta"):
        if name in given:
            source = {"output_dir": "--out", "ctrl_loss": "--loss", "beta": "the build"}[name]
            raise ValueError(f"--{name} is set by ctrl-data train ({source})")
    return given


def _run_train(args) -> int:
    from ctrl_offline.io.files import DataError, read_build_info
    from ctrl_offline.stages.train import config_class, train_from_build

    info = read_build_info(args.data) if Path(args.data).is_dir() else None
    if info is None:
        raise DataError(f"{args.data} is not a `ctrl-data build` output folder (no ctrl_build.json)")
    cls = config_class(info.get("format"))
    overrides = training_overrides(cls, args.extra)
    loading = _loading(args, overrides, continued=args.init_adapter is not None)
    result = train_from_build(args.data, args.out, args.model, loss=args.loss, loading=loading,
                              training_args=overrides, kl_budget=args.kl_budget, kl_prompts=args.kl_prompts,
                              kl_samples=args.kl_eval_samples, kl_every_n_steps=args.kl_every_n_steps,
                              kl_max_new_tokens=args.kl_max_new_tokens, kl_tolerance=args.kl_tolerance,
                              kl_max_bisections=args.kl_max_bisections, keep_checkpoints=args.keep_checkpoints,
                              overwrite=args.overwrite, init_adapter=args.init_adapter)
    kl = ""
    if result.kl and result.kl.get("final"):
        kl = (f"; KL held at {result.kl['final']['value']:.3f} (budget {result.kl['budget']:.3g}"
              f"{'' if result.kl['reached'] else ', not reached'})")
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one summary line per launch
        return 0
    init = f" from {args.init_adapter}" if args.init_adapter else ""
    print(f"trained {result.loss} (β={result.beta:.4g}){init} for {result.steps} step(s) in {result.seconds:.0f}s{kl}: "
          f"{result.adapter_dir}")
    return 0


def _run_round(args) -> int:
    from ctrl_offline.training.config import CTRLPointwiseConfig
    from ctrl_offline.models.generation import SamplingConfig
    from ctrl_offline.stages.rounds import run_round

    overrides = training_overrides(CTRLPointwiseConfig, args.extra)
    loading = _loading(args, overrides, continued=args.adapter is not None)
    planned = args.inference is not None
    build = {"transform": args.transform, "t": args.t, "beta": args.beta, "inference": args.inference,
             "n": args.inference_n, "kl": args.kl_budget if planned else None,
             "selector_args": dict(args.selector_arg) or None, "log_partition": args.log_partition,
             "k_aware": not args.k_infinity, "keep_unfinished": args.keep_unfinished}
    train = {"loading": loading, "training_args": overrides, "kl_prompts": args.kl_prompts,
             "kl_budget": None if planned else args.kl_budget, "kl_samples": args.kl_eval_samples,
             "kl_every_n_steps": args.kl_every_n_steps, "kl_max_new_tokens": args.kl_max_new_tokens,
             "kl_tolerance": args.kl_tolerance, "kl_max_bisections": args.kl_max_bisections,
             "keep_checkpoints": args.keep_checkpoints}
    sampling = SamplingConfig(k=args.num_samples, max_new_tokens=args.max_new_tokens,
                              batch_size=args.sampling_batch_size)
    result = run_round(args.prompts, args.reference, args.reward, args.out, adapter=args.adapter, model=args.model,
                       column=args.prompt_column, split=args.split, limit=args.limit, sampling=sampling,
                       seed=args.seed, shard_size=args.shard_size, score_batch_size=args.score_batch_size,
                       build=build, train=train, overwrite=args.overwrite)
    parent = f"from {result.parent_adapter}" if result.parent_adapter else "from the base"
    skipped = f" (already complete: {', '.join(result.skipped)})" if result.skipped else ""
    print(f"round {result.round} {parent}{skipped}: {result.out_dir}")
    if result.train is not None:
        print(f"  trained {result.train.loss} (β={result.train.beta:.4g}) for {result.train.steps} step(s)")
    print(f"adapter: {result.adapter}")
    return 0


def _run_eval(args) -> int:
    from ctrl_offline.io.files import DataError, read_build_info
    from ctrl_offline.stages.evaluate import evaluate_policy
    from ctrl_offline.stages.frontier import evaluate_frontier, format_frontier, training_record

    settings = dict(n=tuple(args.eval_n), selectors=tuple(args.eval_selectors), column=args.prompt_column,
                    limit=args.limit, max_new_tokens=args.max_new_tokens, lam=args.lam, beta=args.beta,
                    kappa0=args.kappa0, seed=args.seed, policy_samples=args.eval_policy_samples,
                    reference_samples=args.eval_reference_samples, selector_args=dict(args.selector_arg) or None,
                    tilt_fidelity=not args.no_tilt_fidelity,
                    **({} if args.max_subsets is None else {"max_subsets": args.max_subsets}))
    adapters = args.adapter or []
    single = len(adapters) == 1 and not (Path(adapters[0]).is_dir()
                                          and not (Path(adapters[0]) / "adapter_config.json").is_file())
    if adapters and not single:  # several adapters, or a folder of checkpoints: a frontier
        if args.train_data:
            raise DataError("--train-data names one adapter's training set: a frontier reads each adapter's own")
        summary = evaluate_frontier(args.prompts, args.out, args.model, args.reward, args.adapter,
                                    reference_pool=args.reference_pool, overwrite=args.overwrite, **settings)
        print(format_frontier(summary))
        print(f"frontier: {Path(args.out) / 'frontier.md'}")
        return 0
    # A training set built by `ctrl-data build` records its transform, t and β (ctrl_build.json): the
    # report keeps them under "build" (and "transform"), as the recipe's evaluation does.
    # An adapter written by `ctrl-data train` carries its build's metadata beside it.
    build_info = read_build_info(args.train_data) if args.train_data else None
    train_data = args.train_data
    if single and build_info is None and Path(adapters[0]).is_dir():
        build_info, trained_on = training_record(Path(adapters[0]))
        train_data = train_data or trained_on  # to count evaluation prompts seen in training
    result = evaluate_policy(args.prompts, args.out, args.model, args.reward,
                             adapter=adapters[0] if adapters else None, train_data=train_data,
                             overwrite=args.overwrite, reference_pool=args.reference_pool, build_info=build_info,
                             transform=None if build_info is None else build_info.get("transform"),
                             t=None if build_info is None else build_info.get("t"), **settings)
    report = result.report
    print(f"KL(π‖π_ref) ≈ {report['kl']['value']:.4f}   standard win rate {report['standard_win_rate']['value']:.3f}"
          f"   ({report['policy_samples']} policy × {report['reference_samples']} reference samples per prompt)")
    for row in report["win_rates"]:
        print(f"  {row['selector']:>8}-{row['n']:<3} win rate {row['value']:.3f}  [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    if report.get("plan_diagnostics"):
        from ctrl_offline.maths.diagnostics import PlanDiagnostics

        print(f"against the plan: {PlanDiagnostics(**report['plan_diagnostics']).line()}")
    pool = report.get("reference_pool")
    if pool:
        print(f"reference pool: {pool['path']} ({'reused' if pool['reused'] else 'written'})")
    print(f"report: {result.out_dir / 'report.md'}")
    return 0


def _run_compare(args) -> int:
    from ctrl_offline.stages.compare import (
        compare_frontiers,
        compare_reports,
        format_comparison,
        format_frontier_comparison,
    )

    from ctrl_offline.io.files import DataError

    if args.at_kl:
        result = compare_frontiers(args.a, args.b, args.at_kl, num_boot=args.num_boot, seed=args.seed)
        print(json.dumps(result, default=str) if args.json else format_frontier_comparison(result))
        return 0
    if args.b is None:
        raise DataError("compare needs two report folders (or --at-kl, to compare one frontier with best-of-n)")
    result = compare_reports(args.a, args.b, num_boot=args.num_boot, seed=args.seed)
    print(json.dumps(result, default=str) if args.json else format_comparison(result))
    return 0


def _run_inspect(args) -> int:
    from ctrl_offline.stages.inspect import format_summary, inspect_output, plot_summary

    summary = inspect_output(args.path)
    print(json.dumps(summary, default=str) if args.json else format_summary(summary))
    if args.plot:
        plot_summary(args.path, args.plot)
    return 0


def _add_prompt_source(parser) -> None:
    """Which prompts of the source to draw from: its column, split and how many (sample, round)."""
    parser.add_argument("--prompt-column", default="prompt", help="prompt column (default: prompt)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--limit", type=_positive_int, help="use the first LIMIT prompts")


def _add_estimator_args(parser) -> None:
    """The estimator a K-aware plan is made for (ctrl_offline.maths.finite_k.Estimator)."""
    from ctrl_offline.maths.finite_k import ESTIMATOR_LOSSES, POINTWISE_NORMALISERS, TARGET_SCHEMES

    parser.add_argument("--loss", choices=ESTIMATOR_LOSSES, default=None,
                        help="the trainer's loss the K-aware plan is for (default: dpo for pairs, pointwise for "
                        "pointwise, weighted_sft for weights)")
    parser.add_argument("--targets", choices=TARGET_SCHEMES, default="loo",
                        help="node values: loo = Φ of the leave-one-out calibrated reward; cell = the tilt's mass "
                        "on the sample's quantile cell (finite for log)")
    parser.add_argument("--log-partition", choices=POINTWISE_NORMALISERS, default="population",
                        help="normaliser of pointwise targets (population: right when the policy generalises)")


def _format_plan(plan, on_policy: bool = False) -> str:
    header = ["transform", "t", "beta", "KL", "standard win rate", f"{plan.inference}-{plan.n} win rate"]
    rows = [
        [r.transform, "-" if r.t is None else f"{r.t:.4g}", f"{r.beta:.4g}", f"{r.kl:.4f}",
         f"{r.standard_win_rate:.4f}", f"{r.win_rate:.4f}"]
        for r in plan.rows
    ]
    if plan.k is not None:
        header[3:3] = ["trainer beta"]
        header.append("K=∞ win rate")
        for cells, r in zip(rows, plan.rows):
            cells[3:3] = [f"{r.beta / r.phi_scale:.4g}"]
            cells.append(f"{r.ideal_win_rate:.4f}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    best = plan.best()
    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    out.append(f"best for {plan.inference}-{plan.n} at KL {plan.kl:g}: {best.transform}"
               + ("" if best.t is None else f" (t={best.t:.4g})") + f", beta={best.beta:.4g}")
    if plan.k is not None:
        est = plan.estimator
        trained = (f"the tilt on-policy rounds train: policy samples ranked among K={plan.k - 1} reference rewards, "
                   f"pointwise (the K + 1 = {plan.k} estimator)" if on_policy else
                   f"the tilt {est.loss} trains from K={plan.k} samples per prompt (pairs: {est.strategy}, "
                   f"targets: {est.targets})")
        out.append(f"figures of {trained}; the trainer's β is beta / phi_scale = {best.beta / best.phi_scale:.4g}")
        out.extend(f"left out: {note}" for note in plan.skipped)
    from ctrl_offline.reports.measured import format_measured

    out.extend(format_measured(best.transform, f"{plan.inference}-{plan.n}"))
    return "\n".join(out)


def _run_plan(args) -> int:
    from ctrl_offline.maths.planner import DEFAULT_FAMILIES, DEFAULT_T_RANGE, MIN_TRAINABLE_BETA, plan
    from ctrl_offline.maths.procedures import get_procedure

    procedure = get_procedure(args.inference)
    tables = None
    if procedure.win_rate is None:
        if not args.tables:
            raise ValueError(f"--inference {args.inference} has no closed-form win rate: give --tables (a calibrate "
                             "output) to simulate it on")
        if args.plot:
            raise ValueError(f"--plot draws closed-form curves; {args.inference} has none (it is simulated)")
        from ctrl_offline.stages.calibrate import load_tables

        tables = load_tables(args.tables)
    k, loss = args.num_samples, args.loss or "dpo"
    if args.on_policy:
        if k is None:
            raise ValueError("--on-policy plans the ranks of policy samples among K reference rewards: give "
                             "--num-samples K")
        if args.loss not in (None, "pointwise"):
            raise ValueError(f"--on-policy rounds train pointwise, not {args.loss}")
        k, loss = k + 1, "pointwise"
    result = plan(args.inference, args.inference_n, args.kl_budget, families=tuple(args.transforms or DEFAULT_FAMILIES),
                  t_range=tuple(args.t_range or DEFAULT_T_RANGE),
                  min_beta=MIN_TRAINABLE_BETA if args.min_beta is None else args.min_beta,
                  k=k, loss=loss, strategy=args.pair_strategy, targets=args.targets,
                  log_partition=args.log_partition, tables=tables,
                  selector_args={"lam": args.lam, "beta": args.beta_selector, **dict(args.selector_arg)})
    if args.plot:
        from ctrl_offline.reports.plotting import plot_plan

        plot_plan(result, args.plot)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(_format_plan(result, on_policy=args.on_policy))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # input errors: one line, no traceback
        print(f"ctrl-data {args.stage}: error: {err}", file=sys.stderr)
        return 2
