"""The ``eval`` stage: inference-time win rates of an aligned policy against its reference.

For held-out prompts it draws m candidates from the policy (base + adapter) and M from the
reference (the same base with the adapter disabled, no second copy) — or reads the M reference
candidates from a shared reference pool drawn earlier for the same prompts —, scores them, and
for every selector and every N ≤ min(m, M) reports the win rate of T(policy) over T(reference)
averaged over every N-subset of both sides (the U-statistic, docs/evaluation.md) with a bootstrap
interval, the standard win rate, the calibrated-reward shortcut (the policy's candidates against
the reference's best-/worst-of-N drawn from tables built from the reference candidates,
docs/evaluation_shortcut.md) and KL(π‖π_ref) of the policy samples: the per-token exact KL summed
along each sample (``kl``) and the sequence-level log-ratio (``kl_sequence``), each per prompt with
its spread (:func:`ctrl_offline.models.generation.completion_kl`, docs/kl_budget.md). An adapter whose
``ctrl_train.json`` lists the prompts its training was held on (``ctrl-data train --kl-prompts``)
also gets the per-token KL on those prompts (``kl_training_prompts``). Against the plan its build
was made for (``ctrl_build.json``), the report says how the KL was spent (docs/diagnostics.md): KL
efficiency and plan fidelity (``plan_diagnostics``), the on-/off-target split of the KL from the
policy samples' levels among the reference's (``kl_split``) and the tilt-fidelity curve on the
reference samples (``tilt_fidelity``); what cannot be computed is noted (``diagnostic_notes``),
never allowed to fail the report. Writes ``report.json``,
``report.md``, ``samples.parquet``, ``per_prompt.parquet`` (the per-prompt values ``ctrl-data
compare`` pairs) and three figures; a figure that cannot be drawn (a KL beyond what the planner
covers) is noted in the report, never lost with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ctrl_offline.maths.calibration import build_tables, calibrate, rank_counts
from ctrl_offline.maths.diagnostics import level_kl_split, plan_diagnostics, planned_tilt, reference_tilt_fidelity
from ctrl_offline.maths.win_rates import (
    MAX_SUBSETS,
    bootstrap_mean,
    calibrated_shortcut,
    kl_summary,
    u_statistic_per_prompt,
    u_statistic_win_rate,
)
from ctrl_offline.models.generation import (
    SamplingConfig,
    completion_kl,
    load_causal_lm,
    prompt_id,
    render_prompt,
    sample_completions,
)
from ctrl_offline.io.files import DataError, atomic_output_dir, fingerprint, read_metadata, read_table, write_parquet
from ctrl_offline.models.rewards import load_reward, reward_name
from ctrl_offline.maths.procedures import get_procedure, procedure_names
from ctrl_offline.stages._shards import process_device
from ctrl_offline.stages.sample import load_prompts

__all__ = ["EvalResult", "evaluate_policy", "BUILD_REPORT_KEYS", "POOL_FILE", "PER_PROMPT_FILE"]

#: The reference pool's table inside a ``reference_pool`` folder.
POOL_FILE = "pool.parquet"
#: The per-prompt values of an evaluation (what ``ctrl-data compare`` pairs), beside ``report.json``.
PER_PROMPT_FILE = "per_prompt.parquet"

#: What a report records of the training set's build metadata (one name per quantity, as there).
BUILD_REPORT_KEYS = ("transform", "t", "beta", "phi_scale", "unscaled_beta", "num_rows")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    report: dict


def _sample_ids(values):
    """Prompt ids as ``sample`` writes them now (int64); the 16-hex-digit ids of earlier runs become those integers,
    other ids (a user's own strings) stay as they are."""
    from ctrl_offline.maths.calibration import CalibrationError, int_prompt_ids

    try:
        return [int(v) for v in int_prompt_ids(values)]
    except CalibrationError:
        return list(values)


def _overlap(prompt_ids: list[str], train_data: str | None) -> int:
    if not train_data:
        return 0
    table = read_table(train_data, columns=None)
    if "prompt_id" in table.column_names:
        seen = set(_sample_ids(table["prompt_id"].to_pylist()))
    elif "prompt" in table.column_names:
        seen = {prompt_id(p) for p in table["prompt"].to_pylist()}
    else:
        raise DataError(f"training data {train_data} has neither prompt_id nor prompt to compare with")
    return sum(p in seen for p in prompt_ids)


def _draw(model, tokenizer, texts, sampling, seed, reference: bool, checkpoint_dir=None, model_key: str = ""):
    import contextlib

    context = model.disable_adapter() if reference and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with context:
        rows = sample_completions(model, tokenizer, texts, sampling, seed, checkpoint_dir=checkpoint_dir,
                                  model_key=model_key)
    return rows


def _identity(name: str) -> str:
    """A model or reward as a pool records it: local paths made absolute, Hub ids and module:function as given."""
    return str(Path(name).resolve()) if os.path.exists(name) else name


def _pool_settings(model_name_or_path: str, reward: str, max_new_tokens: int) -> dict:
    label, spec = reward_name(reward)
    return {"model": _identity(model_name_or_path), "reward": _identity(spec), "reward_name": label,
            "max_new_tokens": int(max_new_tokens)}


def _read_pool(pool: Path, ids: list[str], settings: dict, samples: int | None) -> dict | None:
    """The reference pool's samples for ``ids`` ({prompt_id: rows sorted by sample_idx}), or None when absent.

    Raises DataError when the pool was made for other prompts, another reference model or
    reward, another ``max_new_tokens`` or holds fewer than ``samples`` samples per prompt.
    """
    path = pool / POOL_FILE
    if not path.is_file():
        if pool.exists() and (not pool.is_dir() or any(pool.iterdir())):
            raise DataError(f"reference pool {pool} exists but holds no {POOL_FILE}: pass an empty or new folder")
        return None
    meta = read_metadata(path)
    if meta.get("stage") != "reference_pool":
        raise DataError(f"{path} is not a reference pool (written by stage {meta.get('stage')!r})")
    for key, what in (("model", "reference model"), ("reward", "reward"), ("max_new_tokens", "max_new_tokens")):
        if meta.get(key) != settings[key]:
            raise DataError(f"reference pool {pool} was drawn with {what} {meta.get(key)!r}, this evaluation uses "
                            f"{settings[key]!r}: pass another --reference-pool folder")
    columns = ["prompt_id", "sample_idx", "completion", "reward", "ref_logp"]
    # `finished` says where the sampled ids ended with EOS (the tilt fidelity re-tokenises the text); a pool
    # written by hand may lack it.
    import pyarrow.parquet as pq

    columns += ["finished"] if "finished" in pq.read_schema(path).names else []
    table = read_table(path, columns=columns).to_pandas()
    # Ids compared as sample writes them now: a pool (or a caller) of an earlier version has hex ids.
    table["prompt_id"] = _sample_ids(table["prompt_id"].tolist())
    caller = dict(zip(_sample_ids(ids), ids))
    wanted, held = set(caller), set(table.prompt_id)
    if wanted != held:
        raise DataError(f"reference pool {pool} holds other prompts: {len(wanted - held)} of this evaluation's "
                        f"{len(wanted)} prompts are missing from it and {len(held - wanted)} of its {len(held)} are "
                        "not evaluated (the pool must be drawn for the same prompts; pass another --reference-pool)")
    counts = table.groupby("prompt_id").size()
    if samples is not None and counts.min() < samples:
        raise DataError(f"reference pool {pool} has {counts.min()} samples for some prompt, fewer than the "
                        f"{samples} reference samples asked for")
    table = table.sort_values(["prompt_id", "sample_idx"], kind="stable")
    return {caller[pid]: group for pid, group in table.groupby("prompt_id", sort=False)}


def _write_pool(pool: Path, ids: list[str], rows: list[dict], rewards: np.ndarray, settings: dict, seed: int,
                samples: int) -> None:
    """Write the reference samples of each distinct prompt to ``pool/pool.parquet`` (atomically)."""
    first = {}
    for i, pid in enumerate(ids):
        first.setdefault(pid, i)
    keep = [j for j, r in enumerate(rows) if first[ids[r["batch_prompt"]]] == r["batch_prompt"]]
    table = pa.table({
        "prompt_id": [ids[rows[j]["batch_prompt"]] for j in keep],
        "sample_idx": [rows[j]["sample_idx"] for j in keep],
        "completion": [rows[j]["completion"] for j in keep],
        "reward": np.asarray(rewards, dtype=float)[keep],
        "ref_logp": [rows[j]["logp"] for j in keep],  # reference samples: log π_ref
        "num_tokens": [rows[j]["num_tokens"] for j in keep],
        "finished": [rows[j]["finished"] for j in keep],
    })
    with atomic_output_dir(pool) as tmp:
        write_parquet(table, tmp / POOL_FILE, {"stage": "reference_pool", **settings, "samples_per_prompt": samples,
                                               "num_prompts": len(first), "seed": seed})


def _per_prompt_table(ids: list[str], win_rates: list[dict], standard: np.ndarray, kl: np.ndarray,
                      kl_sequence: np.ndarray) -> pa.Table:
    """Long table of per-prompt values: metric (win_rate, standard_win_rate, kl, kl_sequence), selector, n, value.

    ``kl`` is the per-token estimate of each prompt's KL, ``kl_sequence`` the sequence-level one."""
    cols = {"prompt_id": [], "prompt_index": [], "metric": [], "selector": [], "n": [], "value": []}

    def add(metric, selector, n, values):
        cols["prompt_id"] += list(ids)
        cols["prompt_index"] += list(range(len(ids)))
        cols["metric"] += [metric] * len(ids)
        cols["selector"] += [selector] * len(ids)
        cols["n"] += [n] * len(ids)
        cols["value"] += [float(v) for v in values]

    for row in win_rates:
        add("win_rate", row["selector"], row["n"], row["per_prompt"])
    add("standard_win_rate", None, 1, standard)
    add("kl", None, None, kl)
    add("kl_sequence", None, None, kl_sequence)
    return pa.table({**cols, "selector": pa.array(cols["selector"], pa.string()), "n": pa.array(cols["n"], pa.int64())})


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
    policy_samples: int | None = None,
    reference_samples: int | None = None,
    reference_pool: str | os.PathLike | None = None,
    max_subsets: int = MAX_SUBSETS,
    selector_args: dict | None = None,
    training_kl_prompts: bool = True,
    tilt_fidelity: bool = True,
) -> EvalResult:
    """Evaluate ``adapter`` on ``model_name_or_path`` (or the base itself when no adapter is given).

    ``selectors`` are registered procedures (:mod:`ctrl_offline.maths.procedures`). ``beta`` is the
    selectors' β (regularised best-of-N, ITP), not the training β; ``selector_args`` holds any other
    procedure setting (``{"alpha": 1.5}`` for tsallis). ``build_info``
    (optional, the training set's ``ctrl_build.json``) is recorded in the report under ``build``:
    transform, t, the trainer's ``beta``, ``phi_scale`` and the raw-Φ ``unscaled_beta``.

    ``policy_samples`` (m) and ``reference_samples`` (M), each ≥ max(N) (default max(N), at least
    2), are the samples drawn per prompt from each side; every win rate is the U-statistic over all
    N-subsets of the m and M samples (:func:`~ctrl_offline.maths.win_rates.u_statistic_win_rate`,
    docs/evaluation.md). ``reference_pool`` names a folder shared by evaluations on the same
    prompts: when it holds a pool for the same prompts (by prompt_id), reference model, reward and
    ``max_new_tokens`` with at least M samples per prompt, its samples are used instead of drawing
    the reference again (M defaults to all of them); when it does not exist, the M reference
    samples are drawn, scored and written there. A pool that does not match is a DataError.
    ``max_subsets`` caps the N-subsets enumerated per prompt for the adaptive selectors.

    KL(π‖π_ref) is reported as ``kl`` (the per-token estimator: Σ_t of the exact next-token KL
    along each policy sample) and ``kl_sequence`` (the mean of log π(y|x) − log π_ref(y|x)), each
    with its bootstrap interval, the prompt-to-prompt ``sd``, ``stderr`` and ``per_prompt`` values.
    With ``training_kl_prompts`` (default) an adapter whose ``ctrl_train.json`` lists the prompts its
    training was held on also gets ``kl_training_prompts``: the per-token KL there, drawn as the
    callback drew, beside the KL the callback left. ``figure_notes`` says what the figures left out
    (a planner curve that cannot be planned at the measured KL).

    Diagnostics (docs/diagnostics.md, docs/evaluation.md): ``plan_diagnostics`` — KL efficiency and
    plan fidelity of the procedure and N the build was planned for, at ``kl`` and its win rate;
    ``kl_split`` — on target + off target of the sequence-level KL from the policy samples' levels
    among the M reference rewards of their prompt, with the plan's own on-target at that M;
    ``tilt_fidelity`` — h = log π_θ − log π_ref of the M reference samples against the planned
    log-density at their leave-one-out Ĉ (one more teacher-forced pass of both models over the
    reference samples; ``tilt_fidelity=False`` skips it). Each is None where it cannot be had (no
    plan, a simulated plan, a KL off the plan's curve, …), with the reason in ``diagnostic_notes``.
    """
    n = tuple(sorted(set(int(x) for x in n)))
    if not n or n[0] < 1:
        raise ValueError(f"N must be positive integers, got {n}")
    unknown = [s for s in selectors if s not in procedure_names()]
    if unknown:
        raise ValueError(f"unknown selector(s) {unknown}; choose from {', '.join(procedure_names())}")
    for name, value in (("lambda", lam), ("beta", beta), ("kappa0", kappa0)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    selector_settings = {"lam": lam, "beta": beta, "kappa0": kappa0, **(selector_args or {})}
    for selector in selectors:  # an unknown setting stops here, before any sampling
        get_procedure(selector).settings(selector_settings)
    for name, value in (("policy_samples", policy_samples), ("reference_samples", reference_samples)):
        if value is not None and (int(value) != value or value < max(max(n), 2)):
            raise ValueError(f"{name} must be an integer ≥ max(N) = {max(n)} (and ≥ 2), got {value}")
    m = int(policy_samples) if policy_samples is not None else max(max(n), 2)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # said now, not after every sample is drawn
        raise DataError(f"output folder {out} is not empty (pass --overwrite to replace it)")
    # Each finished batch of samples is kept here until the report is written: a stopped evaluation resumes
    # after its last batch, with the same samples (the same random state) as an uninterrupted one.
    drawn = out.resolve().with_name(f".{out.resolve().name}.sampling")
    prompts = load_prompts(prompts_source, column, limit=limit)
    ids = [prompt_id(p) for p in prompts]
    overlap = _overlap(ids, train_data)
    if overlap:
        logger.warning("%d of %d evaluation prompts also appear in the training data", overlap, len(ids))
    settings = _pool_settings(model_name_or_path, reward, max_new_tokens)
    pool_dir = None if reference_pool is None else Path(reference_pool)
    pooled = None if pool_dir is None else _read_pool(pool_dir, ids, settings, reference_samples)
    if pooled is not None:
        big_m = int(reference_samples) if reference_samples is not None else min(len(g) for g in pooled.values())
        if big_m < max(n):
            raise DataError(f"reference pool {pool_dir} has {big_m} samples per prompt, fewer than max(N) = {max(n)}")
        logger.info("reusing the reference pool %s (%d samples per prompt)", pool_dir, big_m)
    else:
        big_m = int(reference_samples) if reference_samples is not None else max(max(n), 2)

    model, tokenizer = load_causal_lm(model_name_or_path, adapter, device=process_device())
    texts = [render_prompt(tokenizer, p) for p in prompts]
    score = load_reward(reward_name(reward)[1])
    if pooled is None:
        # The reference side first, and into the pool at once: a run stopped while the policy samples
        # keeps it for the next (and for every other run against the same pool).
        reference = _draw(model, tokenizer, texts, SamplingConfig(k=big_m, max_new_tokens=max_new_tokens), seed + 1,
                          reference=True, checkpoint_dir=drawn / "reference", model_key=settings["model"])
        ref_rewards = score([prompts[r["batch_prompt"]] for r in reference], [r["completion"] for r in reference])
        if pool_dir is not None:
            _write_pool(pool_dir, ids, reference, ref_rewards, settings, seed + 1, big_m)
            logger.info("wrote the reference pool %s", pool_dir)
    else:
        reference = [{"batch_prompt": i, "sample_idx": int(row.sample_idx), "completion": row.completion,
                      "logp": float(row.ref_logp), "reward": float(row.reward),
                      **({"finished": bool(row.finished)} if hasattr(row, "finished") else {})}
                     for i, pid in enumerate(ids) for row in pooled[pid].head(big_m).itertuples()]
        ref_rewards = np.array([r["reward"] for r in reference])
    policy_key = f"{settings['model']}|{adapter and _identity(adapter)}|{adapter and fingerprint(adapter)}"
    policy = _draw(model, tokenizer, texts, SamplingConfig(k=m, max_new_tokens=max_new_tokens), seed, reference=False,
                   checkpoint_dir=drawn / "policy", model_key=policy_key)

    # The policy's samples under both models, teacher-forced on the same batches: the per-token KL
    # along each, and log π_ref (which RBoN and ITP need). Without an adapter π is π_ref: one pass, KL 0.
    policy_texts = [texts[r["batch_prompt"]] for r in policy]
    policy_ids = [r["completion_ids"] for r in policy]
    scored = completion_kl(model, tokenizer, policy_texts, policy_ids,
                           reference=None if hasattr(model, "disable_adapter") else model)
    policy_ref_logp = scored.ref_logp.reshape(len(prompts), m)
    kl = kl_summary(scored.token.reshape(len(prompts), m), num_boot=num_boot, rng=seed)
    kl_sequence = kl_summary(scored.sequence.reshape(len(prompts), m), num_boot=num_boot, rng=seed)
    held = _training_kl_record(adapter) if training_kl_prompts else None
    on_training_prompts = None if held is None else _kl_on_training_prompts(model, tokenizer, held, num_boot)

    r_pol = np.asarray(score([prompts[r["batch_prompt"]] for r in policy], [r["completion"] for r in policy]))
    r_pol = r_pol.reshape(len(prompts), m)
    ref_rewards = np.asarray(ref_rewards, dtype=float)
    rewards = np.concatenate([r_pol.ravel(), ref_rewards])
    r_ref = ref_rewards.reshape(len(prompts), big_m)
    ref_ref_logp = np.array([r["logp"] for r in reference]).reshape(len(prompts), big_m)

    tables = build_tables(np.repeat(ids, big_m), r_ref.ravel())
    u_pol = calibrate(tables, np.repeat(ids, m), r_pol.ravel()).reshape(len(prompts), m)

    results = []
    for selector in selectors:
        for size in n:
            results.append(u_statistic_win_rate(
                r_pol, r_ref, size, selector, policy_ref_logps=policy_ref_logp, reference_ref_logps=ref_ref_logp,
                max_subsets=max_subsets, num_boot=num_boot, rng=seed, **selector_settings))
    standard = u_statistic_per_prompt(r_pol, r_ref, 1)  # every policy sample against every reference sample
    report = {
        "model": model_name_or_path,
        "adapter": adapter,
        "reward": reward,
        "prompts": {"source": str(prompts_source), "count": len(prompts), "overlap_with_training": overlap},
        "candidates_per_side": m if m == big_m else f"{m} policy / {big_m} reference",
        "policy_samples": m,
        "reference_samples": big_m,
        "reference_pool": None if pool_dir is None else {"path": str(pool_dir), "reused": pooled is not None},
        "estimator": "u_statistic",
        "max_subsets": max_subsets,
        "selector_settings": {"lambda": lam, "beta": beta, "kappa0": kappa0, **(selector_args or {})},
        "win_rates": [{k: v for k, v in row.items() if k != "per_prompt"} for row in results],
        "standard_win_rate": bootstrap_mean(standard, num_boot=num_boot, rng=seed).to_dict(),
        "calibrated_shortcut": [calibrated_shortcut(r_pol, size, tables=tables, prompt_ids=ids, num_boot=num_boot,
                                                    rng=seed) for size in n],
        "kl": {**kl, "estimator": "per_token"},
        "kl_sequence": {**kl_sequence, "estimator": "sequence"},
        "kl_training_prompts": on_training_prompts,
        "mean_policy_u": float(u_pol.mean()),
        "transform": {"name": transform, "t": t},
        "build": None if build_info is None else {k: build_info.get(k) for k in BUILD_REPORT_KEYS},
    }
    # How the KL was spent, against the build's plan (docs/diagnostics.md): a note where a figure cannot be had.
    notes: list[str] = []
    report["plan_diagnostics"] = _noted(notes, "plan diagnostics", lambda: plan_diagnostics(
        build_info, kl["value"], report["win_rates"]).to_dict())
    planned = build_info is not None and bool(build_info.get("planner"))  # else the note above says why
    tilt = _noted(notes, "planned tilt", lambda: planned_tilt(build_info)) if planned else None
    report["kl_split"] = _noted(notes, "KL split", lambda: _kl_split(tables, ids, r_pol, scored, tilt, notes,
                                                                     num_boot, seed))
    report["tilt_fidelity"] = None
    if tilt is not None and not tilt_fidelity:
        notes.append("tilt fidelity: skipped (tilt_fidelity=False, --no-tilt-fidelity)")
    elif tilt is not None:
        report["tilt_fidelity"] = _noted(notes, "tilt fidelity", lambda: _tilt_fidelity(
            model, tokenizer, texts, reference, tables, ids, r_ref, tilt))
    report["diagnostic_notes"] = notes
    samples = pa.table({
        "side": ["policy"] * len(policy) + ["reference"] * len(reference),
        "prompt_id": [ids[r["batch_prompt"]] for r in policy + reference],
        "sample_idx": [r["sample_idx"] for r in policy + reference],
        "completion": [r["completion"] for r in policy + reference],
        "reward": rewards,
        "u": np.concatenate([u_pol.ravel(), np.full(len(reference), np.nan)]),
    })
    per_prompt = _per_prompt_table(ids, results, standard, kl["per_prompt"], kl_sequence["per_prompt"])
    from ctrl_offline.reports.reporting import write_report

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_parquet(samples, tmp / "samples.parquet", {"stage": "eval"})
        write_parquet(per_prompt, tmp / PER_PROMPT_FILE, {"stage": "eval", "reward": reward,
                                                           "model": model_name_or_path, "adapter": adapter})
        try:
            notes = write_report(report, u_pol.ravel(), tmp) or []
        except Exception as err:  # noqa: BLE001 — a figure must never cost the samples and the numbers
            logger.exception("the report's figures could not be drawn; report.json and the samples are written")
            notes = [f"report.md and the figures could not be written: {type(err).__name__}: {err}"]
        report["figure_notes"] = notes
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
    shutil.rmtree(drawn, ignore_errors=True)
    return EvalResult(Path(out_dir), report)


def _noted(notes: list[str], what: str, compute):
    """``compute()``, or None with a note in ``notes`` saying why: a diagnostic never costs the report."""
    try:
        return compute()
    except ValueError as err:  # the documented refusals: no plan, a simulated one, a KL off its curve, …
        notes.append(f"{what}: {err}")
    except Exception as err:  # noqa: BLE001 — anything else is logged in full, and still only noted
        logger.exception("%s not computed", what)
        notes.append(f"{what} not computed: {type(err).__name__}: {err}")
    return None


def _policy_levels(tables, ids: list, r_pol: np.ndarray) -> tuple[np.ndarray, int, float]:
    """(levels, M, tied share) of the policy samples against the reference rewards (docs/diagnostics.md §4).

    A sample's level is the number of its prompt's M reference rewards strictly below its reward
    (``below`` of :func:`~ctrl_offline.maths.calibration.rank_counts`, the counts its u is made of); the
    tied share is the fraction of samples equal to some reference reward (the levels assume none).
    """
    m = r_pol.shape[1]
    below, equal, k = rank_counts(tables, np.repeat(ids, m), r_pol.ravel())
    if k.min() != k.max():
        raise ValueError(f"the prompts hold {k.min()} to {k.max()} reference rewards (a prompt listed twice pools "
                         "its samples): the split needs the same M for every prompt")
    return below.reshape(r_pol.shape), int(k[0]), float(np.mean(equal > 0))


def _kl_split(tables, ids: list, r_pol: np.ndarray, scored, tilt, notes: list[str], num_boot: int, seed: int) -> dict:
    """The on-/off-target split of the policy samples' KL (:func:`~ctrl_offline.maths.diagnostics.level_kl_split`)."""
    levels, big_m, tied = _policy_levels(tables, ids, r_pol)
    split = level_kl_split(levels, big_m, scored.logp.reshape(r_pol.shape), scored.ref_logp.reshape(r_pol.shape),
                           tilt=tilt, num_boot=num_boot, rng=seed)
    if tied:
        notes.append(f"KL split: {tied:.0%} of the policy samples tie a reference reward; the levels assume a "
                     "tie-free reward, so the on-target figure is approximate (docs/diagnostics.md §4)")
    return {**split, "tied_share": tied}


def _reference_log_ratios(model, tokenizer, texts: list[str], reference: list[dict]) -> np.ndarray:
    """h = log π_θ(y|x) − log π_ref(y|x) of each reference sample, both teacher-forced in the same batches.

    Samples drawn here are scored on their sampled ids; a pool keeps only the text, re-tokenised (with
    EOS where the sample finished, as the sampler's ids end). Scoring both sides afresh, rather than
    taking the pool's ``ref_logp``, keeps the two log-probs of h on the same ids and numerics.
    """
    eos = tokenizer.eos_token_id
    ids = [r["completion_ids"] if "completion_ids" in r else
           tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + ([eos] if r.get("finished") else [])
           for r in reference]
    scored = completion_kl(model, tokenizer, [texts[r["batch_prompt"]] for r in reference], ids,
                           reference=None if hasattr(model, "disable_adapter") else model)
    return scored.sequence


def _tilt_fidelity(model, tokenizer, texts: list[str], reference: list[dict], tables, ids: list, r_ref: np.ndarray,
                   tilt) -> dict:
    """The tilt-fidelity curve on the reference samples (:func:`~ctrl_offline.maths.diagnostics.reference_tilt_fidelity`).

    u: each reference sample's leave-one-out Ĉ among its prompt's M; h: :func:`_reference_log_ratios`.
    """
    big_m = r_ref.shape[1]
    u = calibrate(tables, np.repeat(ids, big_m), r_ref.ravel(), leave_one_out=True)
    h = _reference_log_ratios(model, tokenizer, texts, reference)
    # Tie-free, u takes the M values j/(M − 1): M bins hold one each, more would leave bins empty.
    return reference_tilt_fidelity(u, h, tilt, bins=min(20, big_m))


def _training_kl_record(adapter: str | None) -> dict | None:
    """The KL record of ``adapter``'s ``ctrl_train.json`` when it lists the prompts training was held on, else None."""
    from ctrl_offline.stages.train import TRAIN_INFO_FILE

    path = Path(adapter) / TRAIN_INFO_FILE if adapter else None
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text()).get("kl")
    except ValueError as err:
        logger.warning("cannot read %s (%s): no KL on the prompts training was held on", path, err)
        return None
    if not record or not record.get("prompt_list"):
        return None  # not held, or held by a version that did not record its prompts
    return record


