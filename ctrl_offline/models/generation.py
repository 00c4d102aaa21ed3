"""Drawing reference samples: K completions per prompt from π_ref, with their log-probs.

Calibration assumes the samples come from π_ref itself, so sampling is plain ancestral
sampling (temperature 1, no top-k, no top-p) unless the caller says otherwise. Each
completion is recorded with its token ids and ``logp``, the summed log-prob of those ids under
the model that drew them (the value teacher forcing on exactly the generated ids gives, so for
reference samples it is the ``ref_logp`` the trainer needs), its token count and whether it
ended with EOS. ``logp`` is the sampling model's: π_ref's when the reference draws, the
policy's when the policy does; ``ref_logp`` always means log π_ref (written by ``sample``).

:func:`completion_kl` scores sampled completions under a policy and its reference at once: per
sample, the exact per-token KL summed along the completion and the sequence log-ratio
(docs/kl_budget.md, "The per-token estimator"). The KL callback's :class:`~ctrl_offline.training.kl_budget.SampledKL`
and ``ctrl-data eval`` both estimate KL(π‖π_ref) with it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from tqdm.auto import tqdm


__all__ = ["SamplingConfig", "SampleRow", "CompletionKL", "hex_prompt_id", "load_causal_lm", "prompt_id",
           "render_prompt", "sample_completions", "sequence_logps", "completion_logps", "completion_kl"]


class SampleRow(TypedDict):
    """One drawn completion: ``logp`` is Σ log-prob under the model that drew it (the policy, when it is)."""

    batch_prompt: int
    sample_idx: int
    completion: str
    completion_ids: list[int]
    logp: float
    num_tokens: int
    finished: bool


@dataclass
class SamplingConfig:
    """How reference samples are drawn."""

    k: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8  # prompts per generate call (each with K return sequences)
    logp_batch_size: int = 16  # sequences per teacher-forced log-prob pass

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"K must be at least 2 (calibration compares each sample with the others), got {self.k}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.logp_batch_size < 1:
            raise ValueError("max_new_tokens, batch_size and logp_batch_size must be positive")
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be > 0, top_p in (0, 1], top_k ≥ 0")


def load_causal_lm(name_or_path: str, adapter: str | None = None, device: str | None = None):
    """(model in eval mode, tokenizer with a pad token) from a Hub id or local folder, + a PEFT adapter.

    Raises ``OSError`` naming the model, with a hint for offline machines, when it cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctrl_offline.models.embedded import load_error_message, resolve_model

    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except OSError as err:
        raise OSError(load_error_message("model", name_or_path, err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval(), tokenizer


def prompt_id(prompt) -> int:
    """Stable id of a prompt: the first 64 bits of the SHA-256 of its text (or messages), as a
    signed 64-bit integer (an int64 column; calibration groups integer ids without hashing them).

    Earlier versions wrote the same 64 bits as 16 hex digits (:func:`hex_prompt_id`);
    :func:`ctrl_offline.maths.calibration.int_prompt_ids` turns those into these integers.
    """
    text = prompt if isinstance(prompt, str) else repr([(m["role"], m["content"]) for m in prompt])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big", signed=True)


def hex_prompt_id(prompt) -> str:
    """The id earlier versions gave a prompt: :func:`prompt_id`'s 64 bits as 16 hex digits."""
    return format(prompt_id(prompt) & (2**64 - 1), "016x")


def render_prompt(tokenizer, prompt) -> str:
    """The exact text fed to the model: the chat template when the tokenizer has one."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        raise ValueError("conversational prompts need a tokenizer with a chat template")
    return prompt


@torch.no_grad()
def sequence_logps(model, sequences: torch.Tensor, attention_mask: torch.Tensor, start: int,
                   completion_mask: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Σ log π(token) over positions ≥ ``start`` where ``completion_mask`` is 1, per row (chunked)."""
    out = []
    for i in range(0, sequences.size(0), batch_size):
        ids, mask = sequences[i : i + batch_size], attention_mask[i : i + batch_size]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, start - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, start:, None])[..., 0]
        out.append((logp * completion_mask[i : i + batch_size]).sum(dim=1))
    return torch.cat(out)


