"""End to end on CPU: tiny LM and tiny reward model, 20 prompts, K = 4: sample → score → calibrate → build."""

import json
import re
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import load_from_disk

from ctrl_offline.io.files import read_table
from data_tools.cli import main
from tiny_models import WORDS, build_tiny_model, build_tiny_reward_model, build_tokenizer

K = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 6))) + " " for _ in range(20)]
    with open(root / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return {
        "root": root,
        "prompts": root / "prompts.jsonl",
        "model": build_tiny_model(root / "lm", hidden=64),
        "rm": build_tiny_reward_model(root / "rm"),
    }


def cli(*args):
    return main([str(a) for a in args])


def sample_args(assets, out):
    return ["sample", assets["prompts"], "--model", assets["model"], "--out", out, "--num-samples", K, "--max-new-tokens", 8,
            "--shard-size", 4, "--sampling-batch-size", 4, "--seed", 3]


@pytest.fixture(scope="module")
def pipeline(assets):
    root = assets["root"]
    assert cli(*sample_args(assets, root / "samples")) == 0
    assert cli("score", root / "samples", "--reward", f"rm={assets['rm']}",
               "--reward", "words=tiny_models:word_count_reward", "--out", root / "scored") == 0
    assert cli("calibrate", root / "scored", "--out", root / "calib") == 0
    assert cli("build", root / "calib", "--data-format", "pairs", "--inference", "bon", "--inference-n", 4, "--kl-budget", 0.5,
               "--keep-unfinished", "--out", root / "pairs") == 0
    assert cli("build", root / "calib", "--data-format", "pointwise", "--transform", "exp", "--t", 3, "--beta", 5,
               "--keep-unfinished", "--out", root / "pointwise") == 0
    return root


def test_samples_have_the_documented_columns_and_logps(pipeline, assets):
    samples = read_table(pipeline / "samples").to_pandas()
    assert len(samples) == 20 * K and samples.prompt_id.nunique() == 20
    assert {"prompt_id", "prompt", "prompt_text", "completion", "completion_ids", "sample_idx", "ref_logp",
            "num_tokens", "finished"} <= set(samples.columns)
    assert sorted(samples.groupby("prompt_id").sample_idx.apply(sorted).iloc[0]) == list(range(K))
    assert (samples.num_tokens == samples.completion_ids.apply(len)).all()
    # ref_logp is the teacher-forced log-prob of exactly the sampled ids under the reference.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    tok = build_tokenizer()
    for _, row in samples.head(6).iterrows():
        prompt_token_ids = tok(row.prompt_text)["input_ids"]
        ids = torch.tensor([prompt_token_ids + list(row.completion_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = logp[len(prompt_token_ids) - 1:].gather(1, ids[0, len(prompt_token_ids):, None]).sum().item()
        assert row.ref_logp == pytest.approx(expected, abs=1e-3)


def test_scores_calibration_and_builds(pipeline):
    scored = read_table(pipeline / "scored").to_pandas()
    assert {"reward", "reward_rm", "reward_words"} <= set(scored.columns)
    np.testing.assert_array_equal(scored.reward, scored.reward_rm)
    np.testing.assert_array_equal(scored.reward_words, scored.completion.str.split().apply(len))

    calibrated = pq.read_table(pipeline / "calib" / "calibrated.parquet").to_pandas()
    assert len(calibrated) == 20 * K and calibrated.u.between(0, 1).all()
    # Leave-one-out mid-rank within each prompt: u = (rank − 1)/(K − 1).
    rank = calibrated.groupby("prompt_id").reward.rank(method="average")
    np.testing.assert_allclose(calibrated.u, (rank - 1) / (K - 1))

    pairs = load_from_disk(str(pipeline / "pairs"))
    assert {"prompt", "chosen", "rejected", "target_phi_gap", "label", "weight"} <= set(pairs.column_names)
    usable = calibrated[calibrated.completion.str.strip() != ""]  # empty completions are left out
    ties = usable.groupby("prompt_id").u.apply(lambda s: sum(a == b for i, a in enumerate(s) for b in list(s)[i + 1:]))
    sizes = usable.groupby("prompt_id").size()
    assert len(pairs) == (sizes * (sizes - 1) // 2).sum() - ties.sum()  # all pairs but the tied ones
    assert all(m > 0 for m in pairs["target_phi_gap"]) and all(0.5 < p <= 1 for p in pairs["label"])
    meta = json.loads((pipeline / "pairs" / "ctrl_build.json").read_text())
    assert meta["transform"] == "exp" and meta["planner"]["inference"] == "bon"

    pointwise = load_from_disk(str(pipeline / "pointwise"))
    assert {"prompt", "completion", "target"} <= set(pointwise.column_names)
    assert len(pointwise) == len(usable)


def retokenises(tok, prompt_text, completion, ids, finished) -> bool:
    """Whether tokenising the text as TRL does (prompt + completion, + EOS if finished) gives back the sampled ids."""
    prompt = tok(prompt_text)["input_ids"]
    return tok(prompt_text + completion + (tok.eos_token if finished else ""))["input_ids"] == prompt + list(ids)


class Forwards:
    """Counts the forward passes of a model, and those run with its LoRA adapters disabled: the reference's."""

    def __init__(self, model):
        self.total = self.reference = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.total += 1
        self.reference += any(m.disable_adapters for m in module.modules() if isinstance(m, BaseTunerLayer))


@pytest.mark.parametrize("fmt", ["pairs", "pointwise"])
def test_sampled_ids_that_do_not_retokenise_keep_their_reference_logps(pipeline, assets, tmp_path, fmt):
    """Rows carry the sampled token ids: the build keeps the stored reference log-probs however the text
    tokenises, and the trainer trains those ids, with no reference forward pass at all."""
    from ctrl_offline.training.config import CTRLConfig, CTRLPointwiseConfig
    from ctrl_offline.models.generation import completion_logps
    from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.stages.build import build_dataset
    from ctrl_offline.training.trainer import CTRLPointwiseTrainer, CTRLTrainer, _pointwise_logps, _sequence_logps

    tok = build_tokenizer()
    table = pq.read_table(pipeline / "calib" / "calibrated.parquet")
    rows = table.to_pylist()
    # The random tiny model samples <pad>/<unk> mid-text, which decoding drops: some of the pipeline's own
    # completions already do not re-tokenise, and its builds kept their reference log-probs all the same.
    assert not all(retokenises(tok, r["prompt_text"], r["completion"], r["completion_ids"], r["finished"])
                   for r in rows if r["completion"].strip())
    for build in ("pairs", "pointwise"):
        meta = json.loads((pipeline / build / "ctrl_build.json").read_text())
        assert meta["stored_ref_logps"] and meta["token_ids"]
    # Glue every prompt to its completion ("… cat" + "sat …" reads "catsat", one <unk>): no row re-tokenises.
    # The prompts' own ids do not change (the tokenizer splits on whitespace), so the stored values still hold.
    glued = table.set_column(table.column_names.index("prompt_text"), "prompt_text",
                             pa.array([p.rstrip() for p in table["prompt_text"].to_pylist()]))
    assert not any(retokenises(tok, r["prompt_text"], r["completion"], r["completion_ids"], r["finished"])
                   for r in glued.to_pylist() if r["completion"].strip())
    (tmp_path / "glued").mkdir()
    pq.write_table(glued.replace_schema_metadata(table.schema.metadata), tmp_path / "glued" / "calibrated.parquet")
    build_dataset(tmp_path / "glued", tmp_path / "build", format=fmt, transform="identity", beta=0.1)
    meta = json.loads((tmp_path / "build" / "ctrl_build.json").read_text())
    assert meta["stored_ref_logps"] and meta["token_ids"]
    data = load_from_disk(str(tmp_path / "build"))
    sides = ("chosen", "rejected") if fmt == "pairs" else ("completion",)
    ref_columns = {"chosen": "ref_chosen_logps", "rejected": "ref_rejected_logps", "completion": "ref_logp"}
    sampled = {(r["prompt_id"], tuple(r["completion_ids"])): r["ref_logp"] for r in rows}
    for side in sides:
        ids = data["completion_ids" if side == "completion" else f"{side}_ids"]
        # The rows carry the sampled ids, with the reference log-probs sampling stored for exactly those ids ...
        assert [sampled[(p, tuple(i))] for p, i in zip(data["prompt_id"], ids)] == list(data[ref_columns[side]])
        assert data["prompt_token_ids"] == [tok(p)["input_ids"] for p in data["prompt"]]
        # ... which are their teacher-forced log-probs under the reference.
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
        np.testing.assert_allclose(completion_logps(base, tok, data["prompt"], ids), data[ref_columns[side]],
                                   atol=1e-3)

    model, lora = load_policy(ModelLoadingConfig(str(assets["model"]), load_in_4bit=False, gradient_checkpointing=False))
    forwards = Forwards(model)
    trainer_cls, config_cls = (CTRLTrainer, CTRLConfig) if fmt == "pairs" else (CTRLPointwiseTrainer, CTRLPointwiseConfig)
    trainer = trainer_cls(model, config_cls(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=2,
                                            per_device_train_batch_size=8, learning_rate=5e-3, report_to="none",
                                            save_strategy="no", gradient_checkpointing=False, bf16=False),
                          data, processing_class=tok, peft_config=lora)
    assert trainer.uses_stored_token_ids and forwards.total == 0
    if fmt == "pairs":
        assert trainer.uses_stored_ref_logps and not trainer.args.precompute_ref_log_probs
    # At initialisation (LoRA B = 0) the policy is the reference: the log-prob the trainer computes for each row is
    # that of its sampled ids, the stored value.
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader(trainer.train_dataset):
            if fmt == "pairs":
                logps, _ = _sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"],
                                           batch["completion_mask"])
                torch.testing.assert_close(logps, torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]),
                                           atol=1e-3, rtol=0)
            else:
                torch.testing.assert_close(_pointwise_logps(trainer.model, batch), batch["ref_logp"], atol=1e-3, rtol=0)
    forwards.total = 0
    assert math.isfinite(trainer.train().training_loss)
    # One forward pass per step, the policy's; none of the reference's.
    assert forwards.total == 2 and forwards.reference == 0


def test_text_only_rows_still_train_by_tokenising(pipeline, assets, tmp_path):
    """A set without the token ids (a user's own text) is tokenised as TRL does, and the reference pass runs."""
    from ctrl_offline.training.config import CTRLConfig
    from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.training.trainer import CTRLTrainer

    data = load_from_disk(str(pipeline / "pairs")).remove_columns(
        ["prompt_token_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]).select(range(8))
    model, lora = load_policy(ModelLoadingConfig(str(assets["model"]), load_in_4bit=False, gradient_checkpointing=False))
    forwards = Forwards(model)
    trainer = CTRLTrainer(model, CTRLConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=1,
                                            per_device_train_batch_size=8, report_to="none", save_strategy="no",
                                            gradient_checkpointing=False, bf16=False),
                          data, processing_class=build_tokenizer(), peft_config=lora)
    assert not trainer.uses_stored_token_ids and not trainer.uses_stored_ref_logps
    assert forwards.reference > 0  # TRL's reference pass over the set, once, before training
    eos = trainer.processing_class.eos_token_id
    # The text tokenised, EOS appended where the completion finished.
    assert [ids[-1] == eos for ids in trainer.train_dataset["chosen_ids"]] == trainer.train_dataset["chosen_finished"]
    assert math.isfinite(trainer.train().training_loss)


def test_build_without_finished_completions_says_why(pipeline, capsys, tmp_path):
    # Every completion cut at max_new_tokens: nothing left to train on.
    table = pq.read_table(pipeline / "calib" / "calibrated.parquet")
    cut = table.set_column(table.column_names.index("finished"), "finished", pa.array([False] * table.num_rows))
    (tmp_path / "cut").mkdir()
    pq.write_table(cut.replace_schema_metadata(table.schema.metadata), tmp_path / "cut" / "calibrated.parquet")
    assert cli("build", tmp_path / "cut", "--data-format", "pairs", "--transform", "identity", "--beta", 0.1,
               "--drop-unfinished", "--out", tmp_path / "empty") == 2
    err = capsys.readouterr().err
    assert "no usable completions" in err and "--keep-unfinished" in err and not (tmp_path / "empty").exists()


def test_inspect_summarises_each_stage(pipeline, capsys, tmp_path):
    for stage in ("samples", "scored", "calib", "pairs"):
        assert cli("inspect", pipeline / stage) == 0
        out = capsys.readouterr().out
        assert "rows" in out
    assert cli("inspect", pipeline / "calib", "--json", "--plot", tmp_path / "calib.png") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 20 and summary["k"]["min"] == K and sum(summary["u_histogram"]) == 20 * K
    assert (tmp_path / "calib.png").exists()


def test_pairs_feed_trl_and_the_ctrl_trainer_unchanged(pipeline, assets, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from ctrl_offline.training.config import CTRLConfig
    from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.training.trainer import CTRLTrainer

    pairs = load_from_disk(str(pipeline / "pairs")).select(range(8))
    tok = build_tokenizer()
    common = dict(use_cpu=True, max_steps=1, per_device_train_batch_size=4, report_to="none", save_strategy="no",
                  gradient_checkpointing=False, bf16=False)
    model, lora = load_policy(ModelLoadingConfig(str(assets["model"]), load_in_4bit=False, gradient_checkpointing=False))
    trl = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "trl"), **common), train_dataset=pairs,
                     processing_class=tok, peft_config=lora)
    # TRL 1.16 takes no pre-tokenised pairs: it tokenises the text (EOS appended) over the build's sampled ids.
    assert all(ids[-1] == tok.eos_token_id for ids in trl.train_dataset["chosen_ids"])
    assert math.isfinite(trl.train().training_loss)
    model, lora = load_policy(ModelLoadingConfig(str(assets["model"]), load_in_4bit=False, gradient_checkpointing=False))
    ours = CTRLTrainer(model, CTRLConfig(output_dir=str(tmp_path / "ours"), **common), pairs,
                       processing_class=tok, peft_config=lora)
    build = json.loads((pipeline / "pairs" / "ctrl_build.json").read_text())
    assert ours.uses_stored_ref_logps == build["stored_ref_logps"]
    assert ours.args.beta == build["beta"]  # read from the build folder the pairs were loaded from
    assert math.isfinite(ours.train().training_loss)


def test_a_killed_sample_run_resumes_to_the_same_rows(assets, tmp_path):
    reference = tmp_path / "uninterrupted"
    assert cli(*sample_args(assets, reference)) == 0

    resumed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)])}
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", *map(str, sample_args(assets, resumed))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (resumed / "shard-00000.parquet").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in resumed.glob("shard-*.parquet"))
    assert 1 <= len(done_before) < 5, "the run should have been killed mid-way"
    assert cli(*sample_args(assets, resumed)) == 0
    manifest = json.loads((resumed / "_manifest.json").read_text())
    assert manifest["complete"]
    a = read_table(reference).to_pandas().sort_values(["prompt_id", "sample_idx"]).reset_index(drop=True)
    b = read_table(resumed).to_pandas().sort_values(["prompt_id", "sample_idx"]).reset_index(drop=True)
    assert a.drop(columns=["completion_ids"]).equals(b.drop(columns=["completion_ids"]))
    assert [list(x) for x in a.completion_ids] == [list(x) for x in b.completion_ids]


