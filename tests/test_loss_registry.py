"""The loss registry (ctrl_offline.maths.losses): one registration makes a new loss known to the configs, the trainers,
the train stage and the command line."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from ctrl_offline.training.config import CTRLConfig, CTRLPointwiseConfig
from ctrl_offline.maths.losses import (
    LOSS_TYPES,
    Loss,
    dpo_loss,
    format_losses,
    get_loss,
    loss_names,
    register_loss,
    unregister_loss,
)
from ctrl_offline.stages.build import BUILD_METADATA, FORMATS
from ctrl_offline.training.trainer import CTRLTrainer, TrainingDataError
from data_tools.cli import build_parser, main
from tiny_models import build_tiny_model, build_tokenizer

GOOD = ["good kind answer", "kind good answer", "helpful good answer", "good helpful kind"]
BAD = ["bad rude answer", "rude bad answer", "bad answer here", "rude answer bad"]
PROMPTS = ["say something", "answer me", "tell a story", "help please"]


def hinge(chosen_logratio, rejected_logratio, beta, batch):
    """SLiC-style hinge on the implicit reward gap: max(0, 1 − β(ρ₁ − ρ₂)), chosen always wins."""
    return torch.relu(1.0 - beta * (chosen_logratio - rejected_logratio))


HINGE = Loss("hinge", "pairs", hinge, description="SLiC hinge on β·Δρ (a test's loss)")


@pytest.fixture
def hinge_loss():
    """A new pair loss, registered in this one place."""
    register_loss(HINGE)
    yield HINGE
    unregister_loss("hinge")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden=32))


def pair_rows(n=8):
    return {"prompt": [PROMPTS[i % 4] for i in range(n)], "chosen": [GOOD[i % 4] for i in range(n)],
            "rejected": [BAD[i % 4] for i in range(n)], "target_phi_gap": [0.2 + 0.1 * (i % 3) for i in range(n)]}


def test_the_built_in_losses():
    assert loss_names() == LOSS_TYPES == ("dpo", "dpo_hard", "ipo", "distill", "bonbon", "pointwise",
                                              "weighted_sft")
    assert (*format_losses(), "grouped") == FORMATS  # the grouped layout serves every loss
    assert format_losses()["pairs"] == ("dpo", "dpo_hard", "ipo", "distill", "bonbon")
    assert get_loss("weighted_sft").needs_beta is False and get_loss("pointwise").needs_ref_logps is True
    # dpo reads soft labels from `label` or from `target_phi_gap`: either column will do.
    assert get_loss("dpo").missing_columns(["label"]) == [] == get_loss("dpo").missing_columns(["target_phi_gap"])
    assert get_loss("dpo").missing_columns(["prompt"]) == ["label|target_phi_gap"]


def test_register_get_and_their_errors(hinge_loss):
    assert get_loss("hinge") is hinge_loss and loss_names("pairs")[-1] == "hinge"
    with pytest.raises(ValueError, match="already registered"):
        register_loss(HINGE)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        get_loss("nope")
    with pytest.raises(ValueError, match="no loss named"):
        unregister_loss("nope")
    with pytest.raises(ValueError, match="data_format must be one of"):
        Loss("odd", "triples", hinge)


def test_the_built_in_compute_matches_the_pure_functions():
    chosen, rejected = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4])
    gap = torch.tensor([0.5, -1.0], dtype=torch.float64)
    soft = get_loss("dpo").compute(chosen, rejected, 2.0, {"target_phi_gap": gap})
    torch.testing.assert_close(soft, dpo_loss(chosen, rejected, 2.0, torch.sigmoid(gap).float()))
    hard = get_loss("dpo_hard").compute(chosen, rejected, 2.0, {})
    torch.testing.assert_close(hard, dpo_loss(chosen, rejected, 2.0, 1.0))
    ipo = get_loss("ipo").compute(chosen, rejected, 2.0, {"target_phi_gap": gap})
    torch.testing.assert_close(ipo, (chosen - rejected - gap.float() / 2.0) ** 2)


def test_a_registered_loss_is_a_config_choice_and_a_cli_choice(hinge_loss, tmp_path):
    assert CTRLConfig(output_dir=str(tmp_path), ctrl_loss="hinge", report_to="none").ctrl_loss == "hinge"
    with pytest.raises(ValueError, match="ctrl_loss must be one of"):
        CTRLPointwiseConfig(output_dir=str(tmp_path), ctrl_loss="hinge")
    stages = build_parser()._subparsers._group_actions[0].choices
    loss_flag = next(a for a in stages["train"]._actions if "--loss" in a.option_strings)
    assert "hinge" in loss_flag.choices


def test_a_registered_loss_trains_through_the_cli(hinge_loss, tiny_path, tmp_path, capsys):
    """`ctrl-data train --loss hinge` on a pairs build: the trainer computes the registered loss."""
    folder = tmp_path / "pairs"
    Dataset.from_dict(pair_rows()).save_to_disk(str(folder))
    (folder / BUILD_METADATA).write_text(json.dumps({"stage": "build", "format": "pairs", "transform": "exp",
                                                      "t": 4.0, "beta": 0.5, "phi_scale": 1.0}))
    out = tmp_path / "adapter"
    assert main(["train", str(folder), "--out", str(out), "--model", tiny_path, "--loss", "hinge", "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--use_cpu", "--logging_steps", "1",
                 "--save_strategy", "no"]) == 0
    assert (out / "adapter_config.json").exists()
    # A weights build cannot train a pairs loss: the stage says which format the loss needs.
    weights = tmp_path / "weights"
    Dataset.from_dict({"prompt": PROMPTS, "completion": GOOD, "weight": [1.0] * 4}).save_to_disk(str(weights))
    (weights / BUILD_METADATA).write_text(json.dumps({"stage": "build", "format": "weights"}))
    assert main(["train", str(weights), "--out", str(tmp_path / "w"), "--model", tiny_path, "--loss", "hinge"]) != 0
    assert "cannot train loss 'hinge': it trains on pairs rows" in capsys.readouterr().err


def test_the_trainer_uses_the_registered_compute(hinge_loss, tiny_path, tmp_path):
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    args = CTRLConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=1, per_device_train_batch_size=4,
                      report_to="none", save_strategy="no", beta=0.5, ctrl_loss="hinge", min_train_rows=0)
    trainer = CTRLTrainer(model, args, Dataset.from_dict(pair_rows()), processing_class=tokenizer,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    # At initialisation the adapter is a no-op (ρ = 0), so the hinge is exactly 1 on every pair.
    assert loss.item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(outputs["margins"], torch.zeros(4), atol=1e-5)


def test_a_loss_missing_its_columns_is_refused_by_name(tiny_path, tmp_path):
    register_loss(Loss("needs_gap", "pairs", hinge, columns=(("target_phi_gap",),)))
    try:
        rows = pair_rows()
        del rows["target_phi_gap"]
        args = CTRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", beta=0.5, ctrl_loss="needs_gap")
        with pytest.raises(TrainingDataError, match="lacks column.*target_phi_gap"):
            CTRLTrainer(AutoModelForCausalLM.from_pretrained(tiny_path), args, Dataset.from_dict(rows),
                        processing_class=build_tokenizer())
    finally:
        unregister_loss("needs_gap")


def test_a_loss_reads_its_own_column(tiny_path, tmp_path):
    """A column the loss names (not one of the trainer's own) reaches ``compute`` in the batch."""
    def margin_hinge(chosen, rejected, beta, batch):
        return torch.relu(batch["hinge_margin"].to(chosen.dtype) - beta * (chosen - rejected))

    register_loss(Loss("margin_hinge", "pairs", margin_hinge, columns=(("hinge_margin",),)))
    try:
        rows = {**pair_rows(), "hinge_margin": [0.5, 1.0, 1.5, 2.0] * 2}
        args = CTRLConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=1, per_device_train_batch_size=4,
                          report_to="none", save_strategy="no", beta=0.5, ctrl_loss="margin_hinge", min_train_rows=0)
        trainer = CTRLTrainer(AutoModelForCausalLM.from_pretrained(tiny_path), args, Dataset.from_dict(rows),
                              processing_class=build_tokenizer(),
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert batch["hinge_margin"].tolist() == [0.5, 1.0, 1.5, 2.0]
        # ρ = 0 at initialisation: the loss is the mean margin.
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(1.25, abs=1e-5)
    finally:
        unregister_loss("margin_hinge")
