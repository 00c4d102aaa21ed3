"""Rows carry the token ids that were sampled: the build writes them, the trainers train them as they are.

The end-to-end case (real samples whose text does not tokenise back to their ids, no reference
pass) is in test_pipeline.py; here, hand-made rows whose ids and text disagree on purpose, and the
inputs that are refused.
"""

import json
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset, load_from_disk

from ctrl_offline.training.config import CTRLConfig, CTRLPointwiseConfig
from ctrl_offline.models.generation import completion_logps
from ctrl_offline.io.files import DataError, write_parquet
from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
from ctrl_offline.stages.build import build_dataset
from ctrl_offline.training.trainer import CTRLPointwiseTrainer, CTRLTrainer, TrainingDataError, _sequence_logps

PROMPTS = ["tell me about the cat", "why is the dog happy", "how is it", "what is good"]


def ids_of(tokenizer, words: str) -> list[int]:
    return tokenizer(words, add_special_tokens=False)["input_ids"]


def config(cls, tmp_path, **overrides):
    return cls(**{**dict(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=1, per_device_train_batch_size=8,
                         report_to="none", save_strategy="no", gradient_checkpointing=False, beta=0.5, seed=0),
                  **overrides})


def policy(tiny_path):
    return load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))


@pytest.fixture()
def pairs(tiny_path, tokenizer):
    """8 pairs whose ids are not their text's: each completion's ids carry an extra <unk> (which decoding drops)."""
    from transformers import AutoModelForCausalLM

    unk, eos = tokenizer.unk_token_id, tokenizer.eos_token_id
    prompts = [PROMPTS[i % 4] for i in range(8)]
    chosen = [ids_of(tokenizer, "yes it is good") + [unk, eos] for _ in range(8)]
    rejected = [ids_of(tokenizer, "no") + [unk] for _ in range(8)]  # cut at the cap: no EOS
    base = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    ref = {side: completion_logps(base, tokenizer, prompts, ids) for side, ids in (("chosen", chosen),
                                                                                   ("rejected", rejected))}
    return {"prompt": prompts, "chosen": [" yes it is good"] * 8, "rejected": [" no"] * 8,
            "target_phi_gap": [0.5] * 8, "prompt_token_ids": [tokenizer(p)["input_ids"] for p in prompts],
            "chosen_ids": chosen, "rejected_ids": rejected, "ref_chosen_logps": ref["chosen"],
            "ref_rejected_logps": ref["rejected"], "chosen_finished": [True] * 8, "rejected_finished": [False] * 8}


def test_pair_trainer_trains_the_ids_not_the_text(pairs, tiny_path, tokenizer, tmp_path):
    model, lora = policy(tiny_path)
    trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path), Dataset.from_dict(pairs), processing_class=tokenizer,
                          peft_config=lora)
    assert trainer.uses_stored_token_ids and trainer.uses_stored_ref_logps
    built = trainer.train_dataset
    assert built["prompt_ids"] == pairs["prompt_token_ids"]
    assert built["chosen_ids"] == pairs["chosen_ids"] and built["rejected_ids"] == pairs["rejected_ids"]
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():  # at initialisation the policy is the reference: the log-ratios are 0
        logps, _ = _sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    torch.testing.assert_close(logps, torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]), atol=1e-4,
                               rtol=0)
    assert np.isfinite(trainer.train().training_loss)


def test_pair_ids_whose_prompt_fills_max_length_are_dropped_as_trl_does(pairs, tiny_path, tokenizer, tmp_path):
    lengths = [len(p) for p in pairs["prompt_token_ids"]]  # 5, 5, 3, 3, ...
    model, lora = policy(tiny_path)
    trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path, max_length=max(lengths), min_train_rows=0),
                          Dataset.from_dict(pairs), processing_class=tokenizer, peft_config=lora)
    kept = [ids for ids in pairs["prompt_token_ids"] if len(ids) < max(lengths)]
    assert 0 < len(kept) < 8 and trainer.train_dataset["prompt_ids"] == kept


def test_pointwise_trainer_trains_the_ids_not_the_text(pairs, tiny_path, tokenizer, tmp_path):
    rows = {"prompt": pairs["prompt"], "completion": pairs["chosen"], "target": [0.3] * 8,
            "prompt_token_ids": pairs["prompt_token_ids"], "completion_ids": pairs["chosen_ids"],
            "ref_logp": pairs["ref_chosen_logps"]}
    model, lora = policy(tiny_path)
    trainer = CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path), Dataset.from_dict(rows),
                                   processing_class=tokenizer, peft_config=lora)
    assert trainer.uses_stored_token_ids
    built = trainer.train_dataset
    for prompt, completion, ids, labels in zip(rows["prompt_token_ids"], rows["completion_ids"], built["input_ids"],
                                               built["labels"]):
        assert ids == prompt + completion and labels == [-100] * len(prompt) + completion
    assert np.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("prompt_token_ids"), r"has chosen_ids, rejected_ids but lacks prompt_token_ids"),
    (lambda r: r["chosen_ids"].__setitem__(3, []), r"missing or empty 'chosen_ids' in 1 row\(s\): 3"),
    (lambda r: r["rejected_ids"].__setitem__(0, [5, 999]), r"token id 999, outside the model's vocabulary of 39"),
    (lambda r: r["prompt_token_ids"].__setitem__(2, [-1]), r"'prompt_token_ids' holds token id -1, not a token id"),
    (lambda r: r.update(chosen_ids=[[0.5]] * 8), r"'chosen_ids' must hold lists of token ids"),
])
def test_bad_pair_token_ids_are_refused(pairs, mutate, message, tiny_path, tokenizer, tmp_path):
    mutate(pairs)
    model, lora = policy(tiny_path)
    with pytest.raises(TrainingDataError, match=message):
        CTRLTrainer(model, config(CTRLConfig, tmp_path), Dataset.from_dict(pairs), processing_class=tokenizer,
                    peft_config=lora)


