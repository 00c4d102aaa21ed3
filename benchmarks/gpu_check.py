"""One prepared GPU check (issue 15, item 7): QLoRA memory at 7B, trainer and sampling throughput.

    bash benchmarks/fetch_gpu_wheels.sh                  # here, once: wheels the GPU machine lacks
    bash benchmarks/gpu_check.sh                         # there: installs them offline, then runs this
    python benchmarks/gpu_check.py --toy --out runs/gpu_check   # anywhere, tiny sizes (CPU: < 2 minutes)

Three parts, each in its own process under its own time limit, so that a crash, an out-of-memory
error or a hang in one is recorded in the JSON and the others still run:

* ``qlora_7b``: ``bench_trainer.run_qlora`` (``--qlora-7b``): a 7B-shaped Llama (hidden 4096, 32
  layers, 32 heads, intermediate 11008, vocabulary 32,000) with random bf16 weights built on the GPU
  from a config and saved, reloaded 4-bit NF4 through ``load_policy`` (double quantisation, LoRA r=16
  on q/k/v/o/gate/up/down, gradient checkpointing), then ``CTRLTrainer`` steps on one pair at
  sequence length 1024 per sequence, batch 1. Reports ``torch.cuda.max_memory_allocated`` (and
  reserved) against the 24 GB goal, PASS or FAIL, and seconds per step after the first. Skipped,
  saying why, without CUDA or without a working bitsandbytes (``--toy`` on a GPU runs the same path
  at a toy shape).
* ``trainer_vs_trl``: ``bench_trainer.run_default``: ``CTRLTrainer`` (soft-label DPO, stored
  reference log-probs) against TRL's ``DPOTrainer`` (reference pass every step), same random ~220M
  Llama, LoRA adapter, pairs and steps, alternating runs in separate processes: tokens/s of each and
  the ratio.
* ``sampling``: ``ctrl_offline.models.generation.sample_completions`` batched (``batch_size`` prompts × K
  samples per ``generate`` call) against the same function one prompt at a time, and against
  ``bench_sampling.naive_sampling`` (one ``generate`` per prompt and sample) on the first few
  prompts: tokens/s and the ratios.

Writes ``gpu_check.json`` (and ``gpu_check.log``, the parts' output) under ``--out`` (a folder, or a
path ending in .json), after every part; prints a short table. Exit status 1 when a part failed or
ran out of time, 0 otherwise (skipped parts included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL_BYTES = 24 * 10**9  # "fits in 24 GB": decimal GB, which leaves a 24 GiB card ~1.6 GiB for context and slack
PARTS = ("qlora_7b", "trainer_vs_trl", "sampling")
# Seconds each part may take by default; time a part leaves unused goes to the parts after it.
BUDGETS = {"qlora_7b": 270, "trainer_vs_trl": 160, "sampling": 70}
TOY_BUDGETS = {"qlora_7b": 15, "trainer_vs_trl": 70, "sampling": 30}
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}

SIZES = {
    "full": {
        "qlora": {"shape": "7b", "seq_len": 1024, "steps": 4},
        # ~220M parameters: 12 × (4·1024² + 3·1024·2816) + 2 × 32000·1024
        "trainer": {"hidden": 1024, "layers": 12, "heads": 16, "intermediate": 2816, "vocab": 32000,
                    "prompt-words": 64, "completion-words": 128, "batch-size": 8, "warmup": 3, "steps": 30,
                    "max-length": 256, "repeats": 2},
        # ~135M parameters
        "sampling": {"hidden": 768, "layers": 8, "heads": 12, "intermediate": 2048, "vocab": 32000,
                     "prompts": 32, "prompt_words": 24, "k": 4, "max_new_tokens": 48, "batch_size": 16,
                     "naive_prompts": 8},
    },
    "toy": {
        "qlora": {"shape": "smoke", "seq_len": 128, "steps": 2},
        "trainer": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 172, "vocab": 500,
                    "prompt-words": 8, "completion-words": 16, "batch-size": 2, "warmup": 1, "steps": 3,
                    "max-length": 64, "repeats": 1},
        "sampling": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 172, "vocab": 500,
                     "prompts": 8, "prompt_words": 8, "k": 2, "max_new_tokens": 8, "batch_size": 4,
                     "naive_prompts": 2},
    },
}


# ---------------------------------------------------------------------------------------------------------------
# Parts (each runs in its own process: ``gpu_check.py --run-part NAME --part-file FILE``)


class PartWriter:
    """The part's JSON, rewritten after every measurement so that a part stopped at its limit keeps what it had."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"status": "running"}

    def update(self, **values) -> None:
        self.data.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)


