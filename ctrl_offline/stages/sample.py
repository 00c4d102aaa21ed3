"""The ``sample`` stage: prompts in, K reference completions per prompt out (sharded, resumable).

Rows (docs/theory.md §5): ``prompt_id`` (int64: the first 64 bits of the prompt's SHA-256; a run
started by an earlier version resumes with its 16-hex-digit string ids), ``prompt`` (as given), ``prompt_text``
(what the model saw: the chat template applied), ``completion``, ``completion_ids``,
``sample_idx``, ``ref_logp`` (Σ log π_ref of the completion tokens, EOS included when there is
one), ``num_tokens``, ``finished`` (ended with EOS).

With ``adapter`` (a PEFT adapter folder, ``ctrl-data sample --adapter``) the completions are drawn
from the policy, the base with that adapter loaded, for an on-policy round (docs/rounds.md): each row
then also has ``logp`` (Σ log π of the completion under the policy that drew it) and its ``ref_logp``
is still log π_ref, scored teacher-forced by the same base with the adapter disabled, so the
trainer's stored reference log-probs stay valid. The manifest's ``inputs`` record
``reference_model`` (the base), ``policy_adapter`` (the adapter's absolute path), its fingerprint and
``round`` (the adapter's round + 1; :mod:`ctrl_offline.stages.rounds`).

``build`` carries ``completion_ids`` into the training rows, with ``prompt_text`` tokenised as it is
here, and the trainers train those ids: the stored ``ref_logp`` is the one they need however the
decoded text would tokenise. A completion cut at ``max_new_tokens`` (``finished`` False) is a prefix:
its ``completion_ids`` and ``ref_logp`` stop at the cap, with no EOS, and ``build`` keeps it as such
by default. When most completions of a run are cut, the stage says so: a larger
``max_new_tokens`` gives whole answers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from ctrl_offline.models.generation import (SampleRow, SamplingConfig, completion_logps, hex_prompt_id, load_causal_lm, prompt_id,
                          render_prompt, sample_completions)
from ctrl_offline.io.files import DataError, fingerprint
from ctrl_offline.stages._shards import MANIFEST, ShardedOutput, process_device
from ctrl_offline.stages.lineage import check_base_model, read_adapter

__all__ = ["SampleResult", "load_prompts", "sample_prompts"]

logger = logging.getLogger(__name__)

#: The fraction of completions cut at ``max_new_tokens`` above which the stage warns.
MOSTLY_CUT = 0.5


@dataclass(frozen=True)
class SampleResult:
    out_dir: Path
    num_prompts: int
    num_shards: int
    shards_written: int
    complete: bool


def load_prompts(source: str, column: str = "prompt", split: str = "train", limit: int | None = None) -> list:
    """Prompts from a local JSONL/JSON/Parquet/CSV/text file, a `datasets` folder or a Hub dataset id."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        elif path.is_file():
            if path.suffix == ".txt":
                lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
                dataset = datasets.Dataset.from_dict({column: lines})
            else:
                kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
                if kind is None:
                    raise DataError(f"cannot read prompts from {path}: unknown file type {path.suffix!r}")
                dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            dataset = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types; the message is what matters
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(err).lower() or "connect" in str(err).lower()
        hint = " This machine may be offline: pass a local file or folder instead of a Hub id." if offline else ""
        raise DataError(f"cannot load prompts from {source!r}: {err}.{hint}") from err
    if column not in dataset.column_names:
        raise DataError(f"prompts {source!r} lack column {column!r} (they have: {', '.join(dataset.column_names)})")
    prompts = dataset[column][: limit if limit else None]
    if not prompts:
        raise DataError(f"no prompts in {source!r} (column {column!r}{'' if Path(source).is_file() else f', split {split!r}'})")
    empty = [i for i, p in enumerate(prompts) if not p or (isinstance(p, str) and not p.strip())]
    if empty:
        raise DataError(f"{len(empty)} empty prompt(s) in {source!r}, e.g. rows {empty[:5]}")
    return prompts


