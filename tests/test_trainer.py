"""The real trainers, end to end on a tiny model built from a config (CPU, a few steps each)."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from ctrl_offline.training.config import CTRLConfig, CTRLPointwiseConfig
from ctrl_offline.models.modeling import ModelLoadingConfig, QuantizationUnavailable, bitsandbytes_available, load_policy
from ctrl_offline.training.trainer import CTRLPointwiseTrainer, CTRLTrainer, TrainingDataError
from tiny_models import build_tiny_model, build_tokenizer

PROMPTS = ["tell me about the cat", "why is the dog happy", "how is it", "what is good"]
GOOD = [" the cat sat on the mat", " the dog ran fast and is happy", " it is very good", " yes it is great"]
BAD = [" bad", " no", " awful awful", " not fine"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    # hidden 64: bitsandbytes' CPU NF4 kernels need rows of at least one 64-wide block.
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden=64))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def pair_rows(n=8, with_ref=None):
    rows = {
        "prompt": [PROMPTS[i % 4] for i in range(n)],
        "chosen": [GOOD[i % 4] for i in range(n)],
        "rejected": [BAD[i % 4] for i in range(n)],
        "target_phi_gap": [0.2 + 0.1 * (i % 3) for i in range(n)],
        "weight": [1.0 + 0.5 * (i % 2) for i in range(n)],
    }
    if with_ref is not None:
        rows["ref_chosen_logps"], rows["ref_rejected_logps"] = with_ref
    return rows


def pointwise_rows(n=8):
    return {
        "prompt": [PROMPTS[i % 4] for i in range(n)],
        "completion": [(GOOD + BAD)[i % 8] for i in range(n)],
        "target": [0.5 if i % 8 < 4 else -0.5 for i in range(n)],
        "weight": [1.5 if i % 8 < 4 else 0.5 for i in range(n)],
    }


def config(cls, tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=3, per_device_train_batch_size=4,
                learning_rate=5e-3, report_to="none", logging_steps=1, save_strategy="no",
                gradient_checkpointing=False, beta=0.5, seed=0)
    base.update(overrides)
    return cls(**base)


def sequence_logps(model, tokenizer, prompts, completions):
    """Summed log-probs of each completion (+ EOS, as the trainers add it) given its prompt."""
    out = []
    for prompt, completion in zip(prompts, completions):
        p = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        out.append(logp[len(p) - 1:].sum().item())
    return np.array(out)


@pytest.mark.parametrize("loss", ["dpo", "dpo_hard", "ipo", "distill", "bonbon"])
def test_pair_losses_train_and_the_adapter_reloads(loss, tiny_path, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path, ctrl_loss=loss), Dataset.from_dict(pair_rows()),
                          processing_class=tokenizer, peft_config=lora)
    assert not trainer.uses_stored_ref_logps  # computed once by TRL before training
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()

    trained = trainer.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    prompts, completions = PROMPTS, GOOD
    np.testing.assert_allclose(sequence_logps(reloaded, tokenizer, prompts, completions),
                               sequence_logps(trained, tokenizer, prompts, completions), rtol=1e-5, atol=1e-5)
    # Training moved the policy away from the reference (the base with the adapter off).
    with reloaded.disable_adapter():
        ref = sequence_logps(reloaded, tokenizer, prompts, completions)
    assert np.abs(sequence_logps(reloaded, tokenizer, prompts, completions) - ref).max() > 1e-3


def test_soft_label_dpo_raises_the_chosen_margin(tiny_path, tokenizer, tmp_path):
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    rows = pair_rows()
    rows["target_phi_gap"] = [4.0] * 8
    trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path, max_steps=8, ctrl_loss="dpo"),
                          Dataset.from_dict(rows), processing_class=tokenizer, peft_config=lora)
    trainer.train()
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert margins[-1] > margins[0] + 0.05


def test_stored_reference_logps_skip_the_reference_pass(tiny_path, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    rows = pair_rows()
    ref = (sequence_logps(base, tokenizer, rows["prompt"], rows["chosen"]).tolist(),
           sequence_logps(base, tokenizer, rows["prompt"], rows["rejected"]).tolist())
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    stored = CTRLTrainer(model, config(CTRLConfig, tmp_path, max_steps=1), Dataset.from_dict(pair_rows(with_ref=ref)),
                         processing_class=tokenizer, peft_config=lora)
    assert stored.uses_stored_ref_logps and not stored.args.precompute_ref_log_probs
    np.testing.assert_allclose(stored.train_dataset["ref_chosen_logps"], ref[0])

    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    computed = CTRLTrainer(model, config(CTRLConfig, tmp_path / "b", max_steps=1), Dataset.from_dict(pair_rows()),
                           processing_class=tokenizer, peft_config=lora)
    # The stored values agree with TRL's own reference pass (the base with adapters disabled).
    np.testing.assert_allclose(computed.train_dataset["ref_chosen_logps"], ref[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(computed.train_dataset["ref_rejected_logps"], ref[1], rtol=1e-4, atol=1e-4)
    # At step 0 the policy equals the reference, so the first logged margin is zero with stored values.
    stored.train()
    first = next(h for h in stored.state.log_history if "rewards/margins" in h)
    assert abs(first["rewards/margins"]) < 1e-3


@pytest.mark.parametrize("loss", ["pointwise", "weighted_sft"])
def test_pointwise_losses_train(loss, tiny_path, tokenizer, tmp_path):
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    trainer = CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path, ctrl_loss=loss, max_steps=6),
                                   Dataset.from_dict(pointwise_rows()), processing_class=tokenizer, peft_config=lora)
    if loss == "pointwise":
        # ref_logp was absent: one reference pass added it, matching the base model.
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_path)
        rows = pointwise_rows()
        np.testing.assert_allclose(trainer.train_dataset["ref_logp"],
                                   sequence_logps(base, tokenizer, rows["prompt"], rows["completion"]),
                                   rtol=1e-4, atol=1e-4)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(v) for v in losses)
    if loss == "pointwise":
        assert losses[-1] < losses[0]


@pytest.mark.skipif(not bitsandbytes_available()[0], reason="bitsandbytes cannot run NF4 here")
def test_qlora_nf4_path_trains_and_saves_a_peft_adapter(tiny_path, tokenizer, tmp_path):
    import bitsandbytes as bnb

    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=True))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant
    assert set(lora.target_modules) >= {"q_proj", "v_proj", "down_proj"}
    trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path, max_steps=2, gradient_checkpointing=True),
                          Dataset.from_dict(pair_rows()), processing_class=tokenizer, peft_config=lora)
    assert math.isfinite(trainer.train().training_loss)
    trainer.save_model(str(tmp_path / "qlora"))
    assert (tmp_path / "qlora" / "adapter_model.safetensors").exists()


def test_four_bit_where_it_cannot_run(tiny_path, monkeypatch, caplog):
    import ctrl_offline.models.modeling as modeling

    monkeypatch.setattr(modeling, "bitsandbytes_available", lambda: (False, "no kernel for this device"))
    with pytest.raises(QuantizationUnavailable, match="no kernel for this device.*allow_full_precision_fallback"):
        load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=True))
    with caplog.at_level(logging.WARNING):
        model, _ = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=True, allow_full_precision_fallback=True))
    assert "full precision" in caplog.text
    assert getattr(model.config, "quantization_config", None) is None


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="cannot load model .*offline"):
        load_policy(ModelLoadingConfig(str(tmp_path / "nowhere"), load_in_4bit=False))


@pytest.mark.parametrize(
    "mutate,cls,loss,message",
    [
        (lambda r: r.update(prompt=[""] + r["prompt"][1:]), CTRLConfig, "dpo", r"empty 'prompt' in 1 row\(s\): 0"),
        (lambda r: r.update(chosen=r["chosen"][:3] + ["  "] + r["chosen"][4:]), CTRLConfig, "dpo", r"empty 'chosen'.*: 3"),
        (lambda r: r.update(target_phi_gap=[float("nan")] * 8), CTRLConfig, "ipo", r"NaN.*'target_phi_gap' in 8 row"),
        (lambda r: r.update(weight=[1.0] * 7 + [float("inf")]), CTRLConfig, "dpo", r"'weight' in 1 row\(s\): 7"),
        (lambda r: r.pop("target_phi_gap"), CTRLConfig, "distill", r"lacks column\(s\) target_phi_gap"),
    ],
)
def test_bad_pairs_are_refused_by_row(mutate, cls, loss, message, tiny_path, tokenizer, tmp_path):
    rows = pair_rows()
    mutate(rows)
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False))
    with pytest.raises(TrainingDataError, match=message):
        CTRLTrainer(model, config(cls, tmp_path, ctrl_loss=loss), Dataset.from_dict(rows), processing_class=tokenizer,
                    peft_config=lora)


def test_bad_pointwise_sets_are_refused(tiny_path, tokenizer, tmp_path):
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False))
    rows = pointwise_rows()
    rows.pop("target")
    with pytest.raises(TrainingDataError, match=r"lacks column\(s\) target"):
        CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path), Dataset.from_dict(rows),
                             processing_class=tokenizer, peft_config=lora)
    rows = pointwise_rows()
    rows["target"][2] = float("nan")
    with pytest.raises(TrainingDataError, match=r"'target' in 1 row\(s\): 2"):
        CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path), Dataset.from_dict(rows),
                             processing_class=tokenizer, peft_config=lora)


def test_configs_refuse_unknown_losses(tmp_path):
    with pytest.raises(ValueError, match="ctrl_loss must be one of"):
        CTRLConfig(output_dir=str(tmp_path), ctrl_loss="pointwise")
    with pytest.raises(ValueError, match="ctrl_loss must be one of"):
        CTRLPointwiseConfig(output_dir=str(tmp_path), ctrl_loss="dpo")


def test_long_pairs_are_truncated_with_a_count(tiny_path, tokenizer, tmp_path, caplog):
    rows = pair_rows()
    rows["chosen"] = [" the cat sat on the mat and the dog ran fast and it was very good" * 2] * 8
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False))
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.training.trainer"):
        trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path, max_length=16, max_steps=1), Dataset.from_dict(rows),
                              processing_class=tokenizer, peft_config=lora)
    assert trainer.num_truncated == 8
    assert "8 of 8 pairs exceed max_length=16" in caplog.text
    assert math.isfinite(trainer.train().training_loss)


def test_training_resumes_from_its_last_checkpoint(tiny_path, tokenizer, tmp_path):
    def make(max_steps):
        model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False))
        args = config(CTRLConfig, tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1)
        return CTRLTrainer(model, args, Dataset.from_dict(pair_rows()), processing_class=tokenizer, peft_config=lora)

    make(2).train()  # a run that stopped (was killed) after its checkpoint at step 2
    assert (tmp_path / "out" / "checkpoint-2").exists()
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        steps = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    resumed = make(4)
    resumed.add_callback(CountSteps)
    resumed.train(resume_from_checkpoint=True)
    assert CountSteps.steps == [3, 4]  # picked up after step 2 instead of starting over
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4]


# -- β travels with the data --------------------------------------------------------------------------------
BUILD_INFO = {"stage": "build", "transform": "exp", "t": 12.6, "beta": 0.37, "phi_scale": 2.5e3, "unscaled_beta": 925.0}


def build_folder(tmp_path, rows, info=BUILD_INFO, name="pairs"):
    """A training set saved as `ctrl-data build` saves it: a datasets folder with ctrl_build.json beside the data."""
    from datasets import load_from_disk

    from ctrl_offline.stages.build import BUILD_METADATA

    folder = tmp_path / name
    Dataset.from_dict(rows).save_to_disk(str(folder))
    (folder / BUILD_METADATA).write_text(json.dumps(info))
    return load_from_disk(str(folder))


def test_read_build_info_follows_a_loaded_dataset(tmp_path):
    from ctrl_offline.io.files import read_build_info

    data = build_folder(tmp_path, pair_rows())
    for source in (tmp_path / "pairs", str(tmp_path / "pairs" / "ctrl_build.json"), data, data.select([3, 1]),
                   data.shuffle(seed=0), data.filter(lambda row: row["weight"] > 1)):
        info = read_build_info(source)
        assert (info["beta"], info["phi_scale"], info["unscaled_beta"]) == (0.37, 2.5e3, 925.0), source
    assert read_build_info(Dataset.from_dict(pair_rows())) is None
    assert read_build_info(tmp_path) is None


@pytest.mark.parametrize("cls,trainer_cls,rows,loss", [(CTRLConfig, CTRLTrainer, pair_rows, "dpo"),
                                                       (CTRLPointwiseConfig, CTRLPointwiseTrainer, pointwise_rows,
                                                        "pointwise")])
def test_trainers_read_beta_from_the_build_metadata(cls, trainer_cls, rows, loss, tiny_path, tokenizer, tmp_path):
    data = build_folder(tmp_path, rows())
    args = config(cls, tmp_path, beta=None, ctrl_loss=loss, max_steps=1)
    assert args.beta is None
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    trainer = trainer_cls(model, args, data, processing_class=tokenizer, peft_config=lora)
    assert trainer.args.beta == 0.37 and trainer.build_info["unscaled_beta"] == 925.0
    assert math.isfinite(trainer.train().training_loss)
    # The same β given explicitly is confirmed, not refused (relative tolerance 1e-6).
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    trainer = trainer_cls(model, config(cls, tmp_path, beta=0.37 * (1 + 1e-8), ctrl_loss=loss), data,
                          processing_class=tokenizer, peft_config=lora)
    assert trainer.args.beta == pytest.approx(0.37)


def test_a_set_without_the_column_its_loss_reads_is_refused_by_name(tiny_path, tokenizer, tmp_path):
    rows = pair_rows()
    rows["phi_gap"] = rows.pop("target_phi_gap")  # not a column any loss reads
    data = build_folder(tmp_path, rows)
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    with pytest.raises(ValueError, match="target_phi_gap"):
        CTRLTrainer(model, config(CTRLConfig, tmp_path, beta=None, ctrl_loss="ipo", max_steps=1), data,
                    processing_class=tokenizer, peft_config=lora)


def test_a_contradicting_beta_is_refused(tiny_path, tokenizer, tmp_path, caplog):
    data = build_folder(tmp_path, pair_rows())
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    with pytest.raises(ValueError, match=r"beta=0\.5 was passed.*records beta=0\.37") as err:
        CTRLTrainer(model, config(CTRLConfig, tmp_path, beta=0.5), data, processing_class=tokenizer, peft_config=lora)
    assert "raw-Φ β (unscaled_beta" not in str(err.value) and "allow_beta_mismatch" in str(err.value)
    # The planner's raw-Φ β (unscaled_beta): the message says so and gives the β the trainer needs.
    with pytest.raises(ValueError, match=r"beta=925\.0 was passed.*records beta=0\.37") as err:
        CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path, beta=925.0),
                             build_folder(tmp_path, pointwise_rows(), name="pointwise"), processing_class=tokenizer,
                             peft_config=lora)
    assert "You passed the raw-Φ β (unscaled_beta=925.0" in str(err.value)
    assert "unscaled_beta / phi_scale = 925 / 2500 = 0.37" in str(err.value)
    # allow_beta_mismatch lets it through, with a warning.
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.training.trainer"):
        trainer = CTRLTrainer(model, config(CTRLConfig, tmp_path, beta=0.5, allow_beta_mismatch=True), data,
                              processing_class=tokenizer, peft_config=lora)
    assert trainer.args.beta == 0.5 and trainer.beta == 0.5
    assert "training with beta=0.5 anyway (allow_beta_mismatch)" in caplog.text


def test_beta_is_needed_without_metadata(tiny_path, tokenizer, tmp_path):
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    for cls, trainer_cls, rows in ((CTRLConfig, CTRLTrainer, pair_rows),
                                   (CTRLPointwiseConfig, CTRLPointwiseTrainer, pointwise_rows)):
        with pytest.raises(ValueError, match=r"beta is needed: the training set has no build metadata"):
            trainer_cls(model, config(cls, tmp_path, beta=None), Dataset.from_dict(rows()), processing_class=tokenizer,
                        peft_config=lora)
    # weighted SFT's weights already hold β: it trains without one.
    trainer = CTRLPointwiseTrainer(model, config(CTRLPointwiseConfig, tmp_path, beta=None, ctrl_loss="weighted_sft"),
                                   Dataset.from_dict(pointwise_rows()), processing_class=tokenizer, peft_config=lora)
    assert trainer.args.beta is None
    with pytest.raises(ValueError, match="beta must be > 0"):
        CTRLConfig(output_dir=str(tmp_path), beta=0.0)


def test_arguments_that_read_beta_serve_another_training_set(tmp_path):
    from ctrl_offline.training.trainer import resolve_beta

    args = config(CTRLConfig, tmp_path, beta=None)
    resolve_beta(args, build_folder(tmp_path, pair_rows(), name="a"))
    assert args.beta == 0.37
    resolve_beta(args, build_folder(tmp_path, pair_rows(), {**BUILD_INFO, "beta": 0.2}, name="b"))
    assert args.beta == 0.2  # read again, not taken for a β the user passed
    with pytest.raises(ValueError, match="beta is needed"):
        resolve_beta(args, Dataset.from_dict(pair_rows()))
    # An evaluation set built with another β contradicts the training set's.
    args = config(CTRLConfig, tmp_path, beta=None)
    with pytest.raises(ValueError, match=r"training set's beta=0\.37 differs from beta=0\.2 in the eval_dataset"):
        resolve_beta(args, build_folder(tmp_path, pair_rows(), name="c"),
                     build_folder(tmp_path, pair_rows(), {**BUILD_INFO, "beta": 0.2}, name="d"))