class _RecordedLogps:
    """log π(sampled token) at every generation step, read off the model's own forward passes.

    Forward hooks on the causal LM that ``generate`` runs: each pass leaves the log-softmax of its
    last position's raw logits (before any temperature or top-k/top-p warping, so they are the
    model's own log-probs), and the next pass's input ids say which token was sampled from it. One
    step of logits is held at a time, and no second, teacher-forced pass over prompt + completion is
    needed (it cost about 40% of sampling SmolLM2-135M on CPU).
    """

    def __init__(self, model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.previous, self.steps = None, []
        self.handles = [inner.register_forward_hook(self._after, with_kwargs=True)]

    def _after(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if ids is None or logits is None:
            return
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, ids[:, -1:])[:, 0])
        self.previous = torch.log_softmax(logits[:, -1].float(), dim=-1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def token_logps(self, generated: torch.Tensor) -> torch.Tensor | None:
        """[rows, tokens] log-probs of ``generated``, or None when the passes seen do not match it."""
        if self.previous is None or len(self.steps) != generated.size(1) - 1:
            return None
        last = self.previous.gather(1, generated[:, -1:])[:, 0]
        return torch.stack([*self.steps, last], dim=1)


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _SamplingCheckpoint:
    """Each finished batch's rows and the random state after it, in one folder, so that a stopped draw resumes
    after its last finished batch and gives exactly the rows the uninterrupted draw gives."""

    def __init__(self, folder, prompt_texts: list[str], config: SamplingConfig, seed: int, model_key: str):
        self.folder = Path(folder)
        key = hashlib.sha256(json.dumps([prompt_texts, repr(config), seed, model_key]).encode()).hexdigest()
        stamp = self.folder / "draw.json"
        if self.folder.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key):
            shutil.rmtree(self.folder)  # another draw's batches: start over
        self.folder.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            tmp = stamp.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key}))
            os.replace(tmp, stamp)

    def _path(self, start: int):
        return self.folder / f"batch-{start:08d}.pt"

    def load(self, start: int) -> tuple[list, dict] | None:
        path = self._path(start)
        if not path.is_file():
            return None
        saved = torch.load(path, weights_only=True)
        return [SampleRow(row) for row in saved["rows"]], saved["rng"]

    def save(self, start: int, rows: list) -> None:
        tmp = self._path(start).with_suffix(".tmp")
        torch.save({"rows": [dict(row) for row in rows], "rng": _rng_state()}, tmp)
        os.replace(tmp, self._path(start))