def test_pointwise_ids_without_the_prompt_ids_are_refused(pairs, tiny_path, tokenizer, tmp_path):
    rows = {"prompt": pairs["prompt"], "completion": pairs["chosen"], "target": [0.3] * 8,
            "completion_ids": pairs["chosen_ids"], "ref_logp": pairs["ref_chosen_logps"]}
    model, lora = policy(tiny_path)
    with pytest.raises(TrainingDataError, match="has completion_ids but lacks prompt_token_ids"):
        CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path), Dataset.from_dict(rows),
                             processing_class=tokenizer, peft_config=lora)


def calibrated(folder, tokenizer, metadata, completion_ids=None):
    """A small calibrate output: 4 prompts × 3 samples, finished, ids as sampled."""
    rows = [(p, prompt, j, " yes" * (j + 1)) for p, prompt in enumerate(PROMPTS) for j in range(3)]
    ids = completion_ids or [ids_of(tokenizer, c) + [tokenizer.eos_token_id] for *_, c in rows]
    table = pa.table({"prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                      "prompt_text": [r[1] for r in rows], "completion": [r[3] for r in rows],
                      "completion_ids": pa.array(ids, pa.list_(pa.int32())), "sample_idx": [r[2] for r in rows],
                      "ref_logp": [-1.0 - r[2] for r in rows], "finished": [True] * len(rows),
                      "u": [r[2] / 2 for r in rows]})
    folder.mkdir()
    write_parquet(table, folder / "calibrated.parquet", {"stage": "calibrate", **metadata})
    return folder, ids


def test_build_writes_the_sampled_ids(tiny_path, tokenizer, tmp_path):
    folder, ids = calibrated(tmp_path / "calib", tokenizer, {"reference_model": tiny_path})
    build_dataset(folder, tmp_path / "pointwise", format="pointwise", transform="identity", beta=0.5)
    rows = load_from_disk(str(tmp_path / "pointwise"))
    assert json.loads((tmp_path / "pointwise" / "ctrl_build.json").read_text())["token_ids"]
    assert rows["completion_ids"] == ids
    assert rows["prompt_token_ids"] == [tokenizer(p)["input_ids"] for p in rows["prompt"]]
    assert rows.features["completion_ids"].feature.dtype == "int32"
    build_dataset(folder, tmp_path / "pairs", format="pairs", transform="identity", beta=0.5)
    pairs = load_from_disk(str(tmp_path / "pairs"))
    by_text = dict(zip(rows["completion"], ids))
    assert {"prompt_token_ids", "chosen_ids", "rejected_ids"} <= set(pairs.column_names)
    assert pairs["chosen_ids"] == [by_text[c] for c in pairs["chosen"]]
    assert pairs["rejected_ids"] == [by_text[c] for c in pairs["rejected"]]


def test_build_without_a_tokenizer_writes_text_only_rows(tokenizer, tmp_path, caplog):
    folder, _ = calibrated(tmp_path / "calib", tokenizer, {})  # no reference model recorded, none given
    with caplog.at_level(logging.WARNING):
        build_dataset(folder, tmp_path / "pairs", format="pairs", transform="identity", beta=0.5)
    assert "reference model to tokenise their prompts with" in caplog.text
    assert not json.loads((tmp_path / "pairs" / "ctrl_build.json").read_text())["token_ids"]
    assert not {"prompt_token_ids", "chosen_ids", "rejected_ids"} & set(load_from_disk(str(tmp_path / "pairs"))
                                                                        .column_names)


def test_build_refuses_samples_without_their_ids(tiny_path, tokenizer, tmp_path):
    ids = [ids_of(tokenizer, " yes" * (j + 1)) for _ in PROMPTS for j in range(3)]
    ids[4] = []
    folder, _ = calibrated(tmp_path / "calib", tokenizer, {"reference_model": tiny_path}, ids)
    with pytest.raises(DataError, match=r"1 sample\(s\) have no completion_ids .*rows \[4\]"):
        build_dataset(folder, tmp_path / "pairs", format="pairs", transform="identity", beta=0.5)
