"""The exact LM testbed: does CTRL beat best-vs-worst DPO at matched KL, measured without noise?

    python benchmarks/testbed.py --quick --json          # ≤ 5 min on 2 cores: oracle + one method
    python benchmarks/testbed.py --out runs/testbed      # the comparison (resumable), table for docs/results.md

A tiny Llama pretrained on a synthetic language is π_ref; every response of every evaluation
prompt is enumerated (ctrl_offline.testbeds.lm_testbed), so KL(π‖π_ref) and the BoN-4 / WoN-4 / standard
win rates are exact. Two parts:

1. **Oracle** — the planner's tilt (K = ∞, and the K-aware plan: the tilt soft-label DPO trains from
   K samples) put on each prompt's responses by its exact quantile cells: its exact KL and win rate
   against the plan's (must agree to 0.005).
2. **Trained methods** — the library's own pipeline: K reference samples per training prompt,
   calibrated (``calibrate_scored``) and built (``build_dataset``, K-aware plan), trained with
   ``CTRLTrainer``; the baseline is TRL's ``DPOTrainer`` on each prompt's raw best vs worst sample.
   Every run is held to its KL budget by ``KLBudgetCallback`` with the exact KL of the evaluation
   prompts, then measured exactly. Paired differences against the baseline (same K, budget, seed and
   reference samples) get a 95% bootstrap interval over seeds and prompts.

Decision rule (stated before any run): at matched KL, a gap of ≥ 3 points (0.03) with the 95%
interval excluding 0 shows the effect; a gap ≤ 1 point with the interval's upper end below 3 points
refutes it; anything else is inconclusive.

Every stage is cached under ``--out`` (the pretrained reference, reference samples, each run's
result), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DECISION_RULE = ("a gap of >= 3 points with the 95% interval excluding 0 shows the effect; <= 1 point with the "
                 "upper end below 3 points refutes it; anything else is inconclusive")

#: method → how its training set is made and trained. The CTRL methods without a suffix train in
#: on-policy rounds (``kind="rounds"``: sample from the policy, calibrate against the reference
#: tables, pointwise targets, train, repeat); ``_dpo`` is soft-label DPO on sampled pairs of the
#: reference samples, ``_pointwise`` the pointwise loss on the reference samples (both offline).
METHODS = {
    "raw_bvw_dpo": dict(kind="bvw", inference=None),
    "calib_identity": dict(kind="rounds", transform="identity", inference="bon"),
    "ctrl_exp_bon": dict(kind="rounds", transform="exp", inference="bon"),
    "ctrl_negexp_won": dict(kind="rounds", transform="negexp", inference="won"),
    "calib_identity_dpo": dict(kind="ctrl", transform="identity", inference="bon"),
    "ctrl_exp_bon_dpo": dict(kind="ctrl", transform="exp", inference="bon"),
    "ctrl_negexp_won_dpo": dict(kind="ctrl", transform="negexp", inference="won"),
    "ctrl_exp_bon_pointwise": dict(kind="ctrl", transform="exp", inference="bon", format="pointwise"),
    # BoNBoN (docs/theory.md §4.1): best vs worst of the K reference samples, IPO at β*_K + α·NLL of the best.
    "bonbon": dict(kind="bonbon", inference=None),
}
DEFAULT_METHODS = ["raw_bvw_dpo", "calib_identity", "ctrl_exp_bon", "ctrl_negexp_won"]

SIZES = {
    "quick": dict(pretrain_steps=300, per_prompt=32, train_prompts=384, eval_prompts=8, k=[8], kl=[0.5], seeds=[0],
                  methods=["calib_identity"], oracle_kl=[0.5]),
    "full": dict(pretrain_steps=600, per_prompt=64, train_prompts=384, eval_prompts=16, k=[8, 32],
                 kl=[0.25, 0.5, 1.0], seeds=[0, 1, 2], methods=DEFAULT_METHODS, oracle_kl=[0.25, 0.5, 1.0]),
}


@dataclass
class Setup:
    language: object
    reward: object
    model: object
    tokenizer: object
    train_prompts: list
    eval_prompts: list
    ref_logp: np.ndarray
    eval_rewards: np.ndarray
    valid_mass: np.ndarray
    pretrain_seconds: float
    path: Path


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(out: Path, size: dict, ties: bool = False) -> Setup:
    """The language, π_ref (pretrained once, cached), the prompt split and π_ref's exact log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctrl_offline.testbeds.lm_testbed import Reward, SyntheticLanguage, pretrain_reference, response_logprobs

    # Prompts of 3 symbols give 512 prompts; --prompt-length 4 gives 4 096 (for more training prompts).
    language = SyntheticLanguage(prompt_length=size.get("prompt_length", 3))
    reward = Reward(language, ties=ties)
    ref_dir = out / f"reference_{size['pretrain_steps']}"
    seconds = 0.0
    if not (ref_dir / "config.json").exists():
        _log(f"pretraining π_ref ({size['pretrain_steps']} steps)")
        model, tokenizer, seconds = pretrain_reference(language, steps=size["pretrain_steps"],
                                                       per_prompt=size["per_prompt"])
        model.save_pretrained(ref_dir)
        tokenizer.save_pretrained(ref_dir)
        (ref_dir / "pretrain.json").write_text(json.dumps({"seconds": seconds}))
    # Always from the folder: trainers that build their own reference copy find it by the model's path.
    model, tokenizer = AutoModelForCausalLM.from_pretrained(ref_dir), AutoTokenizer.from_pretrained(ref_dir)
    seconds = json.loads((ref_dir / "pretrain.json").read_text())["seconds"]
    model.eval()
    train_prompts, eval_prompts = language.split_prompts(size["train_prompts"], size["eval_prompts"])
    if language.prompt_length != 3:  # the last prompts: every training size is measured on the same ones
        eval_prompts = language.all_prompts()[-size["eval_prompts"]:]
        if set(eval_prompts) & set(train_prompts):
            raise ValueError(f"{size['train_prompts']} training prompts overlap the last {size['eval_prompts']}")
    cache = ref_dir / f"ref_logp_{size['eval_prompts']}.npz"
    if cache.exists():
        data = np.load(cache)
        ref_logp, valid = data["logp"], data["valid"]
    else:
        ref_logp, valid = response_logprobs(model, tokenizer, language, eval_prompts)
        np.savez(cache, logp=ref_logp, valid=valid)
    torch.manual_seed(0)
    return Setup(language, reward, model, tokenizer, train_prompts, eval_prompts, ref_logp,
                 reward.table(eval_prompts), valid, seconds, ref_dir)


