"""Scale-out exercised: `accelerate launch --num_processes 2 -m data_tools train` (CPU, gloo DDP) trains the adapter
one process trains with the doubled batch. Slow (two interpreter start-ups per launch): `pytest -m slow`."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.cli import main
from tiny_models import WORDS, build_tiny_model

TESTS = Path(__file__).parent
ROOT = TESTS.parent
#: Largest weight difference allowed, relative to the largest LoRA-B entry: float32 sums over 2 ranks vs 1 differ in
#: rounding only (measured 8e-6 of 0.019, i.e. 4e-4); a wrong sharding or a missing all-reduce differs by ~1.
TOLERANCE = 1e-3


def launch(*command, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(list(map(str, command)), env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_train_the_adapter_of_one_with_the_doubled_batch(tmp_path):
    from safetensors.torch import load_file

    rng = np.random.default_rng(5)
    (tmp_path / "prompts.txt").write_text("".join(" ".join(rng.choice(WORDS, size=3)) + " \n" for _ in range(16)))
    model = build_tiny_model(tmp_path / "lm", hidden=32)
    for args in (["sample", "prompts.txt", "--model", model, "--out", "samples", "--num-samples", 4, "--max-new-tokens", 6],
                 ["score", "samples", "--reward", "words=tiny_models:word_count_reward", "--out", "scored"],
                 ["calibrate", "scored", "--out", "calib"],
                 ["build", "calib", "--inference", "bon", "--inference-n", 4, "--kl-budget", 0.5, "--keep-unfinished", "--out", "pairs"]):
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert main([str(a) for a in args]) == 0
        finally:
            os.chdir(cwd)
    common = ["--max_steps", 3, "--learning_rate", 1e-2, "--lora-dropout", 0, "--no-gradient-checkpointing",
              "--use_cpu", "--seed", 0, "--logging_steps", 1]
    launch(sys.executable, "-m", "data_tools", "train", "pairs", "--out", "one", "--per_device_train_batch_size", 4,
           *common, cwd=tmp_path)
    # accelerate's torchrun launcher (--multi_gpu) with the trainer on CPU (--use_cpu): 2 gloo processes.
    launch(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", 2, "--num_machines", 1,
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "data_tools", "train", "pairs", "--out", "two",
           "--per_device_train_batch_size", 2, *common, cwd=tmp_path)
    one, two = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    assert moved > 1e-3  # the adapter trained
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= TOLERANCE * moved, f"2 processes differ from 1 by {worst:.3g} (LoRA B up to {moved:.3g})"
