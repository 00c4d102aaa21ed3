"""Trainer throughput and peak memory: CTRLTrainer against TRL's stock DPOTrainer, side by side.

    python benchmarks/bench_trainer.py            # CPU here; the GPU (bf16 where supported) when there is one
    python benchmarks/bench_trainer.py --json     # the last stdout line is one JSON object
    python benchmarks/bench_trainer.py --qlora-7b # GPU only, UNTESTED: QLoRA steps of a 7B-shaped Llama

Both trainers load the same folder: a random Llama built from a config and a word-level tokenizer
with a few thousand synthetic words, saved once with ``save_pretrained``. Same LoRA adapter (from
``load_policy``), same synthetic pairs, batch size, max length, learning rate and number of
optimisation steps; fp32 on a CPU, bf16 mixed precision on a GPU that supports it.

* TRL: ``trl.DPOTrainer`` as a user runs it by default, on the ``prompt``/``chosen``/``rejected``
  columns only: every step runs the reference forward pass (the base with the adapter disabled),
  and that time is counted.
* Ours: ``CTRLTrainer`` (``ctrl_loss="dpo"``, soft labels from ``target_phi_gap``) on the same pairs
  plus ``ref_chosen_logps``/``ref_rejected_logps``, so it never runs the reference. Those values
  are computed here once, before either trainer starts, with the base model; in the pipeline they
  come free from sampling. That time is NOT counted.

Each trainer runs in its own process (the script re-invokes itself with ``--worker``), so the peak
resident set size (``ru_maxrss``) is its own; on CUDA the peak allocation is reported too. The
workers run one after the other, alternating, ``--repeats`` times; the table gives the median
tokens/s and the largest peak memory of each. Tokens are the real (non-pad) tokens of
prompt+chosen and prompt+rejected fed to each measured step; tokens/s counts the ``--steps`` steps
after ``--warmup`` warm-up steps (the wall time of the whole ``train()`` is reported as well). Both
trainers are wrapped the same way to count those tokens (a ``training_step`` override that only
counts) and timed by the same callback. The 1-minute load average is recorded around every run,
and a warning is printed when other processes were competing for the CPUs.

``--qlora-7b`` builds a 7B-shaped Llama (hidden 4096, 32 layers, 32 heads, intermediate 11008,
vocab 32000) with random bf16 weights on the GPU, saves it (about 13.5 GB of disk, under
``--work-dir``), loads it 4-bit NF4 with ``load_policy(ModelLoadingConfig(path, load_in_4bit=True))``
and runs ``--qlora-steps`` CTRLTrainer steps on one pair at sequence length 1024 (batch size 1,
gradient checkpointing), reporting peak GPU memory and step times. It has NOT been run at 7B: no
GPU was available where it was written (only the same code path at a toy shape on the CPU). Without
CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1",
              "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
SPECIALS = ["<pad>", "<eos>", "<unk>"]
QLORA_7B_SHAPE = dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
# The same code path at a toy size (CPU NF4 works with bitsandbytes >= 0.45): --qlora-smoke checks the script only.
QLORA_SMOKE_SHAPE = dict(hidden=128, layers=2, heads=2, kv_heads=2, intermediate=344, vocab=3000)


# ---------------------------------------------------------------------------------------------------------------
# Assets: tokenizer, random model, pairs, reference log-probs


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size - 3`` synthetic words ``w0 w1 …`` plus pad/eos/unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return tokenizer, words


def build_model(folder: Path, shape: dict, seed: int, max_positions: int, device: str = "cpu", dtype=None) -> None:
    """Save a random Llama of ``shape`` and its tokenizer to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _ = build_tokenizer(shape["vocab"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_pairs(words: list[str], n: int, prompt_words: int, completion_words: int, seed: int) -> dict:
    """``n`` synthetic pairs of random words; completions start with a space, as sampled completions do."""
    import numpy as np

    rng = np.random.default_rng(seed)
    text = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return {"prompt": [text(prompt_words) for _ in range(n)],
            "chosen": [" " + text(completion_words) for _ in range(n)],
            "rejected": [" " + text(completion_words) for _ in range(n)],
            "target_phi_gap": rng.uniform(-2.0, 2.0, n).round(3).tolist()}


def reference_logps(folder: Path, rows: dict, batch_size: int = 16, device: str = "cpu") -> None:
    """Σ log π_ref(completion + EOS | prompt) for both sides, batched, with the base model (adds the columns).

    This stands in for the sampling stage, which records these values for free; it is not timed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    for side in ("chosen", "rejected"):
        values = []
        for start in range(0, len(rows["prompt"]), batch_size):
            prompts = rows["prompt"][start:start + batch_size]
            completions = rows[side][start:start + batch_size]
            seqs, starts = [], []
            for prompt, completion in zip(prompts, completions):
                seqs.append(tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id])
                starts.append(len(tokenizer(prompt)["input_ids"]))
            width = max(map(len, seqs))
            ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            token_logp = logp.gather(2, ids[:, 1:, None])[..., 0]
            for i, (s, p) in enumerate(zip(seqs, starts)):
                values.append(token_logp[i, p - 1:len(s) - 1].sum().item())
        rows[f"ref_{side}_logps"] = values
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Workers (one trainer per process)


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _instrumented(cls):
    """``cls`` plus a count of the real tokens fed to each optimisation step (nothing else changes)."""

    class Counted(cls):
        def training_step(self, model, inputs, *args, **kwargs):
            self.bench_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    Counted.__name__ = cls.__name__
    return Counted


def _step_clock():
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall-clock time at the start of training and at the end of every optimisation step."""

        def __init__(self):
            self.begin, self.ends = None, []

        def _now(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(self._now())

    return StepClock()


def worker(which: str, folder: Path, args) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from ctrl_offline.training.config import CTRLConfig
    from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.training.trainer import CTRLTrainer

    cuda = args.device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    pairs = load_from_disk(str(folder / "pairs"))
    model, lora = load_policy(ModelLoadingConfig(str(folder / "model"), load_in_4bit=False,
                                                 gradient_checkpointing=False))
    common = dict(output_dir=str(folder / f"out-{which}"), per_device_train_batch_size=args.batch_size,
                  max_steps=args.warmup + args.steps, learning_rate=1e-4, beta=0.1, max_length=args.max_length,
                  report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                  gradient_checkpointing=False, bf16=bf16, use_cpu=not cuda, seed=args.seed)
    if which == "trl":
        trainer = _instrumented(DPOTrainer)(
            model=model, args=DPOConfig(**common), train_dataset=pairs.select_columns(["prompt", "chosen", "rejected"]),
            processing_class=tokenizer, peft_config=lora)
        assert not trainer.precompute_ref_logps  # the default: a reference forward pass at every step
    else:
        trainer = _instrumented(CTRLTrainer)(model, CTRLConfig(ctrl_loss="dpo", **common), pairs,
                                             processing_class=tokenizer, peft_config=lora)
        assert trainer.uses_stored_ref_logps  # no reference pass, neither before nor during training
    trainer.bench_tokens = []
    clock = _step_clock()
    trainer.add_callback(clock)
    rss_before = _rss_now_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    steps = len(clock.ends)
    if steps != args.warmup + args.steps or len(trainer.bench_tokens) != steps:
        raise RuntimeError(f"expected {args.warmup + args.steps} steps, timed {steps}, "
                           f"counted {len(trainer.bench_tokens)}")
    measured_seconds = clock.ends[-1] - (clock.ends[args.warmup - 1] if args.warmup else clock.begin)
    measured_tokens = sum(trainer.bench_tokens[args.warmup:])
    # Per-step rates too: their median shrugs off a step slowed by another process on the machine.
    edges = [clock.begin, *clock.ends]
    step_rates = [n / (edges[i + 1] - edges[i]) for i, n in enumerate(trainer.bench_tokens)][args.warmup:]
    result = {"trainer": which, "train_seconds": train_seconds, "measured_seconds": measured_seconds,
              "measured_steps": args.steps, "tokens": measured_tokens,
              "tokens_per_s": measured_tokens / measured_seconds,
              "s_per_step": measured_seconds / args.steps, "tokens_per_step": measured_tokens / args.steps,
              "train_tokens_per_s": sum(trainer.bench_tokens) / train_seconds,
              "median_step_tokens_per_s": statistics.median(step_rates),
              "rss_before_train_mb": rss_before, "peak_rss_mb": _peak_rss_mb(),
              "final_loss": trainer.state.log_history[-1].get("train_loss"),
              "load_avg_1min": [round(load_before, 2), round(load_after, 2)]}
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return result


def qlora_worker(folder: Path, args) -> dict:
    """One pair at sequence length ``--qlora-seq-len`` (per side), batch 1, a 4-bit NF4 base + LoRA."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from ctrl_offline.training.config import CTRLConfig
    from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.training.trainer import CTRLTrainer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    words = [w for w in tokenizer.get_vocab() if w not in SPECIALS]
    seq = args.qlora_seq_len
    prompt_words = seq // 2
    completion_words = seq - prompt_words - 1  # + EOS: prompt + completion = seq tokens exactly
    rows = make_pairs(words, 4, prompt_words, completion_words, args.seed)
    # Stored reference log-probs: their values do not change the cost of a step; about uniform over the vocabulary.
    uniform = -(completion_words + 1) * math.log(len(tokenizer))
    rows["ref_chosen_logps"] = [uniform] * 4
    rows["ref_rejected_logps"] = [uniform] * 4
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, lora = load_policy(ModelLoadingConfig(str(folder), load_in_4bit=True))  # gradient checkpointing on
    load_seconds = time.perf_counter() - start
    nf4_layers = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    if not nf4_layers:
        raise RuntimeError("load_policy(load_in_4bit=True) returned no 4-bit layers")
    if cuda:
        torch.cuda.synchronize()
    loaded_cuda_mb = torch.cuda.memory_allocated() / 2**20 if cuda else None
    config = CTRLConfig(output_dir=str(folder / "out"), ctrl_loss="dpo", per_device_train_batch_size=1,
                        max_steps=args.qlora_steps, learning_rate=1e-4, beta=0.1, max_length=seq, report_to="none",
                        save_strategy="no", logging_steps=10**6, disable_tqdm=True, gradient_checkpointing=True,
                        use_cpu=not cuda, seed=args.seed,
                        min_train_rows=0)  # 4 pairs on purpose: the step's memory and time are measured, not learning
    trainer = _instrumented(CTRLTrainer)(model, config, Dataset.from_dict(rows), processing_class=tokenizer,
                                         peft_config=lora)
    trainer.bench_tokens = []
    clock = _step_clock()
    trainer.add_callback(clock)
    trainer.train()
    times = [b - a for a, b in zip([clock.begin, *clock.ends[:-1]], clock.ends)]
    result = {"shape": args.qlora_shape, "seq_len_per_sequence": seq, "batch_size": 1,
              "tokens_per_step": trainer.bench_tokens, "step_seconds": times, "load_seconds": load_seconds,
              "nf4_linear_layers": nf4_layers, "peak_rss_mb": _peak_rss_mb(), "bf16": bool(config.bf16),
              "num_truncated": trainer.num_truncated}
    if cuda:
        result.update(loaded_cuda_mb=loaded_cuda_mb, peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20,
                      peak_cuda_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
                      gpu=torch.cuda.get_device_name(0))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Orchestration


def machine_info(device: str) -> dict:
    import peft
    import torch
    import transformers
    import trl

    info = {"device": device, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "trl": trl.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
    return info


def run_worker(extra: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    out = subprocess.run(cmd, env={**os.environ, **WORKER_ENV}, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {' '.join(extra[:2])} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_flags(args) -> list[str]:
    return ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--max-length", str(args.max_length), "--seed", str(args.seed), "--device", args.device]


def run_default(args) -> dict:
    """The side-by-side comparison: prints its table and returns the summary (also printed as JSON with --json)."""
    import torch

    shape = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.heads,
                 intermediate=args.intermediate, vocab=args.vocab)
    pairs = args.pairs or args.batch_size * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        build_model(folder / "model", shape, args.seed, max_positions=max(args.max_length, 512))
        _, words = build_tokenizer(args.vocab)
        rows = make_pairs(words, pairs, args.prompt_words, args.completion_words, args.seed)
        reference_logps(folder / "model", rows, device=args.device)  # the sampling stage's job; timed for neither
        from datasets import Dataset

        Dataset.from_dict(rows).save_to_disk(str(folder / "pairs"))
        setup_seconds = time.perf_counter() - started
        runs = {"trl": [], "ours": []}
        for r in range(args.repeats):
            for which in (("trl", "ours") if r % 2 == 0 else ("ours", "trl")):
                runs[which].append(run_worker(["--worker", which, "--folder", tmp, *worker_flags(args)]))
                if not args.json:
                    print(f"  run {r + 1}/{args.repeats} {which:>4}: {runs[which][-1]['tokens_per_s']:8.0f} tokens/s, "
                          f"peak RSS {runs[which][-1]['peak_rss_mb']:.0f} MB", flush=True)

    def summary(results):
        out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
               "s_per_step": statistics.median(r["s_per_step"] for r in results),
               "tokens_per_step": results[0]["tokens_per_step"],
               "train_seconds": statistics.median(r["train_seconds"] for r in results),
               "median_step_tokens_per_s": statistics.median(r["median_step_tokens_per_s"] for r in results),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
               "rss_before_train_mb": max(r["rss_before_train_mb"] for r in results),
               "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in results],
               "load_avg_1min": [r["load_avg_1min"] for r in results]}
        if "peak_cuda_mb" in results[0]:
            out["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in results)
        return out

    ours, trl = summary(runs["ours"]), summary(runs["trl"])
    ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    step_ratio = ours["median_step_tokens_per_s"] / trl["median_step_tokens_per_s"]
    mem_ratio = ours["peak_rss_mb"] / trl["peak_rss_mb"]
    cuda_cols = "peak_cuda_mb" in ours
    print(f"\n{'trainer':<26} {'s/step':>7} {'tokens/step':>11} {'tokens/s':>9} {'train() s':>9} "
          f"{'RSS pre MB':>10} {'peak RSS MB':>11}" + (f" {'peak CUDA MB':>12}" if cuda_cols else ""))
    for name, s in (("TRL DPOTrainer", trl), ("CTRLTrainer (stored ref)", ours)):
        print(f"{name:<26} {s['s_per_step']:>7.3f} {s['tokens_per_step']:>11.0f} {s['tokens_per_s']:>9.0f} "
              f"{s['train_seconds']:>9.2f} {s['rss_before_train_mb']:>10.0f} {s['peak_rss_mb']:>11.0f}"
              + (f" {s['peak_cuda_mb']:>12.0f}" if cuda_cols else ""))
    print(f"ratio tokens/s (ours / TRL): {ratio:.2f}x  (median-step rates: {step_ratio:.2f}x)    "
          f"peak RSS (ours / TRL): {mem_ratio:.3f}x"
          + (f"    peak CUDA (ours / TRL): {ours['peak_cuda_mb'] / trl['peak_cuda_mb']:.3f}x" if cuda_cols else ""))
    busiest = max(v for s in (ours, trl) for pair in s["load_avg_1min"] for v in pair)
    if busiest > (os.cpu_count() or 1) + 0.5:
        print(f"warning: 1-min load average reached {busiest:.1f} on {os.cpu_count()} CPUs during the runs: "
              "other processes shared the CPUs, so the times are inflated and noisy")
    result = {"tokens_per_s": ours["tokens_per_s"], "trl_tokens_per_s": trl["tokens_per_s"], "ratio": ratio,
              "peak_mem_mb": ours["peak_rss_mb"], "trl_peak_mem_mb": trl["peak_rss_mb"], "mem_ratio": mem_ratio,
              "ratio_median_step": step_ratio,
              "peak_mem_measure": "ru_maxrss of the worker process (MB)", "ours": ours, "trl": trl,
              "settings": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                           "intermediate": args.intermediate, "vocab": args.vocab, "pairs": pairs,
                           "prompt_words": args.prompt_words, "completion_words": args.completion_words,
                           "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps,
                           "max_length": args.max_length, "repeats": args.repeats, "seed": args.seed,
                           "lora": "r=16, alpha=32, dropout=0.05, q/k/v/o/gate/up/down",
                           "precision": "bf16" if args.device == "cuda" and torch.cuda.is_bf16_supported()
                           else "fp32"},
              "setup_seconds_not_timed": setup_seconds, "max_load_avg_1min": busiest,
              "machine": machine_info(args.device), "date": datetime.date.today().isoformat()}
    if cuda_cols:
        result.update(peak_cuda_mb=ours["peak_cuda_mb"], trl_peak_cuda_mb=trl["peak_cuda_mb"],
                      cuda_mem_ratio=ours["peak_cuda_mb"] / trl["peak_cuda_mb"])
    if args.json:
        print(json.dumps(result))
    return result


def run_qlora(args) -> dict | None:
    """UNTESTED at 7B (no GPU where it was written). Builds, saves, reloads 4-bit, trains a few steps.

    Returns the worker's result (None when there is no GPU for the 7B shape)."""
    import torch

    smoke = args.qlora_shape == "smoke"
    if not smoke and not torch.cuda.is_available():
        print("--qlora-7b needs a CUDA GPU (4-bit NF4 QLoRA of a 7B-shaped model); none here, nothing run.")
        return None
    shape = QLORA_SMOKE_SHAPE if smoke else QLORA_7B_SHAPE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        folder = Path(tmp) / "model"
        started = time.perf_counter()
        if not args.json:
            print(f"building a random {args.qlora_shape} Llama {shape} on {device}, saving it to {folder} …",
                  flush=True)
        # Random weights straight on the device in bf16 (7B: ~13.5 GB), then saved; freed before the worker loads.
        build_model(folder, shape, args.seed, max_positions=max(args.qlora_seq_len, 512), device=device,
                    dtype=torch.bfloat16)
        build_seconds = time.perf_counter() - started
        if device == "cuda":
            torch.cuda.empty_cache()
        result = run_worker(["--worker", "qlora", "--folder", str(folder), "--qlora-shape", args.qlora_shape,
                             "--qlora-seq-len", str(args.qlora_seq_len), "--qlora-steps", str(args.qlora_steps),
                             "--seed", str(args.seed)])
    result.update(build_seconds_not_timed=build_seconds, machine=machine_info(device),
                  date=datetime.date.today().isoformat(),
                  tested="toy shape only (smoke)" if smoke else "UNTESTED before this run")
    print(f"QLoRA ({args.qlora_shape}, NF4 base + LoRA r=16, seq {args.qlora_seq_len} per sequence, batch 1, "
          f"gradient checkpointing): step seconds {[round(s, 2) for s in result['step_seconds']]}, "
          + (f"peak CUDA allocated {result['peak_cuda_mb'] / 1024:.2f} GiB "
             f"(reserved {result['peak_cuda_reserved_mb'] / 1024:.2f} GiB)" if "peak_cuda_mb" in result
             else f"peak RSS {result['peak_rss_mb']:.0f} MB (CPU smoke run)"))
    if args.json:
        print(json.dumps(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line, also used by benchmarks/gpu_check.py to build ``args`` for run_default / run_qlora."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=4000, help="tokenizer size (synthetic words + pad/eos/unk)")
    parser.add_argument("--pairs", type=int, default=0, help="default: batch size × (warm-up + steps)")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--completion-words", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps run but not counted in tokens/s")
    parser.add_argument("--steps", type=int, default=20, help="measured optimisation steps")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--work-dir", default=None, help="parent of the temporary folder (default: the system's)")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    parser.add_argument("--qlora-7b", action="store_true", help="GPU only, untested: 7B-shaped QLoRA steps")
    parser.add_argument("--qlora-seq-len", type=int, default=1024)
    parser.add_argument("--qlora-steps", type=int, default=2, help="QLoRA steps (the first includes warm-up)")
    parser.add_argument("--qlora-smoke", action="store_true", help=argparse.SUPPRESS)  # toy shape, any device
    parser.add_argument("--qlora-shape", default="7b", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["ours", "trl", "qlora"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    os.environ.update(WORKER_ENV)  # offline, no telemetry, no progress bars: here and in the workers
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker == "qlora":
        print(json.dumps(qlora_worker(Path(args.folder), args)))
    elif args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), args)))
    elif args.qlora_7b or args.qlora_smoke:
        if args.qlora_smoke:
            args.qlora_shape = "smoke"
        run_qlora(args)
    else:
        run_default(args)


if __name__ == "__main__":
    main()
