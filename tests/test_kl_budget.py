"""KLBudgetCallback and SampledKL: training stopped at a KL budget, on real trainers and tiny models."""

import logging
import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ctrl_offline.training.config import CTRLConfig
from ctrl_offline.training.kl_budget import KLBudgetCallback, KLEstimate, SampledKL
from ctrl_offline.models.modeling import ModelLoadingConfig, load_policy
from ctrl_offline.pipeline.recipe import RecipeConfig, RecipeError, parse_recipe_args
from ctrl_offline.training.trainer import CTRLTrainer


PROMPTS = ["tell me about the cat", "why is the dog happy", "how is it", "what is good", "the cat sat",
           "is it fine", "yes or no", "a dog ran"]
GOOD = [" the cat sat on the mat", " the dog ran fast and is happy", " it is very good", " yes it is great"]
BAD = [" bad", " no", " awful awful", " not fine"]



# -- a plain model (full fine-tuning) whose KL is exact -------------------------------------------
class Categorical(torch.nn.Module):
    """π = softmax(logits) over 6 outcomes, π_ref uniform; the loss pulls π towards outcome 0."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(6))
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, target=None):
        return {"loss": -torch.log_softmax(self.logits, -1)[target].mean()}


def exact_categorical_kl(model) -> KLEstimate:
    logp = torch.log_softmax(model.logits.detach().double(), -1)
    return KLEstimate(float((logp.exp() * (logp + math.log(6))).sum()), 0.0)


class Recording:
    """An estimator that remembers the weights it was called on."""

    def __init__(self, estimate):
        self.estimate, self.calls = estimate, []

    def __call__(self, model):
        assert not model.training and not torch.is_grad_enabled()
        result = self.estimate(model)
        self.calls.append((result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        return result


def categorical_trainer(tmp_path, callback, max_steps=40, **saving):
    saving = saving or {"save_strategy": "no"}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=max_steps, learning_rate=0.05,
                             per_device_train_batch_size=2, report_to="none", logging_steps=5, seed=0,
                             disable_tqdm=True, **saving)
    data = [{"target": 0}] * 8
    return Trainer(model=Categorical(), args=args, train_dataset=data,
                   callbacks=[callback] if callback is not None else None)


def test_plain_model_stops_at_the_budget_and_interpolates(tmp_path):
    budget = 0.3
    kl = Recording(exact_categorical_kl)
    callback = KLBudgetCallback(budget, kl, every_n_steps=3, tolerance=0.002)
    trainer = categorical_trainer(tmp_path, callback)
    trainer.train()
    assert callback.reached and trainer.state.global_step < 40 and trainer.state.global_step % 3 == 0
    left = exact_categorical_kl(trainer.model).value
    assert abs(left - budget) <= 0.002 and callback.final.value == pytest.approx(left, abs=1e-12)
    assert left <= budget + 0.002
    steps = [h for h in callback.history if "alpha" not in h]
    assert [h["step"] for h in steps] == list(range(3, trainer.state.global_step + 1, 3))
    assert steps[-1]["kl"] > budget >= steps[-2]["kl"]
    assert 1 <= sum("alpha" in h for h in callback.history) <= 12
    assert torch.equal(trainer.model.frozen, torch.ones(3))
    logged = [h for h in trainer.state.log_history if "kl" in h]
    assert [h["kl"] for h in logged] == [h["kl"] for h in callback.history]
    assert all("kl_stderr" in h and "step" in h for h in logged)


def test_a_budget_passed_at_the_first_check_is_reported(tmp_path, caplog):
    callback = KLBudgetCallback(0.05, exact_categorical_kl, every_n_steps=20, tolerance=0.002)
    trainer = categorical_trainer(tmp_path, callback)
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.training.kl_budget"):
        trainer.train()
    assert callback.reached and trainer.state.global_step == 20
    assert abs(callback.final.value - 0.05) <= 0.002
    assert "already passed at the first check (step 20" in caplog.text and "every_n_steps" in caplog.text
    caplog.clear()
    callback = KLBudgetCallback(0.05, exact_categorical_kl, every_n_steps=1, tolerance=0.002)
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.training.kl_budget"):
        categorical_trainer(tmp_path, callback).train()
    assert callback.reached and "first check" not in caplog.text


def test_plain_model_restores_the_last_weights_under_budget(tmp_path):
    budget = 0.3
    kl = Recording(exact_categorical_kl)
    callback = KLBudgetCallback(budget, kl, every_n_steps=2, interpolate=False)
    trainer = categorical_trainer(tmp_path, callback)
    trainer.train()
    assert callback.reached and len(kl.calls) == trainer.state.global_step // 2  # no bisection
    under = [(estimate, weights) for estimate, weights in kl.calls if estimate.value <= budget][-1]
    assert torch.equal(trainer.model.logits.detach(), under[1]["logits"])
    assert callback.final == under[0] and callback.final.value <= budget
    assert kl.calls[-1][0].value > budget and "alpha" not in callback.history[-1]


def test_budget_not_reached_warns_and_leaves_the_weights(tmp_path, caplog):
    plain = categorical_trainer(tmp_path / "plain", None, max_steps=5)
    plain.train()
    kl = Recording(exact_categorical_kl)
    callback = KLBudgetCallback(50.0, kl, every_n_steps=2)
    trainer = categorical_trainer(tmp_path, callback, max_steps=5)
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.training.kl_budget"):
        trainer.train()
    assert not callback.reached and trainer.state.global_step == 5
    assert [h["step"] for h in callback.history] == [2, 4, 5]  # + one estimate at the end of training
    assert callback.final == kl.calls[-1][0] == exact_categorical_kl(trainer.model)
    assert torch.equal(trainer.model.logits, plain.model.logits)  # the callback changed nothing
    message = caplog.text
    assert "KL budget not reached" in message and f"{callback.final.value:.4g}" in message and "50" in message
    assert "more steps" in message and "learning rate" in message and "β" in message

    # The last step estimated already: no second estimate at the end.
    kl = Recording(exact_categorical_kl)
    callback = KLBudgetCallback(50.0, kl, every_n_steps=1)
    categorical_trainer(tmp_path / "every", callback, max_steps=3).train()
    assert [h["step"] for h in callback.history] == [1, 2, 3] and callback.final == kl.calls[-1][0]


def test_last_estimate_over_budget_at_the_end_of_training_settles_too(tmp_path):
    callback = KLBudgetCallback(0.3, exact_categorical_kl, every_n_steps=100, tolerance=0.002)
    trainer = categorical_trainer(tmp_path, callback, max_steps=40)
    trainer.train()
    assert trainer.state.global_step == 40 and callback.reached
    assert abs(exact_categorical_kl(trainer.model).value - 0.3) <= 0.002


class Crash(Exception):
    pass


def test_a_run_resumed_from_its_checkpoint_holds_the_budget_as_if_never_stopped(tmp_path, caplog):
    """Killed after its checkpoint at step 6, resumed by a fresh callback: the same estimates, the same stop and
    the same weights as a run never stopped, and no claim that the budget was passed at the first check."""
    def run(folder, crash_at=None, resume=False):
        class CrashAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == crash_at:
                    raise Crash

        callback = KLBudgetCallback(0.3, exact_categorical_kl, every_n_steps=3, tolerance=0.002)
        trainer = categorical_trainer(folder, callback, save_strategy="steps", save_steps=3)
        if crash_at is not None:
            trainer.add_callback(CrashAt)
        trainer.train(resume_from_checkpoint=resume or None)
        return callback, trainer

    whole, whole_trainer = run(tmp_path / "whole")
    assert whole.reached and whole_trainer.state.global_step > 6
    with pytest.raises(Crash):
        run(tmp_path / "killed", crash_at=7)
    assert (tmp_path / "killed" / "out" / "checkpoint-6").exists()
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.training.kl_budget"):
        resumed, resumed_trainer = run(tmp_path / "killed", resume=True)
    assert resumed.reached and resumed_trainer.state.global_step == whole_trainer.state.global_step
    assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history]
    assert [h["kl"] for h in resumed.history] == pytest.approx([h["kl"] for h in whole.history], abs=1e-9)
    assert [h.get("alpha") for h in resumed.history] == [h.get("alpha") for h in whole.history]
    assert resumed.final.value == pytest.approx(whole.final.value, abs=1e-9)
    assert torch.allclose(resumed_trainer.model.logits, whole_trainer.model.logits, atol=1e-7)
    assert "first check" not in caplog.text


def test_a_run_resumed_from_the_checkpoint_where_it_reached_its_budget_trains_no_further(tmp_path):
    """The checkpoint saved as the budget was reached holds the weights left: resuming it (a re-run after a crash
    before the adapter was written) keeps them and their KL, estimates nothing and does not train on."""
    def run(resume=False):
        callback = KLBudgetCallback(0.3, exact_categorical_kl, every_n_steps=3, tolerance=0.002)
        trainer = categorical_trainer(tmp_path, callback, save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume or None)
        return callback, trainer

    whole, whole_trainer = run()
    assert whole.reached
    stop = whole_trainer.state.global_step
    assert (tmp_path / "out" / f"checkpoint-{stop}").exists()
    resumed, resumed_trainer = run(resume=True)
    assert resumed.reached and resumed.final.value == pytest.approx(whole.final.value, abs=1e-12)
    assert resumed_trainer.state.global_step <= stop + 1  # the one step the trainer takes before it looks
    assert len(resumed.history) == len(whole.history)  # no new estimate
    assert torch.allclose(resumed_trainer.model.logits, whole_trainer.model.logits, atol=1e-7)
    assert exact_categorical_kl(resumed_trainer.model).value == pytest.approx(whole.final.value, abs=1e-9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0.0), "budget must be a finite KL > 0"), (dict(budget=-1.0), "budget must be"),
    (dict(budget=math.inf), "budget must be"), (dict(budget=math.nan), "budget must be"),
    (dict(every_n_steps=0), "every_n_steps must be an integer ≥ 1"), (dict(every_n_steps=1.5), "every_n_steps"),
    (dict(tolerance=0.0), "tolerance must be > 0"), (dict(max_bisections=-1), "max_bisections must be"),
])
def test_invalid_settings_are_refused(kwargs, match):
    settings = {"budget": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        KLBudgetCallback(settings.pop("budget"), exact_categorical_kl, **settings)


def test_nothing_trainable_is_refused_at_train_begin(tmp_path):
    model = Categorical().requires_grad_(False)
    callback = KLBudgetCallback(0.5, exact_categorical_kl)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    with pytest.raises(TypeError, match="must return a KLEstimate"):
        bad = KLBudgetCallback(0.5, lambda m: 0.1)
        state = TrainerState(global_step=1)
        bad.on_train_begin(args, state, TrainerControl(), model=Categorical())
        bad.on_step_end(args, state, TrainerControl(), model=Categorical())


# -- the CTRL trainer with LoRA -------------------------------------------------------------------
def next_token_kl(tokenizer):
    """Exact KL(π‖π_ref) of the next token after each prompt, averaged: a deterministic estimator."""
    encoded = [torch.tensor([tokenizer(p)["input_ids"]]) for p in PROMPTS[:4]]

    def estimate(model):
        values = []
        for ids in encoded:
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
            with model.disable_adapter():
                ref = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
            values.append(float((logp.exp() * (logp - ref)).sum()))
        return KLEstimate(sum(values) / len(values), 0.0)

    return estimate


def pair_rows(n=8):
    return {"prompt": [PROMPTS[i % 4] for i in range(n)], "chosen": [GOOD[i % 4] for i in range(n)],
            "rejected": [BAD[i % 4] for i in range(n)], "target_phi_gap": [4.0] * n}


@pytest.mark.parametrize("interpolate", [True, False])
def test_ctrl_trainer_with_lora_holds_the_budget(interpolate, tiny_path, tokenizer, tmp_path):
    budget, tolerance = 0.006, 2e-5
    model, lora = load_policy(ModelLoadingConfig(tiny_path, load_in_4bit=False, gradient_checkpointing=False))
    args = CTRLConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=12, per_device_train_batch_size=4,
                      learning_rate=3e-3, report_to="none", logging_steps=1, save_strategy="no",
                      gradient_checkpointing=False, beta=0.5, seed=0, disable_tqdm=True)
    kl = Recording(next_token_kl(tokenizer))
    callback = KLBudgetCallback(budget, kl, tolerance=tolerance, interpolate=interpolate)
    trainer = CTRLTrainer(model, args, Dataset.from_dict(pair_rows()), processing_class=tokenizer, peft_config=lora,
                          callbacks=[callback])
    trainer.train()
    assert callback.reached and 3 <= trainer.state.global_step < 12
    trainer.model.eval()
    with torch.no_grad():
        left = next_token_kl(tokenizer)(trainer.model).value
    assert callback.final.value == pytest.approx(left, abs=1e-9)
    weights = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert weights and all("lora_" in n for n in weights)
    if interpolate:
        assert abs(left - budget) <= tolerance
    else:
        under = [w for estimate, w in kl.calls if estimate.value <= budget][-1]
        assert left <= budget and all(torch.equal(weights[n], under[n]) for n in weights)
    assert any("kl" in h for h in trainer.state.log_history)


# -- the sampled estimator ------------------------------------------------------------------------
def lora_model(tiny_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    return get_peft_model(base, config).eval()


@torch.no_grad()
def two_token_kl(model, tokenizer, prompts) -> float:
    """Exact KL(π‖π_ref) of the first two completion tokens (a first EOS ends it), by enumeration."""
    eos, values = tokenizer.eos_token_id, []

    def logps(ids):
        policy = torch.log_softmax(model(input_ids=ids).logits[:, -1].double(), -1)
        with model.disable_adapter():
            ref = torch.log_softmax(model(input_ids=ids).logits[:, -1].double(), -1)
        return policy, ref

    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        first, first_ref = logps(ids)
        vocab = first.size(-1)
        second, second_ref = logps(torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1))
        after = (second.exp() * (second - second_ref)).sum(-1)
        after[eos] = 0.0
        values.append(float((first[0].exp() * (first[0] - first_ref[0] + after)).sum()))
    return sum(values) / len(values)


def test_sampled_kl_is_zero_at_init_and_matches_the_exact_kl(tiny_path, tokenizer):
    model = lora_model(tiny_path)
    estimator = SampledKL(PROMPTS, tokenizer, num_samples=64, max_new_tokens=2, batch_size=4, seed=3)
    tokenizer.padding_side = "right"
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    at_init = estimator(model)  # LoRA B = 0: the policy is the reference
    assert at_init == KLEstimate(0.0, 0.0, 8 * 64, per_prompt=(0.0,) * 8, sequence_value=0.0, sequence_stderr=0.0,
                                 per_prompt_sequence=(0.0,) * 8)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random state is untouched
    assert tokenizer.padding_side == "right"

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    exact = two_token_kl(model, tokenizer, PROMPTS)
    estimate = estimator(model)
    assert exact > 0.5 and estimate.value > 0 and 0 < estimate.stderr < 0.5
    assert abs(estimate.value - exact) <= 3 * estimate.stderr
    # The sequence-level estimate from the same samples, kept beside it, is unbiased too but noisier.
    assert abs(estimate.sequence_value - exact) <= 4 * estimate.sequence_stderr
    assert len(estimate.per_prompt) == 8 and estimate.prompt_sd == pytest.approx(estimate.stderr * math.sqrt(8))
    assert estimator(model) == estimate  # the same seed at every call: common random numbers
    callback = KLBudgetCallback(0.5, estimator)
    callback._estimate(model, TrainerState(global_step=3))  # what every check records
    assert callback.history == [{"step": 3, "kl": estimate.value, "stderr": estimate.stderr,
                                 "kl_sequence": estimate.sequence_value}]
    model.train()
    assert estimator(model) == estimate and model.training  # evaluated in eval mode, mode restored


def test_sampled_kl_with_a_separate_reference(tiny_path, tokenizer):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    with pytest.raises(ValueError, match="needs a reference.*reference_model="):
        SampledKL(PROMPTS[:2], tokenizer, max_new_tokens=2)(policy)
    reference = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    estimator = SampledKL(PROMPTS[:4], tokenizer, num_samples=16, max_new_tokens=2, reference_model=reference)
    same = estimator(policy)
    assert (same.value, same.stderr, same.num_samples, same.sequence_value) == (0.0, 0.0, 64, 0.0)
    with torch.no_grad():
        policy.lm_head.weight.mul_(20.0)
    assert estimator(policy).value > 0.05
    with pytest.raises(ValueError, match="chat template"):
        SampledKL([[{"role": "user", "content": "hi"}]], tokenizer)
    with pytest.raises(ValueError, match="num_samples must be"):
        SampledKL(PROMPTS, tokenizer, num_samples=0)


# -- the recipe's settings ------------------------------------------------------------------------
def test_recipe_holds_kl_by_default_and_validates_its_settings(tmp_path):
    recipe = RecipeConfig()
    assert recipe.hold_kl is True and (recipe.kl_eval_prompts, recipe.kl_eval_samples, recipe.kl_every_n_steps) == \
        (16, 4, 10)
    for name, value in [("kl_budget", 0.0), ("kl_budget", -0.5), ("kl_budget", math.inf), ("kl_eval_prompts", 0),
                        ("kl_eval_samples", 0), ("kl_every_n_steps", 0)]:
        with pytest.raises(RecipeError, match=name):
            RecipeConfig(**{name: value})
    recipe, _, _ = parse_recipe_args(["--output_dir", str(tmp_path), "--model_name_or_path", "m", "--hold_kl", "false",
                                      "--kl_every_n_steps", "5"])
    assert recipe.hold_kl is False and recipe.kl_every_n_steps == 5


def test_recipe_estimates_kl_on_prompts_neither_trained_nor_evaluated_on(tmp_path, caplog):
    from ctrl_offline.models.hh import EMBEDDED_HH, hh_prompts
    from ctrl_offline.pipeline.prompts import kl_prompts as _kl_prompts, write_prompts as _write_prompts

    pool = hh_prompts(EMBEDDED_HH, ["helpful-base"], "train")
    assert len(pool) == 36
    recipe = RecipeConfig(dataset_name=EMBEDDED_HH, num_train_prompts=6, kl_eval_prompts=5)
    _write_prompts(tmp_path / "run" / "train", pool[:6])
    # An evaluation prompt that the train split holds too is skipped.
    _write_prompts(tmp_path / "run" / "eval", hh_prompts(EMBEDDED_HH, ["helpful-base"], "test", 3) + [pool[6]])
    prompts, source = _kl_prompts(recipe, tmp_path / "run")
    assert prompts == pool[7:12] and "past the training prompts" in source

    # Every prompt of the split trained on: the training prompts, with a warning.
    _write_prompts(tmp_path / "all" / "train", pool)
    _write_prompts(tmp_path / "all" / "eval", pool[:1])
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.pipeline.prompts"):
        prompts, source = _kl_prompts(recipe, tmp_path / "all")
    assert prompts == pool[:5] and source == "training prompts" and "no held-out prompts" in caplog.text


def test_estimates_noisier_than_the_tolerance_are_called_out(tmp_path, caplog):
    """A sampled estimate whose standard error exceeds the tolerance cannot hold the budget to it: say so, once."""
    noisy = lambda model: KLEstimate(exact_categorical_kl(model).value, 0.12, 24)  # noqa: E731
    callback = KLBudgetCallback(0.3, noisy, every_n_steps=3, tolerance=0.03)
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.training.kl_budget"):
        categorical_trainer(tmp_path, callback).train()
    assert caplog.text.count("standard error (0.12 nats) exceeds the tolerance (0.03)") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctrl_offline.training.kl_budget"):
        categorical_trainer(tmp_path, KLBudgetCallback(0.3, exact_categorical_kl, every_n_steps=3)).train()
    assert "exceeds the tolerance" not in caplog.text
