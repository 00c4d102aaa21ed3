"""Completions cut at max_new_tokens are trained as what they are: prefixes, with no EOS.

The build keeps them (flagged), their stored reference log-probs stay valid and are used (no
reference pass), the trainers' tokenisation leaves EOS off them and keeps it on finished ones, and
a build that would leave out most rows or a training set too small to train on stops with a
message saying what to change.
"""

import json
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset, load_from_disk

from ctrl_offline.training.config import CTRLConfig, CTRLPointwiseConfig
from ctrl_offline.models.generation import SamplingConfig, completion_logps, sample_completions
from ctrl_offline.io.files import DataError, write_parquet
from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
from ctrl_offline.stages.build import build_dataset
from ctrl_offline.training.trainer import (
    CTRLPointwiseTrainer,
    CTRLTrainer,
    TrainingDataError,
    _pointwise_logps,
    _sequence_logps,
)
from tiny_models import WORDS

PROMPTS = ["tell me about the cat", "why is the dog happy", "how is it", "what is good"]
K = 4


@pytest.fixture(scope="module")
def calibrated(tiny_path, tokenizer, tmp_path_factory):
    """A calibrate output as `sample` + `calibrate` write it: 4 prompts × K = 4, only sample 0 finished.

    Ids and ``ref_logp`` are what sampling records: a finished completion's ids end in EOS and its
    log-prob includes EOS; a cut one stops at the cap, no EOS.
    """
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    rows = []
    for p, prompt in enumerate(PROMPTS):
        for j in range(K):
            text = " " + " ".join(rng.choice(WORDS, size=3 + j))
            ids = tokenizer(prompt + text)["input_ids"][len(tokenizer(prompt)["input_ids"]):]
            finished = j == 0
            rows.append({"prompt_id": p, "prompt": prompt, "prompt_text": prompt, "completion": text,
                         "completion_ids": ids + ([tokenizer.eos_token_id] if finished else []), "sample_idx": j,
                         "finished": finished, "u": ((j + p) % K) / (K - 1)})
    base = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    ref = completion_logps(base, tokenizer, [r["prompt_text"] for r in rows], [r["completion_ids"] for r in rows])
    table = pa.table({
        **{c: [r[c] for r in rows] for c in ("prompt_id", "prompt", "prompt_text", "completion", "sample_idx",
                                              "finished", "u")},
        "completion_ids": pa.array([r["completion_ids"] for r in rows], pa.list_(pa.int32())),
        "ref_logp": ref,
        "num_tokens": [len(r["completion_ids"]) for r in rows],
    })
    folder = tmp_path_factory.mktemp("calibrated")
    write_parquet(table, folder / "calibrated.parquet", {"stage": "calibrate", "reference_model": tiny_path})
    return folder, {r["completion"]: r["completion_ids"] for r in rows}


def config(cls, tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=2, per_device_train_batch_size=8,
                learning_rate=5e-3, report_to="none", logging_steps=1, save_strategy="no",
                gradient_checkpointing=False, seed=0)
    base.update(overrides)
    return cls(**base)


def policy(tiny_path):
    return load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))


def no_reference_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reference model ran: stored reference log-probs were not used")

    for cls, name in ((CTRLTrainer, "_precompute_ref_logps"), (CTRLTrainer, "compute_ref_log_probs"),
                      (CTRLPointwiseTrainer, "_add_ref_logps")):
        monkeypatch.setattr(cls, name, refuse)


def test_build_keeps_cut_completions_flagged_with_their_reference_logps(calibrated, tmp_path):
    folder, _ = calibrated
    result = build_dataset(folder, tmp_path / "pairs", format="pairs", transform="identity", beta=0.5)
    pairs = load_from_disk(str(tmp_path / "pairs"))
    meta = json.loads((tmp_path / "pairs" / "ctrl_build.json").read_text())
    # Every sample is kept; the cut ones re-tokenise (without EOS) to their sampled ids, so the
    # stored reference log-probs survive the check.
    assert meta["stored_ref_logps"] and meta["keep_unfinished"] and meta["unfinished_rows"] == 12
    assert result.num_rows == len(PROMPTS) * K * (K - 1) // 2
    assert {"chosen_finished", "rejected_finished", "ref_chosen_logps"} <= set(pairs.column_names)
    assert not all(pairs["chosen_finished"]) and any(list(pairs["chosen_finished"]) + list(pairs["rejected_finished"]))
    build_dataset(folder, tmp_path / "pointwise", format="pointwise", transform="identity", beta=0.5)
    pointwise = load_from_disk(str(tmp_path / "pointwise"))
    assert len(pointwise) == len(PROMPTS) * K and sum(pointwise["finished"]) == len(PROMPTS)
    assert "ref_logp" in pointwise.column_names


