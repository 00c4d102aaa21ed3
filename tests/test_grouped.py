"""Grouped training (issue 26): one row per prompt, each response forwarded once per step, packed without padding.

The grouped trainer must train exactly what pair rows (and pointwise / weights rows) train: the same loss value
and the same gradients at the same weights, when its batch holds the prompts whose pairs make up the pair rows'
batch. Packed sequences must not see each other: their log-probs equal those of each sequence alone.
"""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset, load_from_disk
from trl.trainer.utils import disable_dropout_in_model

from ctrl_offline.io.files import DataError, write_parquet
from ctrl_offline.maths.losses import Loss, register_loss, unregister_loss
from ctrl_offline.models.generation import completion_logps
from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
from ctrl_offline.stages.build import build_dataset
from ctrl_offline.stages.train import train_from_build
from ctrl_offline.training.config import CTRLConfig, CTRLGroupedConfig, CTRLPointwiseConfig
from ctrl_offline.training.grouped import CTRLGroupedTrainer
from ctrl_offline.training.packing import pack_sequences, packed_sequence_logps
from ctrl_offline.training.trainer import CTRLPointwiseTrainer, CTRLTrainer, TrainingDataError, _sequence_logps

PROMPTS = ["tell me about the cat", "why is the dog happy", "how is it", "what is good"]
WORDS = "the a cat dog sat ran on mat fast slow good bad happy sad very".split()
K = 4


@pytest.fixture(scope="module")
def calibrated(tiny_path, tokenizer, tmp_path_factory):
    """4 prompts × K = 4 samples of 1–8 words (EOS where finished, one cut), tie-free u, stored log-probs."""
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    rows = [(p, prompt, j, " " + " ".join(rng.choice(WORDS, rng.integers(1, 9))))
            for p, prompt in enumerate(PROMPTS) for j in range(K)]
    finished = [i != 5 for i in range(len(rows))]
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if f else [])
           for (*_, c), f in zip(rows, finished)]
    base = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    ref = completion_logps(base, tokenizer, [r[1] for r in rows], ids)
    u = np.concatenate([rng.permutation(K) / (K - 1) for _ in PROMPTS])
    table = pa.table({"prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                      "prompt_text": [r[1] for r in rows], "completion": [r[3] for r in rows],
                      "completion_ids": pa.array(ids, pa.list_(pa.int32())), "sample_idx": [r[2] for r in rows],
                      "ref_logp": ref, "finished": finished, "u": u})
    folder = tmp_path_factory.mktemp("grouped") / "calib"
    folder.mkdir()
    write_parquet(table, folder / "calibrated.parquet", {"stage": "calibrate", "reference_model": tiny_path})
    return folder


def build(calibrated, out, fmt, **kwargs):
    build_dataset(calibrated, out, format=fmt, transform="exp", t=3.0, beta=0.5, **kwargs)
    return load_from_disk(str(out))


def config(cls, tmp_path, batch_size, **overrides):
    return cls(**{**dict(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=1, report_to="none",
                         save_strategy="no", gradient_checkpointing=False, seed=0),
                  "per_device_train_batch_size": batch_size, **overrides})


def trainer_of(cls, args, dataset, tiny_path, tokenizer):
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    trainer = cls(model, args, dataset, processing_class=tokenizer, peft_config=lora)
    disable_dropout_in_model(trainer.model)  # TRL's SFT trainer keeps LoRA's dropout; the DPO ones turn it off
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same non-zero adapter in every trainer: log-ratios away from 0
        for name, param in sorted(trainer.model.named_parameters()):
            if param.requires_grad:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return trainer