def _transform_spec(row) -> str:
    return row.transform if row.t is None else f"{row.transform}:{row.t}"


def oracle(setup: Setup, kls, ks, n: int = 4) -> list[dict]:
    """Planned vs exact KL and win rate of the exactly tilted policies, K = ∞ and K-aware."""
    from ctrl_offline.maths.finite_k import ideal_tilt, trained_tilt
    from ctrl_offline.testbeds.lm_testbed import exact_metrics, tilted_policy
    from ctrl_offline.maths.planner import plan

    rows = []
    cases = [("bon", "identity"), ("bon", "exp"), ("won", "identity"), ("won", "negexp")]
    for kl in kls:
        for k in [None, *ks]:
            for inference, family in cases:
                p = plan(inference, n, kl, families=(family,), k=k, loss="dpo", strategy="all")
                if not p.rows:
                    continue
                row = p.rows[0]
                spec = _transform_spec(row)
                tilt = ideal_tilt(spec, row.beta) if k is None else trained_tilt(spec, row.beta, k, p.estimator)
                m = exact_metrics(tilted_policy(setup.ref_logp, setup.eval_rewards, tilt.log_density),
                                  setup.ref_logp, setup.eval_rewards, n_values=(n,))
                exact = m.bon_win_rate[n] if inference == "bon" else m.won_win_rate[n]
                rows.append(dict(inference=inference, n=n, transform=row.transform, t=row.t, beta=row.beta,
                                 k=k, planned_kl=row.kl, exact_kl=m.kl, planned_win_rate=row.win_rate,
                                 exact_win_rate=exact,
                                 ok=abs(exact - row.win_rate) <= 0.005 and abs(m.kl - row.kl) <= 0.005))
    return rows


def reference_samples(out: Path, setup: Setup, k: int, seed: int) -> Path:
    """K samples per training prompt from π_ref with their rewards, as a scored Parquet file (cached)."""
    size = "" if len(setup.train_prompts) == 384 else f"_P{len(setup.train_prompts)}"
    path = out / "samples" / f"K{k}_seed{seed}{size}" / "scored.parquet"
    if not path.exists():
        write_scored(path, setup, setup.model, k, seed)
    return path


def write_scored(path: Path, setup: Setup, model, k: int, seed: int) -> Path:
    """K exact samples per training prompt from ``model``, scored, with their π_ref log-probs (response + EOS,
    as the trainers score them: no reference pass at training), as a scored Parquet file."""
    import pyarrow as pa

    from ctrl_offline.io.files import write_parquet
    from ctrl_offline.testbeds.lm_testbed import sample_from_model, sequence_logprobs

    # A policy can put almost no mass on valid responses for some prompt; such draws are left out
    # (the testbed's policy is the LM renormalised over valid responses; its valid mass is reported).
    symbols = sample_from_model(model, setup.tokenizer, setup.language, setup.train_prompts, k, seed=seed,
                                missing_ok=model is not setup.model)
    drawn = (symbols >= 0).all(axis=2)
    ref_logps = sequence_logprobs(setup.model, setup.tokenizer, setup.language, setup.train_prompts,
                                  np.maximum(symbols, 0))
    rows = {"prompt_id": [], "prompt": [], "completion": [], "sample_idx": [], "reward": [], "finished": [],
            "ref_logp": [], "completion_ids": []}
    offset, eos = setup.tokenizer.convert_tokens_to_ids("r0"), setup.tokenizer.eos_token_id
    for prompt, draws, logps, kept in zip(setup.train_prompts, symbols, ref_logps, drawn):
        draws, logps = draws[kept], logps[kept]
        rewards = setup.reward(prompt, draws)
        for j, (y, r, lp) in enumerate(zip(draws, rewards, logps)):
            rows["ref_logp"].append(float(lp))
            rows["completion_ids"].append([offset + int(s) for s in y] + [eos])
            rows["prompt_id"].append(prompt)
            rows["prompt"].append(prompt)
            rows["completion"].append(setup.language.response_text(y))
            rows["sample_idx"].append(j)
            rows["reward"].append(float(r))
            rows["finished"].append(True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.table(rows), path, metadata={"stage": "score", "reference_model": str(setup.path),
                                                  "reward_model": "lm_testbed"})
    return path


