"""`ctrl-data train`: the shell pipeline sample → score → calibrate → build → train → eval on a tiny model, with
nothing copied by hand, and the train stage's resume, KL budget and bad-input behaviour."""

import json
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
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "--learning_rate", "1e-3",
        "--logging_steps", "1"]


def shell(*args, cwd):
    """`ctrl-data ARGS` in a fresh process, as a user's shell runs it (the tests folder importable for the reward)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "data_tools", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ctrl-data {args[0]} failed:\n{proc.stderr[-3000:]}"


def cli(*args, cwd=None):
    """`ctrl-data ARGS` in this process (what the shell runs, without the interpreter start-up)."""
    previous = os.getcwd()
    os.chdir(cwd or previous)
    try:
        code = main([str(a) for a in args])
    finally:
        os.chdir(previous)
    assert cwd is None or code == 0, f"ctrl-data {args[0]} exited {code}"
    return code


def chain(run, root: Path) -> Path:
    """sample → score → calibrate → build → train → eval in ``root``, relative paths only: nothing is passed from
    one stage to the next but folder names (no β, loss or model path copied by hand). Returns the tiny model."""
    rng = np.random.default_rng(1)
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 5))) + " " for _ in range(16)]
    (root / "prompts.txt").write_text("\n".join(prompts[:12]) + "\n")
    (root / "heldout.txt").write_text("\n".join(prompts[12:]) + "\n")
    model = build_tiny_model(root / "lm", hidden=32)
    run("sample", "prompts.txt", "--model", model, "--out", "samples", "--num-samples", 4, "--max-new-tokens", 6, cwd=root)
    run("score", "samples", "--reward", "words=tiny_models:word_count_reward", "--out", "scored", cwd=root)
    run("calibrate", "scored", "--out", "calib", cwd=root)
    run("build", "calib", "--inference", "bon", "--inference-n", 4, "--kl-budget", 0.5, "--keep-unfinished", "--out", "pairs", cwd=root)
    run("train", "pairs", "--out", "adapter", *FAST, cwd=root)
    run("eval", "heldout.txt", "--model", model, "--adapter", "adapter", "--reward",
        "words=tiny_models:word_count_reward", "--eval-n", 1, 2, "--max-new-tokens", 6, "--out", "report", cwd=root)
    return model


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    return {"root": root, "model": chain(cli, root)}


def check_pipeline(root: Path, model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    build = json.loads((root / "pairs" / "ctrl_build.json").read_text())
    trained = json.loads((root / "adapter" / "ctrl_train.json").read_text())
    # The loss the K-aware plan was made for and the build's β, with nothing passed by hand.
    assert trained["loss"] == build["planner"]["estimator"]["loss"] == "dpo"
    assert trained["beta"] == build["beta"]
    assert trained["base_model"] == str(model) and trained["steps"] == 2
    assert json.loads((root / "adapter" / "ctrl_build.json").read_text()) == build  # beside the adapter
    assert not (root / "adapter.checkpoints").exists() and not (root / "adapter.partial").exists()
    # The adapter is a standard PEFT folder whose weights moved.
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), root / "adapter")
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)
    # eval read the build through the adapter folder.
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["build"]["beta"] == build["beta"] and report["build"]["transform"] == build["transform"]


def test_pipeline_trains_the_build_and_eval_finds_it(pipeline):
    check_pipeline(pipeline["root"], pipeline["model"])


@pytest.mark.slow
def test_the_same_pipeline_from_the_shell(tmp_path):
    chain(shell, tmp_path)
    check_pipeline(tmp_path, tmp_path / "lm")




def test_resumes_from_its_checkpoints_and_refuses_other_settings(pipeline, tmp_path, capsys):
    root = pipeline["root"]
    out = tmp_path / "adapter"
    args = ["train", root / "pairs", "--out", out, *FAST, "--save_steps", "1", "--keep-checkpoints"]
    assert cli(*args) == 0
    assert (tmp_path / "adapter.checkpoints" / "checkpoint-2").is_dir()
    # A run killed after its last checkpoint: the adapter is gone, the checkpoints remain. Mark the
    # checkpoint's weights (LoRA B zeroed): a resumed run trains no further step and delivers them.
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.rmtree(out)
    checkpoint = tmp_path / "adapter.checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    weights = load_file(checkpoint)
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, checkpoint)
    assert cli(*args) == 0
    resumed = load_file(out / "adapter_model.safetensors")
    assert all(float(v.abs().max()) == 0 for k, v in resumed.items() if "lora_B" in k)
    # Other training arguments against those checkpoints are refused, and nothing is written.
    shutil.rmtree(out)
    assert cli("train", root / "pairs", "--out", out, *FAST, "--learning_rate", "5e-4", "--save_steps", "1") == 2
    assert "checkpoints of another training run" in capsys.readouterr().err
    assert not out.exists()


def test_holds_the_planned_kl_on_held_out_prompts(pipeline, tmp_path):
    root = pipeline["root"]
    out = tmp_path / "adapter"
    assert cli("train", root / "pairs", "--out", out, "--kl-prompts", root / "heldout.txt", "--kl-budget", 0.05,
               "--kl-every-n-steps", 1, "--kl-eval-samples", 2, "--kl-max-new-tokens", 6, "--kl-tolerance", 0.02,
               "--kl-max-bisections", 2, *FAST[2:], "--max_steps", 4, "--learning_rate", 3e-2) == 0
    kl = json.loads((out / "ctrl_train.json").read_text())["kl"]
    assert kl["budget"] == 0.05 and kl["prompts"] == 4 and kl["history"]
    assert (kl["tolerance"], kl["max_bisections"]) == (0.02, 2)
    assert sum("alpha" in h for h in kl["history"]) <= 2  # the bisection's estimates
    if kl["reached"]:
        assert abs(kl["final"]["value"] - 0.05) < 0.05
    else:
        assert all(h["kl"] <= 0.05 + 1e-9 for h in kl["history"])


@pytest.fixture()
def fake_build(tmp_path):
    """A build folder's metadata alone: enough for every check made before a model is loaded."""
    import datasets

    data = tmp_path / "data"
    datasets.Dataset.from_dict({"prompt": ["a "], "chosen": ["b"], "rejected": ["c"], "label": [0.7]}).save_to_disk(data)
    info = {"format": "pairs", "transform": "exp", "t": 5.0, "beta": 0.3, "stored_ref_logps": True,
            "reference_model": "org/reference", "planner": {"kl": 0.5, "estimator": {"loss": "dpo"}}}
    (data / "ctrl_build.json").write_text(json.dumps(info))
    return data