def _cuda() -> tuple[bool, str]:
    import torch

    return torch.cuda.is_available(), ("cuda" if torch.cuda.is_available() else "cpu")


def qlora_summary(result: dict, shape: str, cuda: bool) -> dict:
    """The figures of ``bench_trainer.run_qlora``'s result that the check reports; the 24 GB verdict (7B, CUDA)."""
    steps = result["step_seconds"]
    summary = {"shape": shape, "goal_gb": GOAL_BYTES / 1e9,
               "s_per_step": statistics.median(steps[1:] or steps), "first_step_s": steps[0],
               "tokens_per_step": statistics.median(result["tokens_per_step"]),
               "nf4_linear_layers": result["nf4_linear_layers"], "load_seconds": result["load_seconds"],
               "build_seconds_not_timed": result["build_seconds_not_timed"], "gpu": result.get("gpu")}
    if cuda:
        peak = result["peak_cuda_mb"] * 2**20
        reserved = result["peak_cuda_reserved_mb"] * 2**20
        summary.update(peak_allocated_gib=peak / 2**30, peak_reserved_gib=reserved / 2**30,
                       loaded_allocated_gib=result["loaded_cuda_mb"] / 1024,
                       reserved_within_goal=reserved <= GOAL_BYTES,
                       verdict=("PASS" if peak <= GOAL_BYTES else "FAIL") if shape == "7b" else None)
    else:
        summary.update(verdict=None, peak_rss_mb=result["peak_rss_mb"],
                       note="CPU code-path check at the toy shape: no GPU memory figure, no verdict")
    return summary


def part_qlora(args, sizes: dict, out: PartWriter) -> None:
    import torch

    import bench_trainer

    cuda = torch.cuda.is_available()
    if not cuda and not args.qlora_cpu_smoke:
        out.update(status="skipped", reason="no CUDA GPU here: the 4-bit NF4 QLoRA step at 7B needs one "
                                            "(bitsandbytes' GPU kernels, and the 24 GB goal is GPU memory)")
        return
    if not cuda:
        sizes = SIZES["toy"]["qlora"]  # --qlora-cpu-smoke: the code path only, at the toy shape
    from ctrl_offline.models.modeling import bitsandbytes_available

    ok, why = bitsandbytes_available()
    if not ok:
        out.update(status="skipped", reason=f"bitsandbytes cannot run 4-bit NF4 here: {why}")
        return
    flags = ["--qlora-smoke" if sizes["shape"] == "smoke" else "--qlora-7b", "--qlora-seq-len", str(sizes["seq_len"]),
             "--qlora-steps", str(sizes["steps"]), "--seed", str(args.seed)]
    if args.work_dir:
        flags += ["--work-dir", args.work_dir]
    bt_args = bench_trainer.build_parser().parse_args(flags)
    bt_args.device = "cuda" if cuda else "cpu"
    bt_args.qlora_shape = sizes["shape"]
    out.update(settings={**sizes, "lora": "r=16, alpha=32, dropout=0.05, q/k/v/o/gate/up/down",
                         "quantisation": f"NF4, double quantisation, {'bf16' if cuda else 'fp32'} compute",
                         "gradient_checkpointing": True, "batch_size": 1, "goal_bytes": GOAL_BYTES})
    result = bench_trainer.run_qlora(bt_args)
    summary = qlora_summary(result, sizes["shape"], cuda)
    out.update(status="ok", summary=summary, result=result)


