"""The ``score`` stage: reference samples in, the same rows with rewards out (shard by shard).

Each reward spec adds a column ``reward_<name>``; the first one is also written as ``reward``
(the column calibration reads by default). Sample shard i becomes scored shard i, so a killed
run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from ctrl_offline.io.files import DataError, fingerprint, read_table, require_columns
from ctrl_offline.models.rewards import load_reward, reward_name
from ctrl_offline.stages._shards import MANIFEST, ShardedOutput, process_device

__all__ = ["ScoreResult", "score_samples"]


@dataclass(frozen=True)
class ScoreResult:
    out_dir: Path
    num_shards: int
    shards_written: int
    reward_columns: list[str]
    complete: bool


def score_samples(
    samples_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rewards: list[str],
    *,
    batch_size: int = 16,
    overwrite: bool = False,
) -> ScoreResult:
    """Score every shard of a ``sample`` output with each reward in ``rewards``."""
    if not rewards:
        raise ValueError("give at least one reward (a reward model path/id or module:function)")
    samples_dir = Path(samples_dir)
    shards = sorted(samples_dir.glob("shard-*.parquet"))
    if not shards:
        raise DataError(f"{samples_dir} holds no sample shards (shard-*.parquet)")
    named = [reward_name(spec) for spec in rewards]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names} (use name=spec)")
    upstream = samples_dir / MANIFEST
    reference_model = json.loads(upstream.read_text())["inputs"].get("reference_model") if upstream.exists() else None
    fresh = not Path(out_dir).exists()
    output = ShardedOutput(
        out_dir,
        "score",
        settings={"rewards": dict(named), "batch_size": batch_size},
        inputs={"samples": {"path": str(samples_dir), "fingerprint": fingerprint(samples_dir)},
                "reference_model": reference_model},
        overwrite=overwrite,
    )
    indices = [int(p.stem.split("-")[1]) for p in shards]
    pending = [i for i in output.my_pending(max(indices) + 1) if i in set(indices)]
    written = 0
    if pending:
        try:
            scorers = [(name, load_reward(spec, batch_size, process_device())) for name, spec in named]
        except BaseException:
            if fresh:  # a reward that cannot load leaves nothing behind
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        for index in tqdm(pending, desc="scoring shards", unit="shard"):
            table = read_table(samples_dir / f"shard-{index:05d}.parquet")
            require_columns(table, ["prompt_id", "prompt", "completion", "sample_idx"], f"sample shard {index}")
            prompts, completions = table["prompt"].to_pylist(), table["completion"].to_pylist()
            for name, scorer in scorers:
                table = table.append_column(f"reward_{name}", pa.array(scorer(prompts, completions), pa.float64()))
            table = table.append_column("reward", table[f"reward_{names[0]}"])
            output.write(index, table)
            written += 1
    complete = all(output.is_done(i) for i in indices) and output.complete(max(indices) + 1)
    return ScoreResult(Path(out_dir), len(indices), written, ["reward", *(f"reward_{n}" for n in names)], complete)