def _bvw_dataset(scored: Path):
    """Each prompt's raw best vs worst sample (prompts whose samples all tie are left out)."""
    import datasets
    import pandas as pd

    frame = pd.read_parquet(scored)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _, group in frame.groupby("prompt_id", sort=False):
        best, worst = group["reward"].idxmax(), group["reward"].idxmin()
        if group.loc[best, "reward"] > group.loc[worst, "reward"]:
            rows["prompt"].append(group.loc[best, "prompt"])
            rows["chosen"].append(group.loc[best, "completion"])
            rows["rejected"].append(group.loc[worst, "completion"])
    return datasets.Dataset.from_dict(rows)


def _calibrated(scored: Path) -> Path:
    """The calibrate output of ``scored``, made once and shared by every method on these samples."""
    from ctrl_offline.stages.calibrate import calibrate_scored

    calibrated = scored.parent / "calibrated"
    if not calibrated.exists():
        calibrate_scored(scored, calibrated)
    return calibrated


def train_run(out: Path, setup: Setup, method: str, k: int, kl: float, seed: int, args) -> dict:
    """One method at one (K, KL budget, seed): build, train held to the budget, measure exactly."""
    import copy

    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from ctrl_offline.training.config import CTRLConfig, CTRLPointwiseConfig
    from ctrl_offline.training.kl_budget import KLBudgetCallback
    from ctrl_offline.testbeds.lm_testbed import ExactKL
    from ctrl_offline.stages.build import build_dataset
    from ctrl_offline.training.trainer import CTRLPointwiseTrainer, CTRLTrainer

    spec = METHODS[method]
    run_dir = out / "runs" / f"{method}_K{k}_kl{kl:g}_seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    if spec["kind"] == "rounds":
        return rounds_run(out, setup, method, k, kl, seed, args)
    start = time.perf_counter()
    scored = reference_samples(out, setup, k, seed)
    planned = {}
    common = dict(output_dir=str(run_dir / "trainer"), use_cpu=True, report_to="none", save_strategy="no",
                  logging_steps=10, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                  num_train_epochs=args.epochs, max_steps=args.max_steps, lr_scheduler_type="constant",
                  gradient_checkpointing=False, seed=seed, disable_tqdm=True, max_length=None,
                  dataloader_num_workers=0)
    if spec["kind"] == "bvw":
        train = _bvw_dataset(scored)
        config = DPOConfig(beta=args.bvw_beta, bf16=False, **common)
        trainer_cls = DPOTrainer
    elif spec["kind"] == "bonbon":
        from ctrl_offline.maths.losses import bonbon_beta

        calibrated = _calibrated(scored)
        build_dataset(calibrated, run_dir / "build", format="pairs", strategy="best_vs_worst", transform="identity",
                      beta=bonbon_beta(k), tokenizer=str(setup.path), seed=seed, overwrite=True)
        train = datasets.load_from_disk(str(run_dir / "build"))
        config = CTRLConfig(ctrl_loss="bonbon", bf16=False, **common)
        trainer_cls = CTRLTrainer
    else:
        calibrated = _calibrated(scored)
        pointwise = spec.get("format") == "pointwise"  # all K samples of a prompt, one row each
        estimator = (dict(format="pointwise", loss="pointwise", log_partition="population") if pointwise else
                     dict(format="pairs", loss="dpo", strategy="sampled", pairs_per_prompt=args.pairs_per_prompt))
        build = build_dataset(calibrated, run_dir / "build", transform=spec["transform"], inference=spec["inference"],
                              n=4, kl=kl, tokenizer=str(setup.path), seed=seed, overwrite=True, **estimator)
        planned = planned_from_build(build)
        train = datasets.load_from_disk(str(run_dir / "build"))
        config = (CTRLPointwiseConfig if pointwise else CTRLConfig)(ctrl_loss=estimator["loss"], bf16=False, **common)
        trainer_cls = CTRLPointwiseTrainer if pointwise else CTRLTrainer
    model = copy.deepcopy(setup.model)
    torch.manual_seed(seed)
    callback = KLBudgetCallback(kl, ExactKL(setup.tokenizer, setup.language, setup.eval_prompts, setup.ref_logp),
                                every_n_steps=args.kl_every, tolerance=args.kl_tolerance)
    extra = {"ref_model": copy.deepcopy(setup.model)} if trainer_cls is DPOTrainer else {}
    trainer = trainer_cls(model=model, args=config, train_dataset=train, processing_class=setup.tokenizer,
                          callbacks=[callback], **extra)
    trainer.train()
    result = dict(method=method, k=k, kl_budget=kl, seed=seed, **planned, reached=callback.reached,
                  steps=int(trainer.state.global_step), rows=len(train), **measure(setup, model, planned, run_dir),
                  kl_history=callback.history, seconds=time.perf_counter() - start)
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1, default=float))
    return result


