"""An exact language-model testbed: a real (tiny) causal LM whose every response can be enumerated.

Sampling noise and "did training reach π*?" are inseparable on a real model. Here they are not
(docs/lm_testbed.md):

* **the language** — prompts are ``prompt_length`` tokens over ``prompt_vocab`` symbols
  (``p0 p5 p2``); responses are exactly ``length`` tokens over ``vocab`` symbols (``r3 r0 …``)
  followed by EOS, so a prompt has ``vocab ** length`` responses (7 776 by default);
* **π_ref** — a 2-layer Llama (transformers' own classes) trained for a minute on text from a
  random prompt-conditioned Markov source (:func:`pretrain_reference`), so π_ref is a real,
  non-uniform LM, not the source itself;
* **the policy's distribution** — the LM's probability of each response followed by EOS,
  renormalised over the ``vocab ** length`` valid responses (the mass the LM puts on invalid
  strings — early EOS, no EOS — is reported as ``valid_mass`` and is ~1e-3). Pairwise losses see
  the unnormalised log-ratio, which differs from the normalised one by a per-prompt constant
  that cancels in every pair;
* **the reward** — r(x, y) = a_x·Σ_t W[t, y_t] + b_x with a random position-dependent token score W
  and a per-prompt scale a_x > 0 and offset b_x (so raw rewards are not comparable across prompts
  and calibration matters); tie-free, or with ``ties=True`` the score rounded to a grid;
* **exact figures** — KL(π‖π_ref) and BoN-N / WoN-N / standard win rates are sums over every
  response (:func:`exact_metrics`), averaged over the prompt set: no sampling noise at all.

:func:`tilted_policy` gives the oracle: the planner's tilt (K = ∞, or the tilt a finite-K estimator
trains, :mod:`ctrl_offline.maths.finite_k`) put on each prompt's responses by its exact quantile cells.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ctrl_offline.maths.calibration import quantile_cells

__all__ = [
    "SyntheticLanguage",
    "Reward",
    "ExactMetrics",
    "build_tokenizer",
    "build_reference_model",
    "pretrain_reference",
    "response_logprobs",
    "exact_metrics",
    "tilted_policy",
    "sample_responses",
    "ExactKL",
    "sample_from_model",
    "response_index",
    "sequence_logprobs",
]

PAD, EOS = "<pad>", "<eos>"


@dataclass(frozen=True)
class SyntheticLanguage:
    """The token inventory, the prompt set and the Markov source π_ref is pretrained on."""

    vocab: int = 6
    length: int = 5
    prompt_vocab: int = 8
    prompt_length: int = 3
    #: Sharpness of the source's next-token logits: larger means a lower-entropy π_ref.
    temperature: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.vocab < 2 or self.length < 1 or self.prompt_vocab < 1 or self.prompt_length < 1:
            raise ValueError("vocab ≥ 2, length ≥ 1, prompt_vocab ≥ 1 and prompt_length ≥ 1 are required")
        if self.vocab**self.length > 200_000:
            raise ValueError(f"vocab ** length = {self.vocab ** self.length} responses per prompt is too many to "
                             "enumerate (at most 200 000)")

    @property
    def num_responses(self) -> int:
        return self.vocab**self.length

    @property
    def response_tokens(self) -> list[str]:
        return [f"r{i}" for i in range(self.vocab)]

    @property
    def prompt_tokens(self) -> list[str]:
        return [f"p{i}" for i in range(self.prompt_vocab)]

    def all_prompts(self) -> list[str]:
        """Every prompt, in a fixed shuffled order (so a prefix is a random subset)."""
        grid = itertools.product(range(self.prompt_vocab), repeat=self.prompt_length)
        prompts = [" ".join(f"p{i}" for i in combo) for combo in grid]
        order = np.random.default_rng(self.seed + 17).permutation(len(prompts))
        return [prompts[i] for i in order]

    def split_prompts(self, num_train: int, num_eval: int) -> tuple[list[str], list[str]]:
        """Disjoint training and held-out prompt lists."""
        prompts = self.all_prompts()
        if num_train + num_eval > len(prompts):
            raise ValueError(f"{num_train} + {num_eval} prompts requested, the language has {len(prompts)}")
        return prompts[:num_train], prompts[num_train:num_train + num_eval]

    def responses(self) -> np.ndarray:
        """Every response as symbol indices, shape (vocab ** length, length), in lexicographic order."""
        grid = np.indices((self.vocab,) * self.length).reshape(self.length, -1).T
        return np.ascontiguousarray(grid)

    def response_text(self, symbols) -> str:
        return " " + " ".join(f"r{int(s)}" for s in symbols)

    def _source(self):
        rng = np.random.default_rng(self.seed)
        v = self.vocab
        return (rng.normal(size=(self.prompt_length, self.prompt_vocab, v)), rng.normal(size=(v + 1, v)),
                rng.normal(size=(self.length, v)))

    def sample_corpus(self, prompts: list[str], per_prompt: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
        """(prompt, response symbols) pairs from the Markov source: logits = prompt + previous-symbol + position."""
        by_prompt, by_prev, by_pos = self._source()
        rng = np.random.default_rng(seed)
        out = []
        for prompt in prompts:
            tokens = [int(p[1:]) for p in prompt.split()]
            base = sum(by_prompt[i, tok] for i, tok in enumerate(tokens))
            prev = np.full(per_prompt, self.vocab)  # row `vocab` of by_prev: the start of the response
            ys = np.empty((per_prompt, self.length), dtype=np.int64)
            for t in range(self.length):
                logits = self.temperature * (base[None, :] + by_prev[prev] + by_pos[t][None, :])
                probs = np.exp(logits - logits.max(axis=1, keepdims=True))
                probs /= probs.sum(axis=1, keepdims=True)
                ys[:, t] = (probs.cumsum(axis=1) > rng.random((per_prompt, 1))).argmax(axis=1)
                prev = ys[:, t]
            out.extend((prompt, y) for y in ys)
        return out


def build_tokenizer(language: SyntheticLanguage):
    """A word-level tokenizer: one token per prompt symbol, response symbol, pad and EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [PAD, EOS, "<unk>", *language.prompt_tokens, *language.response_tokens]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token="<unk>")