@pytest.mark.parametrize("rows", ["token_ids", "text"])
def test_pair_trainer_uses_stored_logps_and_leaves_eos_off_cut_completions(calibrated, tiny_path, tokenizer,
                                                                          tmp_path, monkeypatch, rows):
    """With the sampled ids, or tokenising the text (these completions re-tokenise to their ids): EOS only where
    sampling drew it."""
    folder, sampled = calibrated
    build_dataset(folder, tmp_path / "pairs", format="pairs", transform="identity", beta=0.5)
    pairs = load_from_disk(str(tmp_path / "pairs"))
    if rows == "text":
        pairs = pairs.remove_columns(["prompt_token_ids", "chosen_ids", "rejected_ids"])
    no_reference_pass(monkeypatch)
    model, lora = policy(tiny_path)
    trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path), pairs, processing_class=tokenizer, peft_config=lora)
    assert trainer.uses_stored_ref_logps and trainer.uses_stored_token_ids == (rows == "token_ids")
    built = trainer.train_dataset
    eos = tokenizer.eos_token_id
    for side in ("chosen", "rejected"):
        for text, ids, done in zip(pairs[side], built[f"{side}_ids"], built[f"{side}_finished"]):
            assert ids == sampled[text]  # exactly the sampled ids: EOS only where sampling drew it
            assert (ids[-1] == eos) == done
    # The stored values equal a fresh reference computation on the trainer's own tokenisation ...
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    with trainer.model.disable_adapter():
        fresh = completion_logps(base, tokenizer, list(built["prompt"]), list(built["chosen_ids"]))
    np.testing.assert_allclose(fresh, list(pairs["ref_chosen_logps"]), atol=1e-4)
    # ... and they are what the loss reads: at initialisation (LoRA B = 0) the policy is the
    # reference, so every log-ratio the trainer forms from the batch is 0.
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        logps, _ = _sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"],
                                   batch["completion_mask"])
    chosen, rejected = logps.chunk(2)
    torch.testing.assert_close(chosen, batch["ref_chosen_logps"], atol=1e-4, rtol=0)
    torch.testing.assert_close(rejected, batch["ref_rejected_logps"], atol=1e-4, rtol=0)
    assert np.isfinite(trainer.train().training_loss)


def test_rows_without_flags_all_end_in_eos(calibrated, tiny_path, tokenizer, tmp_path):
    folder, _ = calibrated
    build_dataset(folder, tmp_path / "pairs", format="pairs", transform="identity", beta=0.5)
    legacy = load_from_disk(str(tmp_path / "pairs")).remove_columns(
        ["chosen_finished", "rejected_finished", "ref_chosen_logps", "ref_rejected_logps", "prompt_token_ids",
         "chosen_ids", "rejected_ids"])
    model, lora = policy(tiny_path)
    trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path, beta=0.5), legacy, processing_class=tokenizer,
                          peft_config=lora)
    eos = tokenizer.eos_token_id
    assert all(ids[-1] == eos for side in ("chosen_ids", "rejected_ids") for ids in trainer.train_dataset[side])


