"""The recipes (recipes/hh_bon.py, hh_won.py over recipes/ctrl_pipeline.py): config parsing, the resumable run,
refusals, push checks."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctrl_offline.models.hh import EMBEDDED_HH, dialogue_to_messages, hh_prompts
from ctrl_offline.pipeline.recipe import RecipeError, parse_recipe_args
from tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY_BON = ROOT / "recipes" / "configs" / "hh_bon_tiny.yaml"
TINY_WON = ROOT / "recipes" / "configs" / "hh_won_tiny.yaml"


def _load_pipeline():
    """recipes/ctrl_pipeline.py, the script the recipes run (not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("ctrl_pipeline", ROOT / "recipes" / "ctrl_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ctrl_pipeline", module)
    spec.loader.exec_module(module)
    return module


pipeline = _load_pipeline()
main = pipeline.main


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama whose tokenizer has a (minimal) chat template, as HH prompts are chats."""
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("recipe") / "model", hidden=32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    return path


#: The offline pipeline (soft-label DPO on the reference samples' pairs) instead of the tiny config's on-policy round.
OFFLINE = ("--rounds", 0, "--data_format", "pairs", "--ctrl_loss", "dpo")


def tiny_args(model, out, *extra):
    """The tiny config on the tiny random model: seconds instead of minutes."""
    return ["--config", str(TINY_BON), "--output_dir", str(out), "--model_name_or_path", str(model),
            "--reward_model", "tiny_models:word_count_reward", "--keep_unfinished", "true",
            "--num_train_prompts", "6", "--num_eval_prompts", "4", "--max_new_tokens", "6", "--max_steps", "2",
            "--eval_policy_samples", "4", "--eval_reference_samples", "4", *map(str, extra)]


def test_hh_dialogues_become_chat_prompts():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: An apple."
    assert dialogue_to_messages(text) == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a fruit."}]
    with pytest.raises(ValueError, match="not an HH dialogue"):
        dialogue_to_messages("just text")
    prompts = hh_prompts(EMBEDDED_HH, ["helpful-base", "harmless-base"], "test")
    assert len(prompts) == 24 and all(p[-1]["role"] == "user" for p in prompts)
    assert any(len(p) == 3 for p in prompts)  # multi-turn prompts keep the earlier turns
    assert len(hh_prompts(EMBEDDED_HH, ["helpful-base"], "train", limit=5)) == 5


def test_offline_hub_dataset_says_how_to_use_a_local_copy():
    with pytest.raises(OSError) as info:
        hh_prompts("Anthropic/hh-rlhf", ["helpful-base"], "train", limit=2)
    assert "offline" in str(info.value) and "local folder" in str(info.value) and EMBEDDED_HH in str(info.value)


def test_yaml_and_command_line_overrides_and_unknown_keys(tmp_path):
    recipe, model, training = parse_recipe_args(["--config", str(TINY_WON), "--output_dir", str(tmp_path),
                                                 "--learning_rate", "0.01", "--eval_n", "1", "8",
                                                 "--eval_policy_samples", "8", "--eval_reference_samples", "10"])
    assert (recipe.inference, recipe.transform, recipe.dataset_subsets) == ("won", "negexp", ["harmless-base"])
    assert model.model_name_or_path == "embedded:smollm2" and model.load_in_4bit is False
    assert training.learning_rate == 0.01 and recipe.eval_n == [1, 8]  # the command line wins over the file
    assert (recipe.eval_policy_samples, recipe.eval_reference_samples) == (8, 10)
    # The tiny config's 4 evaluation samples per side cannot hold N = 8.
    with pytest.raises(RecipeError, match=r"eval_policy_samples must be an integer ≥ max\(eval_n\) = 8"):
        parse_recipe_args(["--config", str(TINY_WON), "--eval_n", "1", "8"])
    with pytest.raises(RecipeError, match=r"unknown eval_selectors \['median'\]; choose from bon, won"):
        parse_recipe_args(["--config", str(TINY_WON), "--eval_selectors", "bon", "median"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_BON.read_text() + "lerning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"unknown config key 'lerning_rate' in .*bad.yaml; did you mean 'learning_rate'\?"):
        parse_recipe_args(["--config", str(bad)])
    with pytest.raises(RecipeError, match=r"'num_sample' on the command line; did you mean 'num_samples'\?"):
        parse_recipe_args(["--config", str(TINY_BON), "--num_sample", "4"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("eval_n: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe_args(["--config", str(broken)])
    with pytest.raises(RecipeError, match="unknown inference 'median'; choose from bon, won"):
        parse_recipe_args(["--config", str(TINY_BON), "--inference", "median"])


def test_a_script_without_config_reads_its_own_yaml_and_holds_no_settings():
    own = ROOT / "recipes" / "configs" / "hh_won.yaml"
    assert pipeline._with_config(["--output_dir", "x"], own) == ["--config", str(own), "--output_dir", "x"]
    assert pipeline._with_config(["--config", "a.yaml"], own) == ["--config", "a.yaml"]
    assert pipeline._with_config(["--config=a.yaml"], own) == ["--config=a.yaml"]
    recipe, model, training = parse_recipe_args(pipeline._with_config([], own))
    assert (recipe.inference, recipe.transform, recipe.dataset_subsets) == ("won", "negexp", ["harmless-base"])
    assert model.model_name_or_path == "HuggingFaceTB/SmolLM2-1.7B-Instruct" and training.output_dir == "runs/hh_won"
    for name in ("hh_bon", "hh_won"):  # the YAML is the one source of settings: the scripts only name theirs
        recipe, _, training = parse_recipe_args(["--config", str(ROOT / "recipes" / "configs" / f"{name}.yaml")])
        assert recipe.inference == name[3:] and training.output_dir == f"runs/{name}"  # the full configs parse
        text = (ROOT / "recipes" / f"{name}.py").read_text()
        assert "DEFAULTS" not in text and f'"configs" / "{name}.yaml"' in text


def test_recipe_trains_grouped_rows(tiny_chat_model, tmp_path):
    """data_format: grouped builds one row per prompt and trains it with the grouped trainer (any loss)."""
    from ctrl_offline.io.files import read_build_info

    out = tmp_path / "grouped"
    assert main(tiny_args(tiny_chat_model, out, "--rounds", 0, "--data_format", "grouped", "--ctrl_loss", "dpo")) == 0
    assert read_build_info(out / "data")["format"] == "grouped"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["training"] == {"mode": "offline", "data_format": "grouped", "adapter": str(out / "adapter")}
    with pytest.raises(RecipeError, match="rounds: 1 trains pointwise"):
        parse_recipe_args(["--config", str(TINY_BON), "--data_format", "grouped", "--ctrl_loss", "dpo"])


def test_recipe_runs_end_to_end_then_resumes_and_guards_its_folder(tiny_chat_model, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="ctrl_offline.training.trainer"):
        assert main(tiny_args(tiny_chat_model, out, *OFFLINE)) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    report = json.loads((out / "eval" / "report.json").read_text())
    assert {(r["selector"], r["n"]) for r in report["win_rates"]} == {(s, n) for s in ("bon", "won") for n in (1, 2, 4)}
    # The powered evaluation: m = M = 4 (as tiny_args asks), the reference drawn once into the run's pool.
    assert {(r["policy_samples"], r["reference_samples"]) for r in report["win_rates"]} == {(4, 4)}
    assert (out / "eval_reference_pool").is_dir()
    build = json.loads((out / "data" / "ctrl_build.json").read_text())
    assert build["transform"] == "exp"  # planned for BoN-4
    assert report["prompts"]["overlap_with_training"] == 0
    printed = capsys.readouterr().out
    assert "bon-4" in printed and "KL(aligned" in printed
    assert report["training"] == {"mode": "offline", "data_format": "pairs", "adapter": str(out / "adapter")}
    assert "training: offline, on the reference samples (pairs)" in printed
    # β travels with the data: the trainer read it from the build, and the summary and report give both βs.
    assert f"beta={build['beta']:.6g} from {out / 'data' / 'ctrl_build.json'}" in caplog.text
    assert {k: report["build"][k] for k in ("beta", "phi_scale", "unscaled_beta")} == \
        {k: build[k] for k in ("beta", "phi_scale", "unscaled_beta")}
    assert build["unscaled_beta"] == pytest.approx(build["beta"] * build["phi_scale"])
    assert f"β={build['beta']:.3g} (Φ rescaled by " in printed and "; raw-Φ β=" in printed
    assert "Φ rescaled by" in (out / "eval" / "report.md").read_text()

    # Same config again: every stage is skipped and nothing is rewritten.
    adapter_time = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO", logger=pipeline.logger.name):
        assert main(tiny_args(tiny_chat_model, out, *OFFLINE)) == 0
    skipped = {r.getMessage().split("]")[0].lstrip("[") for r in caplog.records if "skipped" in r.getMessage()}
    assert skipped == {"prompts", "sample", "score", "calibrate", "build", "train", "evaluate"}
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_time

    # Another config into the same folder: refused, naming what changed, unless --overwrite.
    assert main(tiny_args(tiny_chat_model, out, *OFFLINE, "--learning_rate", "0.5")) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "learning_rate" in err and "--overwrite" in err
    assert main(tiny_args(tiny_chat_model, out, *OFFLINE, "--learning_rate", "0.5", "--overwrite", "true")) == 0
    assert json.loads((out / "recipe_config.json").read_text())["training"]["learning_rate"] == 0.5

    # The planner's raw-Φ β passed to the trainer is refused, saying which β the trainer needs.
    capsys.readouterr()
    assert main(tiny_args(tiny_chat_model, tmp_path / "raw", *OFFLINE, "--beta", build["unscaled_beta"])) == 2
    err = capsys.readouterr().err
    assert "You passed the raw-Φ β (unscaled_beta" in err and f"records beta={build['beta']!r}" in err


def test_recipe_trains_in_on_policy_rounds_and_resumes_at_the_round_it_was_in(tiny_chat_model, tmp_path, capsys,
                                                                              caplog):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_chat_model, out, "--rounds", 2)) == 0
    first, second = out / "round1" / "adapter", out / "round2" / "adapter"
    assert not (out / "data").exists() and not (out / "adapter").exists()  # no offline build or training
    # Round 1 sampled the base (a seed of its own) and trained a fresh adapter; round 2 sampled round 1's adapter
    # and trained it further.
    reference_seed = json.loads((out / "samples" / "_manifest.json").read_text())["settings"]["seed"]
    records = [json.loads((out / f"round{n}" / "ctrl_round.json").read_text()) for n in (1, 2)]
    assert [r["seed"] for r in records] == [reference_seed + 1, reference_seed + 2]
    assert [r["parent_adapter"] for r in records] == [None, str(first.resolve())]
    assert all(r["sampling"]["k"] == 4 for r in records)  # round_samples: num_samples by default
    trained = [json.loads((folder / "ctrl_train.json").read_text()) for folder in (first, second)]
    assert [t["init_adapter"] for t in trained] == [None, str(first.resolve())]
    assert [t["round"] for t in trained] == [1, 2] and {t["loss"] for t in trained} == {"pointwise"}
    build = json.loads((out / "round2" / "build" / "ctrl_build.json").read_text())
    assert build["format"] == "pointwise" and build["parent_adapter"] == str(first.resolve())
    assert build["transform"] == "exp"  # planned for BoN-4, as the offline build is
    assert (out / "round2" / "train" / "kl_budget.json").is_file()  # each round held to the KL budget
    # The evaluation reads round 2's adapter; the report and the summary say how it was trained.
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["adapter"] == str(second)
    assert report["training"] == {"mode": "on-policy", "round": 2, "rounds": 2, "round_samples": 4,
                                  "adapter": str(second), "init_adapter": str(first.resolve())}
    line = "training: on-policy, round 2 of 2 (4 policy samples per prompt a round"
    assert f"- {line}" in (out / "eval" / "report.md").read_text()
    printed = capsys.readouterr().out
    assert line in printed and f"adapter: {second}" in printed

    # Again: completed rounds are skipped, nothing is retrained.
    trained_at = (second / "adapter_model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger=pipeline.logger.name):
        assert main(tiny_args(tiny_chat_model, out, "--rounds", 2)) == 0
    skipped = {r.getMessage().split("]")[0].lstrip("[") for r in caplog.records if "skipped" in r.getMessage()}
    assert skipped == {"prompts", "sample", "score", "calibrate", "round 1", "round 2", "evaluate"}
    assert (second / "adapter_model.safetensors").stat().st_mtime_ns == trained_at
    assert (out / "eval" / "report.md").read_text().count("- training: ") == 1

    # A run killed in round 2's training resumes there: round 1 skipped, round 2's finished stages kept.
    shutil.rmtree(second)
    shutil.rmtree(out / "eval")
    caplog.clear()
    with caplog.at_level("INFO", logger=pipeline.logger.name):
        assert main(tiny_args(tiny_chat_model, out, "--rounds", 2)) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "[round 1] done already, skipped" in messages and "[round 2] running" in messages
    assert "[round 2] resumed: samples, scored, calibrated, build complete already" in messages
    assert json.loads((second / "ctrl_train.json").read_text())["init_adapter"] == str(first.resolve())
    assert json.loads((out / "eval" / "report.json").read_text())["adapter"] == str(second)


def test_rounds_keys_in_the_configs_and_their_refusals(tmp_path, monkeypatch):
    for name, rounds in (("hh_bon", 3), ("hh_won", 3), ("hh_bon_tiny", 1), ("hh_won_tiny", 1)):
        recipe, _, training = parse_recipe_args(["--config", str(ROOT / "recipes" / "configs" / f"{name}.yaml")])
        assert (recipe.rounds, recipe.data_format, training.ctrl_loss) == (rounds, "pointwise", "pointwise")
        assert recipe.round_samples == recipe.num_samples  # the default
        assert type(training).__name__ == "CTRLPointwiseConfig"  # pointwise recipes read TRL's SFTConfig keys
    recipe, _, training = parse_recipe_args(["--config", str(TINY_BON), "--round_samples", "2"])
    assert recipe.round_samples == 2
    recipe, _, training = parse_recipe_args(["--config", str(TINY_BON), *map(str, OFFLINE)])
    assert (recipe.rounds, recipe.data_format, training.ctrl_loss, type(training).__name__) == \
        (0, "pairs", "dpo", "CTRLConfig")

    with pytest.raises(RecipeError, match=r"rounds: 1 trains pointwise targets on the policy's own samples, not pairs: "
                                          r"set data_format: pointwise and ctrl_loss: pointwise, or rounds: 0"):
        parse_recipe_args(["--config", str(TINY_BON), "--data_format", "pairs"])
    with pytest.raises(RecipeError, match=r"ctrl_loss 'dpo' trains pairs rows, but rounds: 1 trains pointwise .*set "
                                          r"ctrl_loss: pointwise, or rounds: 0 \(with data_format: pairs\)"):
        parse_recipe_args(["--config", str(TINY_BON), "--ctrl_loss", "dpo"])
    with pytest.raises(RecipeError, match=r"rounds must be an integer ≥ 0 \(0: the offline pipeline\), got -1"):
        parse_recipe_args(["--config", str(TINY_BON), "--rounds", "-1"])
    with pytest.raises(RecipeError, match="round_samples must be an integer ≥ 1, got 0"):
        parse_recipe_args(["--config", str(TINY_BON), "--round_samples", "0"])
    with pytest.raises(RecipeError, match=r"ctrl_loss 'dpo' trains pairs rows, but data_format is pointwise: set "
                                          r"ctrl_loss: pointwise, or data_format: pairs"):
        parse_recipe_args(["--config", str(TINY_BON), "--rounds", "0", "--ctrl_loss", "dpo"])

    # Rounds run in one process: a multi-process launch is refused before any work.
    import accelerate

    class TwoProcesses:
        num_processes, is_main_process = 2, True

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    recipe, model, training = parse_recipe_args(["--config", str(TINY_BON), "--output_dir", str(tmp_path / "run")])
    with pytest.raises(RecipeError, match="rounds: 1 runs in one process .* or set rounds: 0"):
        pipeline.run_recipe(recipe, model, training)
    assert not (tmp_path / "run").exists()


def test_push_without_a_token_fails_before_any_work(tiny_chat_model, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    out = tmp_path / "run"
    assert main(tiny_args(tiny_chat_model, out, "--push_to_hub", "true", "--hub_model_id", "me/ctrl")) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("config,script", [(TINY_BON, "hh_bon.py"), (TINY_WON, "hh_won.py")])
def test_tiny_config_on_the_embedded_model_under_accelerate(config, script, tmp_path):
    """The documented CPU run, as users launch it: accelerate, the embedded SmolLM2, VADER (minutes)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "recipes" / "accelerate" / "cpu.yaml"), str(ROOT / "recipes" / script),
                           "--config", str(config), "--output_dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "round1" / "adapter" / "adapter_config.json").exists()  # the tiny configs train one on-policy round
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["kl"]["value"] == report["kl"]["value"] and "KL(aligned" in proc.stdout


