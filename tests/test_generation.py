"""Sampling records each completion's reference log-prob from generate's own forward passes; it must equal the
teacher-forced log-prob of the same ids (the second pass it replaces), whatever warping the sampler used."""

import pytest
import torch

from ctrl_offline.models.generation import SamplingConfig, sample_completions, sequence_logps
from tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("gen") / "lm", hidden=32)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
def test_recorded_logps_equal_a_teacher_forced_pass(tiny, monkeypatch, temperature, top_k):
    model, tokenizer = tiny
    prompts = ["the cat sat ", "why is the dog happy ", "a "]
    config = SamplingConfig(k=3, max_new_tokens=7, temperature=temperature, top_k=top_k, batch_size=2)
    rows = sample_completions(model, tokenizer, prompts, config, seed=1)
    assert len(rows) == 9
    for row in rows:
        ids = tokenizer(prompts[row["batch_prompt"]], return_tensors="pt")["input_ids"]
        completion = torch.tensor([row["completion_ids"]])
        sequence = torch.cat([ids, completion], dim=1)
        expected = sequence_logps(model, sequence, torch.ones_like(sequence), ids.size(1), torch.ones_like(completion))
        assert row["logp"] == pytest.approx(float(expected), abs=1e-4)
    # The teacher-forced pass is gone: sampling never calls it.
    import ctrl_offline.models.generation as generation

    monkeypatch.setattr(generation, "sequence_logps", lambda *a, **k: pytest.fail("second log-prob pass ran"))
    again = sample_completions(model, tokenizer, prompts, config, seed=1)
    assert [r["logp"] for r in again] == [r["logp"] for r in rows]


def test_hooks_are_removed_even_when_generate_fails(tiny, monkeypatch):
    model, tokenizer = tiny
    before = len(model._forward_hooks)

    def failing_generate(**kwargs):
        model(input_ids=kwargs["input_ids"])  # a pass is seen, then generate fails
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="out of memory"):
        sample_completions(model, tokenizer, ["a "], SamplingConfig(k=2, max_new_tokens=3), seed=0)
    assert len(model._forward_hooks) == before


def test_a_stopped_draw_resumes_with_the_rows_of_an_uninterrupted_one(tiny, monkeypatch, tmp_path):
    model, tokenizer = tiny
    prompts = [f"word {i} " for i in range(7)]
    config = SamplingConfig(k=3, max_new_tokens=6, batch_size=2)  # 4 batches
    whole = sample_completions(model, tokenizer, prompts, config, seed=3)

    real_generate, calls = model.generate, []

    def generate(**kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped during the third batch
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    folder = tmp_path / "drawn"
    with pytest.raises(KeyboardInterrupt):
        sample_completions(model, tokenizer, prompts, config, seed=3, checkpoint_dir=folder, model_key="m")
    assert len(list(folder.glob("batch-*.pt"))) == 2
    torch.manual_seed(123)  # whatever the random state is now, the resumed draw restores its own
    resumed = sample_completions(model, tokenizer, prompts, config, seed=3, checkpoint_dir=folder, model_key="m")
    assert resumed == whole and len(calls) == 3 + 2  # the two kept batches were not drawn again
    # Another model (or seed, prompts, config) does not reuse the kept batches.
    sample_completions(model, tokenizer, prompts, config, seed=3, checkpoint_dir=folder, model_key="other")
    assert len(calls) == 5 + 4