def _kl_on_training_prompts(model, tokenizer, record: dict, num_boot: int) -> dict:
    """The per-token KL of the evaluated policy on the prompts the KL callback held training on.

    Drawn as the callback drew (its samples per prompt, ``max_new_tokens`` and seed), so it is the
    callback's own estimate of these weights; ``held_in_training`` is the KL the callback left.
    """
    from ctrl_offline.training.kl_budget import SampledKL

    prompts = record["prompt_list"]
    settings = {"num_samples": int(record.get("samples_per_prompt", 4)),
                "max_new_tokens": int(record.get("max_new_tokens", 64)), "seed": int(record.get("seed", 0)),
                "batch_size": int(record.get("batch_size", 8))}
    estimate = SampledKL(prompts, tokenizer, **settings,
                         reference_model=None if hasattr(model, "disable_adapter") else model)(model)
    final = record.get("final") or {}
    return {"num_prompts": len(prompts), "source": record.get("prompts_source"),
            "samples_per_prompt": settings["num_samples"], "max_new_tokens": settings["max_new_tokens"],
            "seed": settings["seed"],
            "kl": {**kl_summary(np.array(estimate.per_prompt)[:, None], num_boot=num_boot, rng=settings["seed"]),
                   "estimator": "per_token"},
            "kl_sequence": {**kl_summary(np.array(estimate.per_prompt_sequence)[:, None], num_boot=num_boot,
                                         rng=settings["seed"]), "estimator": "sequence"},
            "held_in_training": final.get("value"), "budget": record.get("budget")}
