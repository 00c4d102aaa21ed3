"""The real-model comparison (issues 15 and 25): CTRL vs raw best-vs-worst DPO, calibrated identity and BoNBoN
on SmolLM2-135M-Instruct, as win-rate-against-KL frontiers compared at common KLs, with a powered paired evaluation.

  * reference model: the embedded SmolLM2-135M-Instruct (``embedded:smollm2``), all offline;
  * reward: VADER compound sentiment with exact ties broken by a fixed per-text jitter (``vader_tiebroken``);
  * prompts: templates × topics (benchmarks/prompts_topics.py); training, KL and evaluation topics disjoint;
  * methods, each trained on the same reference samples (cut completions kept as prefixes) and held by
    ``KLBudgetCallback`` + ``SampledKL`` (per-token KL on the KL prompts) to every KL budget:
      raw_bvw_dpo      best vs. worst raw reward per prompt, hard-label DPO (β fixed, ``--dpo-beta``)
      calib_identity   calibrated identity transform, K-aware plan for BoN-n at the budget, soft-label DPO
      ctrl_exp_bon     CTRL: exp transform, K-aware plan for BoN-n, soft-label DPO
      ctrl_negexp_won  CTRL: negexp transform, K-aware plan for WoN-n, soft-label DPO
      bonbon           BoNBoN: best vs. worst of the K samples, IPO at β*_K + NLL of the best (docs/theory.md §4.1)
      ctrl_exp_bon_rounds  CTRL-exp for BoN-n by on-policy rounds (docs/rounds.md): each round samples the policy
                       on the first --round-prompts training prompts, ranks its samples among the K reference
                       rewards, regresses onto the pointwise targets; every round held to the budget
  * evaluation: the library's eval stage, m policy samples per prompt against a reference pool of M samples
    per prompt drawn once and shared by every run (U-statistic BoN-n / WoN-n / standard win rates), the KL
    on the evaluation prompts and on the KL prompts the callback held (their agreement is reported); then
    each method's budgets are its frontier, and ``compare_frontiers`` interpolates CTRL and every baseline at
    common KLs (paired bootstrap over prompts on both axes) on the selector each CTRL method was planned for,
    and sets each against best-of-n sampling of the reference at the same KL.

Every stage is cached under --out (prompts, reference samples, scores, calibration, the reference pool, each
run's training set, adapter, KL record and evaluation), so a killed run resumes where it stopped.

    python benchmarks/smollm_comparison.py --out runs/smollm --json          # default size, 2 CPU cores
    python benchmarks/smollm_comparison.py --gpu --out runs/smollm-gpu --json  # one GPU
    python benchmarks/smollm_comparison.py --toy --out /tmp/smollm-toy --json  # tiny random model, < 3 min
    python benchmarks/smollm_comparison.py --measure-costs --out runs/smollm   # time pieces, print the estimate

docs/smollm_comparison.md describes the design (ties, cut completions, KL held, the pool, the intervals).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# quality.py and prompts_topics.py beside this file; the reward spec below imports this module by name.
for _path in (str(HERE), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import quality  # noqa: E402
from prompts_topics import TOPICS_EVAL, TOPICS_KL, TOPICS_TRAIN, make_prompts  # noqa: E402

logger = logging.getLogger("smollm_comparison")

#: The reward every stage scores with: ``name=module:function`` (score stage, eval stage, pool).
REWARD_SPEC = "vader_tb=smollm_comparison:vader_tiebroken"
#: VADER's compound score is rounded to 4 decimals, so distinct scores differ by ≥ 1e-4; a jitter below
#: 1e-5 breaks exact ties without reordering any two distinct scores.
TIE_JITTER = 1e-5

#: The decision rule, in win-rate points (1 point = 0.01), fixed before any result is seen.
EFFECT_POINTS, NULL_POINTS = 3.0, 1.0
#: The common KLs (nats, per-token estimate on the evaluation prompts) at which methods are compared.
COMMON_KLS = (0.1, 0.25, 0.5)
DECISION_RULE = (
    "Decision rule (fixed before the results; CTRL − baseline, in win-rate points, on the selector the CTRL "
    "method was planned for, N as evaluated, each method's win rate interpolated in √KL between its runs at the "
    f"common KLs {', '.join(f'{k:g}' for k in COMMON_KLS)} (where both reach them), 95% paired bootstrap interval "
    "over prompts on both axes):\n"
    f"  shows the effect  gap ≥ {EFFECT_POINTS:g} points and the interval excludes 0 (lower bound > 0)\n"
    f"  refutes it        gap ≤ {NULL_POINTS:g} point and the upper bound < {EFFECT_POINTS:g} points\n"
    "  inconclusive      otherwise\n"
    "A KL beyond a method's largest evaluated KL is not reached: no verdict there. The same rule reads CTRL − "
    "best-of-n sampling of the reference at the same KL (exact, so the interval is CTRL's own).")

METHODS = {
    # name: build kwargs (``n``/``kl`` added per run for planned builds), trainer loss, role, selector compared on
    "raw_bvw_dpo": ({"format": "pairs", "strategy": "best_vs_worst", "transform": "identity"}, "dpo_hard",
                    "baseline", None),
    "calib_identity": ({"format": "pairs", "strategy": "sampled", "transform": "identity", "inference": "bon"}, "dpo",
                       "baseline", None),
    "ctrl_exp_bon": ({"format": "pairs", "strategy": "sampled", "transform": "exp", "inference": "bon"}, "dpo",
                     "ctrl", "bon"),
    "ctrl_negexp_won": ({"format": "pairs", "strategy": "sampled", "transform": "negexp", "inference": "won"}, "dpo",
                        "ctrl", "won"),
    # BoNBoN (docs/theory.md §4.1): best vs worst of the K samples, IPO at β*_K plus the NLL of the best.
    "bonbon": ({"format": "pairs", "strategy": "best_vs_worst", "transform": "identity"}, "bonbon", "baseline", None),
    # On-policy rounds (issue 24's training; docs/rounds.md): pointwise targets on the policy's own samples.
    "ctrl_exp_bon_rounds": ({"transform": "exp", "inference": "bon"}, "pointwise", "ctrl", "bon"),
}
#: The methods trained by on-policy rounds (:func:`train_rounds`) rather than on the reference samples.
ROUNDS_METHODS = {"ctrl_exp_bon_rounds"}
DEFAULT_METHODS = ["raw_bvw_dpo", "calib_identity", "ctrl_exp_bon", "ctrl_negexp_won", "bonbon", "ctrl_exp_bon_rounds"]

#: Sizes. ``default`` is the 2-core CPU run (about 2 h, see docs/smollm_comparison.md); ``gpu`` one GPU;
#: ``toy`` a tiny random Llama for the end-to-end test. Any flag given on the command line wins.
PRESETS = {
    "default": dict(train_prompts=1024, k=8, eval_prompts=256, m=8, big_m=16, max_new_tokens=48, kl_prompts=24,
                    kl_samples=4, kl_every=8, kl_tolerance=0.03, max_bisections=4, max_steps=160, batch_size=8,
                    pairs_per_prompt=2, lr=2e-4, kl=[0.1, 0.25, 0.5], bf16=False, num_boot=2000,
                    sampling_batch=16, rounds=3, round_prompts=128, round_samples=4, round_steps=32),
    "gpu": dict(train_prompts=1024, k=8, eval_prompts=512, m=16, big_m=32, max_new_tokens=48, kl_prompts=48,
                kl_samples=4, kl_every=8, kl_tolerance=0.02, max_bisections=8, max_steps=1024, batch_size=16,
                pairs_per_prompt=4, lr=2e-4, kl=[0.1, 0.25, 0.5], bf16=True, num_boot=2000, sampling_batch=64,
                rounds=4, round_prompts=1024, round_samples=4, round_steps=64),
    "toy": dict(train_prompts=8, k=4, eval_prompts=8, m=4, big_m=4, max_new_tokens=6, kl_prompts=4, kl_samples=2,
                kl_every=2, kl_tolerance=0.05, max_bisections=2, max_steps=6, batch_size=4, pairs_per_prompt=2,
                lr=5e-3, kl=[0.05, 0.1], bf16=False, num_boot=200, sampling_batch=8, common_kl=[0.02, 0.05],
                rounds=2, round_prompts=8, round_samples=2, round_steps=3),
}

#: Seconds per unit of work (SmolLM2-135M fp32 on CPU, ≤ 48 new tokens, answers ~30 tokens; a step is 8 pairs).
#: ``--measure-costs`` times them on the machine at hand and writes ``costs.json`` under --out; later runs into
#: that --out estimate from it. Without it the start of a run prints both of these:
COSTS = {
    # Derived from the quality experiment's timings in docs/results.md (2 cores, both threads, machine not
    # shared): 768 reference samples in a few minutes, 235–310 s per run of 12–24 steps + 192 policy samples
    # and their log-probs.
    "idle_2_cores": {"load_s": 10.0, "sample_s": 0.3, "logp_s": 0.15, "step_s": 9.0, "threads": 2,
                     "source": "idle 2 cores (from the quality experiment's timings)"},
    # Measured with --measure-costs on 2026-11-27: 1 thread, the 2 cores shared with another session's
    # benchmark (load average 4-5): sampling 8 prompts × 4 took 59 s, 4 training steps 149 s, one KL
    # estimate of 8 prompts × 2 samples 43 s.
    "loaded_1_thread": {"load_s": 2.5, "sample_s": 1.83, "logp_s": 0.42, "step_s": 37.4, "threads": 1,
                        "source": "1 thread on the shared machine, load ≈ 4 (measured)"},
}


# -- the reward with ties broken ----------------------------------------------------------------------
def tie_jitter(text: str) -> float:
    """A fixed value in [0, TIE_JITTER) from the text's BLAKE2b hash: equal texts get equal values."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return TIE_JITTER * int.from_bytes(digest, "big") / 2.0**64


