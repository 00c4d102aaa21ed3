"""Grouped training against pair rows: supervision per second and peak memory, side by side (issue 26).

    python benchmarks/bench_grouped.py               # CPU here; the GPU (bf16 where supported) when there is one
    python benchmarks/bench_grouped.py --json        # the last stdout line is one JSON object
    python benchmarks/bench_grouped.py --record-lengths SAMPLES_DIR --tokenizer MODEL --lengths OUT.json

Real-shaped data: each prompt's token count and its K = 8 completions' token counts (EOS included where
it finished) come from a sample run of the embedded SmolLM2-135M-Instruct on hh-tiny prompts, recorded in
``benchmarks/data/smollm2_hh_tiny_lengths.json`` (``--record-lengths`` writes such a file from any
``ctrl-data sample`` folder). The tokens themselves are random words of a word-level tokenizer and the
model a random Llama, as in ``bench_trainer.py``: their values do not change what a step costs. Each
prompt's u is a random permutation of j/(K − 1) (tie-free), Φ the identity; ``ctrl-data build``'s own
stage writes the pair rows and the grouped rows from the same calibrated file, so both hold the same pairs.

Four trainers, each in its own process (``--repeats`` runs, alternating), same LoRA adapter (``load_policy``,
r = 16), learning rate and steps; fp32 on a CPU, bf16 on a GPU that supports it:

* ``trl``: TRL's ``DPOTrainer`` on the pair rows' text (it tokenises, appends EOS and runs the reference
  forward pass every step: counted);
* ``pairs``: ``CTRLTrainer`` on the same pair rows' stored ids and reference log-probs, padded batches;
* ``pairs_packed``: the same with ``padding_free=True`` (sequences packed, position ids restarting);
* ``grouped``: ``CTRLGroupedTrainer`` on the grouped rows: each distinct response forwarded once a step.

Pair-row trainers take ``--pair-batch`` pairs a step (default 8: 16 sequences); the grouped trainer takes
``--group-batch`` prompts a step (default 2: at most 16 distinct responses), so every forward holds about
as many sequences. Two pair sets: ``all`` (28 pairs per prompt) and ``sampled`` (8 per prompt).

Units. A *pair-equivalent* is one pair's loss computed; its *supervision tokens* are those of
prompt + chosen and prompt + rejected, what the pair's row feeds TRL. A grouped step supervises all its
prompts' pairs with the same units, so every trainer is measured in the same currency. Rates are over the
``--steps`` steps after ``--warmup``; the table gives the median over runs and the largest peak memory
(``ru_maxrss`` of the worker; on CUDA also ``torch.cuda.max_memory_allocated``). The 1-minute load
average is recorded around every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench_trainer's model, tokenizer and measurement helpers
    sys.path.insert(0, str(HERE))

import bench_trainer as bt  # noqa: E402

LENGTHS_FILE = HERE / "data" / "smollm2_hh_tiny_lengths.json"
TRAINERS = ("trl", "pairs", "pairs_packed", "grouped")
STRATEGIES = {"all": {"strategy": "all"}, "sampled": {"strategy": "sampled", "pairs_per_prompt": 8}}
LABELS = {"trl": "TRL DPOTrainer (pair rows, ref pass)", "pairs": "CTRLTrainer pair rows, padded",
          "pairs_packed": "CTRLTrainer pair rows, padding-free", "grouped": "CTRLGroupedTrainer, grouped rows"}


# ---------------------------------------------------------------------------------------------------------------
# Lengths: recorded from a real sample run


def record_lengths(samples: Path, tokenizer_name: str, out: Path, source: str | None = None) -> dict:
    """Each prompt's token count (its rendered text, tokenised as the sampler did) and its completions' token
    counts, from a ``ctrl-data sample`` folder; written to ``out``."""
    import pandas as pd
    from transformers import AutoTokenizer

    from ctrl_offline.io.files import read_metadata, read_table
    from ctrl_offline.models.embedded import resolve_model

    frame = read_table(samples).to_pandas()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_name))
    prompts = []
    for _, group in frame.sort_values(["prompt_id", "sample_idx"]).groupby("prompt_id", sort=False):
        prompts.append({"prompt_tokens": len(tokenizer(group["prompt_text"].iloc[0])["input_ids"]),
                        "completion_tokens": [int(n) for n in group["num_tokens"]],
                        "finished": [bool(f) for f in group["finished"]]})
    manifest = samples / "_manifest.json"  # a sample folder's settings (one file: its metadata)
    settings = (json.loads(manifest.read_text()) if manifest.is_file() else read_metadata(samples) or {}).get(
        "settings", {})
    record = {"source": source or f"ctrl-data sample of {tokenizer_name} ({samples})", "tokenizer": tokenizer_name,
              "k": int(frame.groupby("prompt_id").size().max()), "max_new_tokens": settings.get("max_new_tokens"),
              "date": datetime.date.today().isoformat(), "prompts": prompts}
    out.parent.mkdir(parents=True, exist_ok=True)
    head = json.dumps({k: v for k, v in record.items() if k != "prompts"}, indent=1)[:-2]
    out.write_text(head + ',\n "prompts": [\n' + ",\n".join("  " + json.dumps(p) for p in prompts) + "\n ]\n}\n")
    summary = pd.Series([n for p in prompts for n in p["completion_tokens"]]).describe()
    print(f"recorded {len(prompts)} prompts × K={record['k']} into {out}; completion tokens: "
          f"mean {summary['mean']:.1f}, min {summary['min']:.0f}, max {summary['max']:.0f}")
    return record


def load_lengths(path: Path) -> dict:
    record = json.loads(Path(path).read_text())
    if not record.get("prompts"):
        raise SystemExit(f"{path}: no prompts recorded")
    return record


# ---------------------------------------------------------------------------------------------------------------
# Data: a calibrated file of real-shaped random words, built by the build stage


def write_calibrated(folder: Path, model_dir: Path, words: list[str], lengths: dict, num_prompts: int,
                     seed: int) -> Path:
    """A calibrate output: ``num_prompts`` prompts (cycling through the recorded ones) × K completions of random
    words, ids as a sampler records them (EOS last: every completion counts as finished), tie-free u."""
    import numpy as np
    import pyarrow as pa
    from transformers import AutoTokenizer

    from ctrl_offline.io.files import write_parquet

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("prompt_id", "prompt", "prompt_text", "completion", "completion_ids", "sample_idx",
                            "ref_logp", "finished", "num_tokens", "u")}
    recorded = lengths["prompts"]
    for p in range(num_prompts):
        shape = recorded[p % len(recorded)]
        prompt = " ".join(rng.choice(words, size=shape["prompt_tokens"]))
        k = len(shape["completion_tokens"])
        u = rng.permutation(k) / (k - 1)
        for j, n in enumerate(shape["completion_tokens"]):
            chosen = list(rng.choice(words, size=max(n - 1, 1)))
            ids = [vocab[w] for w in chosen] + [tokenizer.eos_token_id]
            for key, value in (("prompt_id", p), ("prompt", prompt), ("prompt_text", prompt),
                               ("completion", " " + " ".join(chosen)), ("completion_ids", ids), ("sample_idx", j),
                               # About uniform over the vocabulary: the value does not change a step's cost.
                               ("ref_logp", -len(ids) * math.log(len(vocab))), ("finished", True),
                               ("num_tokens", len(ids)), ("u", float(u[j]))):
                rows[key].append(value)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({**rows, "completion_ids": pa.array(rows["completion_ids"], pa.list_(pa.int32()))})
    write_parquet(table, folder / "calibrated.parquet", {"stage": "calibrate", "reference_model": str(model_dir)})
    return folder


def build_sets(root: Path, model_dir: Path, calibrated: Path) -> dict:
    """Pair rows and grouped rows for each pair strategy, by ``ctrl-data build``'s stage."""
    from ctrl_offline.stages.build import build_dataset

    sets = {}
    for name, strategy in STRATEGIES.items():
        for fmt in ("pairs", "grouped"):
            result = build_dataset(calibrated, root / f"{fmt}_{name}", format=fmt, transform="identity", beta=0.1,
                                   tokenizer=str(model_dir), **strategy)
            sets[f"{fmt}_{name}"] = result.num_rows
    return sets


