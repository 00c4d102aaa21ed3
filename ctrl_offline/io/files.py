"""Reading and writing the pipeline's tables: Parquet files, Parquet folders, `datasets` folders.

Writes are atomic (a temporary sibling, then ``os.replace``) so a killed or failed stage
never leaves a file that a later stage would trust. Each stage records its settings and its
inputs' fingerprints in the Parquet schema metadata under the key ``ctrl_offline``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ctrl_offline._version import __version__

__all__ = [
    "DataError",
    "METADATA_KEY",
    "read_table",
    "require_columns",
    "write_parquet",
    "write_json",
    "write_text",
    "read_metadata",
    "atomic_output_dir",
    "fingerprint",
    "BUILD_INFO_FILE",
    "read_build_info",
]

METADATA_KEY = b"ctrl_offline"
#: The metadata `ctrl-data build` writes beside a training set (transform, t, ``beta``, ``phi_scale``,
#: ``unscaled_beta``, ...); the same name as ``ctrl_offline.stages.build.BUILD_METADATA``.
BUILD_INFO_FILE = "ctrl_build.json"


class DataError(ValueError):
    """An input that cannot be read or lacks what a stage needs."""


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "state.json").exists() or (
        path / "dataset_dict.json"
    ).exists()


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Load a Parquet file, a folder of Parquet files, or a `datasets.save_to_disk` folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"cannot read {path}: no such file or folder")
    try:
        if path.is_dir() and (path / "dataset_dict.json").exists():
            raise DataError(f"{path} holds a DatasetDict; pass one of its splits' folders")
        if path.is_dir() and _is_datasets_folder(path):
            import datasets  # slow import: only when needed

            table = datasets.load_from_disk(str(path)).data.table
            return table.select(columns) if columns else table
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
            if not files:
                raise DataError(f"cannot read {path}: the folder holds no Parquet files")
            return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)
        return pq.read_table(path, columns=columns)
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError, KeyError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def require_columns(table: pa.Table, columns, what: str) -> None:
    """Raise naming the missing columns (and the ones present) if ``table`` lacks any."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{what} lacks column(s) {', '.join(missing)} (it has: {', '.join(table.column_names)})")


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``ctrl_offline`` metadata recorded in a Parquet file ({} if none)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}


def write_parquet(table: pa.Table, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``table`` to ``path`` atomically, with ``metadata`` (plus the library version)."""
    path = Path(path)
    record = {"library_version": __version__, **(metadata or {})}
    existing = dict(table.schema.metadata or {})
    existing[METADATA_KEY] = json.dumps(record, default=str).encode()
    table = table.replace_schema_metadata(existing)
    with _replacing(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(payload, indent=2, default=str))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary sibling, then renamed over it)."""
    path = Path(path)
    with _replacing(path) as tmp:
        Path(tmp).write_text(text)
    return path


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary sibling of ``path`` that replaces it once the block succeeds (and is removed if it fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out_dir`` only if the block succeeds.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; it is replaced only
    once the new output is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"output folder {out_dir} is not empty (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a file or folder: names, sizes and modification times of its files."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _build_folders(source) -> list[Path]:
    """Folders that may hold a build's metadata: the folder itself, or those of a dataset's Arrow files."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return [path.parent if path.is_file() else path]  # the folder, or a file in it
    files = getattr(source, "cache_files", None) or []
    # A dataset loaded with `load_from_disk` (and any select/map/filter/shuffle of it) is backed by
    # Arrow files inside the saved folder; an in-memory dataset has none.
    return list(dict.fromkeys(Path(f["filename"]).parent for f in files if "filename" in f))


def read_build_info(source) -> dict | None:
    """The metadata ``ctrl-data build`` recorded beside a training set, or None when there is none.

    ``source`` is a build output folder, or a ``datasets.Dataset`` loaded from one with
    ``load_from_disk`` (found through the Arrow files backing it, so a ``select``/``map``/``filter``
    of it still finds it). An in-memory dataset (``Dataset.from_dict``) has no metadata. Its keys
    include ``beta`` (the trainer's β, for Φ rescaled to span 1 on [0, 1]), ``phi_scale`` (the span
    of the raw Φ on [0, 1]) and ``unscaled_beta`` (= beta × phi_scale, the β for the raw Φ that the
    planner reports). Raises DataError for an unreadable file, or a dataset drawn from several
    build folders that disagree on β; the returned dict also names its ``path``.
    """
    found = []
    for folder in _build_folders(source):
        path = folder / BUILD_INFO_FILE
        if not path.is_file():
            continue
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read the build metadata {path}: {err}") from err
        if not isinstance(info, dict):
            raise DataError(f"the build metadata {path} is not a JSON object")
        found.append({**info, "path": str(path)})
    if not found:
        return None
    keys = ("beta", "phi_scale", "unscaled_beta")
    differing = [i for i in found[1:] if any(i.get(k) != found[0].get(k) for k in keys)]
    if differing:
        shown = "; ".join(f"{i['path']}: beta={i.get('beta')}" for i in [found[0], *differing])
        raise DataError(f"the dataset's files come from build folders with different β ({shown})")
    return found[0]