@torch.no_grad()
def sample_completions(model, tokenizer, prompt_texts: list[str], config: SamplingConfig,
                       seed: int, checkpoint_dir=None, model_key: str = "") -> list[SampleRow]:
    """K samples for each rendered prompt; rows in prompt order, ``sample_idx`` 0..K−1.

    Each row's ``logp`` is the completion's log-prob under ``model`` (the policy's when ``model``
    is the policy); see :class:`SampleRow`.

    Deterministic for a given seed, model, prompt list and batch size. With ``checkpoint_dir`` every
    finished batch is kept there with the random state after it, and a draw of the same prompts,
    config, seed and ``model_key`` (what identifies the model to the caller) resumes after the last
    kept batch with the same rows as one uninterrupted draw; another draw's batches are cleared. The
    caller removes the folder when it no longer needs it.
    """
    device = next(model.parameters()).device
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids if eos_ids is not None else tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    checkpoint = None if checkpoint_dir is None else _SamplingCheckpoint(checkpoint_dir, prompt_texts, config, seed,
                                                                          model_key)
    rows = []
    starts = range(0, len(prompt_texts), config.batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", leave=False, disable=len(starts) < 2):
        kept = None if checkpoint is None else checkpoint.load(start)
        if kept is not None:
            rows.extend(kept[0])
            _set_rng_state(kept[1])
            continue
        batch_rows = []
        batch = prompt_texts[start : start + config.batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        recorded = _RecordedLogps(model)
        try:
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                max_new_tokens=config.max_new_tokens,
                num_return_sequences=config.k,
                pad_token_id=pad_id,
                use_cache=True,
            )
        finally:
            recorded.remove()
        prompt_len = enc["input_ids"].size(1)
        generated = out[:, prompt_len:]
        # Keep tokens up to and including the first EOS; the rest is padding.
        is_eos = torch.zeros_like(generated, dtype=torch.bool)
        for e in eos_ids:
            is_eos |= generated == e
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        completion_mask = (~after_eos).long()
        attention = torch.cat([enc["attention_mask"].repeat_interleave(config.k, dim=0), completion_mask], dim=1)
        token_logps = recorded.token_logps(generated)
        if token_logps is not None:
            logps = token_logps.masked_fill(completion_mask == 0, 0.0).sum(dim=1)
        else:  # a model whose passes could not be read: score the samples again, teacher-forced
            logps = sequence_logps(model, out, attention, prompt_len, completion_mask, config.logp_batch_size)
        for row in range(out.size(0)):
            n = int(completion_mask[row].sum())
            ids = generated[row, :n].tolist()
            batch_rows.append(
                SampleRow({
                    "batch_prompt": start + row // config.k,
                    "sample_idx": row % config.k,
                    "completion": tokenizer.decode(ids, skip_special_tokens=True),
                    "completion_ids": ids,
                    "logp": float(logps[row]),
                    "num_tokens": n,
                    "finished": bool(is_eos[row, :n].any()),
                })
            )
        rows.extend(batch_rows)
        if checkpoint is not None:
            checkpoint.save(start, batch_rows)
    return rows


@torch.no_grad()
def completion_logps(model, tokenizer, prompt_texts: list[str], completion_ids: list[list[int]],
                     batch_size: int = 16) -> list[float]:
    """Σ log π(completion ids | prompt text) under ``model``, for given (prompt, completion ids) rows."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(prompt_texts), batch_size):
        prompts = [tokenizer(t)["input_ids"] for t in prompt_texts[i : i + batch_size]]
        comps = completion_ids[i : i + batch_size]
        rows = [p + list(c) for p, c in zip(prompts, comps)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.float32)
        for j, (p, r) in enumerate(zip(prompts, rows)):
            ids[j, : len(r)] = torch.tensor(r)
            attention[j, : len(r)] = 1
            target[j, len(p) : len(r)] = 1.0
        ids, attention, target = ids.to(device), attention.to(device), target.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        out.extend((logp * target[:, 1:]).sum(dim=1).tolist())
    return out


@dataclass(frozen=True)
class CompletionKL:
    """Per sampled completion y of a prompt x (float64 arrays, one value per row given to :func:`completion_kl`):

    * ``token``    — Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)), the exact KL of each next-token distribution
      summed over y's positions (the per-token estimator);
    * ``logp``     — log π(y|x) = Σ_t log π(y_t|x, y_<t);
    * ``ref_logp`` — log π_ref(y|x);
    * ``num_tokens`` — |y|, the positions summed.

    ``sequence`` = ``logp`` − ``ref_logp`` is the sequence-level log-ratio.
    """

    token: np.ndarray
    logp: np.ndarray
    ref_logp: np.ndarray
    num_tokens: np.ndarray

    @property
    def sequence(self) -> np.ndarray:
        """log π(y|x) − log π_ref(y|x) per sample: the sequence-level Monte Carlo term."""
        return self.logp - self.ref_logp


def _takes_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _tail_logits(model, ids: torch.Tensor, attention: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions, [rows, keep, vocab] in the model's dtype.

    Models that take ``logits_to_keep`` (transformers' causal LMs) compute only those: the prompt
    positions before them never reach the vocabulary projection.
    """
    extra = {"logits_to_keep": keep} if _takes_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False, **extra).logits
    return logits[:, -keep:]


def _kl_and_logps(policy: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor):
    """For rows of logits (one next-token distribution each): KL(π‖π_ref) over the vocabulary, log π and log π_ref
    of ``targets``. Computed in float32 at least (float64 for a float64 model)."""
    dtype = torch.promote_types(policy.dtype, torch.float32)
    logp = torch.log_softmax(policy.to(dtype), dim=-1)
    ref = torch.log_softmax(reference.to(dtype), dim=-1)
    p = logp.exp()
    # 0·log(0/q) = 0: a token the policy never emits adds nothing, even where π_ref is 0 too (−inf − −inf).
    kl = torch.where(p > 0, p * (logp - ref), torch.zeros((), dtype=dtype, device=p.device)).sum(dim=-1)
    picked = targets[:, None]
    return kl, logp.gather(-1, picked)[:, 0], ref.gather(-1, picked)[:, 0]