def planned_from_build(build) -> dict:
    """A run's plan, as its build recorded it (``ctrl_build.json``): transform, t, both βs, KL, win rate, K, estimator."""
    info = json.loads((build.out_dir / "ctrl_build.json").read_text())
    row = info["planner"]["row"]
    return dict(transform=row["transform"], t=row["t"], beta=build.beta, unscaled_beta=row["beta"], planned_kl=row["kl"],
                planned_win_rate=row["win_rate"], plan_k=info["k"], estimator=info["planner"]["estimator"])


def rounds_run(out: Path, setup: Setup, method: str, k: int, kl: float, seed: int, args) -> dict:
    """On-policy rounds through the library: each round draws ``--round-samples`` exact samples per training
    prompt from the current policy, scores them, calibrates them against the K reference samples' tables
    (``calibrate_scored(tables=…)``), builds pointwise targets Φ(u) − β log Z (``build_dataset``, K-aware:
    an outside sample's rank among K is the K + 1 estimator's) and trains ``--round-steps`` steps of
    ``CTRLPointwiseTrainer`` from where the last round stopped; the final policy is settled onto the budget
    (:func:`settle`; ``--hold round`` also holds every round to it). The learning rate falls linearly from
    ``--lr`` to ``--lr-end`` over the rounds."""
    import copy

    import datasets
    import torch

    from ctrl_offline.training.config import CTRLPointwiseConfig
    from ctrl_offline.training.kl_budget import KLBudgetCallback
    from ctrl_offline.testbeds.lm_testbed import ExactKL
    from ctrl_offline.stages.build import build_dataset
    from ctrl_offline.stages.calibrate import calibrate_scored
    from ctrl_offline.training.trainer import CTRLPointwiseTrainer

    spec = METHODS[method]
    run_dir = out / "runs" / f"{method}_K{k}_kl{kl:g}_seed{seed}"
    start = time.perf_counter()
    scored = reference_samples(out, setup, k, seed)
    reference = scored.parent / "calibrated"
    if not reference.exists():
        calibrate_scored(scored, reference)
    model = copy.deepcopy(setup.model)
    torch.manual_seed(seed)
    exact_kl = ExactKL(setup.tokenizer, setup.language, setup.eval_prompts, setup.ref_logp)
    history, planned, steps, reached, rows = [], {}, 0, False, 0
    for rnd in range(args.rounds):
        round_dir = run_dir / f"round{rnd}"
        # Fresh draws every round (never the reference samples' seed).
        samples = write_scored(round_dir / "scored.parquet", setup, model, args.round_samples,
                               seed=100_000 + 1_000 * seed + rnd)
        calibrate_scored(samples, round_dir / "calibrated", tables=reference / "tables.parquet", overwrite=True)
        build = build_dataset(round_dir / "calibrated", round_dir / "build", format="pointwise", loss="pointwise",
                              transform=spec["transform"], inference=spec["inference"], n=4, kl=kl,
                              tokenizer=str(setup.path), seed=seed, overwrite=True)
        planned = planned or planned_from_build(build)
        lr = args.lr + (args.lr_end - args.lr) * rnd / max(args.rounds - 1, 1)
        config = CTRLPointwiseConfig(
            ctrl_loss="pointwise", bf16=False, output_dir=str(round_dir / "trainer"), use_cpu=True, report_to="none",
            save_strategy="no", logging_steps=10, per_device_train_batch_size=args.round_batch_size, learning_rate=lr,
            max_steps=args.round_steps, lr_scheduler_type="constant", gradient_checkpointing=False,
            seed=seed + rnd, disable_tqdm=True, max_length=None, dataloader_num_workers=0)
        # --hold round: one check at the end of each round; a round that ends over the budget is bisected back
        # along its own segment, so the policy never leaves the budget. --hold end: the rounds run free (the
        # regression's fixed point is the planned tilt, at the budget) and only the final policy is settled.
        callbacks = ([KLBudgetCallback(kl, exact_kl, every_n_steps=args.round_steps, tolerance=args.kl_tolerance)]
                     if args.hold == "round" else [])
        trainer = CTRLPointwiseTrainer(model=model, args=config, train_dataset=datasets.load_from_disk(
            str(round_dir / "build")), processing_class=setup.tokenizer, callbacks=callbacks)
        trainer.train()
        steps += int(trainer.state.global_step)
        rows += build.num_rows
        value = exact_kl(model).value
        reached = reached or value >= kl - args.kl_tolerance
        history.append(dict(round=rnd, steps=steps, lr=lr, kl=value))
        _log(f"  {method} round {rnd}: exact KL {value:.3f} after {steps} steps (lr {lr:.2g})")
    alpha = settle(model, setup.model, exact_kl, kl, args.kl_tolerance, current=value)
    result = dict(method=method, k=k, kl_budget=kl, seed=seed, **planned, reached=reached, steps=steps, rows=rows,
                  settle_alpha=alpha, **measure(setup, model, planned, run_dir),
                  kl_history=history, seconds=time.perf_counter() - start,
                  rounds=dict(rounds=args.rounds, samples=args.round_samples, steps=args.round_steps, lr=args.lr,
                              lr_end=args.lr_end))
    result_path = run_dir / "result.json"
    result_path.write_text(json.dumps(result, indent=1, default=float))
    return result