def part_trainer(args, sizes: dict, out: PartWriter) -> None:
    import bench_trainer

    cuda, device = _cuda()
    flags = [f"--{k}={v}" for k, v in sizes.items()] + ["--device", device, "--seed", str(args.seed)]
    if args.work_dir:
        flags += ["--work-dir", args.work_dir]
    out.update(settings={**sizes, "device": device})
    result = bench_trainer.run_default(bench_trainer.build_parser().parse_args(flags))
    summary = {"ctrl_tokens_per_s": result["tokens_per_s"], "trl_tokens_per_s": result["trl_tokens_per_s"],
               "ratio": result["ratio"], "ratio_median_step": result["ratio_median_step"],
               "ctrl_s_per_step": result["ours"]["s_per_step"], "trl_s_per_step": result["trl"]["s_per_step"],
               "tokens_per_step": result["ours"]["tokens_per_step"], "precision": result["settings"]["precision"],
               "device": device}
    if cuda:
        summary.update(ctrl_peak_cuda_mb=result["peak_cuda_mb"], trl_peak_cuda_mb=result["trl_peak_cuda_mb"])
    else:
        summary.update(ctrl_peak_rss_mb=result["peak_mem_mb"], trl_peak_rss_mb=result["trl_peak_mem_mb"])
    out.update(status="ok", summary=summary, result=result)


def part_sampling(args, sizes: dict, out: PartWriter) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bench_sampling
    import bench_trainer
    from ctrl_offline.models.generation import SamplingConfig, sample_completions

    cuda, device = _cuda()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    shape = {k: sizes[k] for k in ("hidden", "layers", "heads", "intermediate", "vocab")}
    shape["kv_heads"] = shape["heads"]
    k, max_new, batch = sizes["k"], sizes["max_new_tokens"], sizes["batch_size"]
    out.update(settings={**sizes, "device": device, "dtype": str(dtype).removeprefix("torch.")})

    def clock():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        bench_trainer.build_model(Path(tmp), shape, args.seed, max_positions=512)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    _, words = bench_trainer.build_tokenizer(shape["vocab"])
    rng = np.random.default_rng(args.seed)
    prompts = [" ".join(rng.choice(words, size=sizes["prompt_words"])) for _ in range(sizes["prompts"])]
    # Warm-up (CUDA kernels, cuBLAS handles, allocator), not timed.
    sample_completions(model, tokenizer, prompts[:2], SamplingConfig(k=2, max_new_tokens=4, batch_size=2), seed=1)
    measured = {}

    def record(name, seconds, completions, tokens, **extra):
        measured[name] = {"seconds": seconds, "completions": completions, "tokens": tokens,
                          "tokens_per_s": tokens / seconds, "completions_per_s": completions / seconds, **extra}
        summary = {f"{n}_tokens_per_s": m["tokens_per_s"] for n, m in measured.items()}
        if "batched" in measured and "per_prompt" in measured:
            summary["ratio"] = measured["batched"]["tokens_per_s"] / measured["per_prompt"]["tokens_per_s"]
        if "batched" in measured and "naive_loop" in measured:
            summary["ratio_vs_naive_loop"] = (measured["batched"]["tokens_per_s"]
                                              / measured["naive_loop"]["tokens_per_s"])
        out.update(summary=summary, result=measured)

    for name, batch_size in (("batched", batch), ("per_prompt", 1)):
        start = clock()
        rows = sample_completions(model, tokenizer, prompts, SamplingConfig(k=k, max_new_tokens=max_new,
                                                                            batch_size=batch_size), seed=0)
        seconds = clock() - start
        record(name, seconds, len(rows), sum(r["num_tokens"] for r in rows), batch_size=batch_size,
               prompts=len(prompts))
        print(f"  sampling {name:<10}: {measured[name]['tokens_per_s']:9.0f} tokens/s", flush=True)
    subset = prompts[:sizes["naive_prompts"]]
    torch.manual_seed(0)
    start = clock()
    rows = bench_sampling.naive_sampling(model, tokenizer, subset, k, max_new)
    seconds = clock() - start
    record("naive_loop", seconds, len(rows), sum(n for _, _, n in rows), prompts=len(subset))
    print(f"  sampling naive_loop: {measured['naive_loop']['tokens_per_s']:9.0f} tokens/s", flush=True)
    out.update(status="ok")


PART_FUNCTIONS = {"qlora_7b": ("qlora", part_qlora), "trainer_vs_trl": ("trainer", part_trainer),
                  "sampling": ("sampling", part_sampling)}


