"""The ``eval`` stage: inference-time win rates of an aligned policy against its reference.

For held-out prompts it draws ``max(N)`` candidates from the policy (base + adapter) and from the
reference (the same base with the adapter disabled, no second copy), scores them, and for every
selector and every N reuses those samples to report the win rate of T(policy) over
T(reference) with a bootstrap interval, the standard win rate, the calibrated-reward shortcut
(the policy's candidates against the reference's best-/worst-of-N drawn from tables built from the
reference candidates, docs/evaluation_shortcut.md) and
KL(π‖π_ref) from the policy samples' log-ratios. Writes ``report.json``, ``report.md``,
``samples.parquet`` and three figures.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..calibration import build_tables, calibrate
from ..evaluation import calibrated_shortcut, inference_win_rate, kl_estimate, standard_win_rate
from ..generation import (
    SamplingConfig,
    completion_logps,
    load_causal_lm,
    prompt_id,
    render_prompt,
    sample_completions,
)
from ..io import DataError, atomic_output_dir, read_table
from ..rewards import load_reward, reward_name
from ..selection import SELECTORS
from ._shards import process_device
from .sample import load_prompts

__all__ = ["EvalResult", "evaluate_policy", "BUILD_REPORT_KEYS"]

#: What a report records of the training set's build metadata (one name per quantity, as there).
BUILD_REPORT_KEYS = ("transform", "t", "beta", "phi_scale", "unscaled_beta", "num_rows")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    report: dict


def _overlap(prompt_ids: list[str], train_data: str | None) -> int:
    if not train_data:
        return 0
    table = read_table(train_data, columns=None)
    if "prompt_id" in table.column_names:
        seen = set(table["prompt_id"].to_pylist())
    elif "prompt" in table.column_names:
        seen = {prompt_id(p) for p in table["prompt"].to_pylist()}
    else:
        raise DataError(f"training data {train_data} has neither prompt_id nor prompt to compare with")
    return sum(p in seen for p in prompt_ids)


def _draw(model, tokenizer, texts, sampling, seed, reference: bool):
    import contextlib

    context = model.disable_adapter() if reference and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with context:
        rows = sample_completions(model, tokenizer, texts, sampling, seed)
    return rows


def evaluate_policy(
    prompts_source: str,
    out_dir: str | os.PathLike,
    model_name_or_path: str,
    reward: str,
    *,
    adapter: str | None = None,
    n: tuple[int, ...] = (1, 2, 4),
    selectors: tuple[str, ...] = ("bon", "won"),
    column: str = "prompt",
    limit: int | None = None,
    max_new_tokens: int = 64,
    lam: float = 0.1,
    beta: float = 0.1,
    kappa0: float = 0.1,
    seed: int = 0,
    train_data: str | None = None,
    transform: str | None = None,
    t: float | None = None,
    num_boot: int = 2000,
    overwrite: bool = False,
    build_info: dict | None = None,
) -> EvalResult:
    """Evaluate ``adapter`` on ``model_name_or_path`` (or the base itself when no adapter is given).

    ``beta`` is the selectors' β (regularised best-of-N, ITP), not the training β. ``build_info``
    (optional, the training set's ``ctrl_build.json``) is recorded in the report under ``build``:
    transform, t, the trainer's ``beta``, ``phi_scale`` and the raw-Φ ``unscaled_beta``.
    """
    n = tuple(sorted(set(int(x) for x in n)))
    if not n or n[0] < 1:
        raise ValueError(f"N must be positive integers, got {n}")
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown selector(s) {unknown}; choose from {SELECTORS}")
    for name, value in (("lambda", lam), ("beta", beta), ("kappa0", kappa0)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    prompts = load_prompts(prompts_source, column, limit=limit)
    ids = [prompt_id(p) for p in prompts]
    overlap = _overlap(ids, train_data)
    if overlap:
        logger.warning("%d of %d evaluation prompts also appear in the training data", overlap, len(ids))
    k = max(max(n), 2)
    model, tokenizer = load_causal_lm(model_name_or_path, adapter, device=process_device())
    texts = [render_prompt(tokenizer, p) for p in prompts]
    sampling = SamplingConfig(k=k, max_new_tokens=max_new_tokens)
    policy = _draw(model, tokenizer, texts, sampling, seed, reference=False)
    reference = _draw(model, tokenizer, texts, sampling, seed + 1, reference=True)

    # Log-probs of the policy's samples under both models (for the KL estimate); `ref_logp` of a
    # sample drawn from the policy is its policy log-prob.
    policy_texts = [texts[r["batch_prompt"]] for r in policy]
    policy_ids = [r["completion_ids"] for r in policy]
    import contextlib

    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        policy_under_ref = completion_logps(model, tokenizer, policy_texts, policy_ids)
    policy_logp = np.array([r["ref_logp"] for r in policy]).reshape(len(prompts), k)
    policy_ref_logp = np.array(policy_under_ref).reshape(len(prompts), k)

    score = load_reward(reward_name(reward)[1])
    all_prompts = [prompts[r["batch_prompt"]] for r in policy + reference]
    rewards = score(all_prompts, [r["completion"] for r in policy + reference])
    r_pol = rewards[: len(policy)].reshape(len(prompts), k)
    r_ref = rewards[len(policy):].reshape(len(prompts), k)
    ref_ref_logp = np.array([r["ref_logp"] for r in reference]).reshape(len(prompts), k)

    tables = build_tables(np.repeat(ids, k), r_ref.ravel())
    u_pol = calibrate(tables, np.repeat(ids, k), r_pol.ravel()).reshape(len(prompts), k)

    results = []
    for selector in selectors:
        for size in n:
            results.append(inference_win_rate(
                r_pol, r_ref, selector, size, policy_ref_logps=policy_ref_logp, reference_ref_logps=ref_ref_logp,
                lam=lam, beta=beta, kappa0=kappa0, num_boot=num_boot, rng=seed))
    report = {
        "model": model_name_or_path,
        "adapter": adapter,
        "reward": reward,
        "prompts": {"source": str(prompts_source), "count": len(prompts), "overlap_with_training": overlap},
        "candidates_per_side": k,
        "selector_settings": {"lambda": lam, "beta": beta, "kappa0": kappa0},
        "win_rates": results,
        "standard_win_rate": standard_win_rate(r_pol, r_ref, num_boot=num_boot, rng=seed).to_dict(),
        "calibrated_shortcut": [calibrated_shortcut(r_pol, size, tables=tables, prompt_ids=ids, num_boot=num_boot,
                                                    rng=seed) for size in n],
        "kl": kl_estimate(policy_logp, policy_ref_logp, num_boot=num_boot, rng=seed).to_dict(),
        "mean_policy_u": float(u_pol.mean()),
        "transform": {"name": transform, "t": t},
        "build": None if build_info is None else {k: build_info.get(k) for k in BUILD_REPORT_KEYS},
    }
    samples = pa.table({
        "side": ["policy"] * len(policy) + ["reference"] * len(reference),
        "prompt_id": [ids[r["batch_prompt"]] for r in policy + reference],
        "sample_idx": [r["sample_idx"] for r in policy + reference],
        "completion": [r["completion"] for r in policy + reference],
        "reward": rewards,
        "u": np.concatenate([u_pol.ravel(), np.full(len(reference), np.nan)]),
    })
    from ..io import write_parquet
    from ..reporting import write_report

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_parquet(samples, tmp / "samples.parquet", {"stage": "eval"})
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        write_report(report, u_pol.ravel(), tmp)
    return EvalResult(Path(out_dir), report)