def sample_prompts(
    prompts_source: str,
    out_dir: str | os.PathLike,
    model_name_or_path: str | None,
    *,
    column: str = "prompt",
    split: str = "train",
    limit: int | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    shard_size: int = 32,
    overwrite: bool = False,
    backend: str = "transformers",
    adapter: str | os.PathLike | None = None,
) -> SampleResult:
    """Draw ``sampling.k`` reference completions per prompt into sharded Parquet under ``out_dir``.

    Re-running with the same settings resumes: finished shards are skipped, and since every
    shard is seeded from ``(seed, shard index)`` the result equals an uninterrupted run.

    With ``adapter`` the completions come from the policy (``model_name_or_path`` + the adapter;
    the model defaults to the adapter's recorded base, and another base is refused): rows gain
    ``logp`` (the policy's) while ``ref_logp`` stays log π_ref (the base, adapter disabled), and the
    manifest records ``policy_adapter`` and ``round`` (module docstring). The vLLM backend draws
    reference samples only.
    """
    sampling = sampling or SamplingConfig()
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    policy = None
    if adapter is not None:
        policy = read_adapter(adapter)
        model_name_or_path = check_base_model(policy, model_name_or_path)
        if backend != "transformers":
            raise ValueError(f"backend {backend!r} samples the reference model only: sample from an adapter with "
                             "--backend transformers")
    elif model_name_or_path is None:
        raise ValueError("give the model to sample from (--model), or --adapter to sample a trained policy")
    prompts = load_prompts(prompts_source, column, split, limit)
    hex_ids = _started_with_hex_ids(Path(out_dir), overwrite)
    if hex_ids:
        logger.warning("%s holds a sample run started by an earlier version: resuming it with its 16-hex-digit "
                       "string prompt ids (--overwrite starts over with integer ids)", out_dir)
    ids, unique = [], []
    seen = set()
    for p in prompts:
        pid = hex_prompt_id(p) if hex_ids else prompt_id(p)
        if pid not in seen:
            seen.add(pid)
            ids.append(pid)
            unique.append(p)
    if len(unique) < len(prompts):
        logger.warning("dropped %d duplicate prompt(s)", len(prompts) - len(unique))
    num_shards = -(-len(unique) // shard_size)
    source_print = fingerprint(prompts_source) if Path(prompts_source).exists() else prompts_source
    output = ShardedOutput(
        out_dir,
        "sample",
        settings={**asdict(sampling), "seed": seed, "shard_size": shard_size, "backend": backend,
                  "column": column, "split": split, "limit": limit, **({} if hex_ids else {"prompt_id": "int64"})},
        inputs={"prompts": {"source": str(prompts_source), "fingerprint": source_print},
                "reference_model": str(model_name_or_path),
                **({} if policy is None else {"policy_adapter": str(policy.path),
                                              "policy_adapter_fingerprint": fingerprint(policy.path),
                                              "round": policy.samples_round})},
        overwrite=overwrite,
    )
    pending = output.my_pending(num_shards)
    written = 0
    drawn = cut = 0
    if pending:
        generate = _backend(backend, model_name_or_path, sampling, None if policy is None else str(policy.path))
        texts = generate.render(unique)
        for index in tqdm(pending, desc="sampling shards", unit="shard"):
            lo, hi = index * shard_size, min((index + 1) * shard_size, len(unique))
            rows = generate(texts[lo:hi], seed=seed * 1_000_003 + index)
            table = pa.table(
                {
                    "prompt_id": pa.array([ids[lo + r["batch_prompt"]] for r in rows],
                                          pa.string() if hex_ids else pa.int64()),
                    "prompt": [unique[lo + r["batch_prompt"]] for r in rows],
                    "prompt_text": [texts[lo + r["batch_prompt"]] for r in rows],
                    "completion": [r["completion"] for r in rows],
                    "completion_ids": pa.array([r["completion_ids"] for r in rows], pa.list_(pa.int32())),
                    "sample_idx": pa.array([r["sample_idx"] for r in rows], pa.int32()),
                    # The reference drew them: their log-prob under the sampling model is log π_ref. A policy drew
                    # them: log π_ref is the base's with the adapter disabled (the backend's "ref_logp").
                    "ref_logp": [r["logp"] if policy is None else r["ref_logp"] for r in rows],
                    "num_tokens": pa.array([r["num_tokens"] for r in rows], pa.int32()),
                    "finished": [r["finished"] for r in rows],
                    **({} if policy is None else {"logp": [r["logp"] for r in rows]}),
                }
            )
            output.write(index, table)
            written += 1
            drawn += len(rows)
            cut += sum(not r["finished"] for r in rows)
    if drawn and cut > MOSTLY_CUT * drawn:
        logger.warning("%d of %d completions hit max_new_tokens=%d before EOS. They are kept as prefixes (no EOS) "
                       "by build and the trainers; raise --max-new-tokens if the answers should be whole.",
                       cut, drawn, sampling.max_new_tokens)
    complete = output.complete(num_shards)
    return SampleResult(Path(out_dir), len(unique), num_shards, written, complete)


def _started_with_hex_ids(out_dir: Path, overwrite: bool) -> bool:
    """Whether ``out_dir`` holds a sample run to resume whose settings predate integer prompt ids."""
    path = out_dir / MANIFEST
    if overwrite or not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # ShardedOutput reports an unreadable manifest
    return manifest.get("stage") == "sample" and "prompt_id" not in manifest.get("settings", {})


class _TransformersBackend:
    """transformers ``generate`` on the reference model, or on the policy (the base + ``adapter``)."""

    def __init__(self, model_name_or_path: str, sampling: SamplingConfig, adapter: str | None = None):
        self.model, self.tokenizer = load_causal_lm(model_name_or_path, adapter, device=process_device())
        self.sampling = sampling
        self.adapter = adapter

    def render(self, prompts: list) -> list[str]:
        texts = [render_prompt(self.tokenizer, p) for p in prompts]
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context:
            budget = context - self.sampling.max_new_tokens
            lengths = [len(self.tokenizer(t)["input_ids"]) for t in texts]
            too_long = [i for i, n in enumerate(lengths) if n > budget]
            if too_long:
                raise DataError(
                    f"{len(too_long)} prompt(s) do not fit the model's context of {context} tokens with "
                    f"max_new_tokens={self.sampling.max_new_tokens}: rows {too_long[:5]} "
                    f"({[lengths[i] for i in too_long[:5]]} tokens)"
                )
        return texts

    def __call__(self, texts: list[str], seed: int) -> list[dict]:
        rows = sample_completions(self.model, self.tokenizer, texts, self.sampling, seed)
        if self.adapter is not None:  # the policy drew them: log π_ref from the same base, adapter disabled
            with self.model.disable_adapter():
                ref = completion_logps(self.model, self.tokenizer, [texts[r["batch_prompt"]] for r in rows],
                                       [r["completion_ids"] for r in rows], self.sampling.logp_batch_size)
            for row, value in zip(rows, ref):
                row["ref_logp"] = float(value)
        return rows


class _VLLMBackend(_TransformersBackend):
    """vLLM for the generation (GPU machines); log-probs come from vLLM's own cumulative log-probs."""

    def __init__(self, model_name_or_path: str, sampling: SamplingConfig):
        try:
            from vllm import LLM
        except ImportError as err:
            raise DataError("backend 'vllm' needs the vllm package (pip install 'ctrl-offline[vllm]')") from err
        from transformers import AutoConfig, AutoTokenizer

        from ctrl_offline.models.embedded import resolve_model

        model_name_or_path = resolve_model(model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = type("Config", (), {"config": AutoConfig.from_pretrained(model_name_or_path)})()
        self.llm = LLM(model=model_name_or_path)
        self.sampling = sampling

    def __call__(self, texts: list[str], seed: int) -> list[dict]:
        from vllm import SamplingParams

        s = self.sampling
        params = SamplingParams(n=s.k, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                                max_tokens=s.max_new_tokens, seed=seed, logprobs=0)
        rows = []
        for i, request in enumerate(self.llm.generate(texts, params, use_tqdm=False)):
            for j, out in enumerate(request.outputs):
                rows.append(SampleRow({"batch_prompt": i, "sample_idx": j, "completion": out.text,
                                       "completion_ids": list(out.token_ids), "logp": float(out.cumulative_logprob),
                                       "num_tokens": len(out.token_ids), "finished": out.finish_reason == "stop"}))
        return rows


def _backend(name: str, model_name_or_path: str, sampling: SamplingConfig, adapter: str | None = None):
    if name == "transformers":
        return _TransformersBackend(model_name_or_path, sampling, adapter)
    if name == "vllm":
        return _VLLMBackend(model_name_or_path, sampling)
    raise ValueError(f"unknown sampling backend {name!r}; choose 'transformers' or 'vllm'")
