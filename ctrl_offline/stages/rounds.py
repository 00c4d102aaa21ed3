"""On-policy rounds: sample from the current policy, calibrate against the stored reference tables, train further.

A round (docs/rounds.md; why: docs/finite_k.md §8) is sample → score → calibrate against the
reference tables → build pointwise targets Φ(u) − β log Z → train the adapter further. The target
holds for any response wherever it was sampled, so every round reuses the reference set's tables and
no new reference samples are drawn.

Numbering, one rule for every folder:

* **round 0** is the reference set: the samples the tables were built from (``ctrl-data calibrate``
  without ``--tables``), and a build of them;
* the samples of **round r ≥ 1** are drawn from the policy of round r − 1 — the base itself for
  round 1, the adapter trained in round r − 1 after that — and calibrated against the round-0 tables;
* an adapter is of the round of the build it was trained on (an adapter trained offline on the
  reference set's build is round 0; one whose ``ctrl_train.json`` records no round, written by an
  earlier version or outside ``ctrl-data``, counts as round 0 too), so its samples are round r + 1.

What each stage records (the keys this module reads and :func:`run_round` writes):

* ``ctrl-data sample --adapter``: ``policy_adapter`` (absolute path), ``policy_adapter_fingerprint``
  and ``round`` in its manifest's ``inputs``, and a ``logp`` column beside ``ref_logp``;
* ``ctrl-data build``: ``round`` and ``parent_adapter`` in ``ctrl_build.json`` (:func:`.lineage.build_round`);
* ``ctrl-data train``: ``round`` and ``init_adapter`` in ``ctrl_train.json``;
* ``ctrl-data round``: ``ctrl_round.json`` in the round folder (:data:`ROUND_FILE`).

:func:`run_round` only chains the stage functions; each stage is skipped when its output is
already complete, so a killed round resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from ctrl_offline.io.files import BUILD_INFO_FILE, DataError, fingerprint, read_metadata, write_json
from ctrl_offline.stages.lineage import _json, check_base_model, read_adapter, same_model, sample_manifest

if TYPE_CHECKING:
    from ctrl_offline.stages.train import TrainResult

__all__ = ["RoundResult", "ROUND_FILE", "ROUND_FOLDERS", "run_round"]

logger = logging.getLogger(__name__)

#: The record ``ctrl-data round`` keeps in its round folder: the round, its parent adapter and its settings.
ROUND_FILE = "ctrl_round.json"
#: The folders of one round, in the order the stages write them.
ROUND_FOLDERS = ("samples", "scored", "calibrated", "build", "adapter")


@dataclass(frozen=True)
class RoundResult:
    """One round's folders (``out_dir``/samples, scored, calibrated, build, adapter), the stages skipped because
    their output was already complete, and the training result (None when training was skipped)."""

    round: int
    out_dir: Path
    parent_adapter: Path | None
    skipped: tuple[str, ...]
    train: TrainResult | None

    @property
    def adapter(self) -> Path:
        return self.out_dir / "adapter"


def run_round(
    prompts: str,
    reference: str | os.PathLike,
    rewards: list[str],
    out_dir: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    model: str | None = None,
    column: str = "prompt",
    split: str = "train",
    limit: int | None = None,
    sampling=None,
    seed: int = 0,
    shard_size: int = 32,
    score_batch_size: int = 16,
    build: dict | None = None,
    train: dict | None = None,
    overwrite: bool = False,
) -> RoundResult:
    """One on-policy round into ``out_dir``: sample → score → calibrate against ``reference``'s tables → build
    (pointwise) → train, each stage skipped when its output is already complete.

    ``reference`` is the reference set's calibrate output (``tables.parquet`` beside its
    ``calibrated.parquet``). ``adapter`` is the previous round's adapter: the round samples from it
    and trains it further (``init_adapter``); without one it samples the base and trains a fresh
    adapter (round 1). ``model`` is the base, by default the adapter's, else the model the reference
    set was drawn from; another base than the reference set's is refused. ``sampling`` is a
    :class:`~ctrl_offline.models.generation.SamplingConfig` (``k``: samples per prompt); round r samples with
    seed ``seed + r``, and a round from the base whose seed is the reference samples' own is refused
    (it would draw the reference samples again). ``build`` holds
    :func:`~ctrl_offline.stages.build.build_dataset` arguments (the transform, or ``inference``/``n``/``kl``
    to plan it; the format is pointwise), ``train``
    :func:`~ctrl_offline.stages.train.train_from_build` arguments (``training_args``, ``loading``,
    ``kl_prompts``, …). The round and its settings are recorded in ``out_dir``/:data:`ROUND_FILE`; a
    folder holding a round with other settings is refused unless ``overwrite``, which starts it over.
    """
    from ctrl_offline.models.generation import SamplingConfig
    from ctrl_offline.stages._shards import is_complete
    from ctrl_offline.stages.build import build_dataset
    from ctrl_offline.stages.calibrate import CALIBRATED_FILE, TABLES_FILE, calibrate_scored
    from ctrl_offline.stages.sample import sample_prompts
    from ctrl_offline.stages.score import score_samples
    from ctrl_offline.stages.train import TRAIN_INFO_FILE, train_from_build

    build, train = dict(build or {}), dict(train or {})
    for name, given, owned in (("build", build, ("format", "targets")),
                               ("train", train, ("init_adapter", "model", "out", "data"))):
        clash = sorted(set(given) & set(owned))
        if clash:
            raise ValueError(f"run_round sets {', '.join(clash)} of the {name} stage itself (a round builds pointwise "
                             "loo targets and trains from the previous adapter)")
    sampling = sampling or SamplingConfig()
    out = Path(out_dir).resolve()
    reference = Path(reference).resolve()
    tables = reference / TABLES_FILE
    if not tables.is_file() or not (reference / CALIBRATED_FILE).is_file():
        raise DataError(f"--reference {reference} is not a reference calibrate output (no {TABLES_FILE} and "
                        f"{CALIBRATED_FILE}): pass the folder `ctrl-data calibrate SCORED --out` wrote for the "
                        "reference samples")
    reference_model = read_metadata(tables).get("reference_model")
    parent = read_adapter(adapter) if adapter is not None else None
    if parent is not None:
        base = check_base_model(parent, model)
    elif model is not None:
        base = str(model)
    elif reference_model:
        base = str(reference_model)
    else:
        raise DataError(f"{reference} does not record the model its samples were drawn from: pass --model")
    if reference_model and not same_model(base, reference_model):
        raise DataError(f"the reference tables in {reference} were drawn from {reference_model}, not {base}: a round "
                        "samples a policy on the reference set's own base (pass that --model, or the reference "
                        "tables of this base)")
    number = parent.samples_round if parent is not None else 1
    round_seed = seed + number
    reference_samples = sample_manifest(read_metadata(Path(reference) / "calibrated.parquet"))
    if parent is None and reference_samples is not None and (reference_samples.get("settings") or {}).get("seed") == round_seed:
        raise DataError(f"round {number} samples the base with seed {round_seed}, the seed the reference samples in "
                        f"{reference} were drawn with: it would draw them again instead of fresh samples. Pass "
                        "another --seed")

    record = {"round": number, "parent_adapter": None if parent is None else str(parent.path),
              "parent_adapter_fingerprint": None if parent is None else fingerprint(parent.path),
              "model": base, "reference": str(reference), "prompts": str(prompts), "rewards": list(rewards),
              "column": column, "split": split, "limit": limit, "sampling": asdict(sampling), "seed": round_seed,
              "shard_size": shard_size, "build": build, "train": _recorded_train_args(train)}
    _start_round_folder(out, record, overwrite)

    skipped = []
    samples, scored, calibrated, build_dir, adapter_dir = (out / name for name in ROUND_FOLDERS)
    if is_complete(samples):
        skipped.append("samples")
    else:
        result = sample_prompts(prompts, samples, base, adapter=None if parent is None else str(parent.path),
                                column=column, split=split, limit=limit, sampling=sampling, seed=round_seed,
                                shard_size=shard_size)
        if not result.complete:
            raise DataError(f"{samples} is not complete (other processes' shards are missing): run `ctrl-data round` "
                            "in one process, or the stages one by one under accelerate launch")
    if is_complete(scored):
        skipped.append("scored")
    else:
        score_samples(samples, scored, list(rewards), batch_size=score_batch_size)
    if (calibrated / CALIBRATED_FILE).is_file():
        skipped.append("calibrated")
    else:
        calibrate_scored(scored, calibrated, tables=tables)
    if (build_dir / BUILD_INFO_FILE).is_file():
        skipped.append("build")
    else:
        build_dataset(calibrated, build_dir, format="pointwise", **build)
    trained = None
    if (adapter_dir / TRAIN_INFO_FILE).is_file():
        skipped.append("adapter")
    else:
        trained = train_from_build(build_dir, adapter_dir, base,
                                   init_adapter=None if parent is None else str(parent.path), **train)
    return RoundResult(number, out, None if parent is None else parent.path, tuple(skipped), trained)


def _recorded_train_args(train: dict) -> dict:
    """The training arguments a round records: what decides the adapter (run-only TRL arguments left out)."""
    from ctrl_offline.stages.train import RUN_ONLY_TRAINING_ARGS

    recorded = {k: v for k, v in train.items() if k != "callbacks"}
    if "training_args" in recorded:
        recorded["training_args"] = {k: v for k, v in (recorded["training_args"] or {}).items()
                                     if k not in RUN_ONLY_TRAINING_ARGS}
    return recorded


def _start_round_folder(out: Path, record: dict, overwrite: bool) -> None:
    """Create ``out`` with its round record, or resume the round it holds when the settings are the same."""
    path = out / ROUND_FILE
    comparable = json.loads(json.dumps(record, default=str))
    if out.exists() and overwrite:
        if path.is_file() or not any(out.iterdir()):
            shutil.rmtree(out)
        else:
            raise DataError(f"{out} is not a round folder (no {ROUND_FILE}): --overwrite replaces round folders only; "
                            "choose another --out")
    elif path.is_file():
        previous = _json(path)
        changed = sorted(k for k in set(previous) | set(comparable) if previous.get(k) != comparable.get(k))
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} → {comparable.get(k)!r}" for k in changed[:3])
            raise DataError(f"{out} holds round {previous.get('round')} run with other settings ({detail}); pass "
                            "--overwrite to start it over, or choose another --out")
        return
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {out} is not empty and holds no round ({ROUND_FILE}): choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, comparable)