def settle(model, reference, exact_kl, budget: float, tolerance: float, max_alpha: float = 1.5,
           current: float | None = None) -> float:
    """Hold the final policy to the budget: θ(α) = θ_ref + α(θ − θ_ref), α found by bisection on the exact KL.

    Rounds end wherever their fixed point and noise leave them, above or below the budget; matched-KL
    comparisons need them within ``tolerance``. ``current``: the model's exact KL when already known.
    Leaves the model at θ(α) and returns α (1: untouched).
    """
    import torch

    value = exact_kl(model).value if current is None else current
    if abs(value - budget) <= tolerance:
        return 1.0
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = dict(reference.named_parameters())

    @torch.no_grad()
    def set_alpha(alpha):
        for n, p in model.named_parameters():
            p.copy_(start[n] + alpha * (trained[n] - start[n]))
        return exact_kl(model).value - budget

    lo, hi = (0.0, 1.0) if value > budget else (1.0, max_alpha)
    if value < budget and set_alpha(max_alpha) < 0:
        return max_alpha  # even the largest step stays under: leave it there, the table says so
    alpha = 1.0
    for _ in range(20):
        alpha = (lo + hi) / 2
        gap = set_alpha(alpha)
        if abs(gap) <= tolerance / 2:
            break
        lo, hi = (alpha, hi) if gap < 0 else (lo, alpha)
    return alpha


def measure(setup: Setup, model, planned: dict, run_dir: Path | None = None) -> dict:
    """Exact figures of a trained model on the held-out prompts, with where its KL went (docs/diagnostics.md):
    the chain-rule split into on-target (the quantile's law, 50 bins) and off-target KL, and for a planned
    run the R² of its log-ratio against the planned log-density (weights π_ref)."""
    from ctrl_offline.maths.diagnostics import exact_kl_split, tilt_fidelity
    from ctrl_offline.maths.finite_k import Estimator, trained_tilt
    from ctrl_offline.maths.calibration import quantile_cells
    from ctrl_offline.testbeds.lm_testbed import exact_metrics, response_logprobs

    logp, valid = response_logprobs(model, setup.tokenizer, setup.language, setup.eval_prompts)
    metrics = exact_metrics(logp, setup.ref_logp, setup.eval_rewards, n_values=(4,))
    split = exact_kl_split(logp, setup.ref_logp, setup.eval_rewards, bins=50)
    if run_dir is not None:  # the exact policy, so any diagnostic can be recomputed without training again
        run_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(run_dir / "policy_logp.npz", logp=logp.astype(np.float32))
    out = dict(exact_kl=metrics.kl, bon4=metrics.bon_win_rate[4], won4=metrics.won_win_rate[4],
               standard=metrics.standard_win_rate, valid_mass=float(valid.mean()), per_prompt=metrics.per_prompt,
               on_target_kl=split.on_target, off_target_kl=split.off_target)
    if planned:
        spec = planned["transform"] if planned["t"] is None else f"{planned['transform']}:{planned['t']}"
        tilt = trained_tilt(spec, planned["unscaled_beta"], planned["plan_k"], Estimator(**planned["estimator"]))
        mids = np.concatenate([((lo + hi) / 2)[group] for group, lo, hi in
                               quantile_cells(setup.ref_logp, setup.eval_rewards)])
        out["tilt_r2"] = tilt_fidelity(mids, (logp - setup.ref_logp).ravel(), tilt.log_density,
                                       weights=np.exp(setup.ref_logp).ravel()).r_squared
    return out


def add_diagnostics(results: list[dict]) -> None:
    """KL efficiency and plan fidelity of each CTRL run on BoN-4 and WoN-4, against its own plan's curve
    (the same Φ, K and estimator with β varied; docs/diagnostics.md §2)."""
    from ctrl_offline.maths.diagnostics import kl_efficiency, plan_fidelity
    from ctrl_offline.maths.finite_k import Estimator

    for r in results:
        if not r.get("transform") or "bon4_efficiency" in r:
            continue
        spec = r["transform"] if r["t"] is None else f"{r['transform']}:{r['t']}"
        estimator = Estimator(**r.get("estimator") or dict(loss="dpo", strategy="sampled"))
        for metric, inference in (("bon4", "bon"), ("won4", "won")):
            kw = dict(kl_spent=r["exact_kl"], reached=r[metric], k=r["plan_k"], estimator=estimator)
            r[f"{metric}_efficiency"] = kl_efficiency(spec, inference, 4, **kw)
            r[f"{metric}_fidelity"] = plan_fidelity(spec, inference, 4, **kw)


