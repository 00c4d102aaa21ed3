"""On-policy rounds through `ctrl-data` (docs/rounds.md): reference sample → score → calibrate, then
`ctrl-data round` twice — round 1 from the base, round 2 from round 1's adapter — on a tiny random Llama
with a word-count reward."""

import json
from pathlib import Path

import numpy as np
import pytest

from ctrl_offline.io.files import read_table
from data_tools.cli import main
from tiny_models import WORDS, build_tiny_model, build_tokenizer

REWARD = "words=tiny_models:word_count_reward"
TRAIN = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--use_cpu", "--learning_rate", "5e-2",
         "--logging_steps", "1", "--no-gradient-checkpointing"]
PLAN = ["--inference", "bon", "--inference-n", 4, "--kl-budget", 0.5]


def cli(*args) -> int:
    return main([str(a) for a in args])


def round_args(root: Path, out: str, *extra):
    return ["round", root / "prompts.txt", "--reference", root / "ref" / "calib", "--reward", REWARD, "--out",
            root / out, "--num-samples", 3, "--max-new-tokens", 6, *PLAN, *extra, *TRAIN]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    rng = np.random.default_rng(4)
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 5))) + " " for _ in range(12)]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    model = build_tiny_model(root / "lm", hidden=32)
    ref = root / "ref"
    assert cli("sample", root / "prompts.txt", "--model", model, "--out", ref / "samples", "--num-samples", 4,
               "--max-new-tokens", 6) == 0
    assert cli("score", ref / "samples", "--reward", REWARD, "--out", ref / "scored") == 0
    assert cli("calibrate", ref / "scored", "--out", ref / "calib") == 0
    assert cli(*round_args(root, "round1", "--lora-r", 4, "--lora-alpha", 8)) == 0
    assert cli(*round_args(root, "round2", "--adapter", root / "round1" / "adapter")) == 0
    return {"root": root, "model": model}