def test_recipe_pushes_the_finished_run_to_the_hub(tiny_chat_model, tmp_path):
    """Push settings do not change results: a finished run re-launched with --push_to_hub only pushes."""
    from hub_standin import StandInHub

    out = tmp_path / "run"
    assert main(tiny_args(tiny_chat_model, out)) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    tests = Path(__file__).parent
    env.update(HF_TOKEN="hf_recipe_secret", HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(tests)]))
    with StandInHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "hh_bon.py"),
                               *tiny_args(tiny_chat_model, out, "--push_to_hub", "true", "--hub_model_id", "me/ctrl-tiny",
                                          "--push_dataset", "true")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        files = hub.committed_files()
    card = files["README.md"].decode()
    assert "adapter_config.json" in files and any(name.endswith(".png") for name in files)
    assert "| bon | 4 |" in card and "vader" not in card and "tiny_models:word_count_reward" in card
    assert "hh_bon.py" in card  # the reproducing command
    assert "| β (`beta`, for Φ rescaled to span 1) |" in card and "| raw-Φ β (`unscaled_beta`) |" in card
    assert any(name.endswith(".arrow") for name in files)  # the dataset went up too
    assert "hf_recipe_secret" not in proc.stdout + proc.stderr
    assert "[round 1] done already, skipped" in proc.stderr  # the tiny config's one round: its adapter went up


