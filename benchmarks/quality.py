"""The end-to-end quality experiment: does CTRL beat the usual recipes at matched KL?

Real model, real reward, held-out prompts, all offline:
  * reference model: the embedded SmolLM2-135M-Instruct (``embedded:smollm2``);
  * reward: VADER compound sentiment of the answer (``vader``) — the model is aligned to answer
    warmly; VADER ties a lot (neutral answers score exactly 0);
  * prompts: "one or two sentences" requests about everyday topics; the held-out topics are
    never seen in training.

Methods, each trained at several KL budgets (or DPO β for the raw baseline) from the same
reference samples, then evaluated on the same held-out reference samples:
  raw_bvw_dpo      best-vs-worst pairs, hard-label DPO on raw rewards (what users do today)
  calib_pointwise  calibrated identity, pointwise regression (QRPO-style)
  ctrl_exp_pairs   CTRL exp transform planned for BoN-4, soft-label DPO pairs
  ctrl_exp_point   CTRL exp transform planned for BoN-4, pointwise
  ctrl_negexp_won  CTRL negexp transform planned for WoN-4, soft-label DPO pairs

For each: BoN-4 and WoN-4 win rates against the reference (bootstrap CIs over prompts), the
standard win rate, KL(π‖π_ref), and the theory's prediction for a CTRL policy at the measured
KL. Every stage is cached under --out, so a killed run resumes.

    python benchmarks/quality.py --out runs/quality --json      # ~85 min on 2 CPU cores at the default size
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np

TOPICS_TRAIN = [
    "green tea", "a picnic", "a rainy day", "your neighbour", "a long train ride", "homework", "a job interview",
    "a birthday party", "running in the morning", "a houseplant", "learning guitar", "a power cut", "Monday mornings",
    "a crowded bus", "baking bread", "a lost umbrella", "a new phone", "the dentist", "a board game night",
    "a traffic jam", "cooking soup", "a museum", "moving house", "the weather", "a school trip", "a library",
    "an old friend", "a noisy street", "waiting in line", "a camping trip", "a dog walk", "a snowstorm",
]
TOPICS_EVAL = [
    "a bicycle", "the ocean", "a city park", "a cup of coffee", "a delayed flight", "a thunderstorm", "a garden",
    "a football match", "exams", "a small cafe", "winter evenings", "a busy kitchen",
]
TEMPLATES = [
    "Tell me about {} in one or two short sentences.",
    "What do you think of {}? Answer in one or two short sentences.",
    "Describe {} briefly, in one or two sentences.",
    "Write one short sentence about {}.",
]
METHODS = {
    # name: (build kwargs, trainer loss, format, sweep key)
    "raw_bvw_dpo": ({"format": "pairs", "strategy": "best_vs_worst", "transform": "identity"}, "dpo_hard", "pairs", "beta"),
    "calib_pointwise": ({"format": "pointwise", "transform": "identity", "inference": "bon"}, "pointwise", "pointwise", "kl"),
    "ctrl_exp_pairs": ({"format": "pairs", "strategy": "sampled", "transform": "exp", "inference": "bon"}, "dpo", "pairs", "kl"),
    "ctrl_exp_point": ({"format": "pointwise", "transform": "exp", "inference": "bon"}, "pointwise", "pointwise", "kl"),
    "ctrl_negexp_won": ({"format": "pairs", "strategy": "sampled", "transform": "negexp", "inference": "won"}, "dpo", "pairs", "kl"),
}

logger = logging.getLogger("quality")


def prompts(topics):
    return [template.format(topic) for topic in topics for template in TEMPLATES]


def write_prompts(path: Path, items) -> Path:
    """The prompts as JSON lines; an identical file is left untouched (the sample stage fingerprints its
    inputs by modification time, so rewriting it would stop a resumed run from reusing its shards)."""
    text = "".join(json.dumps({"prompt": p}) + "\n" for p in items)
    if not (path.is_file() and path.read_text() == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def reference_data(out: Path, args, train_prompts=None, reward: str = "vader", backend: str = "transformers",
                   batch_size: int = 8):
    """Sample → score → calibrate the training prompts (each stage resumable).

    ``train_prompts`` defaults to this experiment's (``TOPICS_TRAIN``, the first ``args.train_prompts``);
    ``args`` needs ``model``, ``k`` and ``max_new_tokens``.
    """
    from ctrl_offline.models.generation import SamplingConfig
    from ctrl_offline.stages._shards import is_complete
    from ctrl_offline.stages.calibrate import calibrate_scored
    from ctrl_offline.stages.sample import sample_prompts
    from ctrl_offline.stages.score import score_samples

    if train_prompts is None:
        train_prompts = prompts(TOPICS_TRAIN)[: args.train_prompts]
    source = write_prompts(out / "prompts" / "train.jsonl", train_prompts)
    sampling = SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, batch_size=batch_size)
    if not is_complete(out / "samples"):
        sample_prompts(str(source), out / "samples", args.model, sampling=sampling, seed=0, backend=backend)
    if not is_complete(out / "scored"):
        score_samples(out / "samples", out / "scored", [reward])
    if not (out / "calibrated").exists():
        calibrate_scored(out / "scored", out / "calibrated")
    return out / "calibrated"


def draw(model, tokenizer, texts, k, max_new_tokens, seed, reference):
    from ctrl_offline.models.generation import SamplingConfig, completion_logps, sample_completions

    context = model.disable_adapter() if reference and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with context:
        rows = sample_completions(model, tokenizer, texts, SamplingConfig(k=k, max_new_tokens=max_new_tokens, batch_size=8), seed)
    own = np.array([r["logp"] for r in rows]).reshape(len(texts), k)
    if reference or not hasattr(model, "disable_adapter"):
        return rows, own, own
    with model.disable_adapter():
        under_ref = np.array(completion_logps(model, tokenizer, [texts[r["batch_prompt"]] for r in rows],
                                              [r["completion_ids"] for r in rows])).reshape(len(texts), k)
    return rows, own, under_ref


def evaluation_reference(out: Path, args):
    """The reference's candidates on the held-out prompts, drawn once and shared by every method."""
    from ctrl_offline.models.embedded import vader_sentiment
    from ctrl_offline.models.generation import load_causal_lm, render_prompt

    cache = out / "eval_reference.npz"
    eval_prompts = prompts(TOPICS_EVAL)[: args.eval_prompts]
    if cache.exists():
        return eval_prompts, np.load(cache)["rewards"]
    model, tokenizer = load_causal_lm(args.model)
    texts = [render_prompt(tokenizer, p) for p in eval_prompts]
    rows, _, _ = draw(model, tokenizer, texts, args.n, args.max_new_tokens, seed=10_000, reference=True)
    rewards = np.array(vader_sentiment(None, [r["completion"] for r in rows])).reshape(len(texts), args.n)
    np.savez(cache, rewards=rewards)
    return eval_prompts, rewards