@pytest.mark.parametrize("source", ["token_ids", "text"])
def test_pointwise_trainer_uses_stored_logps_and_leaves_eos_off_cut_completions(calibrated, tiny_path, tokenizer,
                                                                               tmp_path, monkeypatch, source):
    folder, sampled = calibrated
    build_dataset(folder, tmp_path / "pointwise", format="pointwise", transform="identity", beta=0.5)
    rows = load_from_disk(str(tmp_path / "pointwise"))
    if source == "text":
        rows = rows.remove_columns(["prompt_token_ids", "completion_ids"])
    no_reference_pass(monkeypatch)
    model, lora = policy(tiny_path)
    trainer = CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path, max_steps=2), rows,
                                   processing_class=tokenizer, peft_config=lora)
    assert trainer.uses_stored_token_ids == (source == "token_ids")
    built = trainer.train_dataset
    eos = tokenizer.eos_token_id
    for prompt, text, ids, labels, done in zip(rows["prompt"], rows["completion"], built["input_ids"],
                                               built["labels"], built["finished"]):
        assert ids[len(tokenizer(prompt)["input_ids"]):] == sampled[text]
        assert (ids[-1] == eos) == done and labels[-1] == ids[-1]
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        logps = _pointwise_logps(trainer.model, batch)
    torch.testing.assert_close(logps, batch["ref_logp"], atol=1e-4, rtol=0)  # log-ratio 0 at initialisation
    assert np.isfinite(trainer.train().training_loss)


def test_build_stops_when_dropping_cut_completions_leaves_out_most_rows(calibrated, tiny_path, tokenizer, tmp_path,
                                                                        caplog):
    folder, _ = calibrated
    with pytest.raises(DataError) as err:
        build_dataset(folder, tmp_path / "dropped", format="pointwise", transform="identity", beta=0.5,
                      keep_unfinished=False)
    message = str(err.value)
    assert "leave out 12 of 16" in message and "12 cut at max_new_tokens" in message
    assert "keep_unfinished=True" in message and "max_new_tokens" in message and "max_left_out" in message
    assert not (tmp_path / "dropped").exists()

    # Forced through, the 4 finished rows make a set the trainer refuses, saying what to change.
    with caplog.at_level(logging.WARNING):
        build_dataset(folder, tmp_path / "dropped", format="pointwise", transform="identity", beta=0.5,
                      keep_unfinished=False, max_left_out=1.0)
    assert "only 4 row(s)" in caplog.text
    rows = load_from_disk(str(tmp_path / "dropped"))
    model, lora = policy(tiny_path)
    with pytest.raises(TrainingDataError) as err:
        CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path), rows, processing_class=tokenizer,
                             peft_config=lora)
    message = str(err.value)
    assert "4 rows, fewer than min_train_rows=8" in message
    assert "keep the 12 completions its build left out" in message and "min_train_rows=0" in message
    trainer = CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path, min_train_rows=0), rows,
                                   processing_class=tokenizer, peft_config=lora)
    assert len(trainer.train_dataset) == 4


def test_too_few_pairs_are_refused(tiny_path, tokenizer, tmp_path):
    rows = Dataset.from_dict({"prompt": PROMPTS[:3], "chosen": [" yes good"] * 3, "rejected": [" no bad"] * 3,
                              "target_phi_gap": [0.5] * 3})
    model, lora = policy(tiny_path)
    with pytest.raises(TrainingDataError, match=r"3 pairs, fewer than min_train_rows=8.*larger K.*strategy 'all'"):
        CTRLTrainer(model, config(CTRLConfig, tmp_path, beta=0.5), rows, processing_class=tokenizer,
                    peft_config=lora)
    with pytest.raises(ValueError, match="min_train_rows"):
        config(CTRLConfig, tmp_path, beta=0.5, min_train_rows=-1)


def test_sampled_logps_of_cut_completions_have_no_eos_term(tiny_path, tokenizer):
    """What sample records (and eval's KL reuses) is the prefix view: the log-prob of exactly the ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    rows = sample_completions(model, tokenizer, PROMPTS, SamplingConfig(k=2, max_new_tokens=3), seed=0)
    cut = [r for r in rows if not r["finished"]]
    assert cut and all(tokenizer.eos_token_id not in r["completion_ids"] and r["num_tokens"] == 3 for r in cut)
    again = completion_logps(model, tokenizer, [PROMPTS[r["batch_prompt"]] for r in rows],
                             [r["completion_ids"] for r in rows])
    np.testing.assert_allclose(again, [r["logp"] for r in rows], atol=1e-4)