# ---------------------------------------------------------------------------------------------------------------
# Workers (one trainer per process)


def _counts(inputs) -> dict:
    """Pairs, supervision tokens (the pairs' rows' prompt + response tokens), tokens forwarded and sequences."""
    if "pair_chosen" in inputs:  # grouped
        lengths = inputs["sequence_lengths"]
        chosen, rejected = inputs["pair_chosen"], inputs["pair_rejected"]
        return {"pairs": len(chosen), "supervision": int((lengths[chosen] + lengths[rejected]).sum()),
                "forwarded": int(inputs["input_ids"].numel()), "sequences": len(lengths)}
    if "sequence_lengths" in inputs:  # packed pair rows: [chosen; rejected]
        lengths = inputs["sequence_lengths"]
        return {"pairs": len(lengths) // 2, "supervision": int(lengths.sum()),
                "forwarded": int(inputs["input_ids"].numel()), "sequences": len(lengths)}
    return {"pairs": inputs["input_ids"].shape[0] // 2, "supervision": int(inputs["attention_mask"].sum()),
            "forwarded": int(inputs["input_ids"].numel()), "sequences": inputs["input_ids"].shape[0]}


def _instrumented(cls):
    class Counted(cls):
        def training_step(self, model, inputs, *args, **kwargs):
            self.bench_counts.append(_counts(inputs))
            return super().training_step(model, inputs, *args, **kwargs)

    Counted.__name__ = cls.__name__
    return Counted