#: The benchmark's LoRA (r 16, α 32, every projection, no dropout) on a full-precision base.
LORA = dict(load_in_4bit=False, gradient_checkpointing=False, lora_r=16, lora_alpha=32, lora_dropout=0.0)
#: The benchmark's trainer settings (anything here can be overridden per call).
TRAINING = dict(per_device_train_batch_size=8, logging_steps=4, save_strategy="no", report_to="none", seed=0,
                max_length=256, disable_tqdm=True)


def make_trainer(model_name: str, fmt: str, loss: str, data_dir: Path, train_dir: Path, *, callbacks=(),
                 torch_dtype: str = "auto", **overrides):
    """The benchmark's CTRL trainer on the training set in ``data_dir``, not yet trained.

    A thin wrapper over :func:`ctrl_offline.stages.train.make_trainer` with :data:`LORA` and
    :data:`TRAINING` (``overrides`` go to the trainer config: learning_rate, num_train_epochs or
    max_steps, batch size, bf16, ...), for scripts that drive the trainer themselves
    (benchmarks/smollm_comparison.py). No beta: the trainers read it from ``data_dir``'s
    ctrl_build.json (the β for the rescaled Φ).
    """
    from ctrl_offline.models.modeling import ModelLoadingConfig
    from ctrl_offline.stages.train import make_trainer as trainer_of, training_config

    args = training_config(fmt, loss, {**TRAINING, "output_dir": str(train_dir), **overrides})
    return trainer_of(data_dir, ModelLoadingConfig(model_name, torch_dtype=torch_dtype, **LORA), args,
                      callbacks=callbacks)