def build_reference_model(language: SyntheticLanguage, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised tiny Llama for ``language`` (transformers' LlamaForCausalLM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(language)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config), tokenizer


def _encode(tokenizer, prompt: str, symbols: np.ndarray, offset: int) -> list[int]:
    return tokenizer(prompt)["input_ids"] + [offset + int(s) for s in symbols] + [tokenizer.eos_token_id]


def pretrain_reference(language: SyntheticLanguage, *, num_prompts: int | None = None, per_prompt: int = 64,
                       steps: int = 600, batch_size: int = 256, lr: float = 3e-3, hidden: int = 64, layers: int = 2,
                       seed: int = 0, progress: bool = False):
    """(model, tokenizer, seconds): a tiny Llama trained by next-token loss on the Markov source's text.

    Trained on every prompt of the language (or the first ``num_prompts``) so π_ref is a real LM
    of the whole prompt set. The loss covers response tokens and EOS only, like the trainers'.
    """
    start = time.perf_counter()
    model, tokenizer = build_reference_model(language, hidden=hidden, layers=layers, seed=seed)
    prompts = language.all_prompts()[:num_prompts]
    corpus = language.sample_corpus(prompts, per_prompt, seed=seed)
    offset = tokenizer.convert_tokens_to_ids("r0")
    ids = torch.tensor([_encode(tokenizer, p, y, offset) for p, y in corpus])
    labels = ids.clone()
    labels[:, :language.prompt_length] = -100
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="Pretraining π_ref")
    for _ in iterator:
        batch = torch.randint(0, len(ids), (batch_size,), generator=generator)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model, tokenizer, time.perf_counter() - start


@torch.no_grad()
def _tree_logprobs(model, prompt_token_ids: list[int], vocab: int, length: int, offset: int, eos: int,
                   device) -> torch.Tensor:
    """log P(y, EOS | x) for every y in lexicographic order, one level of the response tree at a time.

    The prompt runs once; level d feeds each of the vocab**d prefixes' last token against its
    parent's KV cache (repeated ``vocab`` times), so the cost is ~1.2·vocab**length token
    positions instead of (prompt + length)·vocab**length for whole sequences.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=torch.tensor([prompt_token_ids], device=device), cache=cache, use_cache=True)
    step = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    cum = step[:, offset:offset + vocab].reshape(-1)  # level 1: log P(y_1)
    symbols = torch.arange(vocab, device=device)
    for depth in range(1, length + 1):
        cache.batch_repeat_interleave(vocab)
        tokens = (symbols.repeat(vocab ** (depth - 1)) + offset).unsqueeze(1)
        out = model(input_ids=tokens, cache=cache, use_cache=True)
        step = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        if depth < length:
            cum = (cum.unsqueeze(1) + step[:, offset:offset + vocab]).reshape(-1)
        else:
            cum = cum + step[:, eos]
    return cum


@torch.no_grad()
def response_logprobs(model, tokenizer, language: SyntheticLanguage, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(log π(y|x) normalised over the valid responses, valid mass) for every prompt and response.

    Shapes (len(prompts), vocab ** length) and (len(prompts),); responses in the order of
    :meth:`SyntheticLanguage.responses`. log π(y, EOS | x) is the LM's full-softmax probability of
    the response tokens and EOS (what the trainers compute); it is renormalised over the
    ``vocab ** length`` responses, whose total is the valid mass.
    """
    offset = tokenizer.convert_tokens_to_ids("r0")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.empty((len(prompts), language.num_responses))
    valid = np.empty(len(prompts))
    try:
        for row, prompt in enumerate(prompts):
            lp = _tree_logprobs(model, tokenizer(prompt)["input_ids"], language.vocab, language.length, offset,
                                tokenizer.eos_token_id, device).double().cpu().numpy()
            log_valid = float(np.logaddexp.reduce(lp))
            out[row] = lp - log_valid
            valid[row] = math.exp(log_valid)
    finally:
        model.train(was_training)
    return out, valid


def _prompt_seed(prompt: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Reward:
    """r(x, y) = a_x·s(y) + b_x with s(y) = Σ_t W[t, y_t]: a token score, scaled and shifted per prompt.

    W is standard normal (fixed by ``seed``), so s has no ties; ``ties=True`` rounds s to multiples
    of ``grid`` first (many exact ties, as with a coarse reward model). a_x = exp(N(0, ``scale_spread``²))
    and b_x ~ N(0, ``offset_spread``²) are fixed per prompt by a hash of its text.
    """

    language: SyntheticLanguage
    seed: int = 1
    ties: bool = False
    grid: float = 0.5
    scale_spread: float = 1.0
    offset_spread: float = 2.0

    def token_scores(self) -> np.ndarray:
        return np.random.default_rng(self.seed).normal(size=(self.language.length, self.language.vocab))

    def score(self, symbols: np.ndarray) -> np.ndarray:
        """s(y) for responses given as symbol arrays of shape (..., length)."""
        w = self.token_scores()
        symbols = np.asarray(symbols)
        s = w[np.arange(self.language.length), symbols].sum(axis=-1)
        return np.round(s / self.grid) * self.grid if self.ties else s

    def scale_offset(self, prompt: str) -> tuple[float, float]:
        rng = np.random.default_rng(_prompt_seed(prompt, self.seed))
        return float(np.exp(self.scale_spread * rng.normal())), float(self.offset_spread * rng.normal())

    def __call__(self, prompt: str, symbols: np.ndarray) -> np.ndarray:
        a, b = self.scale_offset(prompt)
        return a * self.score(symbols) + b

    def table(self, prompts: list[str]) -> np.ndarray:
        """Rewards of every response (rows: prompts, columns: :meth:`SyntheticLanguage.responses`)."""
        s = self.score(self.language.responses())
        return np.stack([a * s + b for a, b in map(self.scale_offset, prompts)])


@dataclass(frozen=True)
class ExactMetrics:
    """Exact figures of a policy against π_ref, averaged over a prompt set."""

    kl: float
    standard_win_rate: float
    bon_win_rate: dict
    won_win_rate: dict
    num_prompts: int
    #: The same figures prompt by prompt (lists): ``kl``, ``standard``, ``bon{N}``, ``won{N}``.
    per_prompt: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _best_of_n_win(pv: np.ndarray, qv: np.ndarray, n: int) -> float:
    """P(best of N from p beats best of N from q) + ½P(tie), for masses of distinct values in increasing order.

    With G the CDF at a value and G⁻ just below it, the best of N takes value v with probability
    G(v)^N − G⁻(v)^N.
    """
    gp, gq = np.clip(np.cumsum(pv), 0, 1), np.clip(np.cumsum(qv), 0, 1)
    gp_below, gq_below = np.concatenate([[0.0], gp[:-1]]), np.concatenate([[0.0], gq[:-1]])
    policy_at = gp**n - gp_below**n
    return float(np.sum(policy_at * (gq_below**n + 0.5 * (gq**n - gq_below**n))))


def exact_metrics(policy_logp: np.ndarray, reference_logp: np.ndarray, rewards: np.ndarray,
                  n_values=(4,)) -> ExactMetrics:
    """KL(π‖π_ref), standard and best-/worst-of-N win rates, exact, averaged over prompts (rows).

    All arrays are (prompts, responses); log-probabilities normalised per row. Ties count ½.
    """
    policy_logp, reference_logp = np.atleast_2d(policy_logp), np.atleast_2d(reference_logp)
    rewards = np.atleast_2d(rewards)
    if not policy_logp.shape == reference_logp.shape == rewards.shape:
        raise ValueError(f"shapes differ: policy {policy_logp.shape}, reference {reference_logp.shape}, "
                         f"rewards {rewards.shape}")
    kls, standard = [], []
    bon, won = {n: [] for n in n_values}, {n: [] for n in n_values}
    for lp, lq, r in zip(policy_logp, reference_logp, rewards):
        p, q = np.exp(lp), np.exp(lq)
        kls.append(float(np.sum(np.where(p > 0, p * (lp - lq), 0.0))))
        _, group = np.unique(r, return_inverse=True)
        pv, qv = np.bincount(group, weights=p), np.bincount(group, weights=q)
        standard.append(_best_of_n_win(pv, qv, 1))
        for n in n_values:
            bon[n].append(_best_of_n_win(pv, qv, n))
            # The worst of N beats the other worst of N iff it loses under the reversed order.
            won[n].append(1.0 - _best_of_n_win(pv[::-1], qv[::-1], n))
    per_prompt = {"kl": kls, "standard": standard, **{f"bon{n}": v for n, v in bon.items()},
                  **{f"won{n}": v for n, v in won.items()}}
    return ExactMetrics(kl=float(np.mean(kls)), standard_win_rate=float(np.mean(standard)),
                        bon_win_rate={n: float(np.mean(v)) for n, v in bon.items()},
                        won_win_rate={n: float(np.mean(v)) for n, v in won.items()}, num_prompts=len(rewards),
                        per_prompt=per_prompt)


def tilted_policy(reference_logp: np.ndarray, rewards: np.ndarray, log_density, nodes: int = 16) -> np.ndarray:
    """log π(y|x) of the policy whose true quantile has density exp(``log_density``(c)), per prompt.

    Each reward value gets the density's mass on its quantile cell, ∫_{G⁻}^{G} e^{log_density(c)} dc
    (Gauss–Legendre, ``nodes`` per cell), shared among tied responses in proportion to π_ref:
    the exact tilt of the continuous theory, coarsened to the prompt's responses. ``log_density``
    is a callable on arrays of quantiles, e.g. ``TrainedTilt.log_density`` from
    :func:`ctrl_offline.maths.finite_k.ideal_tilt` / :func:`~ctrl_offline.maths.finite_k.trained_tilt`.
    """
    x, w = np.polynomial.legendre.leggauss(nodes)
    x, w = (x + 1) / 2, w / 2
    out = np.empty(np.shape(np.atleast_2d(reference_logp)))
    for row, (lq, (group, lo, hi)) in enumerate(zip(np.atleast_2d(reference_logp),
                                                     quantile_cells(reference_logp, rewards))):
        width = hi - lo
        u = lo[:, None] + width[:, None] * x[None, :]
        log_f = np.asarray(log_density(u.ravel()), dtype=float).reshape(u.shape)
        top = log_f.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            log_mass = np.log(width) + top[:, 0] + np.log((w[None, :] * np.exp(log_f - top)).sum(axis=1))
        qv = np.bincount(group, weights=np.exp(lq))
        lp = lq - np.log(qv)[group] + log_mass[group]
        out[row] = lp - np.logaddexp.reduce(lp)
    return out


def sample_responses(logp: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """K response indices per prompt drawn with replacement from each row's distribution, (prompts, K)."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(logp), k), dtype=np.int64)
    for row, lp in enumerate(np.atleast_2d(logp)):
        cdf = np.cumsum(np.exp(lp - lp.max()))
        out[row] = np.minimum(np.searchsorted(cdf, rng.random(k) * cdf[-1], side="right"), len(lp) - 1)
    return out


class ExactKL:
    """KL(π‖π_ref) of a model on a prompt set, exact by enumeration: an ``estimate_kl`` for the KL callback."""

    def __init__(self, tokenizer, language: SyntheticLanguage, prompts: list[str], reference_logp: np.ndarray):
        self.tokenizer, self.language, self.prompts = tokenizer, language, list(prompts)
        self.reference_logp = np.asarray(reference_logp)
        if self.reference_logp.shape != (len(self.prompts), language.num_responses):
            raise ValueError(f"reference_logp must have shape {(len(self.prompts), language.num_responses)}, got "
                             f"{self.reference_logp.shape}")

    def __call__(self, model):
        from ctrl_offline.training.kl_budget import KLEstimate

        logp, _ = response_logprobs(model, self.tokenizer, self.language, self.prompts)
        p = np.exp(logp)
        kl = float(np.mean(np.sum(p * (logp - self.reference_logp), axis=1)))
        return KLEstimate(value=max(kl, 0.0), stderr=0.0, num_samples=0)


@torch.no_grad()
def sample_from_model(model, tokenizer, language: SyntheticLanguage, prompts: list[str], k: int, seed: int = 0,
                      batch_size: int = 4096, max_rounds: int = 50,
                      missing_ok: bool = False) -> np.ndarray:
    """K responses per prompt drawn from the model's normalised response distribution, as symbols.

    Ancestral sampling from the full softmax (temperature 1, nothing truncated); a draw that is
    not ``length`` response symbols followed by EOS is redrawn, so the samples follow exactly the
    renormalised distribution :func:`response_logprobs` enumerates. Shape (prompts, K, length).
    A draw still invalid after ``max_rounds`` redraws raises, or with ``missing_ok`` is left as −1
    (a policy that puts almost no mass on valid responses for some prompt).
    """
    offset = tokenizer.convert_tokens_to_ids("r0")
    eos, vocab, length = tokenizer.eos_token_id, language.vocab, language.length
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_token_ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts])
    out = np.empty((len(prompts), k, length), dtype=np.int64)
    todo = np.array([(i, j) for i in range(len(prompts)) for j in range(k)])
    rounds = 0
    try:
        while len(todo):
            rounds += 1
            if rounds > max_rounds:
                if missing_ok:
                    out[todo[:, 0], todo[:, 1]] = -1
                    break
                raise RuntimeError(f"{len(todo)} of {len(prompts) * k} draws still invalid after {max_rounds} rounds: "
                                   "the model rarely writes `length` response symbols then EOS (is it pretrained?)")
            kept = []
            for chunk in np.array_split(todo, max(1, -(-len(todo) // batch_size))):
                ids = prompt_token_ids[chunk[:, 0]]
                for _ in range(length + 1):
                    logits = model(input_ids=ids.to(device), use_cache=False).logits[:, -1].float().cpu()
                    nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
                    ids = torch.cat([ids, nxt], dim=1)
                resp = ids[:, prompt_token_ids.shape[1]:].numpy()
                ok = ((resp[:, :length] >= offset) & (resp[:, :length] < offset + vocab)).all(axis=1)
                ok &= resp[:, length] == eos
                out[chunk[ok, 0], chunk[ok, 1]] = resp[ok, :length] - offset
                kept.append(chunk[~ok])
            todo = np.concatenate(kept) if kept else todo[:0]
    finally:
        model.train(was_training)
    return out


def response_index(language: SyntheticLanguage, symbols: np.ndarray) -> np.ndarray:
    """Row index in :meth:`SyntheticLanguage.responses` of responses given as symbols (..., length)."""
    weights = language.vocab ** np.arange(language.length - 1, -1, -1)
    return np.asarray(symbols) @ weights


@torch.no_grad()
def sequence_logprobs(model, tokenizer, language: SyntheticLanguage, prompts: list[str], symbols: np.ndarray,
                      batch_size: int = 4096) -> np.ndarray:
    """log P(y, EOS | x) under the model's full softmax (unnormalised: what the trainers compute), (prompts, K).

    ``symbols`` has shape (prompts, K, length), as :func:`sample_from_model` returns it.
    """
    offset = tokenizer.convert_tokens_to_ids("r0")
    symbols = np.asarray(symbols)
    prompt_token_ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts])
    ids = torch.cat([prompt_token_ids[:, None, :].expand(-1, symbols.shape[1], -1),
                     torch.from_numpy(np.array(symbols, dtype=np.int64)) + offset,
                     torch.full(symbols.shape[:2] + (1,), tokenizer.eos_token_id)], dim=2).reshape(
        -1, prompt_token_ids.shape[1] + language.length + 1)
    start = prompt_token_ids.shape[1]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for chunk in ids.split(batch_size):
            chunk = chunk.to(device)
            logps = torch.log_softmax(model(input_ids=chunk[:, :-1], use_cache=False).logits.float(), dim=-1)
            out.append(logps[:, start - 1:].gather(-1, chunk[:, start:].unsqueeze(-1)).sum(dim=(1, 2)).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().reshape(symbols.shape[:2])