@torch.no_grad()
def completion_kl(model, tokenizer, prompt_texts: list[str], completion_ids: list[list[int]], *, reference=None,
                  batch_size: int = 16, chunk_size: int = 256) -> CompletionKL:
    """Score sampled completions under a policy and its reference: the per-token KL and both log-probs.

    For each row (prompt text x, completion ids y), teacher-forced on exactly those ids:

        token(y)    = Σ_{t=1..|y|} Σ_v π(v|x, y_<t) [log π(v|x, y_<t) − log π_ref(v|x, y_<t)]
        sequence(y) = Σ_{t=1..|y|} [log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)]   (= logp − ref_logp)

    For y ~ π(·|x) both are unbiased for KL(π(·|x)‖π_ref(·|x)) by the chain rule of KL:
    E[token(y)] = Σ_t E_{y_<t}[KL_t] = KL. ``token`` replaces each sampled log-ratio by its
    expectation over the next token given the prefix (the "Rao-Blackwellised" estimator of Amini,
    Vieira & Cotterell 2025), so its variance is at most the sequence-level one's and usually far
    smaller (docs/kl_budget.md). A completion cut at ``max_new_tokens`` is summed over the tokens
    drawn: the average is then the KL of the first ``max_new_tokens`` tokens, a lower bound on the
    KL of whole completions (the data-processing inequality).

    ``reference`` is π_ref: None for ``model`` with its PEFT adapters disabled, or a model sharing
    the tokenizer; passing ``model`` itself scores one pass for both (every KL is then exactly 0).
    Prompt and padding positions are never scored. Memory stays flat on long completions:
    ``batch_size`` rows go through each model at a time, whose logits are kept from the first
    position that predicts a completion token on (only those are computed where the model takes
    ``logits_to_keep``), and the float32 log-softmax of both models is taken over ``chunk_size``
    completion positions at a time, reduced to three numbers each and discarded.
    """
    if len(prompt_texts) != len(completion_ids):
        raise ValueError(f"{len(prompt_texts)} prompts for {len(completion_ids)} completions: give one prompt per row")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    if reference is None and not hasattr(model, "disable_adapter"):
        raise ValueError(f"completion_kl needs a reference: {type(model).__name__} is not a PEFT model (no adapters to "
                         "disable); pass reference= (a model of π_ref)")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [tokenizer(t)["input_ids"] for t in prompt_texts]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompt {empty[0]} tokenizes to no ids: its first completion token has no position to be "
                         "predicted from")
    rows = [p + list(c) for p, c in zip(prompts, completion_ids)]
    sums = np.zeros((3, len(rows)))  # token KL, log π, log π_ref
    # Rows of one prompt length, then of similar lengths, share a batch: the logits kept start at the batch's
    # shortest prompt, so a batch mixing a short prompt with long ones would project every prompt position
    # of the long ones onto the vocabulary for nothing (most of the cost, with long chat prompts).
    order = sorted(range(len(rows)), key=lambda i: (len(prompts[i]), len(rows[i])))
    starts = range(0, len(order), batch_size)
    for begin in tqdm(starts, desc="per-token KL", unit="batch", leave=False, disable=len(starts) < 2):
        index = [i for i in order[begin : begin + batch_size] if completion_ids[i]]
        if not index:
            continue
        width = max(len(rows[i]) for i in index)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for j, i in enumerate(index):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            attention[j, : len(rows[i])] = 1
        ids, attention = ids.to(device), attention.to(device)
        # Position s predicts token s + 1: completion tokens at [len(prompt), len(row)) are predicted from
        # [len(prompt) − 1, len(row) − 1). Logits before the earliest of those are never needed.
        first = min(len(prompts[i]) for i in index) - 1
        keep = width - first
        policy_logits = _tail_logits(model, ids, attention, keep)
        if reference is model:
            reference_logits = policy_logits
        elif reference is None:
            with model.disable_adapter():
                reference_logits = _tail_logits(model, ids, attention, keep)
        else:
            reference_logits = _tail_logits(reference, ids, attention, keep)
        if reference_logits.shape != policy_logits.shape:
            raise ValueError(f"the reference's logits have shape {tuple(reference_logits.shape)}, the policy's "
                             f"{tuple(policy_logits.shape)}: π and π_ref must share the vocabulary")
        row_of = torch.cat([torch.full((len(completion_ids[i]),), j, dtype=torch.long) for j, i in enumerate(index)])
        position = torch.cat([torch.arange(len(prompts[i]) - 1, len(rows[i]) - 1) for i in index])
        row_of, position = row_of.to(device), position.to(device)
        targets = ids[row_of, position + 1]
        global_row = np.asarray(index)[row_of.cpu().numpy()]
        for c in range(0, len(row_of), chunk_size):
            part = slice(c, c + chunk_size)
            r, s = row_of[part], position[part] - first
            values = _kl_and_logps(policy_logits[r, s], reference_logits[r, s], targets[part])
            for k, value in enumerate(values):
                np.add.at(sums[k], global_row[part], value.double().cpu().numpy())
        del policy_logits, reference_logits
    lengths = np.array([len(c) for c in completion_ids], dtype=np.int64)
    return CompletionKL(token=sums[0], logp=sums[1], ref_logp=sums[2], num_tokens=lengths)