def train(method: str, setting: float, calibrated: Path, run: Path, args) -> dict:
    from datasets import load_from_disk

    from ctrl_offline.io.files import read_build_info
    from ctrl_offline.stages.build import build_dataset
    from ctrl_offline.stages.train import train_from_build

    build_kwargs, loss, fmt, sweep = METHODS[method]
    build_kwargs = dict(build_kwargs)
    if sweep == "kl":
        build_kwargs.update(n=4, kl=setting)
    else:
        build_kwargs.update(beta=setting)
    if build_kwargs.get("strategy") == "sampled":
        build_kwargs["pairs_per_prompt"] = args.pairs_per_prompt
    if not (run / "data").exists():
        build_dataset(calibrated, run / "full_data", seed=0, **build_kwargs)
        dataset = load_from_disk(str(run / "full_data"))
        if fmt == "pointwise":
            # Targets already hold each prompt's log Z over all K samples; training on a seeded
            # subset of rows per prompt keeps them exact and the CPU budget small.
            rng = np.random.default_rng(0)
            order = rng.permutation(len(dataset))
            ids = dataset["prompt_id"]
            seen: dict[str, int] = {}
            keep = []
            for i in order:
                pid = ids[int(i)]
                if seen.get(pid, 0) < args.rows_per_prompt:
                    seen[pid] = seen.get(pid, 0) + 1
                    keep.append(int(i))
            dataset = dataset.select(sorted(keep))
        dataset.save_to_disk(str(run / "data"))
        (run / "data" / "ctrl_build.json").write_text((run / "full_data" / "ctrl_build.json").read_text())
    info = read_build_info(run / "data")
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").exists():
        train_from_build(run / "data", adapter, args.model, loss=loss, loading=LORA,
                         training_args={**TRAINING, "learning_rate": args.lr, "num_train_epochs": args.epochs},
                         checkpoint_dir=run / "train", overwrite=True)
    return info


def evaluate(run: Path, info: dict, eval_prompts, ref_rewards, args) -> dict:
    from ctrl_offline.models.embedded import vader_sentiment
    from ctrl_offline.maths.win_rates import estimate_inference_win_rate, estimate_standard_win_rate, kl_estimate
    from ctrl_offline.models.generation import load_causal_lm, render_prompt
    from ctrl_offline.maths.procedures import tilted_win_rate
    from ctrl_offline.maths.planner import solve_beta
    from ctrl_offline.maths.transforms import get_transform

    cache = run / "eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, tokenizer = load_causal_lm(args.model, adapter=str(run / "adapter"))
    texts = [render_prompt(tokenizer, p) for p in eval_prompts]
    rows, own, under_ref = draw(model, tokenizer, texts, args.n, args.max_new_tokens, seed=20_000, reference=False)
    rewards = np.array(vader_sentiment(None, [r["completion"] for r in rows])).reshape(len(texts), args.n)
    kl = kl_estimate(own, under_ref).to_dict()
    result = {"kl": kl, "standard": estimate_standard_win_rate(rewards, ref_rewards).to_dict(),
              "mean_reward": float(rewards.mean()), "reference_mean_reward": float(ref_rewards.mean())}
    for selector in ("bon", "won"):
        result[selector] = estimate_inference_win_rate(rewards, ref_rewards, selector, args.n)
        # What the theory promises a CTRL policy of this transform at the KL actually reached.
        if not run.name.startswith("raw_") and kl["value"] > 1e-3:
            phi = get_transform(info["transform"], info["t"])
            result[selector]["predicted"] = float(tilted_win_rate(phi, solve_beta(phi, kl["value"]), selector, args.n))
    cache.write_text(json.dumps(result, indent=2))
    return result