def worker(which: str, strategy: str, folder: Path, args) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.training.config import CTRLConfig, CTRLGroupedConfig
    from ctrl_offline.training.grouped import CTRLGroupedTrainer
    from ctrl_offline.training.trainer import CTRLTrainer

    cuda = args.device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model_dir = folder / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    grouped = which == "grouped"
    data = load_from_disk(str(folder / f"{'grouped' if grouped else 'pairs'}_{strategy}"))
    model, lora = load_policy(ModelLoadingConfig(str(model_dir), load_in_4bit=False, gradient_checkpointing=False))
    common = dict(output_dir=str(folder / f"out-{which}-{strategy}"), max_steps=args.warmup + args.steps,
                  learning_rate=1e-4, beta=0.1, max_length=None, report_to="none", save_strategy="no",
                  logging_steps=10**6, disable_tqdm=True, gradient_checkpointing=False, bf16=bf16, use_cpu=not cuda,
                  seed=args.seed, per_device_train_batch_size=args.group_batch if grouped else args.pair_batch)
    if which == "trl":
        trainer = _instrumented(DPOTrainer)(model=model, args=DPOConfig(**common),
                                            train_dataset=data.select_columns(["prompt", "chosen", "rejected"]),
                                            processing_class=tokenizer, peft_config=lora)
    elif grouped:
        trainer = _instrumented(CTRLGroupedTrainer)(model, CTRLGroupedConfig(ctrl_loss="dpo", **common), data,
                                                    processing_class=tokenizer, peft_config=lora)
    else:
        trainer = _instrumented(CTRLTrainer)(model, CTRLConfig(ctrl_loss="dpo", padding_free=which == "pairs_packed",
                                                               **common), data, processing_class=tokenizer,
                                             peft_config=lora)
    trainer.bench_counts = []
    clock = bt._step_clock()
    trainer.add_callback(clock)
    rss_before = bt._rss_now_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    trainer.train()
    load_after = os.getloadavg()[0]
    steps = args.warmup + args.steps
    if len(clock.ends) != steps or len(trainer.bench_counts) != steps:
        raise RuntimeError(f"expected {steps} steps, timed {len(clock.ends)}, counted {len(trainer.bench_counts)}")
    seconds = clock.ends[-1] - (clock.ends[args.warmup - 1] if args.warmup else clock.begin)
    measured = trainer.bench_counts[args.warmup:]
    total = {key: sum(c[key] for c in measured) for key in measured[0]}
    edges = [clock.begin, *clock.ends]
    step_pairs_per_s = [c["pairs"] / (edges[i + 1] - edges[i]) for i, c in enumerate(trainer.bench_counts)]
    result = {"trainer": which, "strategy": strategy, "seconds": seconds, "s_per_step": seconds / args.steps,
              "pairs_per_s": total["pairs"] / seconds, "supervision_tokens_per_s": total["supervision"] / seconds,
              "median_step_pairs_per_s": statistics.median(step_pairs_per_s[args.warmup:]),
              **{f"{key}_per_step": value / args.steps for key, value in total.items()},
              "rss_before_train_mb": rss_before, "peak_rss_mb": bt._peak_rss_mb(),
              "load_avg_1min": [round(load_before, 2), round(load_after, 2)]}
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ---------------------------------------------------------------------------------------------------------------
# Orchestration