def vader_tiebroken(prompts, completions) -> list[float]:
    """VADER compound sentiment + :func:`tie_jitter` of the completion: no exact ties between different texts.

    The order of distinct VADER scores is unchanged; texts VADER scores alike (16% of answers score exactly
    0) are ordered by an arbitrary but fixed hash, so best-vs-worst pairs, calibrated ranks and the win
    rates' tie rule do not depend on sample order. Identical texts still tie (they are the same answer).
    """
    from ctrl_offline.models.embedded import vader_sentiment

    return [float(r) + tie_jitter(c) for r, c in zip(vader_sentiment(prompts, completions), completions)]


# -- sizes, the estimate ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm_comparison")
    parser.add_argument("--model", default=None, help="reference model (default embedded:smollm2; --toy: a tiny "
                                                      "random Llama built under --out)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--gpu", action="store_true", help="sizes for one GPU (bf16 training, more prompts/samples)")
    size.add_argument("--toy", action="store_true", help="tiny random Llama, a few prompts and steps (the test)")
    for name, kind, text in (
            ("train-prompts", int, "training prompts (from the training topics)"),
            ("k", int, "reference samples per training prompt"),
            ("eval-prompts", int, "held-out evaluation prompts (from the evaluation topics)"),
            ("m", int, "policy samples per evaluation prompt"),
            ("big-m", int, "reference-pool samples per evaluation prompt (M)"),
            ("max-new-tokens", int, "token cap of every sample (training, KL, evaluation)"),
            ("kl-prompts", int, "held-out prompts of the KL estimate while training (from the KL topics)"),
            ("kl-samples", int, "policy samples per KL prompt per estimate"),
            ("kl-every", int, "optimizer steps between KL estimates"),
            ("kl-tolerance", float, "bisection tolerance of the KL held (nats)"),
            ("max-bisections", int, "KL estimates of the bisection once the budget is crossed"),
            ("max-steps", int, "step cap of a training run (the callback stops it at the budget before)"),
            ("batch-size", int, "pairs per optimizer step"),
            ("pairs-per-prompt", int, "sampled pairs per prompt (calibrated methods)"),
            ("lr", float, "learning rate (LoRA r 16, α 32)"),
            ("num-boot", int, "bootstrap resamples of every interval"),
            ("sampling-batch", int, "prompts per generate call of the reference samples"),
            ("rounds", int, "on-policy rounds of a rounds method (each held to the budget)"),
            ("round-prompts", int, "training prompts each round samples the policy on (the first ones)"),
            ("round-samples", int, "policy samples per prompt per round"),
            ("round-steps", int, "step cap of a round's training (pointwise rows per step: --batch-size)")):
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    parser.add_argument("--kl", type=float, nargs="+", default=None, help="KL budgets (nats), default 0.1 0.25 0.5")
    parser.add_argument("--common-kl", type=float, nargs="+", default=None,
                        help="the KLs (nats) at which methods are compared, interpolated between each method's runs "
                             f"(default {' '.join(map(str, COMMON_KLS))})")
    parser.add_argument("--baseline-kl", type=float, nargs="+", default=None,
                        help="KL budgets of the baseline methods (default: --kl). A CTRL run can spend less KL on "
                             "held-out prompts than its budget; these hold the baselines at what it spent, and every "
                             "CTRL run is then compared with every baseline run (the KL gap is printed beside)")
    parser.add_argument("--n", type=int, default=4, help="N of the BoN-N / WoN-N win rates and of the plans")
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="β of the raw best-vs-worst DPO baseline")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="train in bfloat16 (on by default with --gpu)")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                        help="sampler of the reference training samples (vllm: GPU only; evaluation and the KL "
                             "estimate always use transformers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-half-width", type=float, default=0.03,
                        help="the paired intervals' half-width the sizes aim at (reported against)")
    parser.add_argument("--measure-costs", action="store_true",
                        help="time sampling 8 prompts × 4, the log-probs, a KL estimate and 4 training steps; write "
                             "costs.json under --out, print the runtime estimate and stop")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing: tabulate and compare the runs of --methods at their budgets "
                             "that are already evaluated under --out")
    parser.add_argument("--dry-run", action="store_true", help="print the sizes, the estimate and the decision rule, "
                                                               "then stop (nothing is written)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    return parser


def resolve_sizes(args) -> argparse.Namespace:
    preset = PRESETS["gpu" if args.gpu else "toy" if args.toy else "default"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.preset = "gpu" if args.gpu else "toy" if args.toy else "default"
    if args.common_kl is None:
        args.common_kl = list(COMMON_KLS)
    if args.model is None:
        args.model = "embedded:smollm2"
    if args.big_m < args.n or args.m < args.n:
        raise SystemExit(f"m and M must be ≥ N = {args.n}")
    # Cut completions train as prefixes without EOS (docs/theory.md §5): dropping them would bias the data
    # towards short answers.
    args.keep_unfinished = True
    return args


def steps_to_budget(budget: float, args) -> int:
    """A guess of the steps a run takes to spend ``budget``: in the quality experiment 12 LoRA steps at lr 5e-4
    (batch 8) reached KL ≈ 0.4–0.6, so ~24 steps per nat at that learning rate, scaled by 5e-4 / lr."""
    return int(min(args.max_steps, max(args.kl_every, math.ceil(24 * budget * 5e-4 / args.lr * 8 / args.batch_size))))


def estimate_runtime(args, costs: dict) -> dict:
    """Seconds per stage from unit costs × counts (a plan, not a measurement).

    Sample and log-prob costs scale with the token cap: a generate call runs until its longest sequence
    stops, and with a fifth of the answers cut nearly every batch of 8 prompts × K runs to the cap.
    """
    scale = args.max_new_tokens / costs.get("max_new_tokens", 48)
    sample, logp, step, load = scale * costs["sample_s"], scale * costs["logp_s"], costs["step_s"], costs["load_s"]
    schedule = [(budget, m) for m in args.methods for budget in method_budgets(m, args)]
    parts = {
        "reference samples": load + args.train_prompts * args.k * sample,
        "reference pool": args.eval_prompts * args.big_m * sample,
    }
    train = evaluate = 0.0
    per = args.kl_prompts * args.kl_samples * (sample + 2 * logp)
    for budget, m in schedule:
        if m in ROUNDS_METHODS:  # each round: sample the policy (and score its log-probs under both), train
            estimates = args.round_steps // args.kl_every + 1 + args.max_bisections
            train += args.rounds * (3 * load + args.round_prompts * args.round_samples * (sample + 2 * logp)
                                    + args.round_steps * step * args.batch_size / 8 + estimates * per)
        else:
            steps = steps_to_budget(budget, args)
            estimates = steps // args.kl_every + 1 + args.max_bisections
            # No reference pass: the rows carry the sampled ids, so their stored reference log-probs apply.
            train += 2 * load + steps * step * args.batch_size / 8 + estimates * per
        evaluate += load + args.eval_prompts * args.m * (sample + logp)
    runs = len(schedule)
    parts["training (KL held)"] = train
    parts["evaluation"] = evaluate
    return {"seconds": parts, "total_s": sum(parts.values()), "runs": runs, "costs": costs}


def planned_half_width(args, prompts: int = 4000, seed: int = 0) -> float:
    """The 95% half-width of a paired BoN-N difference these sizes should give, by simulation.

    Normal rewards as in docs/evaluation.md: both policies shifted from the reference by the same per-prompt
    0.3 ± 0.3 (plus 0.05 and ± 0.1 apart), m samples each, against one shared pool of M reference samples.
    """
    from ctrl_offline.maths.win_rates import u_statistic_per_prompt

    rng = np.random.default_rng(seed)
    shift = rng.normal(0.3, 0.3, size=(prompts, 1))
    pool = rng.normal(size=(prompts, args.big_m))
    a = rng.normal(size=(prompts, args.m)) + shift + 0.05
    b = rng.normal(size=(prompts, args.m)) + shift + rng.normal(0, 0.1, size=(prompts, 1))
    diff = u_statistic_per_prompt(a, pool, args.n, "bon") - u_statistic_per_prompt(b, pool, args.n, "bon")
    return float(1.96 * diff.std() / math.sqrt(args.eval_prompts))


def print_estimate(estimate: dict) -> None:
    costs = estimate["costs"]
    print(f"runtime estimate at {costs['source']}: {costs['sample_s']:.2f} s per sample, {costs['logp_s']:.2f} s "
          f"per log-prob, {costs['step_s']:.1f} s per step of 8 pairs")
    print("  " + ", ".join(f"{name} {seconds / 60:.0f} min" for name, seconds in estimate["seconds"].items())
          + f"; total {estimate['total_s'] / 3600:.1f} h over {estimate['runs']} training runs")


# -- stages ------------------------------------------------------------------------------------------------
def prompt_sets(args) -> dict[str, list[str]]:
    return {"train": make_prompts(TOPICS_TRAIN, args.train_prompts),
            "kl": make_prompts(TOPICS_KL, args.kl_prompts),
            "eval": make_prompts(TOPICS_EVAL, args.eval_prompts)}


def toy_model(out: Path) -> str:
    from tests.tiny_models import build_tiny_model

    path = out / "tiny_model"
    if not (path / "config.json").exists():
        build_tiny_model(path)
    return str(path)


#: Settings that may change between invocations into the same --out (what runs, not what a run gives).
_FREE_SETTINGS = {"out", "json", "measure_costs", "dry_run", "target_half_width", "methods", "kl",
                  "baseline_kl", "report_only", "common_kl"}


def check_out_folder(out: Path, args) -> None:
    """Every cached stage under ``out`` was made with these settings: refuse to mix in a run of other sizes."""
    settings = {k: v for k, v in vars(args).items() if k not in _FREE_SETTINGS}
    path = out / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(settings) if k in saved and saved.get(k) != settings.get(k))
        if changed:
            raise SystemExit(f"{out} holds a run made with other settings ({', '.join(changed)}): pass another --out "
                             "(methods and KL budgets may be added to a run; sizes may not change)")
        added = sorted(set(settings) - set(saved))
        if added:  # settings this script gained after the run began: they shaped none of its cached stages
            logger.info("recording settings new since %s began: %s", out, ", ".join(added))
            path.write_text(json.dumps({**saved, **{k: settings[k] for k in added}}, indent=2))
    else:
        path.write_text(json.dumps(settings, indent=2))


def cut_fraction(folder: Path, pattern: str) -> float | None:
    import pyarrow.parquet as pq

    files = sorted(folder.glob(pattern))
    if not files:
        return None
    finished = np.concatenate([pq.read_table(f, columns=["finished"])["finished"].to_numpy() for f in files])
    return float(1 - finished.mean())


def _train_settings(method: str, budget: float, kl_prompts: list[str], args, max_steps: int) -> dict:
    """:func:`~ctrl_offline.stages.train.train_from_build` arguments of every method's training, held to ``budget``."""
    return {"loss": METHODS[method][1],
            "loading": dict(quality.LORA, torch_dtype="bfloat16" if args.bf16 else "auto"),
            "training_args": {**quality.TRAINING, "learning_rate": args.lr, "max_steps": max_steps,
                              "per_device_train_batch_size": args.batch_size, "bf16": args.bf16, "seed": args.seed,
                              "max_length": 64 + args.max_new_tokens + 64},
            "kl_budget": budget, "kl_prompts": list(kl_prompts), "kl_samples": args.kl_samples,
            "kl_every_n_steps": args.kl_every, "kl_max_new_tokens": args.max_new_tokens, "kl_batch_size": 8,
            "kl_tolerance": args.kl_tolerance, "kl_max_bisections": args.max_bisections}


def _held_record(budget: float, steps: int, kl: dict, started: float, args, **extra) -> dict:
    final = kl.get("final")
    return {"budget": budget, "reached": bool(kl.get("reached")), "steps": steps,
            "final": None if final is None else {k: final[k] for k in ("value", "stderr", "num_samples")},
            **extra, "prompts": args.kl_prompts, "samples_per_prompt": args.kl_samples,
            "seconds": time.perf_counter() - started}


def train_held(method: str, budget: float, calibrated: Path, run: Path, kl_prompts: list[str], args) -> dict:
    """Build the method's training set and train it until its sampled KL reaches ``budget`` (cached)."""
    from ctrl_offline.io.files import read_build_info
    from ctrl_offline.maths.losses import bonbon_beta
    from ctrl_offline.stages.build import build_dataset
    from ctrl_offline.stages.train import train_from_build

    build, loss, _, _ = METHODS[method]
    build = dict(build)
    if "inference" in build:
        build.update(n=args.n, kl=budget)
    elif loss == "bonbon":
        build.update(beta=bonbon_beta(args.k))  # the pairs are best and worst of the prompt's K samples
    else:
        build.update(beta=args.dpo_beta)
    if build.get("strategy") == "sampled":
        build["pairs_per_prompt"] = args.pairs_per_prompt
    if not (run / "data").exists():
        build_dataset(calibrated, run / "data", seed=args.seed, keep_unfinished=args.keep_unfinished, **build)
    info = read_build_info(run / "data")
    record_path = run / "kl_budget.json"
    done = {"build": info, "adapter": run / "adapter", "data": run / "data"}
    # Done: the adapter is here, or the run was trained and evaluated elsewhere (a GPU machine) and only its
    # record and evaluation came back.
    if record_path.exists() and ((run / "adapter" / "adapter_config.json").exists()
                                 or (run / "eval" / "report.json").exists()):
        return {**done, "kl_held": json.loads(record_path.read_text())}
    started = time.perf_counter()
    # The train stage holds the KL and records the prompts, seed and batches it held it on beside the adapter
    # (ctrl_train.json), so the eval stage re-estimates the KL there (kl_training_prompts).
    settings = _train_settings(method, budget, kl_prompts, args, args.max_steps)
    # A checkpoint at every KL check: a run stopped with its session resumes where it was (the KL callback takes
    # up its estimates from the trainer state), not from step 0.
    settings["training_args"].update(save_strategy="steps", save_steps=args.kl_every, save_total_limit=1)
    result = train_from_build(run / "data", run / "adapter", args.model, checkpoint_dir=run / "train",
                              overwrite=(run / "adapter").exists(), **settings)
    record = _held_record(budget, result.steps, result.kl or {}, started, args,
                          history=(result.kl or {}).get("history"))
    record_path.write_text(json.dumps(record, indent=2))
    return {**done, "kl_held": record}


def train_rounds(method: str, budget: float, calibrated: Path, run: Path, kl_prompts: list[str], args) -> dict:
    """On-policy rounds (docs/rounds.md) from the base, every round held to ``budget`` (cached round by round).

    Round r samples the policy of round r − 1 (round 1: the base) on the first ``--round-prompts`` training
    prompts, ``--round-samples`` each, ranks the samples among the K stored reference rewards of their prompt,
    builds the pointwise targets of the K-aware plan (K + 1 estimator) and trains the adapter further for at most
    ``--round-steps`` steps, held to the budget by the same KL callback as every other method.
    """
    from ctrl_offline.io.files import read_build_info
    from ctrl_offline.models.generation import SamplingConfig
    from ctrl_offline.stages.rounds import run_round
    from ctrl_offline.stages.train import TRAIN_INFO_FILE

    build = {**METHODS[method][0], "n": args.n, "kl": budget, "keep_unfinished": args.keep_unfinished}
    sampling = SamplingConfig(k=args.round_samples, max_new_tokens=args.max_new_tokens, batch_size=args.sampling_batch)
    train = _train_settings(method, budget, kl_prompts, args, args.round_steps)
    started = time.perf_counter()
    adapter, rounds = None, []
    for number in range(1, args.rounds + 1):
        result = run_round(str(run.parent.parent / "prompts" / "train.jsonl"), calibrated, [REWARD_SPEC],
                           run / f"round{number}", adapter=adapter, model=args.model, limit=args.round_prompts,
                           sampling=sampling, seed=args.seed, build=build, train=train)
        adapter = result.adapter
        trained = json.loads((adapter / TRAIN_INFO_FILE).read_text())
        kl = trained.get("kl") or {}
        rounds.append({"round": number, "steps": trained["steps"], "reached": kl.get("reached"),
                       "final": kl.get("final")})
    record = _held_record(budget, sum(r["steps"] for r in rounds), {"reached": rounds[-1]["reached"],
                                                                     "final": rounds[-1]["final"]},
                          started, args, rounds=rounds)
    (run / "kl_budget.json").write_text(json.dumps(record, indent=2))
    data = run / f"round{args.rounds}" / "build"
    return {"build": read_build_info(data), "kl_held": record, "adapter": adapter, "data": data}


def evaluate_run(run: Path, trained: dict, eval_source: Path, pool: Path, args) -> dict:
    """The eval stage of ``trained``'s adapter on the held-out prompts against the shared pool (cached in run/eval)."""
    from ctrl_offline.stages.evaluate import evaluate_policy

    info = trained["build"]
    if not (run / "eval" / "report.json").exists():
        # The same seed for every run: the policies' samples share their random numbers (common random
        # numbers), one more source of noise that cancels in the paired differences.
        evaluate_policy(str(eval_source), run / "eval", args.model, REWARD_SPEC, adapter=str(trained["adapter"]),
                        n=(args.n,), selectors=("bon", "won"), max_new_tokens=args.max_new_tokens,
                        seed=args.seed + 100, train_data=str(trained["data"]), transform=info["transform"], t=info["t"],
                        build_info=info, policy_samples=args.m, reference_samples=args.big_m, reference_pool=pool,
                        num_boot=args.num_boot, overwrite=True,
                        # A diagnostic the frontier does not use, and a teacher-forced pass of both models over
                        # the whole pool per run (about a third of a run's evaluation on the CPU).
                        tilt_fidelity=False)
    return json.loads((run / "eval" / "report.json").read_text())


def verdict(difference: dict) -> str:
    from ctrl_offline.maths.win_rates import decision_verdict

    return decision_verdict(difference["value"], difference["ci_low"], difference["ci_high"],
                            effect=EFFECT_POINTS / 100, null=NULL_POINTS / 100)


def method_budgets(method: str, args) -> list[float]:
    """The KL budgets ``method`` is trained at: ``--kl``, or ``--baseline-kl`` for a baseline when given."""
    if METHODS[method][2] == "baseline" and args.baseline_kl is not None:
        return list(args.baseline_kl)
    return list(args.kl)


def comparisons(runs: dict, args) -> list[dict]:
    """Every CTRL method against every baseline and against best-of-n sampling, at the common KLs.

    A method's runs (its KL budgets) are its points; :func:`~ctrl_offline.stages.compare.compare_frontiers`
    interpolates each method's win rate on the selector the CTRL method was planned for at
    ``--common-kl`` (:data:`COMMON_KLS`), with a paired bootstrap over the evaluation prompts on both axes.
    """
    from ctrl_offline.stages.compare import compare_frontiers

    folders: dict[str, list] = {}
    for (method, _), run in sorted(runs.items(), key=lambda item: item[0][1]):
        folders.setdefault(method, []).append(run["dir"] / "eval")
    rows = []
    for ctrl in (m for m in folders if METHODS[m][2] == "ctrl"):
        selector = METHODS[ctrl][3]
        against = [m for m in folders if METHODS[m][2] == "baseline"] + [None]  # None: best-of-n only
        for base in against:
            result = compare_frontiers(folders[ctrl], None if base is None else folders[base], args.common_kl,
                                       num_boot=args.num_boot, seed=args.seed, effect=EFFECT_POINTS / 100,
                                       null=NULL_POINTS / 100)
            rows += [_comparison_row(ctrl, base, row, result["num_prompts"]) for row in result["rows"]
                     if (row["selector"], row["n"]) == (selector, args.n)]
    return rows


def _comparison_row(ctrl: str, baseline: str | None, row: dict, num_prompts: int, **extra) -> dict:
    """One comparison from a :func:`compare_frontiers` row: CTRL − ``baseline``, or − best-of-n sampling (None)."""
    gap = row["a_vs_best_of_n"] if baseline is None else row["difference"]
    return {"ctrl": ctrl, "baseline": baseline or "best-of-n sampling", **extra, "kl": row["kl"],
            "selector": row["selector"], "n": row["n"], "ctrl_value": row["a"],
            "baseline_value": row["best_of_n"] if baseline is None else row["b"], "difference": gap,
            "half_width": None if gap is None else (gap["ci_high"] - gap["ci_low"]) / 2,
            "verdict": "not reached" if gap is None else verdict(gap), "num_prompts": num_prompts}


#: The soft-label CTRL methods the secondary comparison reads against calibrated identity (docs/smollm_comparison.md).
LONG_TRAINED_CTRL = ("ctrl_exp_bon", "ctrl_negexp_won")


def long_trained_comparisons(runs: dict, summaries: list[dict], args) -> list[dict]:
    """The secondary comparison fixed in docs/smollm_comparison.md before any CTRL run trained past step 8.

    A *long-trained* run is a soft-label run that ended at the step cap under its budget. Each long-trained
    CTRL run is read against the long-trained calibrated identity run of the same budget and against best-of-n
    sampling, at κ = the smaller of the two evaluation KLs rounded down to 0.01, each run alone (interpolated
    from the reference, as ``ctrl-data compare CTRL IDENTITY --at-kl κ``), with the rule's thresholds.
    """
    from ctrl_offline.stages.compare import compare_frontiers

    long = {(s["method"], s["kl_budget"]): s for s in summaries if not s["kl_budget_reached"]}
    rows = []
    for (method, budget), summary in sorted(long.items(), key=lambda item: (item[0][1], item[0][0])):
        identity = long.get(("calib_identity", budget))
        if method not in LONG_TRAINED_CTRL or identity is None:
            continue
        kappa = math.floor(100 * min(summary["kl_eval"]["value"], identity["kl_eval"]["value"])) / 100
        selector = METHODS[method][3]
        ctrl_dir = runs[(method, budget)]["dir"] / "eval"
        identity_dir = runs[("calib_identity", budget)]["dir"] / "eval"
        for base, folder in (("calib_identity", identity_dir), (None, None)):
            result = compare_frontiers([ctrl_dir], None if folder is None else [folder], [kappa],
                                       num_boot=args.num_boot, seed=args.seed, effect=EFFECT_POINTS / 100,
                                       null=NULL_POINTS / 100)
            row = next(r for r in result["rows"] if (r["selector"], r["n"]) == (selector, args.n))
            rows.append(_comparison_row(method, base, row, result["num_prompts"], budget=budget))
    return rows


def run_summary(method: str, budget: float, trained: dict, report: dict) -> dict:
    from ctrl_offline.maths.frontier import best_of_n_at_kl

    rates = {f"{r['selector']}": {k: r[k] for k in ("value", "ci_low", "ci_high")} for r in report["win_rates"]}
    # Best-of-n sampling of the reference at the run's evaluated KL, on each selector (exact; docs/evaluation.md).
    spent = report["kl"]["value"]
    for r in report["win_rates"]:
        rates[r["selector"]]["best_of_n"] = best_of_n_at_kl(r["selector"], r["n"], max(spent, 0.0)) \
            if math.isfinite(spent) else None
    # Against the run's own plan (planned methods only): KL efficiency and plan fidelity (docs/diagnostics.md §2).
    diagnostics = report.get("plan_diagnostics") or {}
    plan = {k: diagnostics.get(k) for k in ("procedure", "planned_win_rate", "planned_at_kl_spent", "kl_efficiency",
                                            "plan_fidelity")} if diagnostics else None
    build = trained["build"]
    held = trained["kl_held"]["final"]
    # The callback's KL against the evaluation's per-token KL on the same KL prompts (issue 25's agreement:
    # within 0.03 nats or 10%).
    on_kl_prompts = (report.get("kl_training_prompts") or {}).get("kl")
    agreement = None
    if held and on_kl_prompts:
        gap = on_kl_prompts["value"] - held["value"]
        agreement = {"held": held["value"], "evaluated": on_kl_prompts["value"], "gap": gap,
                     "agrees": bool(abs(gap) <= max(0.03, 0.1 * abs(held["value"])))}
    return {"method": method, "kl_budget": budget, "kl_held": held,
            "kl_budget_reached": trained["kl_held"]["reached"], "training_steps": trained["kl_held"]["steps"],
            "kl_eval": report["kl"], "kl_on_kl_prompts": on_kl_prompts, "kl_agreement": agreement,
            "win_rates": rates, "standard": report["standard_win_rate"], "plan": plan,
            "transform": build["transform"], "t": build["t"], "beta": build["beta"],
            "unscaled_beta": build.get("unscaled_beta"), "num_rows": build.get("num_rows"),
            "policy_samples": report["policy_samples"], "reference_samples": report["reference_samples"],
            "reference_pool_reused": (report.get("reference_pool") or {}).get("reused")}


def _cell(estimate: dict | None, digits: int = 3) -> str:
    if not estimate:
        return "—"
    return f"{estimate['value']:.{digits}f} [{estimate['ci_low']:.{digits}f}, {estimate['ci_high']:.{digits}f}]"


def results_markdown(result: dict, args) -> str:
    """The runs and the comparisons as the Markdown tables docs/results.md records."""
    n = args.n
    lines = [f"| method | budget | KL held ± se | KL on the KL prompts | eval KL [95% CI] | BoN-{n} [95% CI] | best-of-n "
             f"at that KL | WoN-{n} [95% CI] | best-of-n at that KL | plan at that KL | KL efficiency | plan fidelity "
             "| steps |",
             "|---|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]
    number = lambda x, d=3: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    significant = lambda x: "—" if x is None else f"{x:.2g}"  # noqa: E731  (efficiencies span 0.005 to 1)
    for run in result["runs"]:
        held, plan = run["kl_held"], run.get("plan") or {}
        rates = run["win_rates"]
        held_text = "—" if not held else f"{held['value']:.3f} ± {held['stderr']:.3f}"
        planned = f"{number(plan.get('planned_at_kl_spent'))} ({plan['procedure']})" if plan.get("procedure") else "—"
        lines.append(
            f"| {run['method']} | {run['kl_budget']:g} | {held_text}{'' if run['kl_budget_reached'] else '*'} | "
            f"{number((run['kl_on_kl_prompts'] or {}).get('value'))} | "
            f"{_cell(run['kl_eval'])} | {_cell(rates.get('bon'))} | {number(rates.get('bon', {}).get('best_of_n'))} | "
            f"{_cell(rates.get('won'))} | {number(rates.get('won', {}).get('best_of_n'))} | {planned} | "
            f"{significant(plan.get('kl_efficiency'))} | {number(plan.get('plan_fidelity'), 2)} | "
            f"{run['training_steps']} |")
    lines += ["", *_comparison_table(result["comparisons"])]
    if result.get("long_trained"):  # the secondary comparison: only once a long-trained CTRL run exists
        lines += ["", *_comparison_table(result["long_trained"], budget=True)]
    return "\n".join(lines) + "\n"


def _comparison_table(rows: list[dict], budget: bool = False) -> list[str]:
    """Markdown rows of comparisons; ``budget`` adds the runs' budget (the long-trained comparison's)."""
    head = ("| CTRL | against |" + (" budget |" if budget else "")
            + " KL | metric | CTRL | other | gap (points) [95% CI] | verdict |")
    lines = [head, "|---|---|" + ("---:|" if budget else "") + "---:|---|---:|---:|---|---|"]
    for c in rows:
        ctrl, other, gap, interval = _comparison_cells(c)
        lines.append(f"| {c['ctrl']} | {c['baseline']} |" + (f" {c['budget']:g} |" if budget else "")
                     + f" {c['kl']:g} | {c['selector']}-{c['n']} | {ctrl} | {other} | "
                     + ("—" if c["difference"] is None else f"{gap} {interval}") + f" | {c['verdict']} |")
    return lines


def _comparison_cells(c: dict) -> tuple[str, str, str, str]:
    """CTRL's and the other's win rate, the gap and its interval (points) of one comparison, as text."""
    d, a, b = c["difference"], c["ctrl_value"], c["baseline_value"]
    b_value = b if isinstance(b, float) else (b or {}).get("value")
    gap, interval = ("—", "—") if d is None else (f"{100 * d['value']:+.1f}",
                                                   f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]")
    return ("—" if a is None else f"{a['value']:.3f}", "—" if b_value is None else f"{b_value:.3f}", gap, interval)


def plot_frontiers(summaries: list[dict], path: Path, args) -> str | None:
    """``frontier.png``: per selector, each method's runs (evaluated KL, win rate, both 95% intervals) joined in
    budget order, over best-of-n sampling of the reference. Returns a note when no figure could be drawn."""
    from ctrl_offline.maths.frontier import best_of_n_at_kl
    from ctrl_offline.reports.reporting import save_figure

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"no figure ({err})"
    finite = [s for s in summaries if math.isfinite(s["kl_eval"]["value"])]
    if not finite:
        return "no figure (no run has a finite KL)"
    highest = max([s["kl_eval"]["ci_high"] for s in finite] + [0.2])
    grid = np.linspace(0.0, math.sqrt(1.1 * highest), 60) ** 2
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    methods = list(dict.fromkeys(s["method"] for s in finite))
    for ax, selector in zip(axes[0], ("bon", "won")):
        ax.plot(grid, [best_of_n_at_kl(selector, args.n, k) for k in grid], color="grey", linestyle="--",
                label="best-of-n of the reference")
        for i, method in enumerate(methods):
            runs = sorted((s for s in finite if s["method"] == method and selector in s["win_rates"]),
                          key=lambda s: s["kl_budget"])
            if not runs:
                continue
            kl = np.array([[s["kl_eval"][k] for k in ("value", "ci_low", "ci_high")] for s in runs])
            win = np.array([[s["win_rates"][selector][k] for k in ("value", "ci_low", "ci_high")] for s in runs])
            ax.errorbar(kl[:, 0], win[:, 0], xerr=[kl[:, 0] - kl[:, 1], kl[:, 2] - kl[:, 0]],
                        yerr=[win[:, 0] - win[:, 1], win[:, 2] - win[:, 0]], fmt="o-", capsize=3, color=colours(i % 10),
                        label=method, linewidth=1)
            # What the run's own plan gives at the KL it spent (docs/diagnostics.md §2): the vertical gap is
            # the KL the training spent on moves the selector does not see.
            plans = [(s["kl_eval"]["value"], s.get("plan") or {}) for s in runs]
            planned = [(k, plan["planned_at_kl_spent"]) for k, plan in plans
                       if plan.get("procedure") == f"{selector}-{args.n}" and plan.get("planned_at_kl_spent") is not None]
            if planned:
                ax.plot(*zip(*planned), "o:", markerfacecolor="none", color=colours(i % 10), linewidth=1,
                        label=f"{method}: its plan at that KL")
        ax.axhline(0.5, color="lightgrey", linewidth=0.8)
        ax.set_xscale("function", functions=(lambda x: np.sqrt(np.clip(x, 0, None)), np.square))
        ax.set_xlim(0.0, grid[-1])
        ax.set_xticks([k for k in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0) if k <= grid[-1]])
        ax.set_xlabel("KL(π‖π_ref), nats (per-token estimate on the evaluation prompts; √ scale)")
        name = {"bon": "BoN", "won": "WoN"}[selector]
        ax.set_ylabel(f"{name}-{args.n} win rate against the reference")
        ax.set_title(f"{name}-{args.n}")
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return None


def measure_costs(out: Path, args) -> dict:
    """Time the pieces on this machine: sample 8 prompts × 4 (through the sample stage), log-probs, one KL
    estimate and 4 training steps of raw best-vs-worst DPO; unit costs to ``out/costs.json``."""
    import torch

    from ctrl_offline.models.generation import load_causal_lm
    from ctrl_offline.training.kl_budget import SampledKL
    from ctrl_offline.stages.build import build_dataset

    work = out / "cost_pieces"
    started = time.perf_counter()
    load_causal_lm(args.model)
    load = time.perf_counter() - started
    piece = argparse.Namespace(model=args.model, k=4, max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    calibrated = quality.reference_data(work, piece, make_prompts(TOPICS_TRAIN, 8), reward=REWARD_SPEC)
    sample = (time.perf_counter() - started - load) / 32
    build_dataset(calibrated, work / "data", format="pairs", strategy="best_vs_worst", transform="identity",
                  beta=args.dpo_beta, keep_unfinished=True, overwrite=True)
    trainer = quality.make_trainer(args.model, "pairs", "dpo_hard", work / "data", work / "train",
                                   learning_rate=args.lr, max_steps=4, per_device_train_batch_size=8)
    started = time.perf_counter()
    trainer.train()
    step = (time.perf_counter() - started) / 4
    estimator = SampledKL(make_prompts(TOPICS_KL, 8), trainer.processing_class, num_samples=2,
                          max_new_tokens=args.max_new_tokens, seed=1)
    started = time.perf_counter()
    estimator(trainer.model)
    kl_each = (time.perf_counter() - started) / 16
    costs = {"max_new_tokens": args.max_new_tokens, "load_s": load, "sample_s": sample, "logp_s": max(0.0, (kl_each - sample) / 2), "step_s": step,
             "threads": torch.get_num_threads(), "cut_fraction_at_cap": cut_fraction(work / "samples", "shard-*.parquet"),
             "source": f"measured {time.strftime('%Y-%m-%d %H:%M')} with {torch.get_num_threads()} thread(s)"}
    (out / "costs.json").write_text(json.dumps(costs, indent=2))
    return costs


# -- main --------------------------------------------------------------------------------------------------
def _print_comparison(c: dict, budget: bool = False) -> None:
    ctrl, other, gap, interval = _comparison_cells(c)
    print(f"{c['ctrl']:<19} {c['baseline']:<20} {c['kl']:>5g} {c['selector'] + '-' + str(c['n']):>7} {ctrl:>6} "
          f"{other:>6} {gap:>9} {interval:>16}  {c['verdict']}" + (f"  (runs held to {c['budget']:g})" if budget else ""))


def main(argv=None) -> int:
    args = resolve_sizes(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    if args.toy and args.model == "embedded:smollm2" and not args.dry_run:
        args.model = toy_model(out)
    if args.measure_costs:
        costs = measure_costs(out, args)
        print(json.dumps(costs, indent=2))
        print_estimate(estimate_runtime(args, costs))
        return 0
    if not args.dry_run:
        check_out_folder(out, args)
    measured = (out / "costs.json").exists()
    costs = json.loads((out / "costs.json").read_text()) if measured else COSTS["idle_2_cores"]
    estimate = estimate_runtime(args, costs)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "measure_costs", "dry_run")}
    print(f"SmolLM2 comparison, preset {args.preset}: {args.train_prompts} training prompts × K={args.k}, "
          f"{args.eval_prompts} evaluation prompts × m={args.m} policy / M={args.big_m} pool samples, "
          f"budgets {args.kl}, methods {args.methods}, ≤ {args.max_new_tokens} new tokens")
    if args.gpu and not measured:
        print("runtime estimate: no GPU costs measured yet (run --measure-costs --gpu on the GPU machine, into the "
              "same --out)")
    elif not args.toy:
        print_estimate(estimate)
        if not measured:
            print_estimate(estimate_runtime(args, COSTS["loaded_1_thread"]))
            print(f"  (--measure-costs times the pieces on this machine and writes {out / 'costs.json'})")
    estimate["planned_half_width"] = planned_half_width(args)
    print(f"planned half-width of a paired BoN-{args.n} difference at m={args.m}, M={args.big_m}, {args.eval_prompts} "
          f"prompts: ±{estimate['planned_half_width']:.3f} (simulated; target ±{args.target_half_width:g})")
    print(DECISION_RULE)
    if args.dry_run:
        return 0
    started = time.perf_counter()

    sets = prompt_sets(args)
    quality.write_prompts(out / "prompts" / "kl.jsonl", sets["kl"])
    eval_source = quality.write_prompts(out / "prompts" / "eval.jsonl", sets["eval"])
    calibrated = quality.reference_data(out, args, sets["train"], reward=REWARD_SPEC, backend=args.backend,
                                        batch_size=args.sampling_batch)
    pool = out / "pool"
    runs: dict = {}
    summaries = []
    schedule = sorted({(budget, method) for method in args.methods for budget in method_budgets(method, args)},
                      key=lambda bm: (bm[0], args.methods.index(bm[1])))
    for budget, method in schedule:
        run = out / "runs" / f"{method}-kl{budget:g}"
        if args.report_only and not (run / "eval" / "report.json").exists():
            continue
        t0 = time.perf_counter()
        trained = (train_rounds if method in ROUNDS_METHODS else train_held)(method, budget, calibrated, run,
                                                                             sets["kl"], args)
        report = evaluate_run(run, trained, eval_source, pool, args)
        runs[(method, budget)] = {"dir": run, "report": report}
        summary = run_summary(method, budget, trained, report)
        summaries.append(summary)
        held = summary["kl_held"] or {"value": float("nan"), "stderr": float("nan")}
        logger.info("%s @ KL %g: held %.3f ± %.3f, eval KL %.3f, BoN-%d %.3f, WoN-%d %.3f (%.0f s)", method, budget,
                    held["value"], held["stderr"], report["kl"]["value"], args.n,
                    summary["win_rates"]["bon"]["value"], args.n, summary["win_rates"]["won"]["value"],
                    time.perf_counter() - t0)
    compared = comparisons(runs, args)
    long_trained = long_trained_comparisons(runs, summaries, args)
    elapsed = time.perf_counter() - started

    print(f"\nruns (KL held = the callback's estimate on {args.kl_prompts} KL prompts; eval KL = on the "
          f"{args.eval_prompts} evaluation prompts; 95% bootstrap intervals over prompts)")
    print(f"{'method':<19} {'budget':>6} {'KL held':>14} {'eval KL [95% CI]':>22} {'BoN-' + str(args.n) + ' [95% CI]':>22} "
          f"{'WoN-' + str(args.n) + ' [95% CI]':>22} {'standard':>8} {'steps':>5}")
    for s in summaries:
        held = s["kl_held"]
        held_text = f"{held['value']:.3f}±{held['stderr']:.3f}" if held else "-"
        cells = [f"{s['kl_eval']['value']:.3f} [{s['kl_eval']['ci_low']:.3f}, {s['kl_eval']['ci_high']:.3f}]"]
        for sel in ("bon", "won"):
            w = s["win_rates"][sel]
            cells.append(f"{w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]")
        print(f"{s['method']:<19} {s['kl_budget']:>6g} {held_text + ('' if s['kl_budget_reached'] else '*'):>14} "
              f"{cells[0]:>22} {cells[1]:>22} {cells[2]:>22} {s['standard']['value']:>8.3f} {s['training_steps']:>5}")
    if not all(s["kl_budget_reached"] for s in summaries):
        print("* budget not reached within --max-steps: that run spends less KL than the others")
    agreements = [s["kl_agreement"] for s in summaries if s["kl_agreement"]]
    if agreements:
        print(f"KL held by the callback vs the evaluation's per-token KL on the same {args.kl_prompts} KL prompts: "
              + ", ".join(f"{a['held']:.3f}→{a['evaluated']:.3f}" for a in agreements)
              + f"; {sum(a['agrees'] for a in agreements)}/{len(agreements)} within 0.03 nats or 10%")
    print(f"\ncomparisons at common KLs (each method's runs interpolated in √KL; paired by prompt on both axes, "
          f"shared reference pool; target half-width ≤ {args.target_half_width:g})")
    print(f"{'CTRL':<19} {'against':<20} {'KL':>5} {'metric':>7} {'CTRL':>6} {'other':>6} {'gap (pts)':>9} "
          f"{'95% CI (pts)':>16}  verdict")
    for c in compared:
        _print_comparison(c)
    if long_trained:
        print("\nsecondary comparison (docs/smollm_comparison.md): each CTRL run that ended at the step cap under its "
              "budget against the calibrated identity run that did too, each run alone, at the smaller KL rounded down")
        for c in long_trained:
            _print_comparison(c, budget=True)
    widths = [c["half_width"] for c in compared if c["half_width"] is not None]
    if widths:
        print(f"achieved half-widths {min(widths):.3f}–{max(widths):.3f} (target ≤ {args.target_half_width:g}: "
              f"{'met' if max(widths) <= args.target_half_width else 'not met'})")
    reference = {"train_cut_fraction": cut_fraction(out / "samples", "shard-*.parquet"),
                 "pool_cut_fraction": cut_fraction(pool, "pool.parquet")}
    print(f"completions cut at {args.max_new_tokens} tokens: {reference['train_cut_fraction']:.1%} of the training "
          f"samples, {reference['pool_cut_fraction']:.1%} of the reference pool; total {elapsed:.0f} s this "
          f"invocation (estimate from scratch {estimate['total_s']:.0f} s)")
    result = {"config": settings, "decision_rule": DECISION_RULE, "estimate": estimate, "reference": reference,
              "runs": summaries, "comparisons": compared, "long_trained": long_trained, "seconds": elapsed}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(results_markdown(result, args))
    try:  # the tables are written whatever the figure does
        note = plot_frontiers(summaries, out / "frontier.png", args)
    except Exception as err:  # noqa: BLE001
        note = f"no figure ({type(err).__name__}: {err})"
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and " + (note or str(out / "frontier.png")))
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