def run_part(args) -> int:
    os.environ.update(QUIET_ENV)
    for folder in (str(ROOT), str(HERE)):  # ctrl_offline need not be installed; bench_trainer/bench_sampling
        if folder not in sys.path:
            sys.path.insert(0, folder)
    out = PartWriter(Path(args.part_file))
    key, function = PART_FUNCTIONS[args.run_part]
    try:
        function(args, SIZES["toy" if args.toy else "full"][key], out)
    except BaseException as err:  # SystemExit from bench_trainer.run_worker included
        out.update(status="failed", error=f"{type(err).__name__}: {err}"[-4000:],
                   traceback=traceback.format_exc()[-4000:])
        traceback.print_exc()
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Orchestration


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "huggingface-hub",
                 "tokenizers", "safetensors", "pyarrow", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "packages": _versions(), "installed_from_wheels": os.environ.get("GPU_CHECK_INSTALLED", "").split()}
    if shutil.which("nvidia-smi"):
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"failed: {err}"
    return info


def _spawn_part(name: str, args, part_file: Path, timeout: float, log) -> tuple[int | None, bool, str]:
    """Run one part in its own process group; (exit status, timed out, output tail). Output goes to stdout and log."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", name, "--part-file", str(part_file),
           "--seed", str(args.seed)] + (["--toy"] if args.toy else []) + (
               ["--qlora-cpu-smoke"] if args.qlora_cpu_smoke else []) + (["--work-dir", args.work_dir]
                                                                           if args.work_dir else [])
    path = os.pathsep.join([str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": path}
    if args.toy:
        # Tiny matrices: one thread each. With more, OpenMP's spinning threads slow them down many times over
        # on a busy CPU (a toy generate call: 0.14 s with one thread, 6 s with two on 2 shared cores).
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    tail: list[str] = []

    def pump():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            sys.stdout.write(f"  [{name}] {line}")
            sys.stdout.flush()
            log.write(line)
            log.flush()
            tail.append(line)
            del tail[:-60]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and the workers it started (same process group)
        except ProcessLookupError:
            pass
        rc = proc.wait()
    reader.join(timeout=10)
    return rc, timed_out, "".join(tail)[-4000:]


def _fmt(value, spec=",.0f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def describe(name: str, part: dict) -> str:
    s = part.get("summary") or {}
    if part["status"] == "skipped":
        return part.get("reason", "")
    if not s:
        why = part.get("error") or part.get("reason") or ""
        return why.strip().splitlines()[-1][:150] if why.strip() else ""
    note = f" [{part['reason']}]" if part["status"] == "timed_out" else ""
    return _describe_summary(name, s) + note


def _describe_summary(name: str, s: dict) -> str:
    if name == "qlora_7b" and "s_per_step" in s:
        memory = (f"peak {s['peak_allocated_gib']:.2f} GiB allocated ({s['peak_reserved_gib']:.2f} GiB reserved) vs "
                  f"{s['goal_gb']:.0f} GB goal: {s['verdict'] or 'no verdict at the ' + s['shape'] + ' shape'}"
                  if "peak_allocated_gib" in s else f"peak RSS {s['peak_rss_mb']:.0f} MB (CPU, {s['shape']} shape)")
        return (f"{memory}; {s['s_per_step']:.2f} s/step at {s['tokens_per_step']:.0f} tokens "
                f"(first step {s['first_step_s']:.2f} s)")
    if name == "trainer_vs_trl" and "ratio" in s:
        return (f"CTRLTrainer {_fmt(s['ctrl_tokens_per_s'])} tokens/s, TRL DPOTrainer {_fmt(s['trl_tokens_per_s'])} "
                f"tokens/s: ratio {s['ratio']:.2f}x ({s['precision']}, {s['device']})")
    if name == "sampling" and s:
        text = (f"batched {_fmt(s.get('batched_tokens_per_s'))} tokens/s, one prompt at a time "
                f"{_fmt(s.get('per_prompt_tokens_per_s'))}: ratio {_fmt(s.get('ratio'), '.2f')}x")
        if "naive_loop_tokens_per_s" in s:
            text += (f"; naive loop {_fmt(s['naive_loop_tokens_per_s'])} tokens/s "
                     f"({_fmt(s.get('ratio_vs_naive_loop'), '.1f')}x)")
        return text
    return json.dumps(s)[:150]


def print_table(report: dict) -> None:
    gpu = report["machine"].get("nvidia_smi") or "no GPU"
    print(f"\nGPU check ({'toy sizes' if report['toy'] else 'full sizes'}) on {gpu}: "
          f"{report['total_seconds']:.0f} s of a {report['budget_s']:.0f} s budget")
    print(f"{'part':<15} {'status':<9} {'s':>5}  figures")
    for name, part in report["parts"].items():
        print(f"{name:<15} {part['status']:<9} {_fmt(part.get('seconds'), '.0f'):>5}  {describe(name, part)}")
    q = report["parts"].get("qlora_7b")
    if q is not None:
        summary = q.get("summary") or {}
        if summary.get("verdict"):
            text = summary["verdict"]
        elif q["status"] == "ok":
            text = f"NO VERDICT ({summary.get('note') or 'run at the ' + str(summary.get('shape')) + ' shape'})"
        else:
            why = (q.get("reason") or q.get("error") or "").strip()
            text = q["status"].upper() + (f" ({why.splitlines()[-1][:200]})" if why else "")
        print(f"QLoRA 7B step within 24 GB: {text}")


def orchestrate(args) -> int:
    out = Path(args.out)
    json_path = out if out.suffix == ".json" else out / "gpu_check.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = json_path.with_suffix(".log")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    nominal = TOY_BUDGETS if args.toy else BUDGETS
    budget = args.budget or sum(nominal[p] for p in parts)
    scale = budget / sum(nominal[p] for p in parts)
    shares = {p: nominal[p] * scale for p in parts}
    started = time.monotonic()
    deadline = started + budget
    report = {"schema": "ctrl_offline gpu_check 1", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "toy": args.toy, "budget_s": budget, "part_budgets_s": shares, "goal_bytes": GOAL_BYTES,
              "sizes": SIZES["toy" if args.toy else "full"], "machine": machine(), "parts": {},
              "total_seconds": 0.0}

    def save():
        report["total_seconds"] = time.monotonic() - started
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, json_path)

    with open(log_path, "w") as log, tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(parts):
            reserve = sum(shares[p] for p in parts[i + 1:])
            timeout = deadline - time.monotonic() - reserve
            if timeout < 5:
                report["parts"][name] = {"status": "not_run", "reason": "no time left in the budget", "seconds": 0.0}
                save()
                continue
            print(f"== {name} (limit {timeout:.0f} s)", flush=True)
            log.write(f"== {name} (limit {timeout:.0f} s)\n")
            part_file = Path(tmp) / f"{name}.json"
            begin = time.monotonic()
            rc, timed_out, tail = _spawn_part(name, args, part_file, timeout, log)
            data = json.loads(part_file.read_text()) if part_file.exists() else {}
            data.setdefault("status", "failed")
            if timed_out:
                data.update(status="timed_out", reason=f"stopped at its {timeout:.0f} s limit; partial results kept")
            elif rc != 0 and data["status"] != "failed":
                data.update(status="failed", error=f"exit status {rc}")
            elif rc == 0 and data["status"] == "running":
                data.update(status="failed", error="the part ended without a result")
            if data["status"] in ("failed", "timed_out"):
                data["output_tail"] = tail
            data.update(seconds=time.monotonic() - begin, limit_s=timeout, exit_status=rc)
            report["parts"][name] = data
            save()
    save()
    print_table(report)
    print(f"wrote {json_path} and {log_path}")
    return 1 if any(p["status"] in ("failed", "timed_out") for p in report["parts"].values()) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"),
                        help="folder for gpu_check.json and gpu_check.log, or a .json path (default: $OUT, "
                             "else runs/gpu_check)")
    parser.add_argument("--toy", action="store_true", help="tiny sizes everywhere (CPU: the whole in < 2 minutes)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all parts together (default: 500 full, 115 toy), shared in proportion "
                             f"{BUDGETS} (toy {TOY_BUDGETS}); time a part leaves goes to the next")
    parser.add_argument("--work-dir", default=None, help="parent of temporary folders (7B: ~13.5 GB of disk)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qlora-cpu-smoke", action="store_true",
                        help="without CUDA, run the QLoRA part's code path at the toy shape on the CPU (bitsandbytes' "
                             "CPU NF4) instead of skipping it; no memory verdict")
    parser.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--part-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_part:
        return run_part(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
