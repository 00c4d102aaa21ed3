"""The ``calibrate`` stage: scored samples in, quantile tables and calibrated rows out.

Output layout under ``out_dir`` (docs/theory.md §5):

* ``tables.parquet``      one row per prompt: ``prompt_id``, ``ref_rewards`` (sorted list)
* ``calibrated.parquet``  every input row and column, plus ``u`` (Ĉ ∈ [0, 1])

Calibrating the reference set itself gives every row its leave-one-out ``u``. Given
existing tables, other scored responses (e.g. policy samples) are calibrated against them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrl_offline.maths.calibration import CalibrationTables, calibrate, calibrate_reference
from ctrl_offline.io.files import DataError, atomic_output_dir, fingerprint, read_metadata, read_table, require_columns, write_parquet

__all__ = ["CalibrateResult", "calibrate_scored", "load_tables", "save_tables", "tables_applied", "TABLES_FILE",
           "CALIBRATED_FILE", "APPLY_TABLES"]

logger = logging.getLogger(__name__)

TABLES_FILE = "tables.parquet"
#: ``settings.mode`` of a calibrate output whose rows were ranked against stored tables (``--tables``).
APPLY_TABLES = "apply tables"
CALIBRATED_FILE = "calibrated.parquet"


@dataclass(frozen=True)
class CalibrateResult:
    out_dir: Path
    tables_path: Path | None
    calibrated_path: Path
    num_rows: int
    num_prompts: int
    seconds: float


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    column = table[name]
    if column.null_count:
        rows = np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))
        raise DataError(f"column {name!r} has {len(rows)} missing value(s), e.g. at rows {rows[:5].tolist()}")
    return column.to_numpy()


def _rewards(table: pa.Table, name: str) -> np.ndarray:
    column = table[name]
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise DataError(f"reward column {name!r} must be numeric, got {column.type}")
    # Missing rewards become NaN, which calibration reports by row and prompt.
    return pc.fill_null(pc.cast(column, pa.float64()), float("nan")).to_numpy()


def save_tables(tables: CalibrationTables, path: str | os.PathLike, id_type: pa.DataType | None = None,
                metadata: dict | None = None) -> Path:
    """Write tables as Parquet: ``prompt_id``, ``ref_rewards`` (sorted list of K floats)."""
    list_type = pa.ListArray if tables.offsets[-1] < 2**31 else pa.LargeListArray
    ref_rewards = list_type.from_arrays(tables.offsets, pa.array(tables.rewards, pa.float64()))
    ids = pa.array(tables.prompt_ids, type=id_type)
    return write_parquet(pa.table({"prompt_id": ids, "ref_rewards": ref_rewards}), path, metadata)


def load_tables(path: str | os.PathLike) -> CalibrationTables:
    """Read tables written by :func:`save_tables` (a file, or a calibrate output folder)."""
    path = Path(path)
    if path.is_dir() and (path / TABLES_FILE).exists():
        path = path / TABLES_FILE
    table = read_table(path)
    require_columns(table, ["prompt_id", "ref_rewards"], f"calibration tables {path}")
    lists = table["ref_rewards"].combine_chunks()
    if lists.null_count:
        raise DataError(f"calibration tables {path}: {lists.null_count} prompt(s) have a missing ref_rewards list")
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rewards = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(float)
    return CalibrationTables.from_flat(_column_numpy(table, "prompt_id"), offsets, rewards)


def calibrate_scored(
    scored: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tables: str | os.PathLike | None = None,
    min_k: int = 2,
    reward_column: str = "reward",
    leave_one_out_column: str | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> CalibrateResult:
    """Run the calibrate stage on a Parquet file/folder or a `datasets` folder.

    Without ``tables``, ``scored`` is the reference set: its tables are built (at least
    ``min_k`` samples per prompt, unique ``(prompt_id, sample_idx)``) and every row gets its
    leave-one-out ``u``. With ``tables`` (a tables file or an earlier output folder), rows are
    calibrated against them; rows whose boolean ``leave_one_out_column`` is true are treated as
    reference samples of their prompt. Nothing is written unless the whole stage succeeds.
    Inputs whose files record different reference or reward models are refused unless ``force``.
    """
    start = time.perf_counter()
    scored = Path(scored)
    if not force:
        _check_single_provenance(scored)
    needed = ["prompt_id", reward_column] + ([] if tables is not None else ["sample_idx"])
    if leave_one_out_column:
        needed.append(leave_one_out_column)
    data = read_table(scored)
    require_columns(data, needed, f"scored input {scored}")
    logger.info("read %d rows from %s in %.1fs", data.num_rows, scored, time.perf_counter() - start)
    prompt_ids = _column_numpy(data, "prompt_id")
    rewards = _rewards(data, reward_column)
    settings = {"min_k": min_k, "reward_column": reward_column, "leave_one_out_column": leave_one_out_column}
    inputs = {"scored": {"path": str(scored), "fingerprint": fingerprint(scored), "metadata": _upstream(scored)}}

    if tables is None:
        sample_idx = _column_numpy(data, "sample_idx")
        ref_tables, u = calibrate_reference(prompt_ids, rewards, sample_idx=sample_idx, min_k=min_k)
        settings["mode"] = "reference (leave-one-out)"
    else:
        ref_tables = load_tables(tables)
        inputs["tables"] = {"path": str(tables), "fingerprint": fingerprint(tables)}
        loo = _column_numpy(data, leave_one_out_column).astype(bool) if leave_one_out_column else False
        u = calibrate(ref_tables, prompt_ids, rewards, leave_one_out=loo)
        settings["mode"] = APPLY_TABLES
    logger.info("calibrated %d rows in %.1fs", len(u), time.perf_counter() - start)

    k = ref_tables.k
    metadata = {
        "stage": "calibrate",
        "reference_model": inputs["scored"]["metadata"].get("inputs", {}).get("reference_model"),
        "settings": settings,
        "inputs": inputs,
        "num_rows": int(data.num_rows),
        "num_prompts": int(len(ref_tables)),
        "k_min": int(k.min()) if len(k) else 0,
        "k_max": int(k.max()) if len(k) else 0,
    }
    if "u" in data.column_names:
        data = data.drop_columns(["u"])
    calibrated = data.append_column("u", pa.array(u, pa.float64()))
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        tables_path = None
        if tables is None:
            save_tables(ref_tables, tmp / TABLES_FILE, id_type=data.schema.field("prompt_id").type, metadata=metadata)
            tables_path = Path(out_dir) / TABLES_FILE
        write_parquet(calibrated, tmp / CALIBRATED_FILE, metadata)
    logger.info("wrote %s in %.1fs", out_dir, time.perf_counter() - start)
    return CalibrateResult(
        out_dir=Path(out_dir),
        tables_path=tables_path,
        calibrated_path=Path(out_dir) / CALIBRATED_FILE,
        num_rows=int(data.num_rows),
        num_prompts=int(len(ref_tables)),
        seconds=time.perf_counter() - start,
    )


def tables_applied(metadata: dict) -> str | None:
    """The tables a calibrate output's rows were ranked against (``--tables``), from its metadata; None for
    a reference set (leave-one-out, its own tables)."""
    if (metadata.get("settings") or {}).get("mode") != APPLY_TABLES:
        return None
    return ((metadata.get("inputs") or {}).get("tables") or {}).get("path")


def _check_single_provenance(path: Path) -> None:
    """Refuse to calibrate rows drawn or scored by different models together."""
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    seen: dict[tuple, list[str]] = {}
    for f in files:
        if f.name.startswith((".", "_")):
            continue
        try:
            meta = read_metadata(f)
        except (OSError, pa.ArrowException, ValueError):
            continue
        key = (str(meta.get("inputs", {}).get("reference_model")),
               json.dumps(meta.get("settings", {}).get("rewards"), sort_keys=True))
        seen.setdefault(key, []).append(f.name)
    if len(seen) > 1:
        described = "; ".join(f"reference model {k[0]}, rewards {k[1]} in {', '.join(v[:3])}" for k, v in seen.items())
        raise DataError(f"{path} mixes outputs of different models ({described}); pass --force to calibrate them together")


def _upstream(path: Path) -> dict:
    """Metadata the previous stage recorded (its first file's, for a folder), so the chain stays traceable."""
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    for f in files[:1]:
        try:
            meta = read_metadata(f)
        except (OSError, pa.ArrowException, ValueError):
            return {}
        meta.pop("shard", None)
        return meta
    return {}