def loss_and_grads(trainer):
    """The trainer's loss on its first batch (the whole set, in one batch) and the adapter's gradients."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_b[name].abs().max().item()
        assert (grads_a[name] - grads_b[name]).abs().max().item() <= 1e-4 * scale + 1e-7, (name, scale, (grads_a[name] - grads_b[name]).abs().max().item())


# -- packing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("row_tokens", [None, 12])
def test_packed_log_probs_equal_each_sequence_alone(attention, row_tokens, tiny_path):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation=attention).eval()
    add_fused_lm_head(model)
    rng = np.random.default_rng(0)
    sequences = [(rng.integers(3, 30, rng.integers(1, 6)).tolist(), rng.integers(3, 30, rng.integers(1, 9)).tolist())
                 for _ in range(7)]
    batch = pack_sequences(sequences, row_tokens=row_tokens)
    assert batch["input_ids"].shape[0] == (1 if row_tokens is None else batch["input_ids"].shape[0])
    assert int((batch["sequence_index"] >= 0).sum()) == sum(len(p) + len(c) for p, c in sequences)
    with torch.no_grad():
        packed = packed_sequence_logps(model, batch)
        for i, (prompt, completion) in enumerate(sequences):
            ids = torch.tensor([prompt + completion])
            mask = torch.tensor([[0] * len(prompt) + [1] * len(completion)])
            alone, _ = _sequence_logps(model, ids, torch.ones_like(ids), mask)
            assert packed[i].item() == pytest.approx(alone.item(), abs=1e-4)


def test_packing_cuts_at_max_length_and_fills_rows_first_fit():
    batch = pack_sequences([([1, 2], [3, 4, 5]), ([6], [7]), ([8, 9, 10], [11])], max_length=4, row_tokens=6)
    assert batch["sequence_lengths"].tolist() == [4, 2, 4]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 6, 7], [8, 9, 10, 11, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]]
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 0, 1, 1], [2, 2, 2, 2, -1, -1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 0, 0]]
    with pytest.raises(ValueError, match="needs a prompt token"):
        pack_sequences([([], [3])])


def test_packing_refuses_an_attention_that_would_mix_sequences(tiny_path):
    from ctrl_offline.training.packing import row_tokens_for

    class Model:
        class config:
            _attn_implementation = "paged|custom"

    with pytest.raises(ValueError, match="keeps packed sequences apart"):
        row_tokens_for(Model(), None)


# -- the layout ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [dict(strategy="all"), dict(strategy="sampled", pairs_per_prompt=3)])
def test_grouped_rows_hold_the_pairs_formats_pairs_targets_and_weights(strategy, calibrated, tmp_path):
    grouped = build(calibrated, tmp_path / "grouped", "grouped", **strategy)
    pairs = build(calibrated, tmp_path / "pairs", "pairs", **strategy)
    info = json.loads((tmp_path / "grouped" / "ctrl_build.json").read_text())
    assert info["format"] == "grouped" and info["num_rows"] == len(PROMPTS) == len(grouped)
    assert info["num_pairs"] == len(pairs) and info["num_completions"] == len(PROMPTS) * K
    assert info["strategy"] == strategy["strategy"] and info["log_partition"] == "population"
    from_groups = sorted(
        (g["prompt_id"], g["completions"][c], g["completions"][r], g["phi"][c] - g["phi"][r], g["completion_ids"][c],
         g["completion_ids"][r]) for g in grouped for c, r in zip(g["pair_chosen"], g["pair_rejected"]))
    from_pairs = sorted(zip(pairs["prompt_id"], pairs["chosen"], pairs["rejected"], pairs["target_phi_gap"],
                            pairs["chosen_ids"], pairs["rejected_ids"]))
    assert from_groups == from_pairs
    for fmt, column in (("pointwise", "target"), ("weights", "weight")):
        rows = build(calibrated, tmp_path / fmt, fmt)
        by_text = dict(zip(rows["completion"], rows[column]))
        for g in grouped:
            assert g[column] == pytest.approx([by_text[c] for c in g["completions"]], rel=1e-12)
    assert [g["prompt_token_ids"] for g in grouped] == [pairs[pairs["prompt_id"].index(g["prompt_id"])]
                                                         ["prompt_token_ids"] for g in grouped]
    assert sum(map(len, grouped["finished"])) == len(PROMPTS) * K and not all(sum(grouped["finished"], []))


def test_grouped_build_needs_the_sampled_ids_and_reference_log_probs(calibrated, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(calibrated / "calibrated.parquet")
    folder = tmp_path / "calib"
    folder.mkdir()
    write_parquet(table.drop_columns(["ref_logp"]), folder / "calibrated.parquet",
                  {"stage": "calibrate", "reference_model": json.loads(table.schema.metadata[b"ctrl_offline"])
                   ["reference_model"]} if b"ctrl_offline" in (table.schema.metadata or {}) else {"stage": "calibrate"})
    with pytest.raises(DataError, match="grouped format .* lack .*ref_logp"):
        build(folder, tmp_path / "grouped", "grouped")


# -- training --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["dpo", "ipo", "distill", "dpo_hard", "bonbon"])
def test_grouped_step_equals_the_pair_rows_step(loss, calibrated, tiny_path, tokenizer, tmp_path):
    grouped = build(calibrated, tmp_path / "grouped", "grouped")
    pairs = build(calibrated, tmp_path / "pairs", "pairs")
    on_pairs = trainer_of(CTRLTrainer, config(CTRLConfig, tmp_path, len(pairs), ctrl_loss=loss), pairs, tiny_path,
                          tokenizer)
    on_groups = trainer_of(CTRLGroupedTrainer, config(CTRLGroupedConfig, tmp_path, len(grouped), ctrl_loss=loss),
                           grouped, tiny_path, tokenizer)
    packed_pairs = trainer_of(CTRLTrainer, config(CTRLConfig, tmp_path, len(pairs), ctrl_loss=loss, padding_free=True),
                              pairs, tiny_path, tokenizer)
    reference = loss_and_grads(on_pairs)
    assert reference[0] > 0
    assert_same(loss_and_grads(on_groups), reference)
    assert_same(loss_and_grads(packed_pairs), reference)  # padding-free pair rows: the same step
    assert packed_pairs.args.padding_free and packed_pairs.packs_sequences


@pytest.mark.parametrize("loss, fmt", [("pointwise", "pointwise"), ("weighted_sft", "weights")])
def test_grouped_step_equals_the_single_rows_step(loss, fmt, calibrated, tiny_path, tokenizer, tmp_path):
    grouped = build(calibrated, tmp_path / "grouped", "grouped")
    rows = build(calibrated, tmp_path / fmt, fmt)
    on_rows = trainer_of(CTRLPointwiseTrainer, config(CTRLPointwiseConfig, tmp_path, len(rows), ctrl_loss=loss), rows,
                         tiny_path, tokenizer)
    on_groups = trainer_of(CTRLGroupedTrainer, config(CTRLGroupedConfig, tmp_path, len(grouped), ctrl_loss=loss),
                           grouped, tiny_path, tokenizer)
    assert_same(loss_and_grads(on_groups), loss_and_grads(on_rows))


def test_each_response_is_forwarded_once_and_only_if_a_pair_needs_it(calibrated, tiny_path, tokenizer, tmp_path):
    grouped = build(calibrated, tmp_path / "grouped", "grouped")
    trainer = trainer_of(CTRLGroupedTrainer, config(CTRLGroupedConfig, tmp_path, 2), grouped, tiny_path, tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["sequence_lengths"]) == 2 * K and len(batch["pair_chosen"]) == 2 * K * (K - 1) // 2
    assert batch["input_ids"].shape[0] == 1  # everything fits one row of 512 tokens
    sampled = build(calibrated, tmp_path / "sampled", "grouped", strategy="sampled", pairs_per_prompt=1)
    trainer = trainer_of(CTRLGroupedTrainer, config(CTRLGroupedConfig, tmp_path, 4, min_train_rows=0), sampled,
                         tiny_path, tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["sequence_lengths"]) == 2 * 4 and len(batch["pair_chosen"]) == 4  # 2 of K per prompt
    assert np.isfinite(trainer.train().training_loss)


def test_bad_grouped_rows_are_refused(calibrated, tiny_path, tokenizer, tmp_path):
    grouped = build(calibrated, tmp_path / "grouped", "grouped").to_dict()
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    args = config(CTRLGroupedConfig, tmp_path, 2, beta=0.5)

    def refused(rows, message, loss_args=args):
        with pytest.raises(TrainingDataError, match=message):
            CTRLGroupedTrainer(model, loss_args, Dataset.from_dict(rows), processing_class=tokenizer, peft_config=lora)

    bad = {**grouped, "pair_chosen": [[0, 9], *grouped["pair_chosen"][1:]],
           "pair_rejected": [[1, 2], *grouped["pair_rejected"][1:]]}
    refused(bad, r"'pair_chosen' names a completion the group does not have in 1 row\(s\): 0")
    refused({**grouped, "ref_logp": [r[:-1] for r in grouped["ref_logp"]]}, "'ref_logp' must hold one value per")
    refused({k: v for k, v in grouped.items() if k != "ref_logp"}, "lacks column.*ref_logp")
    refused({**grouped, "phi": [[float("nan")] * K, *grouped["phi"][1:]]}, r"NaN, .* 'phi' in 1 row\(s\): 0")
    refused({**grouped, "completion_ids": [[[999]] * K, *grouped["completion_ids"][1:]]}, "outside the model's vocab")
    register_loss(Loss("needs_margin", "pairs", lambda c, r, beta, batch: (c - r - batch["my_margin"]) ** 2,
                       columns=(("my_margin",),)))
    try:
        refused(grouped, "reads my_margin, which a grouped batch does not give",
                config(CTRLGroupedConfig, tmp_path, 2, beta=0.5, ctrl_loss="needs_margin"))
    finally:
        unregister_loss("needs_margin")


def test_train_stage_trains_a_grouped_build_with_any_loss(calibrated, tiny_path, tmp_path):
    build_dataset(calibrated, tmp_path / "grouped", format="grouped", transform="exp", t=3.0, beta=0.5)
    for loss in (None, "pointwise"):
        out = tmp_path / f"adapter_{loss}"
        result = train_from_build(tmp_path / "grouped", out, loss=loss,
                                  loading={"lora_r": 4, "gradient_checkpointing": False},
                                  training_args={"max_steps": 2, "per_device_train_batch_size": 2, "use_cpu": True,
                                                 "save_strategy": "no"})
        assert result.loss == (loss or "dpo") and result.steps == 2
        assert json.loads((out / "ctrl_train.json").read_text())["loss"] == result.loss


def test_the_command_line_builds_and_trains_grouped_rows(calibrated, tmp_path, capsys):
    from data_tools.cli import main

    assert main(["build", str(calibrated), "--data-format", "grouped", "--pair-strategy", "sampled",
                 "--pairs-per-prompt", "4", "--transform", "exp", "--t", "3", "--beta", "0.5",
                 "--out", str(tmp_path / "grouped")]) == 0
    assert "built 4 grouped rows" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "grouped"), "--out", str(tmp_path / "adapter"), "--loss", "ipo",
                 "--lora-r", "4", "--no-gradient-checkpointing", "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--use_cpu", "--packing_row_tokens", "16"]) == 0
    assert "trained ipo" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["pairs", "grouped"])
def test_padding_free_batches_train_on_the_4bit_and_checkpointed_paths(which, calibrated, tiny_path, tokenizer,
                                                                       tmp_path):
    import bitsandbytes as bnb

    data = build(calibrated, tmp_path / which, which)
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=True))  # NF4, gradient checkpointing on
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    cls, config_cls, extra = ((CTRLTrainer, CTRLConfig, {"padding_free": True}) if which == "pairs"
                              else (CTRLGroupedTrainer, CTRLGroupedConfig, {}))
    trainer = cls(model, config(config_cls, tmp_path, 4, gradient_checkpointing=True, packing_row_tokens=32,
                                max_steps=2, **extra), data, processing_class=tokenizer, peft_config=lora)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch
    assert np.isfinite(trainer.train().training_loss)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_inspect_summarises_grouped_rows_per_completion(calibrated, tmp_path):
    from ctrl_offline.stages.inspect import format_summary, inspect_output

    build(calibrated, tmp_path / "grouped", "grouped")
    summary = inspect_output(tmp_path / "grouped")
    assert summary["rows"] == summary["prompts"] == len(PROMPTS) and summary["k"]["max"] == K
    assert sum(summary["u_histogram"]) == len(PROMPTS) * K and summary["unfinished"] == 1
    assert summary["target"]["distinct"] > 1 and "grouped" in format_summary(summary)
