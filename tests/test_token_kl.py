"""The per-token KL estimator (ctrl_offline.models.generation.completion_kl, SampledKL): exact checks by enumerating every
completion of two tiny Llamas over a 5-token vocabulary, max_new_tokens 3; and ctrl-data eval's KL (kl beside
kl_sequence, per prompt; the prompts training was held on; a report written whatever KL the plan cannot cover)."""

import itertools
import math

import numpy as np
import pytest
import torch

from ctrl_offline.models.generation import completion_kl
from ctrl_offline.training.kl_budget import KLEstimate, SampledKL

EOS = 0
VOCAB = ["<eos>", "a", "b", "c", "d"]
MAX_NEW = 3
PROMPTS = ["a b", "c", "d d a", "b c d a", "a", "c a"]



@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<eos>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(seed: int, dtype=torch.float64):
    """A random 5-token Llama; a wide initialisation so that its next-token distributions are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         initializer_range=0.1, pad_token_id=EOS, eos_token_id=EOS, bos_token_id=None,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1)


def completions():
    """Every completion of at most MAX_NEW tokens, ending at its first EOS or cut at MAX_NEW."""
    out = [[EOS]]
    for length in range(2, MAX_NEW + 1):
        for body in itertools.product(range(1, len(VOCAB)), repeat=length - 1):
            out += [[*body, EOS]] if length < MAX_NEW else [[*body, last] for last in range(len(VOCAB))]
    return out


@torch.no_grad()
def enumerate_prompt(policy, reference, tok, prompt):
    """(completions, π(y|x), log π(y|x) − log π_ref(y|x)) for every completion, one plain forward per prefix."""
    ids = tok(prompt)["input_ids"]
    ys, probs, ratios = completions(), [], []
    for y in ys:
        logp = ref = 0.0
        for t in range(len(y)):
            x = torch.tensor([ids + y[:t]])
            logp += float(torch.log_softmax(policy(input_ids=x).logits[0, -1], -1)[y[t]])
            ref += float(torch.log_softmax(reference(input_ids=x).logits[0, -1], -1)[y[t]])
        probs.append(math.exp(logp))
        ratios.append(logp - ref)
    return ys, np.array(probs), np.array(ratios)


@pytest.fixture(scope="module")
def exact(models, tok):
    """Per prompt: the completions, their probabilities under π, and KL(π‖π_ref) over completions."""
    policy, reference = models
    out = []
    for prompt in PROMPTS[:3]:
        ys, probs, ratios = enumerate_prompt(policy, reference, tok, prompt)
        assert len(ys) == 1 + 4 + 4 * 4 * 5 and probs.sum() == pytest.approx(1.0, abs=1e-12)
        out.append({"prompt": prompt, "ys": ys, "probs": probs, "ratios": ratios, "kl": float(probs @ ratios)})
    return out


def test_the_per_token_estimator_is_unbiased_exactly(models, tok, exact):
    policy, reference = models
    for case in exact:
        scored = completion_kl(policy, tok, [case["prompt"]] * len(case["ys"]), case["ys"], reference=reference,
                               batch_size=7, chunk_size=5)
        np.testing.assert_allclose(scored.sequence, case["ratios"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.exp(scored.logp), case["probs"], rtol=1e-9, atol=0)
        assert case["kl"] > 0.05
        assert abs(case["probs"] @ scored.token - case["kl"]) < 1e-6  # E_y[Σ_t KL_t] = KL(π‖π_ref)
        assert np.all(scored.token > 0)
        # Its variance over y ~ π is below the sequence-level log-ratio's, computed exactly.
        var_token = case["probs"] @ (scored.token - case["kl"]) ** 2
        var_sequence = case["probs"] @ (scored.sequence - case["kl"]) ** 2
        assert var_token < var_sequence / 10


def test_sampled_kl_is_within_its_error_and_steadier_than_the_sequence_estimate(models, tok, exact):
    policy, reference = models
    prompts = [case["prompt"] for case in exact]
    truth = float(np.mean([case["kl"] for case in exact]))
    token, sequence = [], []
    for seed in range(5):
        estimate = SampledKL(prompts, tok, num_samples=48, max_new_tokens=MAX_NEW, seed=seed,
                             reference_model=reference)(policy)
        assert estimate.num_samples == 3 * 48 and len(estimate.per_prompt) == len(estimate.per_prompt_sequence) == 3
        assert estimate.value == pytest.approx(np.mean(estimate.per_prompt), abs=1e-12)
        assert estimate.sequence_value == pytest.approx(np.mean(estimate.per_prompt_sequence), abs=1e-12)
        assert abs(estimate.value - truth) <= 4 * estimate.stderr
        # Per prompt, against that prompt's exact KL.
        assert all(abs(v - case["kl"]) < 0.25 * case["kl"] for v, case in zip(estimate.per_prompt, exact))
        token.append(estimate.value)
        sequence.append(estimate.sequence_value)
    assert np.std(token) < np.std(sequence) / 2, (token, sequence)


def test_identical_models_give_exactly_zero(tok):
    policy, copy = tiny_llama(3, torch.float32), tiny_llama(3, torch.float32)
    estimate = SampledKL(PROMPTS, tok, num_samples=8, max_new_tokens=MAX_NEW, reference_model=copy)(policy)
    assert estimate == KLEstimate(0.0, 0.0, len(PROMPTS) * 8, per_prompt=(0.0,) * len(PROMPTS), sequence_value=0.0,
                                  sequence_stderr=0.0, per_prompt_sequence=(0.0,) * len(PROMPTS))
    scored = completion_kl(policy, tok, PROMPTS, [[1, 2, EOS]] * len(PROMPTS), reference=policy)
    assert not scored.token.any() and not scored.sequence.any()


def test_chunked_positions_and_batched_rows_give_the_same_values(tok, monkeypatch):
    """Memory: at most chunk_size positions are log-softmaxed at once, and the chunking changes no value."""
    policy, reference = tiny_llama(4, torch.float32), tiny_llama(5, torch.float32)
    rng = np.random.default_rng(0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    ys = [list(rng.integers(1, len(VOCAB), size=rng.integers(1, 6))) for _ in prompts]
    ys = [y + [EOS] if i % 3 else y for i, y in enumerate(ys)]  # some end with EOS, some are cut
    rows_seen = []
    log_softmax = torch.log_softmax

    def recording(x, *args, **kwargs):
        rows_seen.append(x.shape[0] if x.dim() == 2 else math.inf)
        return log_softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", recording)
    one = completion_kl(policy, tok, prompts, ys, reference=reference, batch_size=4, chunk_size=1)
    assert rows_seen and max(rows_seen) == 1
    rows_seen.clear()
    big = completion_kl(policy, tok, prompts, ys, reference=reference, batch_size=4, chunk_size=10_000)
    assert max(rows_seen) > 1
    monkeypatch.undo()
    np.testing.assert_allclose(one.token, big.token, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one.sequence, big.sequence, rtol=1e-12, atol=1e-12)
    # One row at a time (no padding, every prompt alone) against all rows in one padded batch.
    alone = completion_kl(policy, tok, prompts, ys, reference=reference, batch_size=1)
    together = completion_kl(policy, tok, prompts, ys, reference=reference, batch_size=64)
    np.testing.assert_allclose(alone.token, together.token, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone.logp, together.logp, rtol=1e-5, atol=1e-5)
    assert list(together.num_tokens) == [len(y) for y in ys]


def test_bad_input_is_refused(models, tok):
    policy, reference = models
    with pytest.raises(ValueError, match="one prompt per row"):
        completion_kl(policy, tok, ["a"], [[1], [2]], reference=reference)
    with pytest.raises(ValueError, match="chunk_size must be an integer ≥ 1"):
        completion_kl(policy, tok, ["a"], [[1]], reference=reference, chunk_size=0)
    with pytest.raises(ValueError, match="needs a reference.*reference="):
        completion_kl(policy, tok, ["a"], [[1]])
    with pytest.raises(ValueError, match="tokenizes to no ids"):
        completion_kl(policy, tok, [""], [[1]], reference=reference)
    assert completion_kl(policy, tok, ["a"], [[]], reference=reference).token.tolist() == [0.0]


# -- ctrl-data eval's KL ---------------------------------------------------------------------------
HELD_OUT = ["tell me about the dog", "why is it good", "what is a cat"]
EVAL_PROMPTS = ["the cat sat", "a dog ran fast", "is it fine", "yes or no"]
REWARD = "tiny_models:word_count_reward"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base, a LoRA adapter moved off zero, and its ctrl_train.json as `ctrl-data train --kl-prompts` writes
    it: the KL record of the callback's own estimator (its prompts, seed and batches), with its last estimate."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ctrl_offline.stages.train import _kl_callback
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("eval_kl")
    base = build_tiny_model(root / "base", hidden=32)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    model.eval()
    callback, record = _kl_callback(0.5, HELD_OUT, base, 3, 1, 4, 2, "prompt", 11, 0.01, 12)
    assert record["prompt_list"] == HELD_OUT and (record["seed"], record["batch_size"]) == (11, 2)
    assert record["estimator"] == "per_token" and record["prompts"] == 3
    final = callback.estimate_kl(model)
    model.save_pretrained(root / "adapter", save_embedding_layers=False)
    from dataclasses import asdict

    (root / "adapter" / "ctrl_train.json").write_text(json.dumps({
        "loss": "dpo", "kl": {"budget": 0.5, "reached": True, "final": asdict(final), "history": [],
                              "prompts_source": "heldout.txt", **record}}))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL_PROMPTS))
    return {"root": root, "base": str(base), "adapter": str(root / "adapter"), "final": final,
            "prompts": str(root / "prompts.jsonl")}


def run_eval(trained, out, **kwargs):
    from ctrl_offline.stages.evaluate import evaluate_policy

    args = {"adapter": trained["adapter"], "n": (1, 2), "selectors": ("bon",), "max_new_tokens": 4, "num_boot": 200,
            "policy_samples": 4, "reference_samples": 4, **kwargs}
    return evaluate_policy(trained["prompts"], out, trained["base"], REWARD, **args)


def test_eval_reports_the_per_token_kl_per_prompt_beside_the_sequence_level_one(trained, monkeypatch):
    import json

    import pandas as pd

    import ctrl_offline.reports.reporting

    # The planner's curves are the other test's business (and take seconds): no theory curves here.
    monkeypatch.setattr(ctrl_offline.reports.reporting, "theory_curves", lambda report: (np.array([]), [], []))
    result = run_eval(trained, trained["root"] / "report")
    report = json.loads((result.out_dir / "report.json").read_text())
    kl, sequence = report["kl"], report["kl_sequence"]
    assert (kl["estimator"], sequence["estimator"]) == ("per_token", "sequence")
    for est in (kl, sequence):
        assert len(est["per_prompt"]) == est["num_prompts"] == len(EVAL_PROMPTS)
        assert est["value"] == pytest.approx(np.mean(est["per_prompt"]))
        assert est["sd"] == pytest.approx(np.std(est["per_prompt"], ddof=1))
        assert est["stderr"] == pytest.approx(est["sd"] / 2) and est["ci_low"] <= est["value"] <= est["ci_high"]
    assert kl["value"] > 0.01 and all(v > 0 for v in kl["per_prompt"])  # exact KLs of each position: positive
    table = pd.read_parquet(result.out_dir / "per_prompt.parquet")
    for metric, est in (("kl", kl), ("kl_sequence", sequence)):
        rows = table[table.metric == metric].sort_values("prompt_index")
        np.testing.assert_allclose(rows.value, est["per_prompt"])

    # The prompts training was held on: the callback's estimator again, on the adapter as saved.
    held = report["kl_training_prompts"]
    assert (held["num_prompts"], held["samples_per_prompt"], held["max_new_tokens"], held["seed"]) == (3, 3, 4, 11)
    assert held["source"] == "heldout.txt" and held["budget"] == 0.5
    assert held["held_in_training"] == pytest.approx(trained["final"].value)
    assert held["kl"]["value"] == pytest.approx(trained["final"].value, rel=1e-6)
    assert held["kl_sequence"]["value"] == pytest.approx(trained["final"].sequence_value, rel=1e-6)
    markdown = (result.out_dir / "report.md").read_text()
    assert "per-token estimate (`kl`" in markdown and "sequence-level estimate (`kl_sequence`" in markdown
    assert "prompts training was held on" in markdown and "| prompt | kl (per-token) | kl_sequence |" in markdown
    assert report["figure_notes"] == []

    # Without an adapter the policy is the reference: both estimates are exactly 0, and nothing was held.
    base = run_eval(trained, trained["root"] / "base_report", adapter=None).report
    assert base["kl"]["per_prompt"] == [0.0] * 4 and base["kl_sequence"]["value"] == 0.0
    assert base["kl_training_prompts"] is None


def test_eval_far_past_any_plannable_kl_still_writes_its_report(trained, monkeypatch):
    """An adapter trained far too hard (KL ≈ 21.6 nats, where no t gives exp a trainable β): the samples, win rates
    and KL are written, the curves that cannot be planned are left off the figure, and the report says why."""
    import json

    from ctrl_offline.models.generation import CompletionKL
    from ctrl_offline.reports.reporting import theory_curves
    from ctrl_offline.stages import evaluate

    def far(model, tokenizer, texts, ids, **kwargs):
        rows = len(ids)
        return CompletionKL(token=np.full(rows, 21.5968), logp=np.full(rows, -1.0), ref_logp=np.full(rows, -23.0),
                            num_tokens=np.array([len(i) for i in ids]))

    monkeypatch.setattr(evaluate, "completion_kl", far)
    result = run_eval(trained, trained["root"] / "far", selectors=("bon", "won"), training_kl_prompts=False)
    out = result.out_dir
    report = json.loads((out / "report.json").read_text())
    assert report["kl"]["value"] == pytest.approx(21.5968) and report["kl_sequence"]["value"] == pytest.approx(22.0)
    assert len(report["win_rates"]) == 4 and report["kl_training_prompts"] is None
    notes = report["figure_notes"]
    assert notes and all("beyond what the plan covers" in note for note in notes)
    assert any("bon-2 with exp" in note for note in notes) and any("won-2" in note for note in notes)
    markdown = (out / "report.md").read_text()
    assert "beyond what the plan covers for bon-2 with exp" in markdown and "21.5968 nats" in markdown
    for name in ("samples.parquet", "per_prompt.parquet", "win_rate_vs_kl.png", "calibration_hist.png",
                 "win_rate_vs_n.png"):
        assert (out / name).is_file(), name

    # Past the planner's range altogether: every family is left out, with the reason.
    kls, curves, notes = theory_curves({**report, "kl": {"value": 40.0}})
    assert curves == [] and len(notes) == 2 and all("identity, log, exp, negexp" in note for note in notes)

    # `ctrl-data plan --plot` at a budget whose curve runs past the planner's range draws what it can.
    from ctrl_offline.maths.planner import plan
    from ctrl_offline.reports.plotting import plot_plan, tradeoff_points

    assert np.isnan(tradeoff_points("identity", "bon", 4, [1.0, 30.0])).tolist() == [False, True]
    plot_plan(plan("bon", 4, 15.0, families=("identity",)), trained["root"] / "plan.png")
    assert (trained["root"] / "plan.png").is_file()
