"""What each folder of an on-policy round records about its lineage (docs/rounds.md).

The numbering (round 0 is the reference set; samples of round r ≥ 1 come from the policy of round
r − 1; an adapter is of the round of the build it was trained on) and the records that carry it:
an adapter folder's ``ctrl_train.json`` / ``ctrl_build.json`` (:func:`read_adapter`), the sample
manifest's ``policy_adapter`` and ``round``, a build's ``round`` and ``parent_adapter``
(:func:`build_round`). The sample, build and train stages read these; :mod:`.rounds` chains the
stages into one round.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ctrl_offline.io.files import BUILD_INFO_FILE, DataError, read_metadata
from ctrl_offline.stages.calibrate import tables_applied

__all__ = ["AdapterRecord", "read_adapter", "same_model", "check_base_model", "build_round", "sample_manifest"]

logger = logging.getLogger(__name__)

_TRAIN_INFO_FILE = "ctrl_train.json"  # stages.train.TRAIN_INFO_FILE (not imported: train imports this module)
_MANIFEST = "_manifest.json"  # stages._shards.MANIFEST


@dataclass(frozen=True)
class AdapterRecord:
    """What an adapter folder says about itself.

    ``path`` is absolute; ``base_model`` the model it was trained on (``ctrl_train.json``'s
    ``base_model``, else its build's ``reference_model``, else PEFT's ``base_model_name_or_path``;
    None when none is recorded); ``round`` the round it was trained in (0 when not recorded);
    ``recorded_round`` whether its ``ctrl_train.json`` says so.
    """

    path: Path
    base_model: str | None
    round: int
    recorded_round: bool

    @property
    def samples_round(self) -> int:
        """The round the samples drawn from this adapter feed."""
        return self.round + 1


def read_adapter(path: str | os.PathLike, what: str = "adapter") -> AdapterRecord:
    """The :class:`AdapterRecord` of a PEFT adapter folder; DataError naming the fix when it is not one."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist: pass the folder `ctrl-data train --out` (or "
                        "`ctrl-data round`, ROUND_DIR/adapter) wrote")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise DataError(f"{what} {folder} is not a PEFT adapter folder (no adapter_config.json): pass the folder "
                        "`ctrl-data train --out` wrote")
    train_info = _json(folder / _TRAIN_INFO_FILE)
    build_info = _json(folder / BUILD_INFO_FILE)
    base = (train_info.get("base_model") or build_info.get("reference_model")
            or _json(config_file).get("base_model_name_or_path"))
    recorded = train_info.get("round")
    return AdapterRecord(folder.resolve(), None if base is None else str(base), int(recorded or 0),
                         recorded is not None)


def same_model(a, b) -> bool:
    """Whether two model names mean the same model: equal local folders (resolved) or equal names."""
    return _identity(a) == _identity(b)


def check_base_model(adapter: AdapterRecord, model: str | None, what: str = "adapter") -> str:
    """The base model to load ``adapter`` on: ``model`` when given (refused when the adapter records another), else
    the adapter's own."""
    if model is None:
        if adapter.base_model is None:
            raise DataError(f"{what} {adapter.path} does not record its base model: pass --model")
        return adapter.base_model
    if adapter.base_model is not None and not same_model(model, adapter.base_model):
        raise DataError(f"{what} {adapter.path} was trained on base model {adapter.base_model}, not {model}: its LoRA "
                        f"weights belong to that base. Pass --model {adapter.base_model} (or leave --model out), or "
                        "an adapter trained on this base")
    return str(model)


def build_round(calibrated: str | os.PathLike) -> dict:
    """``{"round", "parent_adapter"}`` of the samples behind a calibrate output, for its build's ``ctrl_build.json``.

    Follows the metadata chain calibrated → scored (``inputs.scored.metadata``) → the sample folder's
    manifest (``inputs.samples.path``). Rows calibrated leave-one-out are the reference set: round 0.
    Rows calibrated against stored tables are round 1 when their samples came from the base and the
    sample stage's ``round`` when they came from an adapter (``parent_adapter``: that adapter).
    When the chain cannot be followed (a sample folder moved, rows written by hand) the round of rows
    calibrated against tables is unknown: None, with a warning.
    """
    path = Path(calibrated)
    metadata = read_metadata(path)
    against_tables = tables_applied(metadata) is not None
    sampled = _samples_inputs(metadata)
    parent = None if sampled is None else sampled.get("policy_adapter")
    if not against_tables:
        return {"round": 0, "parent_adapter": parent}
    if sampled is None:
        logger.warning("cannot follow %s back to its sample folder: its build records round null (run the stages on "
                       "folders that stay where they were written to keep the round)", path)
        return {"round": None, "parent_adapter": None}
    return {"round": sampled.get("round") if parent else 1, "parent_adapter": parent}


def sample_manifest(calibrated_metadata: dict) -> dict | None:
    """The manifest of the sample folder a calibrate output traces back to (calibrated → scored → samples), or None."""
    scored = (calibrated_metadata.get("inputs") or {}).get("scored") or {}
    samples = ((scored.get("metadata") or {}).get("inputs") or {}).get("samples") or {}
    manifest = Path(samples["path"]) / _MANIFEST if samples.get("path") else None
    if manifest is None or not manifest.is_file():
        return None
    record = _json(manifest)
    return record if record.get("stage") == "sample" else None


def _samples_inputs(calibrated_metadata: dict) -> dict | None:
    """The ``inputs`` of the sample manifest a calibrate output traces back to, or None."""
    record = sample_manifest(calibrated_metadata)
    return None if record is None else record.get("inputs") or {}


def _identity(name) -> str:
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    return value if isinstance(value, dict) else {}
