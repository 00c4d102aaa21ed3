"""Sharded, resumable stage outputs.

A stage writes ``shard-00000.parquet``, ``shard-00001.parquet``, … into its output folder,
each atomically, next to a ``_manifest.json`` holding the stage's settings and input
fingerprints. A re-run with the same settings skips finished shards, so a killed run loses
at most the shard in flight; a re-run with different settings is refused (unless
``overwrite``) rather than mixing two runs in one folder. Under ``accelerate launch`` each
process takes the shards with ``index % world_size == rank``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa

from ctrl_offline._version import __version__
from ctrl_offline.io.files import DataError, write_json, write_parquet

MANIFEST = "_manifest.json"


def process_rank() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch``/torchrun; (0, 1) otherwise."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world


def process_device() -> str:
    """This process's device: its own GPU under a multi-GPU launch, else cuda:0 or the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


class ShardedOutput:
    """The output folder of one resumable stage."""

    def __init__(self, out_dir: str | os.PathLike, stage: str, settings: dict, inputs: dict, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.manifest = {"stage": stage, "settings": settings, "inputs": inputs, "library_version": __version__}
        path = self.out_dir / MANIFEST
        rank, _ = process_rank()
        if path.exists() and not overwrite:
            previous = json.loads(path.read_text())
            keys = ("stage", "settings", "inputs")
            comparable = json.loads(json.dumps({k: self.manifest[k] for k in keys}, default=str))
            changed = [k for k in keys if previous.get(k) != comparable[k]]
            if changed:
                detail = "; ".join(_describe_change(previous.get(k), comparable[k], k) for k in changed)
                raise DataError(
                    f"{self.out_dir} holds a {previous.get('stage')} run with different settings ({detail}); "
                    "pass --overwrite to replace it or choose another output folder"
                )
        elif path.exists() and overwrite and rank == 0:
            shutil.rmtree(self.out_dir)
        elif self.out_dir.exists() and any(self.out_dir.iterdir()) and not path.exists() and not overwrite:
            raise DataError(f"output folder {self.out_dir} is not empty and holds no resumable run (pass --overwrite)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # every process may write it: the content is the same, the write atomic
            write_json(path, {**self.manifest, "complete": False})

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"shard-{index:05d}.parquet"

    def is_done(self, index: int) -> bool:
        return self.shard_path(index).exists()

    def my_pending(self, num_shards: int) -> list[int]:
        """Shards this process still has to write."""
        rank, world = process_rank()
        return [i for i in range(num_shards) if i % world == rank and not self.is_done(i)]

    def write(self, index: int, table: pa.Table, extra: dict | None = None) -> Path:
        return write_parquet(table, self.shard_path(index), {**self.manifest, "shard": index, **(extra or {})})

    def complete(self, num_shards: int) -> bool:
        """Mark the run complete once every shard exists (any process may call it)."""
        if all(self.is_done(i) for i in range(num_shards)):
            write_json(self.out_dir / MANIFEST, {**self.manifest, "complete": True, "num_shards": num_shards})
            return True
        return False


def _describe_change(old, new, key: str) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        diff = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return f"{key} " + ", ".join(diff[:4])
    return f"{key}: {old!r} → {new!r}"


def is_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished sharded run (every shard written)."""
    path = Path(out_dir) / MANIFEST
    return path.exists() and bool(json.loads(path.read_text()).get("complete"))
