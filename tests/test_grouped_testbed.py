"""Grouped rows and pair rows train the same tilt, on the exact LM testbed (docs/finite_k.md §9, docs/lm_testbed.md).

A real (tiny) LM pretrained as π_ref, K = 8 exact samples per prompt, calibrated and built by the library's stages
(the K-aware best-of-4 exp plan, soft-label DPO on all pairs) once as pair rows and once as grouped rows. At the
same weights the two give the same loss and gradients of every parameter (full fine-tuning, no adapter); trained
with the same steps and pairs per step they land on the same exact KL and win rates within the seed-to-seed noise.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import load_from_disk

from ctrl_offline.io.files import write_parquet
from ctrl_offline.stages.build import build_dataset
from ctrl_offline.stages.calibrate import calibrate_scored
from ctrl_offline.testbeds.lm_testbed import (Reward, SyntheticLanguage, exact_metrics, pretrain_reference,
                                              response_logprobs, sample_from_model, sequence_logprobs)
from ctrl_offline.training.config import CTRLConfig, CTRLGroupedConfig
from ctrl_offline.training.grouped import CTRLGroupedTrainer
from ctrl_offline.training.trainer import CTRLTrainer

LANGUAGE = SyntheticLanguage(vocab=3, length=3, prompt_vocab=8, prompt_length=2, seed=3)  # 64 prompts, 27 responses
K = 8
PAIRS_PER_GROUP = K * (K - 1) // 2


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    """π_ref saved to a folder, K exact samples per prompt scored and calibrated, pair rows and grouped rows built."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("grouped_testbed")
    torch.manual_seed(0)
    model, tokenizer, _ = pretrain_reference(LANGUAGE, steps=150, per_prompt=64, batch_size=64, hidden=32, lr=1e-2)
    model.save_pretrained(root / "ref")  # from a folder: TRL builds its reference copy for full fine-tuning from it
    tokenizer.save_pretrained(root / "ref")
    model = AutoModelForCausalLM.from_pretrained(root / "ref").eval()
    prompts = LANGUAGE.all_prompts()
    symbols = sample_from_model(model, tokenizer, LANGUAGE, prompts, K, seed=0)
    ref_logps = sequence_logprobs(model, tokenizer, LANGUAGE, prompts, symbols)
    reward = Reward(LANGUAGE)
    offset, eos = tokenizer.convert_tokens_to_ids("r0"), tokenizer.eos_token_id
    rows = {"prompt_id": [], "prompt": [], "completion": [], "sample_idx": [], "reward": [], "finished": [],
            "ref_logp": [], "completion_ids": []}
    for prompt, draws, logps in zip(prompts, symbols, ref_logps):
        for j, (y, r, lp) in enumerate(zip(draws, reward(prompt, draws), logps)):
            for key, value in (("prompt_id", prompt), ("prompt", prompt), ("completion", LANGUAGE.response_text(y)),
                               ("sample_idx", j), ("reward", float(r)), ("finished", True), ("ref_logp", float(lp)),
                               ("completion_ids", [offset + int(s) for s in y] + [eos])):
                rows[key].append(value)
    write_parquet(pa.table(rows), root / "scored.parquet",
                  metadata={"stage": "score", "reference_model": str(root / "ref"), "reward_model": "lm_testbed"})
    calibrate_scored(root / "scored.parquet", root / "calibrated")
    for fmt in ("pairs", "grouped"):
        build_dataset(root / "calibrated", root / fmt, format=fmt, transform="exp", inference="bon", n=4, kl=0.5,
                      tokenizer=str(root / "ref"))
    reference, _ = response_logprobs(model, tokenizer, LANGUAGE, prompts)
    return {"root": root, "tokenizer": tokenizer, "prompts": prompts, "reference": reference,
            "rewards": reward.table(prompts)}


def _trainer(testbed, fmt: str, *, seed: int = 0, prompts=None, groups_per_step: int = 8, steps: int = 1,
             lr: float = 3e-3):
    from transformers import AutoModelForCausalLM

    data = load_from_disk(str(testbed["root"] / fmt))
    if prompts is not None:
        data = data.filter(lambda ids: [i in prompts for i in ids], batched=True, input_columns="prompt_id")
    per_step = groups_per_step if fmt == "grouped" else groups_per_step * PAIRS_PER_GROUP
    common = dict(output_dir=str(testbed["root"] / "out"), use_cpu=True, report_to="none", save_strategy="no",
                  max_steps=steps, learning_rate=lr, lr_scheduler_type="linear", gradient_checkpointing=False,
                  seed=seed, disable_tqdm=True, max_length=None, bf16=False, logging_steps=10**6, min_train_rows=0,
                  per_device_train_batch_size=per_step)
    model = AutoModelForCausalLM.from_pretrained(testbed["root"] / "ref")
    if fmt == "grouped":
        return CTRLGroupedTrainer(model, CTRLGroupedConfig(**common), data, processing_class=testbed["tokenizer"])
    return CTRLTrainer(model, CTRLConfig(**common), data, processing_class=testbed["tokenizer"])


def _loss_and_grads(trainer):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_the_testbed_builds_hold_the_same_pairs_and_give_the_same_first_step(testbed):
    pairs, grouped = (load_from_disk(str(testbed["root"] / fmt)) for fmt in ("pairs", "grouped"))
    assert sum(map(len, grouped["pair_chosen"])) == len(pairs)  # ties (a response drawn twice) left out of both
    some = set(testbed["prompts"][:6])  # both batches: every pair of these prompts
    on_pairs = _trainer(testbed, "pairs", prompts=some, groups_per_step=len(testbed["prompts"]))
    on_groups = _trainer(testbed, "grouped", prompts=some, groups_per_step=len(testbed["prompts"]))
    (loss_p, grads_p), (loss_g, grads_g) = _loss_and_grads(on_pairs), _loss_and_grads(on_groups)
    # The groups' normaliser is the set's mean pairs per group: the pair rows' mean when the batch is the whole set.
    assert loss_g == pytest.approx(loss_p, rel=1e-5)
    assert grads_p.keys() == grads_g.keys() and len(grads_p) > 10
    for name, grad in grads_p.items():
        assert (grads_g[name] - grad).abs().max().item() <= 1e-4 * grad.abs().max().item() + 1e-8, name


@pytest.mark.slow
def test_grouped_and_pair_rows_reach_the_same_tilt(testbed):
    """300 steps of 8 prompts' pairs (224 pairs a step, ~37 epochs), two seeds each: 44 s on 2 cores."""
    figures = {}
    for fmt in ("pairs", "grouped"):
        runs = []
        for seed in (0, 1):
            trainer = _trainer(testbed, fmt, seed=seed, steps=300)
            trainer.train()
            logp, _ = response_logprobs(trainer.model, testbed["tokenizer"], LANGUAGE, testbed["prompts"])
            m = exact_metrics(logp, testbed["reference"], testbed["rewards"], n_values=(4,))
            runs.append((m.kl, m.bon_win_rate[4], m.standard_win_rate))
        figures[fmt] = np.mean(runs, axis=0)
    (kl_p, bon_p, std_p), (kl_g, bon_g, std_g) = figures["pairs"], figures["grouped"]
    assert kl_p > 0.1  # training moved the policy
    assert kl_g == pytest.approx(kl_p, abs=0.02)  # measured: 0.306 against 0.313
    assert bon_g == pytest.approx(bon_p, abs=0.01)  # 0.726 against 0.724
    assert std_g == pytest.approx(std_p, abs=0.01)  # 0.643 against 0.642