def test_recipe_on_a_plain_text_prompt_file_and_a_function_reward(tiny_chat_model, tmp_path):
    """Any prompt source `ctrl-data sample` takes: a .txt file with no held-out split gets one by a seeded shuffle;
    the reward is a `module:function`."""
    from tiny_models import WORDS

    words = np.random.default_rng(3).choice(WORDS, size=(30, 3))
    (tmp_path / "prompts.txt").write_text("".join(" ".join(w) + " \n" for w in words))
    out = tmp_path / "run"
    assert main(tiny_args(tiny_chat_model, out, "--prompts", tmp_path / "prompts.txt", "--num_eval_prompts", 5,
                          "--kl_eval_prompts", 3)) == 0
    read = lambda split: [json.loads(line)["prompt"] for line in (out / "prompts" / split / "prompts.jsonl").open()]
    train, held_out = read("train"), read("eval")
    assert len(train) == 6 and len(held_out) == 5 and not set(train) & set(held_out)
    assert set(train) | set(held_out) <= {" ".join(w) + " " for w in words}
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["prompts"]["overlap_with_training"] == 0 and report["build"]["transform"] == "exp"
    kl = json.loads((out / "round1" / "train" / "kl_budget.json").read_text())  # the round's training was held
    assert kl["prompts"] == 3 and "prompts.txt, past the training prompts" in kl["prompts_source"]