TRAINING = {"rounds": "on-policy rounds (pointwise)", "ctrl": "offline soft-label DPO"}


def efficiency_rows(results: list[dict]) -> list[dict]:
    """Mean KL efficiency and plan fidelity per (training, transform, procedure, K, KL) for ``ctrl_offline.reports.measured``:
    each CTRL method on the procedure it was planned for, calibrated identity on both BoN-4 and WoN-4."""
    groups = {}
    for r in results:
        spec = METHODS.get(r["method"], {})
        if "bon4_efficiency" not in r or spec.get("kind") not in TRAINING:
            continue
        training = TRAINING[spec["kind"]] if spec.get("format") != "pointwise" else "offline pointwise"
        metrics = ("bon4", "won4") if r["transform"] == "identity" else (spec["inference"] + "4",)
        for metric in metrics:
            key = (training, r["transform"], f"{metric[:3]}-4", r["k"], r["kl_budget"])
            groups.setdefault(key, []).append((r[f"{metric}_efficiency"], r[f"{metric}_fidelity"]))
    return [dict(training=t, transform=f, procedure=p, k=k, kl=kl, seeds=len(v),
                 kl_efficiency=float(np.mean([e for e, _ in v])), plan_fidelity=float(np.mean([f for _, f in v])))
            for (t, f, p, k, kl), v in sorted(groups.items())]


def paired(results: list[dict], method: str, baseline: str, metric: str, k: int, kl: float,
           num_boot: int = 4000) -> dict | None:
    """Mean of method − baseline over seeds and prompts, with a two-stage bootstrap (seeds, then prompts)."""
    from ctrl_offline.maths.win_rates import decision_verdict

    by_seed = {}
    for r in results:
        if r["k"] == k and r["kl_budget"] == kl and r["method"] in (method, baseline):
            by_seed.setdefault(r["seed"], {})[r["method"]] = np.asarray(r["per_prompt"][metric])
    diffs = [d[method] - d[baseline] for d in by_seed.values() if method in d and baseline in d]
    if not diffs:
        return None
    # Matched KL: both runs within 0.02 nats of the budget (the callback's bisection lands within 0.01).
    kls = {m: [r["exact_kl"] for r in results if r["k"] == k and r["kl_budget"] == kl and r["method"] == m]
           for m in (method, baseline)}
    matched = all(abs(v - kl) <= 0.02 for values in kls.values() for v in values)
    diffs = np.stack(diffs)  # (seeds, prompts)
    rng = np.random.default_rng(0)
    s = rng.integers(0, len(diffs), size=(num_boot, len(diffs)))
    p = rng.integers(0, diffs.shape[1], size=(num_boot, diffs.shape[1]))
    boots = np.array([diffs[s[b]][:, p[b]].mean() for b in range(num_boot)])
    low, high = np.quantile(boots, [0.025, 0.975])
    gap = float(diffs.mean())
    if matched:
        verdict = decision_verdict(gap, low, high)
    else:
        short = ", ".join(f"{m} {np.mean(v):.2f}" for m, v in kls.items() if any(abs(x - kl) > 0.02 for x in v))
        verdict = f"not at matched KL ({short})"
    return dict(method=method, baseline=baseline, metric=metric, k=k, kl=kl, seeds=len(diffs), difference=gap,
                ci_low=float(low), ci_high=float(high), matched_kl=matched, verdict=verdict)


def comparisons(results: list[dict]) -> list[dict]:
    """CTRL (and calibrated identity) against raw best-vs-worst DPO, and each CTRL transform against
    calibrated identity, on the procedure it was planned for."""
    pairs = [("ctrl_exp_bon", "raw_bvw_dpo", "bon4"), ("ctrl_negexp_won", "raw_bvw_dpo", "won4"),
             ("calib_identity", "raw_bvw_dpo", "bon4"), ("calib_identity", "raw_bvw_dpo", "won4"),
             ("ctrl_exp_bon", "calib_identity", "bon4"), ("ctrl_negexp_won", "calib_identity", "won4"),
             ("ctrl_exp_bon_pointwise", "raw_bvw_dpo", "bon4"), ("ctrl_exp_bon_pointwise", "calib_identity", "bon4"),
             ("ctrl_exp_bon_pointwise", "ctrl_exp_bon", "bon4"),
             # On-policy rounds (the default) against the offline soft-label DPO they replace.
             ("ctrl_exp_bon", "ctrl_exp_bon_dpo", "bon4"), ("ctrl_negexp_won", "ctrl_negexp_won_dpo", "won4"),
             ("calib_identity", "calib_identity_dpo", "bon4"), ("calib_identity", "calib_identity_dpo", "won4"),
             # BoNBoN: the published recipe that targets best-of-n without a transform.
             ("ctrl_exp_bon", "bonbon", "bon4"), ("bonbon", "raw_bvw_dpo", "bon4")]
    rows = []
    for k in sorted({r["k"] for r in results}):
        for kl in sorted({r["kl_budget"] for r in results}):
            for method, baseline, metric in pairs:
                row = paired(results, method, baseline, metric, k, kl)
                if row:
                    rows.append(row)
    return rows


