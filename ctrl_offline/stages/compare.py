"""The ``compare`` stage: two evaluations of the same prompts, paired prompt by prompt.

``ctrl-data eval`` writes each prompt's win rates (and KL) to ``per_prompt.parquet``. For two such
reports A and B on the same prompts — typically two adapters evaluated against one shared
reference pool — :func:`compare_reports` gives, per selector and N, value_A, value_B and the
difference A − B with a paired percentile bootstrap interval over prompts
(:func:`ctrl_offline.evaluation.paired_bootstrap_difference`), plus the standard win rate and
KL(π‖π_ref) of each. Pairing removes the prompt-to-prompt variation both share, so the
difference's interval is narrower than the two reports' own intervals suggest.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..evaluation import paired_bootstrap_difference
from ..io import DataError, read_table, require_columns
from .evaluate import PER_PROMPT_FILE

__all__ = ["compare_reports", "format_comparison"]

logger = logging.getLogger(__name__)


def _load(folder: str | os.PathLike):
    folder = Path(folder)
    report_path, table_path = folder / "report.json", folder / PER_PROMPT_FILE
    if not report_path.is_file():
        raise DataError(f"{folder} is not an evaluation report folder (no report.json)")
    if not table_path.is_file():
        raise DataError(f"{folder} has no {PER_PROMPT_FILE} (written by ctrl-data eval since the powered evaluation): "
                        "re-run ctrl-data eval to compare it")
    try:
        report = json.loads(report_path.read_text())
    except ValueError as err:
        raise DataError(f"cannot read {report_path}: {err}") from err
    frame = read_table(table_path).to_pandas()
    require_columns(read_table(table_path), ["prompt_id", "metric", "selector", "n", "value"], str(table_path))
    # The k-th occurrence of a prompt id pairs with the k-th occurrence in the other report.
    frame["occurrence"] = frame.groupby(["metric", "selector", "n", "prompt_id"], dropna=False).cumcount()
    return report, frame


def _values(frame, metric, selector, n):
    rows = frame[(frame.metric == metric) & (frame.selector.isna() if selector is None else frame.selector == selector)
                 & (frame.n.isna() if n is None else frame.n == n)]
    return rows.set_index(["prompt_id", "occurrence"])["value"]


def compare_reports(a: str | os.PathLike, b: str | os.PathLike, *, num_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> dict:
    """Paired comparison of evaluation reports ``a`` and ``b`` (folders written by ``ctrl-data eval``).

    Returns ``{"a", "b", "num_prompts", "rows"}``: ``a``/``b`` describe each report (path, model,
    adapter, reward, policy/reference samples, reference pool, KL value); each row has ``metric``
    (``win_rate``, ``standard_win_rate`` or ``kl``), ``selector``, ``n``, ``value_a``, ``value_b``
    and ``difference`` (an Estimate dict of mean(A − B) with its paired bootstrap interval), for
    every (selector, N) both reports have. Raises DataError when the reports are not on the same
    prompts (by prompt_id) or used different rewards; a different reference model is logged.
    """
    report_a, frame_a = _load(a)
    report_b, frame_b = _load(b)
    ids_a = sorted(frame_a.loc[frame_a.metric == "kl", "prompt_id"])
    ids_b = sorted(frame_b.loc[frame_b.metric == "kl", "prompt_id"])
    if ids_a != ids_b:
        only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
        raise DataError(f"{a} and {b} are not evaluations of the same prompts ({len(ids_a)} and {len(ids_b)} prompts; "
                        f"{len(only_a)} only in the first, {len(only_b)} only in the second): a paired comparison "
                        "needs the same prompts")
    if report_a.get("reward") != report_b.get("reward"):
        raise DataError(f"{a} and {b} used different rewards ({report_a.get('reward')!r} and "
                        f"{report_b.get('reward')!r}): their win rates are not comparable")
    if report_a.get("model") != report_b.get("model"):
        logger.warning("%s and %s were evaluated against different reference models (%s, %s)", a, b,
                       report_a.get("model"), report_b.get("model"))
    keys_a = {(r["selector"], r["n"]) for r in report_a["win_rates"]}
    keys = [("win_rate", r["selector"], r["n"]) for r in report_b["win_rates"] if (r["selector"], r["n"]) in keys_a]
    keys += [("standard_win_rate", None, 1), ("kl", None, None)]
    rows = []
    for metric, selector, n in keys:
        va, vb = _values(frame_a, metric, selector, n), _values(frame_b, metric, selector, n)
        va, vb = va.align(vb, join="inner")
        if len(va) != len(ids_a):
            raise DataError(f"{metric} {selector}-{n} lacks some prompts' values in {a} or {b}")
        x, y = va.to_numpy(float), vb.to_numpy(float)
        diff = paired_bootstrap_difference(x, y, num_boot=num_boot, level=level, rng=seed)
        both = ~(np.isnan(x) | np.isnan(y))
        rows.append({"metric": metric, "selector": selector, "n": n,
                     "value_a": float(x[both].mean()) if both.any() else float("nan"),
                     "value_b": float(y[both].mean()) if both.any() else float("nan"),
                     "difference": diff.to_dict()})

    def describe(path, report):
        return {"path": str(path), "model": report.get("model"), "adapter": report.get("adapter"),
                "reward": report.get("reward"), "policy_samples": report.get("policy_samples"),
                "reference_samples": report.get("reference_samples"), "reference_pool": report.get("reference_pool"),
                "kl": report.get("kl", {}).get("value")}

    return {"a": describe(a, report_a), "b": describe(b, report_b), "num_prompts": len(ids_a), "level": level,
            "rows": rows}


def format_comparison(result: dict) -> str:
    """A plain-text table of :func:`compare_reports`' result."""
    level = round(100 * result["level"])
    header = ["metric", "value A", "value B", "A - B", f"{level}% paired CI"]
    cells = []
    for row in result["rows"]:
        name = {"win_rate": f"{row['selector']}-{row['n']}", "standard_win_rate": "standard", "kl": "KL"}[row["metric"]]
        d = row["difference"]
        cells.append([name, f"{row['value_a']:.4f}", f"{row['value_b']:.4f}", f"{d['value']:+.4f}",
                      f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda c: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths)))  # noqa: E731
    a, b = result["a"], result["b"]
    out = [f"A: {a['path']} (adapter {a['adapter']}, KL {a['kl']:.4f})",
           f"B: {b['path']} (adapter {b['adapter']}, KL {b['kl']:.4f})",
           f"{result['num_prompts']} prompts, paired by prompt", "",
           line(header), line(["-" * w for w in widths]), *map(line, cells)]
    return "\n".join(out)
