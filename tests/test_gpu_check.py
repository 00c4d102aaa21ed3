"""benchmarks/gpu_check.py: the prepared GPU check, run at toy sizes on the CPU, and its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_modules import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    return load_benchmark("gpu_check")


def _qlora_result(peak_gib: float) -> dict:
    """The shape of bench_trainer.qlora_worker's result on CUDA."""
    return {"step_seconds": [3.0, 1.2, 1.0, 1.1], "tokens_per_step": [2048] * 4, "nf4_linear_layers": 224,
            "load_seconds": 40.0, "build_seconds_not_timed": 30.0, "gpu": "NVIDIA H100 80GB HBM3",
            "loaded_cuda_mb": 5000.0, "peak_cuda_mb": peak_gib * 1024, "peak_cuda_reserved_mb": peak_gib * 1024 + 512,
            "peak_rss_mb": 9000.0}


def test_qlora_verdict_against_24_gb():
    gpu_check = _module()
    fits = gpu_check.qlora_summary(_qlora_result(7.5), "7b", cuda=True)
    assert fits["verdict"] == "PASS" and fits["reserved_within_goal"]
    assert fits["s_per_step"] == pytest.approx(1.1)  # the median after the first (warm-up) step
    assert fits["first_step_s"] == 3.0 and fits["tokens_per_step"] == 2048
    # 24 GB is decimal: 22.35 GiB allocated is the most that passes.
    assert gpu_check.qlora_summary(_qlora_result(22.3), "7b", cuda=True)["verdict"] == "PASS"
    assert gpu_check.qlora_summary(_qlora_result(22.4), "7b", cuda=True)["verdict"] == "FAIL"
    assert gpu_check.qlora_summary(_qlora_result(1.0), "smoke", cuda=True)["verdict"] is None  # no verdict off 7B
    cpu = gpu_check.qlora_summary(_qlora_result(1.0), "smoke", cuda=False)
    assert cpu["verdict"] is None and "peak_allocated_gib" not in cpu


def test_table_names_every_part_and_the_verdict(capsys):
    gpu_check = _module()
    report = {"toy": False, "budget_s": 500, "total_seconds": 321.0, "machine": {"nvidia_smi": "NVIDIA H100"},
              "parts": {"qlora_7b": {"status": "ok", "seconds": 150.0,
                                     "summary": gpu_check.qlora_summary(_qlora_result(7.5), "7b", cuda=True)},
                        "trainer_vs_trl": {"status": "failed", "seconds": 3.0, "error": "RuntimeError: boom\n"},
                        "sampling": {"status": "timed_out", "seconds": 70.0, "reason": "stopped at its 70 s limit",
                                     "summary": {"batched_tokens_per_s": 5000.0}}}}
    gpu_check.print_table(report)
    printed = capsys.readouterr().out
    assert "vs 24 GB goal: PASS" in printed and "QLoRA 7B step within 24 GB: PASS" in printed
    assert "RuntimeError: boom" in printed
    assert "batched 5,000 tokens/s" in printed and "stopped at its 70 s limit" in printed


@pytest.mark.slow  # about 60-90 s on 2 CPUs: five Python processes each import torch, transformers and TRL
def test_toy_run_reports_every_part(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    out = tmp_path / "check"
    # A generous budget: the toy sizes take well under the default 115 s, unless the CPUs are shared.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--budget", "480", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.log").exists()
    assert report["toy"] is True
    assert list(report["parts"]) == ["qlora_7b", "trainer_vs_trl", "sampling"]
    qlora = report["parts"]["qlora_7b"]
    if not torch.cuda.is_available():
        assert qlora["status"] == "skipped" and "CUDA" in qlora["reason"]
    else:
        assert qlora["status"] == "ok"
    trainer = report["parts"]["trainer_vs_trl"]
    assert trainer["status"] == "ok"
    assert trainer["summary"]["ctrl_tokens_per_s"] > 0 and trainer["summary"]["trl_tokens_per_s"] > 0
    assert trainer["summary"]["ratio"] == pytest.approx(
        trainer["summary"]["ctrl_tokens_per_s"] / trainer["summary"]["trl_tokens_per_s"])
    sampling = report["parts"]["sampling"]
    assert sampling["status"] == "ok"
    assert {"batched_tokens_per_s", "per_prompt_tokens_per_s", "naive_loop_tokens_per_s", "ratio",
            "ratio_vs_naive_loop"} <= set(sampling["summary"])
    assert sampling["result"]["batched"]["completions"] == sampling["result"]["per_prompt"]["completions"] == 16
    assert "QLoRA 7B step within 24 GB" in proc.stdout


def test_qlora_step_path_runs_on_cpu(tmp_path):
    """The QLoRA part's whole path (random model saved, reloaded 4-bit NF4, CTRLTrainer steps) at the toy shape on the
    CPU: the only guard of that path off a GPU (its first H100 run failed on the trainer's minimum-rows check)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--parts", "qlora_7b", "--qlora-cpu-smoke",
                           "--budget", "300", "--out", str(out)], capture_output=True, text=True, timeout=400, cwd=ROOT)
    report = json.loads((out / "gpu_check.json").read_text())
    qlora = report["parts"]["qlora_7b"]
    assert qlora["status"] == "ok", proc.stdout[-4000:] + proc.stderr[-4000:]
    assert qlora["result"]["nf4_linear_layers"] > 0
    assert len(qlora["result"]["step_seconds"]) == 2 and all(s > 0 for s in qlora["result"]["step_seconds"])
