"""`ctrl-data eval` against the plan a build was made for (docs/diagnostics.md, docs/evaluation.md): KL
efficiency and plan fidelity, the on-/off-target KL split from samples, the tilt-fidelity curve, the
notes where they cannot be had; and the soft-label DPO trainer's `loss_gap` (loss − label-entropy floor)."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from tiny_models import WORDS, build_tiny_model, build_tokenizer

REWARD = "test_eval_diagnostics:good_count_reward"
PLAN = {"inference": "bon", "n": 4, "kl": 0.5}


def good_count_reward(prompts, completions):
    """The number of "good" in the completion, plus a tie-break in [0, ½) hashed from the text: tie-free
    between different completions, so the sampled KL split's levels are uniform under π_ref."""
    def tie_break(prompt, completion):
        digest = hashlib.sha256(f"{prompt}\x00{completion}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**65

    return [c.split().count("good") + tie_break(p, c) for p, c in zip(prompts, completions)]


def boosting_adapter(model_dir, out, word="good", boost=1.0):
    """A LoRA adapter on lm_head that raises ``word``'s logit by about ``boost`` wherever the final hidden
    state points along its mean direction μ (ΔW = boost·e_word μ̂ᵀ/|μ|): a policy the reward above prefers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(64)]
    with torch.no_grad():
        hidden = torch.cat([model(**tokenizer(t, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0]
                            for t in texts])
    mu = hidden.mean(dim=0)
    peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=["lm_head"]))
    layer = peft.base_model.model.lm_head
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_((mu / mu.norm())[None, :])
        b = torch.zeros_like(layer.lora_B["default"].weight)
        b[tokenizer.convert_tokens_to_ids(word), 0] = boost / mu.norm()
        layer.lora_B["default"].weight.copy_(b)
    peft.save_pretrained(out, save_embedding_layers=False)
    return out


def planned_build(planner_row: dict | None) -> dict:
    """A ctrl_build.json as `ctrl-data build` writes it (the keys eval reads), planned at K = ∞ or not at all."""
    if planner_row is None:
        return {"stage": "build", "format": "pairs", "transform": "exp", "t": 3.0, "beta": 5.0, "phi_scale": 1.0,
                "unscaled_beta": 5.0, "planner": None, "k": 8}
    return {"stage": "build", "format": "pairs", "transform": planner_row["transform"], "t": planner_row["t"],
            "beta": planner_row["beta"], "phi_scale": 1.0, "unscaled_beta": planner_row["beta"],
            "planner": {**PLAN, "row": planner_row, "k": None, "estimator": None, "simulated": False,
                        "selector_args": None}, "k": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ctrl_offline.maths.planner import plan

    root = tmp_path_factory.mktemp("eval_diagnostics")
    rng = np.random.default_rng(2)
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 5))) + f" {i}" for i in range(12)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    model = build_tiny_model(root / "lm", hidden=32)
    row = plan(PLAN["inference"], PLAN["n"], PLAN["kl"], families=("exp",)).best().to_dict()
    adapter = boosting_adapter(model, root / "adapter")
    (adapter / "ctrl_build.json").write_text(json.dumps(planned_build(row)))
    return {"root": root, "prompts": str(root / "prompts.jsonl"), "model": str(model), "adapter": str(adapter),
            "row": row}


@pytest.fixture
def quick_report(monkeypatch):
    """report.md and the figures without the planner's curves (half a minute on a small CPU)."""
    import ctrl_offline.reports.reporting

    monkeypatch.setattr(ctrl_offline.reports.reporting, "theory_curves", lambda report: (np.array([]), [], []))


def evaluate(setup, out, **kwargs):
    from ctrl_offline.stages.evaluate import evaluate_policy

    args = {"n": (1, 4), "selectors": ("bon",), "max_new_tokens": 6, "num_boot": 300, "policy_samples": 8,
            "reference_samples": 8, "seed": 0, **kwargs}
    return evaluate_policy(setup["prompts"], out, setup["model"], REWARD, **args)


def test_a_planned_adapter_gets_its_plan_diagnostics_kl_split_and_tilt_fidelity(setup, quick_report, capsys):
    from ctrl_offline.maths.diagnostics import kl_efficiency, plan_fidelity
    from ctrl_offline.maths.diagnostics import planned_on_target, planned_tilt
    from ctrl_offline.maths.transforms import get_transform
    from data_tools.cli import main

    out = setup["root"] / "planned"
    # Through the CLI: eval finds ctrl_build.json beside the adapter.
    code = main(["eval", setup["prompts"], "--model", setup["model"], "--adapter", setup["adapter"], "--reward", REWARD,
                 "--eval-n", "1", "4", "--eval-selectors", "bon", "--max-new-tokens", "6", "--eval-policy-samples", "8",
                 "--eval-reference-samples", "8", "--reference-pool", str(setup["root"] / "pool"), "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "report.json").read_text())

    plan = report["plan_diagnostics"]
    kl = report["kl"]["value"]
    reached = next(r["value"] for r in report["win_rates"] if (r["selector"], r["n"]) == ("bon", 4))
    assert 0 < kl < 25 and reached > 0.5  # the adapter moved towards the reward: a non-trivial check below
    transform = get_transform(setup["row"]["transform"], setup["row"]["t"])
    assert (plan["procedure"], plan["kl_spent"], plan["reached"], plan["k"]) == ("bon-4", kl, reached, None)
    assert plan["planned_kl"] == setup["row"]["kl"] and plan["planned_win_rate"] == setup["row"]["win_rate"]
    assert plan["kl_efficiency"] == pytest.approx(kl_efficiency(transform, "bon", 4, kl_spent=kl, reached=reached),
                                                  rel=1e-9)
    assert plan["plan_fidelity"] == pytest.approx(plan_fidelity(transform, "bon", 4, kl_spent=kl, reached=reached),
                                                  rel=1e-9)
    assert "against the plan: bon-4" in printed.out

    split = report["kl_split"]
    assert split["num_stored"] == 8 and split["num_levels"] == 9 and sum(split["level_counts"]) == 12 * 8
    total, on, off = split["total"]["value"], split["on_target"]["value"], split["off_target"]["value"]
    assert on + off == pytest.approx(total, abs=1e-12) and on >= 0
    assert total == pytest.approx(report["kl_sequence"]["value"], abs=1e-12)  # the same samples' mean log-ratio
    for part in ("total", "on_target", "off_target"):
        assert split[part]["ci_low"] <= split[part]["value"] <= split[part]["ci_high"]
    tilt = planned_tilt(planned_build(setup["row"]))
    assert split["planned_on_target"] == pytest.approx(planned_on_target(tilt, 8), rel=1e-12)
    assert 0 < split["planned_on_target"] < setup["row"]["kl"]  # the Bernstein coarsening at M = 8 keeps less

    fidelity = report["tilt_fidelity"]
    assert fidelity["num_points"] == 12 * 8 and len(fidelity["bin_centres"]) == 8
    assert math.isfinite(fidelity["r_squared"]) and 0 <= fidelity["r_squared"] <= 1 and math.isfinite(fidelity["slope"])
    for key in ("bin_edges", "mean_h", "planned", "weight", "slope", "intercept"):
        assert key in fidelity
    assert sum(fidelity["weight"]) == 12 * 8
    assert report["diagnostic_notes"] == [] or all("tie" in note for note in report["diagnostic_notes"])

    text = (out / "report.md").read_text()
    assert "KL efficiency" in text and "plan fidelity" in text and "on target" in text and "R² " in text

    # The same evaluation from the pool just written: the reference samples' text re-tokenised for h.
    again = evaluate(setup, setup["root"] / "from-pool", adapter=setup["adapter"],
                     reference_pool=setup["root"] / "pool", build_info=planned_build(setup["row"]), num_boot=2000)
    assert again.report["reference_pool"]["reused"]
    for key, value in plan.items():  # the same samples, scored in other batches: equal to float32 rounding
        assert again.report["plan_diagnostics"][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float)
                                                         else value)
    assert math.isfinite(again.report["tilt_fidelity"]["r_squared"])


def test_pool_text_scores_as_the_sampled_ids(setup):
    """h of a pooled reference sample (text only) is h of its sampled ids: re-tokenised, EOS where it finished."""
    from ctrl_offline.models.generation import load_causal_lm
    from ctrl_offline.stages.evaluate import _reference_log_ratios

    model, tokenizer = load_causal_lm(setup["model"], setup["adapter"], device="cpu")
    words = [["the", "cat", "sat"], ["good", "good"], ["why", "not", "fast", "dog"]]
    sampled = [{"batch_prompt": i % 2, "completion_ids": tokenizer(" ".join(w), add_special_tokens=False)["input_ids"]
                + ([tokenizer.eos_token_id] if i != 1 else [])} for i, w in enumerate(words)]
    pooled = [{"batch_prompt": i % 2, "completion": " ".join(w), "finished": i != 1} for i, w in enumerate(words)]
    texts = ["tell me about the dog", "how is it"]
    np.testing.assert_allclose(_reference_log_ratios(model, tokenizer, texts, pooled),
                               _reference_log_ratios(model, tokenizer, texts, sampled), rtol=0, atol=1e-6)


def test_an_unplanned_build_gets_notes_and_still_a_report(setup, quick_report):
    result = evaluate(setup, setup["root"] / "unplanned", adapter=setup["adapter"], build_info=planned_build(None))
    report = result.report
    assert report["plan_diagnostics"] is None and report["tilt_fidelity"] is None
    assert any("not planned" in note for note in report["diagnostic_notes"])
    split = report["kl_split"]  # the split needs no plan; the plan's on-target does
    assert split["planned_on_target"] is None
    assert split["on_target"]["value"] + split["off_target"]["value"] == pytest.approx(split["total"]["value"])
    written = json.loads((result.out_dir / "report.json").read_text())
    assert written["diagnostic_notes"] == report["diagnostic_notes"]
    assert "not planned" in (result.out_dir / "report.md").read_text()


def test_no_tilt_fidelity_skips_the_extra_pass(setup, monkeypatch):
    import ctrl_offline.reports.reporting
    import ctrl_offline.stages.evaluate as stage
    from data_tools.cli import main

    monkeypatch.setattr(ctrl_offline.reports.reporting, "write_report", lambda report, policy_u, folder: None)
    monkeypatch.setattr(stage, "_reference_log_ratios", lambda *a, **k: pytest.fail("the extra pass ran"))
    out = setup["root"] / "no-tilt"
    assert main(["eval", setup["prompts"], "--model", setup["model"], "--adapter", setup["adapter"], "--reward", REWARD,
                 "--eval-n", "4", "--eval-selectors", "bon", "--max-new-tokens", "6", "--eval-policy-samples", "8",
                 "--eval-reference-samples", "8", "--no-tilt-fidelity", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tilt_fidelity"] is None and report["plan_diagnostics"] is not None
    assert report["kl_split"]["planned_on_target"] > 0
    assert any("--no-tilt-fidelity" in note for note in report["diagnostic_notes"])


def test_what_the_plan_cannot_say_is_a_clear_refusal():
    """The reasons eval notes instead of plan diagnostics (no model needed)."""
    from ctrl_offline.maths.diagnostics import plan_diagnostics

    row = {"transform": "exp", "t": 12.633827675108567, "beta": 95210.67611451553, "kl": 0.5, "win_rate": 0.8727}
    win_rates = [{"selector": "bon", "n": 4, "value": 0.7}]
    assert plan_diagnostics(planned_build(row), 0.4, win_rates).procedure == "bon-4"
    with pytest.raises(ValueError, match="no build metadata"):
        plan_diagnostics(None, 0.4, win_rates)
    with pytest.raises(ValueError, match="not planned"):
        plan_diagnostics(planned_build(None), 0.4, win_rates)
    with pytest.raises(ValueError, match="did not measure.*--eval-n 4"):
        plan_diagnostics(planned_build(row), 0.4, [{"selector": "bon", "n": 2, "value": 0.7}])
    simulated = planned_build(row)
    simulated["planner"]["simulated"] = True
    with pytest.raises(ValueError, match="simulated"):
        plan_diagnostics(simulated, 0.4, win_rates)
    with pytest.raises(ValueError, match="beyond the plan's curve"):
        plan_diagnostics(planned_build(row), 30.0, win_rates)
    with pytest.raises(ValueError, match="> 0 nats"):
        plan_diagnostics(planned_build(row), 0.0, win_rates)


def test_soft_label_dpo_logs_its_loss_less_the_label_entropy_floor(setup, tmp_path):
    from datasets import Dataset

    from ctrl_offline.training.config import CTRLConfig
    from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.training.trainer import CTRLTrainer

    prompts = ["tell me about the cat", "why is the dog happy", "how is it", "what is good"]
    rows = {"prompt": prompts * 2, "chosen": [" the cat sat", " it is very good", " yes", " great fine"] * 2,
            "rejected": [" bad", " no", " awful awful", " not fine"] * 2,
            "target_phi_gap": [0.1, 0.4, 1.5, -0.3, 2.0, 0.0, 0.7, 3.0], "weight": [1.0, 0.5, 2.0, 1.0] * 2}
    model, lora = load_policy(ModelLoadingConfig(setup["model"], load_in_4bit=False, gradient_checkpointing=False))
    args = CTRLConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                      learning_rate=5e-3, report_to="none", logging_steps=1, save_strategy="no",
                      gradient_checkpointing=False, beta=0.5, seed=0, ctrl_loss="dpo")
    trainer = CTRLTrainer(model, args, Dataset.from_dict(rows), processing_class=build_tokenizer(), peft_config=lora)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss_gap" in h]
    assert len(logged) == 2 and all(h["loss_gap"] >= -1e-6 for h in logged)

    # One batch by hand: the floor is the weighted mean binary entropy of its labels σ(ΔΦ).
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    p = 1.0 / (1.0 + np.exp(-batch["target_phi_gap"].double().numpy()))
    floor = np.mean(batch["weight"].double().numpy() * -(p * np.log(p) + (1 - p) * np.log(1 - p)))
    assert trainer._metrics["train"]["loss_gap"][-1] == pytest.approx(loss - floor, abs=1e-5)
    assert loss - floor >= -1e-6