def _teacher_forced(model, rows) -> np.ndarray:
    """Σ log p(completion ids | prompt text) under ``model``, one sequence at a time (no padding)."""
    import torch

    tok = build_tokenizer()
    out = []
    for _, row in rows.iterrows():
        prompt = tok(row.prompt_text)["input_ids"]
        ids = torch.tensor([prompt + list(row.completion_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        out.append(logp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().item())
    return np.array(out)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_policy_samples_store_the_policy_and_the_reference_logps(rounds):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = rounds["root"]
    first = read_table(root / "round1" / "samples").to_pandas()
    assert "logp" not in first.columns  # round 1 samples the base: the reference sample stage, unchanged
    samples = read_table(root / "round2" / "samples").to_pandas()
    assert {"logp", "ref_logp", "completion_ids", "prompt_text"} <= set(samples.columns)
    rows = samples.head(8)
    base = AutoModelForCausalLM.from_pretrained(rounds["model"]).eval()
    np.testing.assert_allclose(rows.ref_logp, _teacher_forced(base, rows), atol=1e-3)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(rounds["model"]),
                                       root / "round1" / "adapter").eval()
    np.testing.assert_allclose(rows.logp, _teacher_forced(policy, rows), atol=1e-3)
    assert np.abs(samples.logp - samples.ref_logp).max() > 1e-3  # the adapter moved: two different models


def test_each_folder_records_its_round_and_parent(rounds):
    root = rounds["root"]
    first, second = root / "round1" / "adapter", root / "round2" / "adapter"
    assert "policy_adapter" not in _json(root / "round1" / "samples" / "_manifest.json")["inputs"]
    inputs = _json(root / "round2" / "samples" / "_manifest.json")["inputs"]
    assert inputs["policy_adapter"] == str(first.resolve()) and inputs["round"] == 2
    assert inputs["reference_model"] == str(rounds["model"])  # ref_logp is the base's
    for number, parent in ((1, None), (2, str(first.resolve()))):
        build = _json(root / f"round{number}" / "build" / "ctrl_build.json")
        assert build["round"] == number and build["parent_adapter"] == parent
        assert build["format"] == "pointwise" and build["k"] == 5 and build["planner"]["k"] == 5  # K + 1
        trained = _json(root / f"round{number}" / "adapter" / "ctrl_train.json")
        assert trained["round"] == number and trained["init_adapter"] == parent
        record = _json(root / f"round{number}" / "ctrl_round.json")
        assert record["round"] == number and record["parent_adapter"] == parent
    assert _json(second / "adapter_config.json")["r"] == 4  # round 1's LoRA shape, no --lora-r given


def test_the_reference_build_is_round_zero(rounds, tmp_path):
    from ctrl_offline.stages.build import build_dataset

    build_dataset(rounds["root"] / "ref" / "calib", tmp_path / "b0", format="pointwise", transform="exp", t=3.0,
                  beta=5.0)
    build = _json(tmp_path / "b0" / "ctrl_build.json")
    assert build["round"] == 0 and build["parent_adapter"] is None


def test_round_two_trains_from_round_one_weights(rounds, tmp_path):
    from safetensors.torch import load_file

    root = rounds["root"]
    first = load_file(root / "round1" / "adapter" / "adapter_model.safetensors")
    second = load_file(root / "round2" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert any(not (first[k] == second[k]).all() for k in first)  # trained further ...
    # ... from round 1's weights: a step at learning rate 0 leaves exactly them.
    out = tmp_path / "still"
    assert cli("train", root / "round2" / "build", "--out", out, "--init-adapter", root / "round1" / "adapter",
               "--max_steps", 1, "--learning_rate", 0, "--per_device_train_batch_size", 8, "--use_cpu") == 0
    kept = load_file(out / "adapter_model.safetensors")
    assert kept.keys() == first.keys() and all((kept[k] == first[k]).all() for k in first)
    assert _json(out / "ctrl_train.json")["init_adapter"] == str((root / "round1" / "adapter").resolve())


def test_a_complete_round_is_skipped_and_other_settings_refused(rounds, capsys):
    root = rounds["root"]
    assert cli(*round_args(root, "round2", "--adapter", root / "round1" / "adapter")) == 0
    assert "already complete: samples, scored, calibrated, build, adapter" in capsys.readouterr().out
    assert cli(*round_args(root, "round2", "--adapter", root / "round1" / "adapter", "--num-samples", 2)) == 2
    assert "holds round 2 run with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sample", "train", "round"])
def test_an_adapter_folder_that_does_not_exist_is_named(rounds, tmp_path, capsys, command):
    root, missing = rounds["root"], tmp_path / "nowhere"
    args = {"sample": ["sample", root / "prompts.txt", "--adapter", missing, "--out", tmp_path / "out"],
            "train": ["train", root / "round2" / "build", "--init-adapter", missing, "--out", tmp_path / "out"],
            "round": round_args(root, "unused", "--adapter", missing)}[command]
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (root / "unused").exists()


def test_another_base_model_is_refused(rounds, tmp_path, capsys):
    root = rounds["root"]
    other = build_tiny_model(tmp_path / "other", hidden=32, seed=1)
    adapter = root / "round1" / "adapter"
    assert cli("sample", root / "prompts.txt", "--model", other, "--adapter", adapter, "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert f"was trained on base model {rounds['model']}, not {other}" in err and not (tmp_path / "s").exists()
    assert cli("train", root / "round2" / "build", "--model", other, "--init-adapter", adapter,
               "--out", tmp_path / "a") == 2
    assert f"was trained on base model {rounds['model']}, not {other}" in capsys.readouterr().err
    assert cli(*round_args(root, "other_round", "--model", other)) == 2
    assert f"were drawn from {rounds['model']}, not {other}" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (root / "other_round").exists()


def test_bad_round_settings_are_refused_before_any_work(rounds, tmp_path, capsys):
    root = rounds["root"]
    adapter = root / "round1" / "adapter"
    assert cli("train", root / "round2" / "build", "--init-adapter", adapter, "--lora-r", 8,
               "--out", tmp_path / "a") == 2
    assert "fixes the LoRA shape its weights have; asked for lora_r=8 (the adapter has 4)" in capsys.readouterr().err
    assert cli("sample", root / "prompts.txt", "--adapter", adapter, "--backend", "vllm", "--out", tmp_path / "s") == 2
    assert "sample from an adapter with --backend transformers" in capsys.readouterr().err
    # Round 1 from the base with the reference samples' own seed would draw them again.
    assert cli(*round_args(root, "same_seed", "--seed", -1)) == 2
    assert "the seed the reference samples" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "s").exists() and not (root / "same_seed").exists()
