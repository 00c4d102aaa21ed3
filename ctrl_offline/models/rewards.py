"""Reward functions: a sequence-classification reward model, or any Python function.

A reward maps lists of prompts and completions to one float per pair. Specs, as the CLI takes
them: a Hub id or local folder of a reward model with a single-score head, or
``module:function`` naming ``function(prompts, completions) -> sequence of floats``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ctrl_offline.models.embedded import load_error_message

__all__ = ["RewardModel", "load_reward", "reward_name"]


class RewardModel:
    """A ``AutoModelForSequenceClassification`` reward model with one output (the score)."""

    def __init__(self, name_or_path: str, batch_size: int = 16, max_length: int | None = None,
                 device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
        except OSError as err:
            raise ValueError(load_error_message("reward model", name_or_path, err)) from err
        outputs = self.model.config.num_labels
        if outputs != 1:
            shape = next((tuple(p.shape) for n, p in self.model.named_parameters()
                          if n.split(".")[0] in ("score", "classifier") and n.endswith("weight")), None)
            raise ValueError(
                f"reward model {name_or_path!r} has a {outputs}-output head{f' (weight shape {shape})' if shape else ''}; "
                "a reward model needs a single score (num_labels=1)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def _texts(self, prompts: Sequence, completions: Sequence[str]) -> list[str]:
        if getattr(self.tokenizer, "chat_template", None):
            return [
                self.tokenizer.apply_chat_template(
                    ([{"role": "user", "content": p}] if isinstance(p, str) else list(p))
                    + [{"role": "assistant", "content": c}],
                    tokenize=False,
                )
                for p, c in zip(prompts, completions)
            ]
        return [p + c for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> np.ndarray:
        texts = self._texts(prompts, completions)
        # Sorting by length keeps padding (and wasted compute) small within each batch.
        order = np.argsort([len(t) for t in texts], kind="stable")
        scores = np.empty(len(texts))
        starts = range(0, len(texts), self.batch_size)
        for i in tqdm(starts, desc="scoring", unit="batch", leave=False, disable=len(starts) < 2):
            idx = order[i : i + self.batch_size]
            enc = self.tokenizer([texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            scores[idx] = self.model(**enc).logits[:, 0].float().cpu().numpy()
        return scores


def _load_function(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward function {spec!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")

    def reward(prompts, completions):
        values = np.asarray(fn(list(prompts), list(completions)), dtype=float)
        if values.shape != (len(completions),):
            raise ValueError(f"reward function {spec!r} returned shape {values.shape}, expected ({len(completions)},)")
        return values

    return reward


def reward_name(spec: str) -> tuple[str, str]:
    """``name=spec`` → (name, spec); otherwise a name derived from the spec."""
    if "=" in spec:
        name, _, spec = spec.partition("=")
        return name, spec
    base = spec.split(":")[-1] if ":" in spec and not os.path.exists(spec) else Path(spec.rstrip("/")).name
    return base.replace("-", "_").replace(".", "_"), spec


#: Short names for rewards that ship with the project.
BUILTIN_REWARDS = {"vader": "ctrl_offline.models.embedded:vader_sentiment"}


def load_reward(spec: str, batch_size: int = 16, device: str | None = None) -> Callable:
    """A callable ``(prompts, completions) -> np.ndarray`` for a reward model path/id, ``module:function``
    or a built-in name (``vader``)."""
    spec = BUILTIN_REWARDS.get(spec, spec)
    if ":" in spec and not os.path.exists(spec):
        return _load_function(spec)
    return RewardModel(spec, batch_size=batch_size, device=device)