@pytest.mark.parametrize("extra, message", [
    (["--loss", "pointwise"], "a pairs build cannot train loss 'pointwise'"),
    (["--model", "org/other"], "stores reference log-probs of org/reference, not of org/other"),
    (["--kl-budget", "0.3"], "needs held-out prompts"),
    (["--learning_rat", "1e-3"], "unrecognized argument(s): --learning_rat"),
    (["--output_dir", "x"], "--output_dir is set by ctrl-data train (--out)"),
    (["--beta", "0.2"], "--beta is set by ctrl-data train (the build)"),
])
def test_bad_input_is_one_line_and_writes_nothing(fake_build, tmp_path, capsys, extra, message):
    out = tmp_path / "adapter"
    assert cli("train", fake_build, "--out", out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("ctrl-data train: error:") and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "adapter.checkpoints").exists()


@pytest.mark.parametrize("stored, message", [
    ({"token_ids": True, "stored_ref_logps": False}, "stores token ids of org/reference"),
    ({"token_ids": True}, "stores token ids and reference log-probs of org/reference"),
])
def test_sampled_token_ids_train_only_their_reference_model(fake_build, tmp_path, capsys, stored, message):
    """The ids are the reference tokenizer's: another model would train on other tokens."""
    info = json.loads((fake_build / "ctrl_build.json").read_text())
    (fake_build / "ctrl_build.json").write_text(json.dumps({**info, **stored}))
    assert cli("train", fake_build, "--out", tmp_path / "adapter", "--model", "org/other") == 2
    assert f"{message}, not of org/other" in capsys.readouterr().err


def test_not_a_build_folder_and_an_existing_adapter(fake_build, tmp_path, capsys):
    assert cli("train", tmp_path / "nowhere", "--out", tmp_path / "a") == 2
    assert "is not a `ctrl-data build` output" in capsys.readouterr().err
    out = tmp_path / "taken"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    assert cli("train", fake_build, "--out", out) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # TRL arguments pass through `train` only
        cli("build", fake_build, "--out", tmp_path / "b", "--learning_rate", "1")
    assert exit_.value.code == 2 and "unrecognized arguments: --learning_rate" in capsys.readouterr().err


def test_bad_input_along_the_shell_pipeline_leaves_nothing(pipeline, tmp_path, capsys):
    """An empty prompt file, a reward that cannot be imported, a base model that does not exist: one line, exit
    status 2, no output folder (a half-made one would refuse the corrected re-run as 'another run')."""
    root = pipeline["root"]
    (tmp_path / "empty.txt").write_text("")
    assert cli("sample", tmp_path / "empty.txt", "--model", pipeline["model"], "--out", tmp_path / "s") == 2
    assert "no prompts in" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert cli("score", root / "samples", "--reward", "no_such_module:reward", "--out", tmp_path / "scored") == 2
    assert "cannot import reward function 'no_such_module:reward'" in capsys.readouterr().err
    assert not (tmp_path / "scored").exists()
    assert cli("train", root / "pairs", "--out", tmp_path / "adapter", "--model", tmp_path / "no-model") == 2
    err = capsys.readouterr().err  # the build's token ids and log-probs are its reference model's
    assert err.count("\n") == 1 and "stores token ids and reference log-probs of" in err
    # Text-only rows (no token ids or log-probs stored) would train another model: it must exist.
    import shutil

    shutil.copytree(root / "pairs", tmp_path / "text")
    info = json.loads((tmp_path / "text" / "ctrl_build.json").read_text())
    (tmp_path / "text" / "ctrl_build.json").write_text(json.dumps({**info, "token_ids": False,
                                                                    "stored_ref_logps": False}))
    assert cli("train", tmp_path / "text", "--out", tmp_path / "adapter", "--model", tmp_path / "no-model") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load model" in err
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter.checkpoints").exists()