def format_oracle(rows: list[dict]) -> str:
    lines = ["| procedure | transform | K | planned KL | exact KL | planned win | exact win | within 0.005 |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = r["transform"] + (f" t={r['t']:.3g}" if r["t"] is not None else "")
        lines.append(f"| {r['inference']}-{r['n']} | {t} | {r['k'] or '∞'} | {r['planned_kl']:.3f} | "
                     f"{r['exact_kl']:.4f} | {r['planned_win_rate']:.4f} | {r['exact_win_rate']:.4f} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def add_planned_figures(results: list[dict]) -> None:
    """Each CTRL run's planned BoN-4 and WoN-4: the tilt its estimator trains at its (Φ, β, K)."""
    from functools import lru_cache

    from ctrl_offline.maths.finite_k import Estimator, trained_tilt

    @lru_cache(maxsize=None)
    def planned(spec, beta, k, estimator):
        tilt = trained_tilt(spec, beta, k, estimator)
        return tilt.bon_win_rate(4), tilt.won_win_rate(4)

    for r in results:
        if r.get("transform") and "planned_bon4" not in r:
            spec = r["transform"] if r["t"] is None else f"{r['transform']}:{r['t']}"
            # Runs from before the estimator was recorded are soft-label DPO on sampled pairs.
            estimator = Estimator(**r.get("estimator") or dict(loss="dpo", strategy="sampled"))
            r["planned_bon4"], r["planned_won4"] = planned(spec, r["unscaled_beta"], r["plan_k"], estimator)


def format_runs(results: list[dict]) -> str:
    lines = ["| method | K | KL budget | seeds (reached) | planned KL | exact KL | off-target KL | BoN-4 planned | "
             "BoN-4 exact | BoN-4 KL eff. | BoN-4 fidelity | WoN-4 planned | WoN-4 exact | WoN-4 KL eff. | "
             "WoN-4 fidelity | tilt R² | valid mass | settle α | steps |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["method"], r["k"], r["kl_budget"]) for r in results}, key=lambda x: (x[1], x[2], x[0]))
    for method, k, kl in keys:
        rs = [r for r in results if (r["method"], r["k"], r["kl_budget"]) == (method, k, kl)]
        def mean(key, digits=3):
            values = [r[key] for r in rs if r.get(key) is not None]
            return f"{np.mean(values):.{digits}f}" if values else "–"

        lines.append(f"| {method} | {k} | {kl:g} | {len(rs)} ({sum(r['reached'] for r in rs)}) | "
                     f"{mean('planned_kl')} | {mean('exact_kl')} | {mean('off_target_kl')} | {mean('planned_bon4')} | "
                     f"{mean('bon4')} | {mean('bon4_efficiency', 2)} | {mean('bon4_fidelity', 2)} | "
                     f"{mean('planned_won4')} | {mean('won4')} | {mean('won4_efficiency', 2)} | "
                     f"{mean('won4_fidelity', 2)} | {mean('tilt_r2', 2)} | {mean('valid_mass')} | {mean('settle_alpha', 2)} | "
                     f"{mean('steps', 0)} |")
    return "\n".join(lines)


def format_comparisons(rows: list[dict]) -> str:
    lines = ["| K | KL | method − baseline | metric | seeds | difference [95% CI] | verdict |",
             "|---:|---:|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['kl']:g} | {r['method']} − {r['baseline']} | {r['metric']} | {r['seeds']} | "
                     f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Parse the arguments and run; with ``--json`` only the report reaches stdout (trainer logs go to stderr)."""
    import contextlib

    args = build_parser().parse_args(argv)
    report, text = None, None
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report, text = run(args)
    print(json.dumps(report, indent=1, default=float) if args.json else text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="oracle + one trained method, ≤ 5 min on 2 cores")
    parser.add_argument("--out", type=Path, default=Path("runs/testbed"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--k", type=int, nargs="+", help="reference samples per training prompt")
    parser.add_argument("--kl", type=float, nargs="+", help="KL budgets")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--ties", action="store_true", help="the reward variant with ties")
    parser.add_argument("--prompt-length", type=int, default=3,
                        help="prompt symbols: 3 gives 512 prompts, 4 gives 4 096 (its own π_ref and folder)")
    parser.add_argument("--train-prompts", type=int, help="training prompts (default 384)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--pairs-per-prompt", type=int, default=8)
    parser.add_argument("--bvw-beta", type=float, default=0.1, help="β of the best-vs-worst DPO baseline")
    parser.add_argument("--kl-every", type=int, default=20, help="steps between exact KL checks")
    parser.add_argument("--kl-tolerance", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=12, help="on-policy rounds (the default CTRL methods)")
    parser.add_argument("--round-samples", type=int, default=16, help="policy samples per prompt per round")
    parser.add_argument("--round-steps", type=int, default=50, help="optimizer steps per round")
    parser.add_argument("--round-batch-size", type=int, default=128)
    parser.add_argument("--hold", choices=["round", "end"], default="end",
                        help="rounds: hold the KL at the end of every round, or only settle the final policy")
    parser.add_argument("--lr-end", type=float, default=3e-5, help="learning rate of the last round")
    parser.add_argument("--skip-oracle", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tabulate the runs already done")
    parser.add_argument("--write-efficiency", type=Path, metavar="JSON",
                        help="write the mean KL efficiency per training, transform, procedure and K (the file "
                        "ctrl_offline/reports/measured.py ships: ctrl_offline/data/testbed_efficiency.json)")
    return parser


def run(args) -> tuple[dict, str]:
    """(report, its tables as Markdown): the oracle, every (K, budget, seed, method) run, the comparisons."""
    size = dict(SIZES["quick" if args.quick else "full"])
    for key in ("k", "kl", "seeds", "methods"):
        if getattr(args, key):
            size[key] = getattr(args, key)
    if args.quick and not args.methods:
        size["methods"] = SIZES["quick"]["methods"]
    logging.basicConfig(level=logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = args.out / ("ties" if args.ties else "tie_free")
    if args.prompt_length != 3:
        out = out.with_name(out.name + f"_p{args.prompt_length}")
    size["prompt_length"] = args.prompt_length
    if args.train_prompts:
        size["train_prompts"] = args.train_prompts
    out.mkdir(parents=True, exist_ok=True)
    print(f"Decision rule (fixed before the runs): {DECISION_RULE}.", file=sys.stderr)
    started = time.perf_counter()
    setup = prepare(out, size, ties=args.ties)
    _log(f"π_ref ready: valid mass {setup.valid_mass.mean():.4f}, "
         f"entropy {-(np.exp(setup.ref_logp) * setup.ref_logp).sum(1).mean():.2f} nats "
         f"(uniform {np.log(setup.language.num_responses):.2f})")
    report = {"decision_rule": DECISION_RULE, "size": size, "ties": args.ties,
              "reference": {"pretrain_seconds": setup.pretrain_seconds, "valid_mass": float(setup.valid_mass.mean()),
                            "responses_per_prompt": setup.language.num_responses,
                            "eval_prompts": len(setup.eval_prompts), "train_prompts": len(setup.train_prompts)}}
    if not args.skip_oracle:
        cache = out / f"oracle_{setup.path.name}_{len(setup.eval_prompts)}.json"
        key = {"kl": size["oracle_kl"], "k": size["k"]}
        cached = json.loads(cache.read_text()) if cache.exists() else None
        if cached and cached["key"] == key:
            report["oracle"] = cached["rows"]
        else:
            report["oracle"] = oracle(setup, size["oracle_kl"], size["k"])
            cache.write_text(json.dumps({"key": key, "rows": report["oracle"]}, default=float))
        _log("oracle done")
    results = []
    # The middle budget first, for every K and seed: an interrupted run has whole comparisons to show.
    kls = sorted(size["kl"], key=lambda kl: (kl != 0.5, kl))
    for kl in kls:
        for k in size["k"]:
            for seed in size["seeds"]:
                for method in size["methods"]:
                    if args.report_only:
                        path = out / "runs" / f"{method}_K{k}_kl{kl:g}_seed{seed}" / "result.json"
                        if path.exists():
                            results.append(json.loads(path.read_text()))
                        continue
                    r = train_run(out, setup, method, k, kl, seed, args)
                    _log(f"{method} K={k} KL={kl:g} seed={seed}: exact KL {r['exact_kl']:.3f}, "
                         f"BoN-4 {r['bon4']:.3f}, WoN-4 {r['won4']:.3f} ({r['seconds']:.0f} s)")
                    results.append(r)
    add_planned_figures(results)
    add_diagnostics(results)
    if args.write_efficiency:
        args.write_efficiency.write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/testbed.py " + " ".join(sys.argv[1:]),
             "rows": efficiency_rows(results)}, indent=1) + "\n")
    report["runs"] = [{k: v for k, v in r.items() if k not in ("per_prompt", "kl_history")} for r in results]
    report["comparisons"] = comparisons(results)
    report["seconds"] = time.perf_counter() - started
    parts = []
    if "oracle" in report:
        parts.append("Oracle: exactly tilted policies vs the plan\n\n" + format_oracle(report["oracle"]))
    parts.append("Trained methods, KL held by the callback (means over seeds)\n\n" + format_runs(results))
    if report["comparisons"]:
        parts.append("Paired differences at matched KL\n\n" + format_comparisons(report["comparisons"]))
    parts.append(f"{report['seconds']:.0f} s")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report, "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