def test_prompt_splits_of_any_source(tmp_path):
    import datasets

    from ctrl_offline.pipeline.prompts import prompt_splits as _prompt_splits
    from ctrl_offline.pipeline.recipe import RecipeConfig

    lines = [f"question {i} " for i in range(20)]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    recipe = RecipeConfig(prompts=str(tmp_path / "p.txt"), num_train_prompts=8, num_eval_prompts=4)
    train, held_out = _prompt_splits(recipe, seed=0)
    assert (len(train), len(held_out)) == (8, 4) and not set(train) & set(held_out)
    assert _prompt_splits(recipe, seed=0) == (train, held_out)  # seeded
    assert _prompt_splits(recipe, seed=1) != (train, held_out)
    # A datasets folder with a test split: that split is held out, the train split is trained in order.
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines[:10]}),
                          "test": datasets.Dataset.from_dict({"text": lines[10:]})}).save_to_disk(folder)
    recipe = RecipeConfig(prompts=str(folder), prompt_column="text", num_train_prompts=8, num_eval_prompts=4)
    assert _prompt_splits(recipe, seed=0) == (lines[:8], lines[10:14])
    # An explicit held-out source; its prompts are never trained on.
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in lines[:3]))
    recipe = RecipeConfig(prompts=str(folder), eval_prompts=str(tmp_path / "eval.jsonl"), prompt_column="text",
                          num_train_prompts=8, num_eval_prompts=4)
    assert _prompt_splits(recipe, seed=0) == (lines[3:10], lines[:3])
    # Empty sources say so.
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(Exception, match="empty|no prompts"):
        _prompt_splits(RecipeConfig(prompts=str(tmp_path / "empty.txt")), seed=0)