def test_prompt_ids_are_int64_hashes_end_to_end(pipeline):
    import hashlib

    from ctrl_offline.models.generation import hex_prompt_id, prompt_id

    # The first 64 bits of the SHA-256, as earlier versions' 16 hex digits and as the int64 written now.
    digest = hashlib.sha256("Tell me a joke.".encode()).digest()
    assert hex_prompt_id("Tell me a joke.") == digest.hex()[:16]
    assert prompt_id("Tell me a joke.") == int.from_bytes(digest[:8], "big", signed=True)
    samples = read_table(pipeline / "samples")
    assert samples.schema.field("prompt_id").type == pa.int64()
    assert all(pid == prompt_id(p) for pid, p in zip(samples["prompt_id"].to_pylist(), samples["prompt"].to_pylist()))
    for path in (pipeline / "scored", pipeline / "calib" / "tables.parquet", pipeline / "calib" / "calibrated.parquet"):
        assert read_table(path).schema.field("prompt_id").type == pa.int64(), path


def test_a_run_started_with_hex_ids_resumes_with_them(pipeline, assets, tmp_path):
    """Runs begun before integer ids keep their 16-hex-digit string ids when resumed, so no folder mixes kinds."""
    import shutil

    from ctrl_offline.models.generation import hex_prompt_id

    legacy = tmp_path / "legacy"
    shutil.copytree(pipeline / "samples", legacy)
    manifest = json.loads((legacy / "_manifest.json").read_text())
    del manifest["settings"]["prompt_id"]
    (legacy / "_manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    for shard in legacy.glob("shard-*.parquet"):
        table = pq.read_table(shard)
        hex_ids = pa.array([format(v & (2**64 - 1), "016x") for v in table["prompt_id"].to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", hex_ids), shard)
    (legacy / "shard-00004.parquet").unlink()
    assert cli(*sample_args(assets, legacy)) == 0
    assert json.loads((legacy / "_manifest.json").read_text())["complete"]
    resumed = pq.read_table(legacy / "shard-00004.parquet")
    assert resumed.schema.field("prompt_id").type == pa.string()
    assert resumed["prompt_id"].to_pylist() == [hex_prompt_id(p) for p in resumed["prompt"].to_pylist()]
    assert read_table(legacy)["prompt_id"].to_pandas().map(type).eq(str).all()


def test_processes_split_the_shards_and_merge(assets, tmp_path, monkeypatch):
    # What `accelerate launch` / torchrun do: each process sees its RANK and WORLD_SIZE.
    reference = tmp_path / "one"
    assert cli(*sample_args(assets, reference)) == 0
    split = tmp_path / "two"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli(*sample_args(assets, split)) == 0
    assert sorted(p.name for p in split.glob("shard-*")) == ["shard-00001.parquet", "shard-00003.parquet"]
    assert not json.loads((split / "_manifest.json").read_text())["complete"]
    monkeypatch.setenv("RANK", "0")
    assert cli(*sample_args(assets, split)) == 0
    assert json.loads((split / "_manifest.json").read_text())["complete"]
    a = read_table(reference).to_pandas().sort_values(["prompt_id", "sample_idx"]).reset_index(drop=True)
    b = read_table(split).to_pandas().sort_values(["prompt_id", "sample_idx"]).reset_index(drop=True)
    assert a.drop(columns=["completion_ids"]).equals(b.drop(columns=["completion_ids"]))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num-samples", "1"], "K must be at least 2"),
        (["--prompt-column", "text"], "lack column 'text'"),
        (["--model", "/nonexistent/model"], "cannot load model ./nonexistent/model.*offline"),
    ],
)
def test_sample_bad_input(assets, tmp_path, capsys, args, message):
    # argparse keeps the last value of a repeated option, so appending overrides the defaults.
    assert cli("sample", assets["prompts"], "--model", assets["model"], "--out", tmp_path / "s", *args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_empty_prompts_and_settings_changes_are_refused(assets, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "the cat"}\n{"prompt": "  "}\n')
    assert cli("sample", tmp_path / "p.jsonl", "--model", assets["model"], "--out", tmp_path / "s") == 2
    assert "empty prompt" in capsys.readouterr().err
    out = tmp_path / "s2"
    assert cli(*sample_args(assets, out)[:-2], "--limit", 4) == 0
    assert cli(*sample_args(assets, out)[:-2], "--limit", 4, "--num-samples", 3) == 2
    assert "different settings" in capsys.readouterr().err


def test_reward_model_with_a_multi_output_head_is_refused(pipeline, tmp_path, capsys):
    bad = build_tiny_reward_model(tmp_path / "rm3", num_labels=3)
    samples = pipeline / "samples"
    assert cli("score", samples, "--reward", bad, "--out", tmp_path / "x") == 2
    assert "3-output head (weight shape (3, 32))" in capsys.readouterr().err


def test_mixed_models_are_refused_unless_forced(pipeline, assets, tmp_path, capsys):
    import shutil

    assert cli("score", pipeline / "samples", "--reward", "tiny_models:word_count_reward", "--out",
               tmp_path / "other") == 0
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(pipeline / "scored" / "shard-00000.parquet", mixed / "shard-00000.parquet")
    shutil.copy(tmp_path / "other" / "shard-00001.parquet", mixed / "shard-00001.parquet")
    assert cli("calibrate", mixed, "--out", tmp_path / "c") == 2
    assert "mixes outputs of different models" in capsys.readouterr().err
    assert cli("calibrate", mixed, "--out", tmp_path / "c", "--force") == 0


def test_eval_reports_win_rates_kl_and_plots(pipeline, assets, tmp_path, capsys):
    from ctrl_offline.training.config import CTRLConfig
    from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.training.trainer import CTRLTrainer

    model, lora = load_policy(ModelLoadingConfig(str(assets["model"]), load_in_4bit=False, gradient_checkpointing=False))
    args = CTRLConfig(output_dir=str(tmp_path / "t"), use_cpu=True, max_steps=4, per_device_train_batch_size=8,
                      learning_rate=2e-2, report_to="none", save_strategy="no", gradient_checkpointing=False)
    trainer = CTRLTrainer(model, args, load_from_disk(str(pipeline / "pairs")), processing_class=build_tokenizer(),
                          peft_config=lora)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat", "why is it good", "tell me"]))
    code = cli("eval", heldout, "--model", assets["model"], "--adapter", tmp_path / "adapter", "--reward",
               f"rm={assets['rm']}", "--eval-n", 1, 2, 4, "--eval-selectors", "bon", "won", "bot", "itp", "--max-new-tokens", 6,
               "--train-data", pipeline / "pairs", "--out", tmp_path / "report")
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {(r["selector"], r["n"]) for r in report["win_rates"]} == {(s, n) for s in ("bon", "won", "bot", "itp")
                                                                       for n in (1, 2, 4)}
    for row in report["win_rates"]:
        assert 0 <= row["ci_low"] <= row["value"] <= row["ci_high"] <= 1
    assert math.isfinite(report["kl"]["value"])
    assert report["prompts"]["overlap_with_training"] == 0
    for name in ("report.md", "win_rate_vs_kl.png", "calibration_hist.png", "win_rate_vs_n.png", "samples.parquet"):
        assert (tmp_path / "report" / name).exists(), name

    # The reference against itself: the KL estimate is 0 up to float32 rounding (the two log-probs come
    # from differently padded batches of the same model).
    code = cli("eval", heldout, "--model", assets["model"], "--reward", "tiny_models:word_count_reward", "--eval-n", 2,
               "--out", tmp_path / "self")
    assert code == 0
    self_report = json.loads((tmp_path / "self" / "report.json").read_text())
    assert abs(self_report["kl"]["value"]) < 1e-4


def test_eval_refuses_n_beyond_candidates_and_bad_selector_settings(assets, tmp_path, capsys):
    from ctrl_offline.maths.win_rates import estimate_inference_win_rate

    with pytest.raises(ValueError, match="larger than the candidates available"):
        estimate_inference_win_rate(np.zeros((2, 3)), np.zeros((2, 3)), "bon", 4)
    heldout = tmp_path / "p.jsonl"
    heldout.write_text('{"prompt": "the cat"}\n')
    with pytest.raises(SystemExit) as exc:  # argparse rejects it before any work
        cli("eval", heldout, "--model", assets["model"], "--reward", "tiny_models:word_count_reward",
            "--kappa0", "0", "--out", tmp_path / "r")
    assert exc.value.code == 2
    assert "must be a finite number > 0" in capsys.readouterr().err


def test_disk_full_mid_shard_leaves_no_corrupt_shard(assets, tmp_path, monkeypatch, capsys):
    import errno

    import pyarrow.parquet as pq_module

    real_write = pq_module.write_table
    calls = {"n": 0}

    def failing_write(table, where, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard: write part of the file, then the disk is full
            Path(where).write_bytes(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(pq_module, "write_table", failing_write)
    out = tmp_path / "s"
    assert cli(*sample_args(assets, out)) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json", "shard-00000.parquet"]  # no partial file
    monkeypatch.setattr(pq_module, "write_table", real_write)
    assert cli(*sample_args(assets, out)) == 0  # and the re-run completes
    assert len(list(out.glob("shard-*.parquet"))) == 5


def test_prompt_longer_than_the_context_is_named(assets, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "the cat"}) + "\n" + json.dumps({"prompt": " ".join(["cat"] * 200)}) + "\n")
    assert cli("sample", long, "--model", assets["model"], "--out", tmp_path / "s", "--max-new-tokens", 8) == 2
    err = capsys.readouterr().err
    assert "do not fit the model's context of 128 tokens" in err and "rows [1]" in err


def test_eval_counts_prompts_seen_in_training(pipeline, assets, tmp_path, caplog):
    import logging

    from ctrl_offline.stages.evaluate import evaluate_policy

    with caplog.at_level(logging.WARNING):
        result = evaluate_policy(str(assets["prompts"]), tmp_path / "r", str(assets["model"]),
                                 "tiny_models:word_count_reward", n=(2,), limit=5, max_new_tokens=4,
                                 train_data=str(pipeline / "calib" / "calibrated.parquet"), num_boot=50)
    assert result.report["prompts"]["overlap_with_training"] == 5
    assert "5 of 5 evaluation prompts also appear in the training data" in caplog.text
