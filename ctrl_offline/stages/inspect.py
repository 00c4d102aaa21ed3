"""``inspect``: a short summary of any stage's output (rows, prompts, K, rewards, u, metadata)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrl_offline.io.files import read_metadata, read_table
from ctrl_offline.stages._shards import MANIFEST
from ctrl_offline.stages.build import BUILD_METADATA
from ctrl_offline.stages.calibrate import CALIBRATED_FILE

__all__ = ["inspect_output", "format_summary", "plot_summary"]


def _stage_metadata(path: Path) -> dict:
    if path.is_dir():
        for name in (MANIFEST, BUILD_METADATA):
            if (path / name).exists():
                return json.loads((path / name).read_text())
        if (path / CALIBRATED_FILE).exists():
            return read_metadata(path / CALIBRATED_FILE)
        return {}
    return read_metadata(path) if path.suffix == ".parquet" else {}


def inspect_output(path: str | os.PathLike, bins: int = 10) -> dict:
    """Summary statistics of a stage output folder or Parquet file."""
    path = Path(path)
    target = path / CALIBRATED_FILE if path.is_dir() and (path / CALIBRATED_FILE).exists() else path
    table = read_table(target)
    summary: dict = {"path": str(path), "rows": table.num_rows, "columns": table.column_names,
                     "metadata": _stage_metadata(path)}
    if "prompt_id" in table.column_names:
        _, counts = np.unique(table["prompt_id"].to_numpy(zero_copy_only=False), return_counts=True)
        if "completions" in table.column_names:  # grouped rows: one per prompt, K completions in it
            counts = pc.list_value_length(table["completions"]).to_numpy(zero_copy_only=False)
        summary["prompts"] = int(len(counts))
        summary["k"] = {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}
    for column in ("reward", "ref_logp", "num_tokens", "target", "target_phi_gap", "weight"):
        if column in table.column_names:
            values = _flat(table[column]).to_numpy(zero_copy_only=False).astype(float)
            summary[column] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values)),
                               "min": float(np.nanmin(values)), "max": float(np.nanmax(values)),
                               "distinct": int(len(np.unique(values)))}
    if "u" in table.column_names:
        u = _flat(table["u"]).to_numpy(zero_copy_only=False)
        hist, _ = np.histogram(u, bins=bins, range=(0.0, 1.0))
        summary["u_histogram"] = hist.tolist()
    if "finished" in table.column_names:
        finished = _flat(table["finished"]).to_numpy(zero_copy_only=False)
        summary["unfinished"] = int((~np.asarray(finished, bool)).sum())
    return summary


def _flat(column):
    """A column's values, one list per row (grouped rows: one entry per completion) flattened."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    return pc.list_flatten(column) if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) else column


def format_summary(summary: dict) -> str:
    lines = [f"{summary['path']}: {summary['rows']:,} rows"]
    if "prompts" in summary:
        k = summary["k"]
        lines.append(f"  prompts: {summary['prompts']:,}   K per prompt: min {k['min']}, median {k['median']:g}, max {k['max']}")
    for column in ("reward", "ref_logp", "num_tokens", "target", "target_phi_gap", "weight"):
        if column in summary:
            s = summary[column]
            lines.append(f"  {column}: mean {s['mean']:.4g} ± {s['std']:.3g}  [{s['min']:.4g}, {s['max']:.4g}]  "
                         f"{s['distinct']:,} distinct")
    if "u_histogram" in summary:
        hist = summary["u_histogram"]
        top = max(hist) or 1
        lines.append("  calibrated u (uniform under π_ref):")
        for i, count in enumerate(hist):
            lo = i / len(hist)
            lines.append(f"    [{lo:.1f}, {lo + 1 / len(hist):.1f})  {count:>9,}  {'#' * round(30 * count / top)}")
    if "unfinished" in summary:
        lines.append(f"  completions cut before EOS: {summary['unfinished']:,}")
    meta = summary.get("metadata") or {}
    if meta:
        shown = {k: meta[k] for k in ("stage", "settings", "format", "transform", "t", "beta", "inputs") if k in meta}
        lines.append("  metadata: " + json.dumps(shown, default=str)[:1500])
    lines.append("  columns: " + ", ".join(summary["columns"]))
    return "\n".join(lines)


def plot_summary(path: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Histograms of the reward and of u (against the Uniform it should follow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    target = path / CALIBRATED_FILE if path.is_dir() and (path / CALIBRATED_FILE).exists() else path
    table = read_table(target)
    panels = [c for c in ("reward", "u") if c in table.column_names]
    if not panels:
        raise ValueError(f"{path} has neither a reward nor a u column to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, column in zip(axes[0], panels):
        values = table[column].to_numpy()
        ax.hist(values, bins=20, density=column == "u", color="tab:blue", alpha=0.8)
        if column == "u":
            ax.axhline(1.0, color="grey", linestyle=":", label="Uniform[0, 1]")
            ax.legend()
        ax.set_title(column)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.stem}.tmp{out_png.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