def at_matched_kl(results: list[dict], selector: str, kl: float) -> dict[str, float]:
    """Each method's win rate at ``kl``, linearly interpolated along its measured frontier.

    Only inside the KL range a method actually reached: extrapolating a two-point frontier
    would invent numbers.
    """
    matched = {}
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["kl"]["value"])
        x = [r["kl"]["value"] for r in rows]
        if len(rows) >= 2 and x[0] <= kl <= x[-1]:
            matched[method] = float(np.interp(kl, x, [r[selector]["value"] for r in rows]))
    return matched


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, selector in zip(axes, ("bon", "won")):
        for method in METHODS:
            rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["kl"]["value"])
            if not rows:
                continue
            x = [r["kl"]["value"] for r in rows]
            y = [r[selector]["value"] for r in rows]
            err = [[r[selector]["value"] - r[selector]["ci_low"] for r in rows],
                   [r[selector]["ci_high"] - r[selector]["value"] for r in rows]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("KL(π ‖ π_ref), nats (measured)")
        ax.set_ylabel(f"{selector.upper()}-4 win rate vs reference")
        ax.set_title(f"{selector.upper()}-4, VADER reward, SmolLM2-135M-Instruct")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--k", type=int, default=8, help="reference samples per training prompt")
    parser.add_argument("--n", type=int, default=4, help="candidates per side at evaluation (BoN-n / WoN-n)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--pairs-per-prompt", type=int, default=1, help="sampled pairs per prompt (CTRL pairs)")
    parser.add_argument("--rows-per-prompt", type=int, default=2, help="rows per prompt (pointwise)")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--kl", type=float, nargs="+", default=[0.1, 0.5, 2.0], help="KL budgets of the planned methods")
    parser.add_argument("--dpo-beta", type=float, nargs="+", default=[20.0, 5.0, 2.0, 0.5, 0.1], help="β of the raw DPO baseline")
    parser.add_argument("--match-kl", type=float, nargs="+", default=[0.3, 0.5, 1.0],
                        help="KL values at which to compare the methods' frontiers")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    started = time.perf_counter()
    calibrated = reference_data(out, args)
    eval_prompts, ref_rewards = evaluation_reference(out, args)
    results = []
    for method in args.methods:
        settings = args.dpo_beta if METHODS[method][3] == "beta" else args.kl
        for setting in settings:
            run = out / "runs" / f"{method}-{METHODS[method][3]}{setting:g}"
            t0 = time.perf_counter()
            info = train(method, setting, calibrated, run, args)
            result = evaluate(run, info, eval_prompts, ref_rewards, args)
            result.update(method=method, setting={METHODS[method][3]: setting}, transform=info["transform"],
                          t=info["t"], beta=info["beta"], phi_scale=info.get("phi_scale"),
                          unscaled_beta=info.get("unscaled_beta"))
            results.append(result)
            logger.info("%s %s: KL %.3f  BoN-4 %.3f  WoN-4 %.3f  standard %.3f  (%.0f s)", method, setting,
                        result["kl"]["value"], result["bon"]["value"], result["won"]["value"],
                        result["standard"]["value"], time.perf_counter() - t0)
    plot(results, out / "frontier.png")
    print(f"{'method':<16} {'setting':>10} {'KL':>6} {'BoN-4 [95% CI]':>22} {'pred':>6} {'WoN-4 [95% CI]':>22} "
          f"{'pred':>6} {'standard':>8}")
    for r in results:
        (key, value), = r["setting"].items()
        cells = []
        for selector in ("bon", "won"):
            s = r[selector]
            cells.append(f"{s['value']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]")
            cells.append(f"{s['predicted']:.3f}" if "predicted" in s else "-")
        print(f"{r['method']:<16} {key + '=' + format(value, 'g'):>10} {r['kl']['value']:>6.3f} {cells[0]:>22} {cells[1]:>6} "
              f"{cells[2]:>22} {cells[3]:>6} {r['standard']['value']:>8.3f}")
    print("\nwin rate at matched KL (linear along each method's measured frontier; '-' = outside its range)")
    print(f"{'method':<16} " + " ".join(f"{s.upper() + '-4 @KL ' + format(k, 'g'):>14}" for s in ("bon", "won")
                                         for k in args.match_kl))
    matched = {(s, k): at_matched_kl(results, s, k) for s in ("bon", "won") for k in args.match_kl}
    for method in args.methods:
        cells = [matched[s, k].get(method) for s in ("bon", "won") for k in args.match_kl]
        print(f"{method:<16} " + " ".join(f"{c:>14.3f}" if c is not None else f"{'-':>14}" for c in cells))
    print(f"total {time.perf_counter() - started:.0f} s; plot {out / 'frontier.png'}")
    if args.json:
        print(json.dumps({"config": vars(args), "results": results,
                          "matched_kl": {f"{s}@{k:g}": v for (s, k), v in matched.items()}}, default=str))
    (out / "results.json").write_text(json.dumps({"config": vars(args), "results": results,
                                                  "matched_kl": {f"{s}@{k:g}": v for (s, k), v in matched.items()}},
                                                 indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