def summarise(runs: list[dict]) -> dict:
    out = {key: statistics.median(r[key] for r in runs)
           for key in ("pairs_per_s", "supervision_tokens_per_s", "median_step_pairs_per_s", "s_per_step",
                       "pairs_per_step", "supervision_per_step", "forwarded_per_step", "sequences_per_step")}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["rss_before_train_mb"] = max(r["rss_before_train_mb"] for r in runs)
    out["runs_pairs_per_s"] = [round(r["pairs_per_s"], 2) for r in runs]
    out["load_avg_1min"] = [r["load_avg_1min"] for r in runs]
    if "peak_cuda_mb" in runs[0]:
        out["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in runs)
    return out


def ratios(table: dict) -> dict:
    """Per strategy, each CTRL trainer against TRL: pair-equivalents per second and peak memory."""
    out = {}
    for strategy, rows in table.items():
        trl = rows["trl"]
        out[strategy] = {which: {"pairs_per_s": rows[which]["pairs_per_s"] / trl["pairs_per_s"],
                                 "median_step_pairs_per_s": rows[which]["median_step_pairs_per_s"]
                                 / trl["median_step_pairs_per_s"],
                                 "peak_rss": rows[which]["peak_rss_mb"] / trl["peak_rss_mb"],
                                 **({"peak_cuda": rows[which]["peak_cuda_mb"] / trl["peak_cuda_mb"]}
                                    if "peak_cuda_mb" in trl else {})}
                         for which in rows if which != "trl"}
    return out


TARGETS = {("all", "grouped"): 5.0, ("sampled", "grouped"): 2.0, ("all", "pairs_packed"): 1.5,
           ("sampled", "pairs_packed"): 1.5}


def print_table(table: dict, rates: dict) -> None:
    cuda = any("peak_cuda_mb" in row for rows in table.values() for row in rows.values())
    for strategy, rows in table.items():
        print(f"\n{strategy} pairs ({'28' if strategy == 'all' else '8'} per prompt, K = 8)")
        print(f"{'trainer':<38} {'s/step':>7} {'pairs/step':>10} {'seq/step':>8} {'tok fwd/step':>12} "
              f"{'pairs/s':>8} {'sup tok/s':>9} {'peak RSS MB':>11}" + (f" {'peak CUDA MB':>12}" if cuda else "")
              + f" {'× TRL pairs/s':>13} {'× TRL mem':>9} {'target':>7}")
        for which, s in rows.items():
            r = rates[strategy].get(which)
            target = TARGETS.get((strategy, which))
            mem = (r.get("peak_cuda") or r["peak_rss"]) if r else 1.0
            print(f"{LABELS[which]:<38} {s['s_per_step']:>7.3f} {s['pairs_per_step']:>10.1f} "
                  f"{s['sequences_per_step']:>8.1f} {s['forwarded_per_step']:>12.0f} {s['pairs_per_s']:>8.1f} "
                  f"{s['supervision_tokens_per_s']:>9.0f} {s['peak_rss_mb']:>11.0f}"
                  + (f" {s.get('peak_cuda_mb', float('nan')):>12.0f}" if cuda else "")
                  + f" {(r['pairs_per_s'] if r else 1.0):>12.2f}x {mem:>8.3f}x"
                  + (f" {'≥' + format(target, 'g') + 'x':>7}" if target else f" {'':>7}"))


def run(args) -> dict:
    import torch

    lengths = load_lengths(args.lengths)
    shape = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.heads,
                 intermediate=args.intermediate, vocab=args.vocab)
    needed = max(args.group_batch * (args.warmup + args.steps), len(lengths["prompts"]))
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        bt.build_model(root / "model", shape, args.seed, max_positions=1024)
        _, words = bt.build_tokenizer(args.vocab)
        calibrated = write_calibrated(root / "calibrated", root / "model", words, lengths, needed, args.seed)
        sets = build_sets(root, root / "model", calibrated)
        setup_seconds = time.perf_counter() - started
        runs = {strategy: {which: [] for which in args.trainers} for strategy in args.strategies}
        for r in range(args.repeats):
            order = args.trainers if r % 2 == 0 else args.trainers[::-1]
            for strategy in args.strategies:
                for which in order:
                    result = run_worker(["--worker", which, "--strategy", strategy, "--folder", tmp,
                                         *worker_flags(args)])
                    runs[strategy][which].append(result)
                    if not args.json:
                        print(f"  run {r + 1}/{args.repeats} {strategy:>7} {which:>12}: "
                              f"{result['pairs_per_s']:7.1f} pairs/s, peak RSS {result['peak_rss_mb']:.0f} MB",
                              flush=True)
    table = {strategy: {which: summarise(rows) for which, rows in by.items()} for strategy, by in runs.items()}
    rates = ratios(table) if "trl" in args.trainers else {s: {} for s in table}
    print_table(table, rates)
    busiest = max(v for rows in table.values() for s in rows.values() for pair in s["load_avg_1min"] for v in pair)
    if busiest > (os.cpu_count() or 1) + 0.5:
        print(f"warning: 1-min load average reached {busiest:.1f} on {os.cpu_count()} CPUs during the runs: other "
              "processes shared the CPUs, so the times are inflated and noisy")
    completion = [n for p in lengths["prompts"] for n in p["completion_tokens"]]
    result = {"table": table, "ratios": rates, "targets": {f"{s}/{w}": t for (s, w), t in TARGETS.items()},
              "sets": sets, "max_load_avg_1min": busiest, "setup_seconds_not_timed": setup_seconds,
              "lengths": {"file": str(args.lengths), "source": lengths.get("source"), "prompts": len(lengths["prompts"]),
                          "completion_tokens_mean": statistics.mean(completion),
                          "prompt_tokens_mean": statistics.mean(p["prompt_tokens"] for p in lengths["prompts"])},
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker", "folder", "strategy")
                           and not callable(v)},
              "precision": "bf16" if args.device == "cuda" and torch.cuda.is_bf16_supported() else "fp32",
              "machine": bt.machine_info(args.device), "date": datetime.date.today().isoformat()}
    result["settings"]["lengths"] = str(args.lengths)
    if args.json:
        print(json.dumps(result, default=str))
    return result


