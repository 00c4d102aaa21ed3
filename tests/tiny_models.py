"""Tiny causal LMs built from a config (random weights) and a word-level tokenizer, for fast tests."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a cat dog sat ran on mat fast slow good bad happy sad very not is was it and or "
    "question answer please tell me about why how what yes no maybe great awful fine"
).split()


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_tiny_model(path: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random Llama and its tokenizer to ``path``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_reward_model(path: str | Path, hidden: int = 32, seed: int = 1, num_labels: int = 1) -> Path:
    """A tiny random Llama sequence classifier (the reward model shape: one score) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def word_count_reward(prompts, completions):
    """A deterministic reward function for `module:function` tests: words in the completion, ties galore."""
    return [float(len(c.split())) for c in completions]