def run_worker(extra: list[str]) -> dict:
    """This script as a worker in a fresh process (its peak memory its own); its last stdout line, parsed."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    out = subprocess.run(cmd, env={**os.environ, **bt.WORKER_ENV}, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {' '.join(extra[:4])} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_flags(args) -> list[str]:
    return ["--pair-batch", str(args.pair_batch), "--group-batch", str(args.group_batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--seed", str(args.seed), "--device", args.device]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=Path, default=LENGTHS_FILE, help="recorded prompt and completion lengths")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--pair-batch", type=int, default=8, help="pairs a step for the pair-row trainers")
    parser.add_argument("--group-batch", type=int, default=2, help="prompts a step for the grouped trainer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    parser.add_argument("--record-lengths", type=Path, metavar="SAMPLES_DIR",
                        help="write --lengths from a `ctrl-data sample` folder instead of benchmarking")
    parser.add_argument("--tokenizer", default="embedded:smollm2", help="with --record-lengths: the sampler's model")
    parser.add_argument("--source", help="with --record-lengths: how the samples were drawn (the file's `source`)")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=list(STRATEGIES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.update(bt.WORKER_ENV)
    if args.record_lengths:
        record_lengths(args.record_lengths, args.tokenizer, args.lengths, args.source)
        return 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args.worker, args.strategy, Path(args.folder), args)))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
