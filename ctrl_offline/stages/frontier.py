"""The frontier stage: several adapters (or one run's checkpoints) evaluated on the same prompts, as a curve.

``ctrl-data eval --adapter A B C`` (or ``--adapter run.checkpoints``) evaluates every adapter with
:func:`~ctrl_offline.stages.evaluate.evaluate_policy` into ``<out>/<label>/`` against one shared
reference pool (``<out>/pool`` unless given), then writes ``frontier.json``, ``frontier.md`` and
``frontier.png``: win rate against KL for every point with intervals on both axes, beside the best-
of-n sampling frontier (:mod:`ctrl_offline.maths.frontier`) and the curve of each point's plan; each row
says how far the point lies from both (vertical gaps) and its KL efficiency. An adapter already
evaluated there is not evaluated again, so an interrupted frontier resumes and a later adapter can be
added. ``ctrl-data compare --at-kl`` reads these folders (docs/evaluation.md, "A frontier, not a point").
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrl_offline.maths.frontier import best_of_n_at_kl, best_of_n_kl
from ctrl_offline.io.files import DataError, read_build_info, write_json, write_text

__all__ = ["FrontierPoint", "FRONTIER_FILE", "training_record", "frontier_points", "evaluate_frontier", "summarize_frontier",
           "format_frontier", "read_frontier"]

#: The summary of a frontier folder, beside one report folder per point.
FRONTIER_FILE = "frontier.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontierPoint:
    """One adapter of a frontier: its ``label`` (its report folder's name), path, and its build's metadata."""

    label: str
    adapter: str
    build_info: dict | None
    train_data: str | None


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _is_adapter(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def training_record(adapter: Path) -> tuple[dict | None, str | None]:
    """(build metadata, training-set folder) of an adapter written by ``ctrl-data train``, or of a checkpoint of one.

    An adapter carries its build's ``ctrl_build.json`` and a ``ctrl_train.json`` naming its data; a
    checkpoint has neither, and is found through its run's ``ctrl_train_settings.json``.
    """
    from ctrl_offline.stages.train import SETTINGS_FILE, TRAIN_INFO_FILE

    trained = adapter / TRAIN_INFO_FILE
    settings = adapter.parent / SETTINGS_FILE
    data = None
    for record in (trained, settings):
        if record.is_file():
            try:
                data = json.loads(record.read_text()).get("data")
            except ValueError as err:
                logger.warning("cannot read %s: %s", record, err)
            break
    data = data if data and Path(data).is_dir() else None
    info = read_build_info(adapter) or (read_build_info(data) if data else None)
    return info, data


def frontier_points(adapters) -> list[FrontierPoint]:
    """The points of a frontier: each of ``adapters`` is a PEFT adapter folder, or a folder of a run's
    checkpoints (``checkpoint-<step>`` folders, as ``ctrl-data train --keep-checkpoints`` leaves in
    ``<out>.checkpoints``), which gives one point per checkpoint in step order. Labels are the folder
    names (``<run>/checkpoint-<step>`` for checkpoints), made unique. Raises DataError for a folder
    that is neither.
    """
    found: list[tuple[str, Path]] = []
    for given in adapters:
        folder = Path(given)
        if _is_adapter(folder):
            found.append((folder.name, folder))
        elif folder.is_dir() and _checkpoints(folder):
            run = folder.name.removesuffix(".checkpoints")
            found += [(f"{run}-{p.name}", p) for p in _checkpoints(folder)]
        else:
            raise DataError(f"{given} is neither a PEFT adapter folder (adapter_config.json) nor a folder of "
                            "checkpoint-<step> adapters (ctrl-data train --keep-checkpoints)")
    points, seen = [], set()
    for label, path in found:
        label = re.sub(r"[^A-Za-z0-9._-]+", "_", label) or "adapter"
        unique, i = label, 2
        while unique in seen or unique == "pool":
            unique, i = f"{label}-{i}", i + 1
        seen.add(unique)
        info, data = training_record(path)
        points.append(FrontierPoint(unique, str(path), info, data))
    return points


def evaluate_frontier(prompts_source: str, out_dir: str | os.PathLike, model_name_or_path: str, reward: str,
                      adapters, *, reference_pool: str | os.PathLike | None = None, overwrite: bool = False,
                      **evaluate_kwargs) -> dict:
    """Evaluate every point of :func:`frontier_points` (``adapters``) and write the frontier's summary.

    Each point goes to ``out_dir/<label>/`` through :func:`~ctrl_offline.stages.evaluate.evaluate_policy`
    (``evaluate_kwargs``: its sizes, selectors and seed, the same for every point) against the
    reference pool ``reference_pool`` (default ``out_dir/pool``), so every point is measured on the
    same prompts against the same reference samples, and ``ctrl-data compare`` can pair them. A
    point whose folder already holds a report is read, not evaluated again (``overwrite`` redoes
    them all). Returns :func:`summarize_frontier`'s summary, also written to ``frontier.json`` /
    ``frontier.md`` / ``frontier.png``.
    """
    # Resolved per call, so a stand-in for the eval stage (tests/test_cli.py) is seen only while it stands.
    from ctrl_offline.stages.evaluate import evaluate_policy

    points = frontier_points(adapters)
    out = Path(out_dir)
    pool = Path(reference_pool) if reference_pool is not None else out / "pool"
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for i, point in enumerate(points, 1):
        folder = out / point.label
        if (folder / "report.json").is_file() and not overwrite:
            logger.info("[%d/%d] %s: already evaluated in %s", i, len(points), point.label, folder)
            reports.append(json.loads((folder / "report.json").read_text()))
            continue
        logger.info("[%d/%d] evaluating %s", i, len(points), point.adapter)
        result = evaluate_policy(prompts_source, folder, model_name_or_path, reward, adapter=point.adapter,
                                 reference_pool=pool, overwrite=overwrite, build_info=point.build_info,
                                 train_data=point.train_data,
                                 transform=None if point.build_info is None else point.build_info.get("transform"),
                                 t=None if point.build_info is None else point.build_info.get("t"), **evaluate_kwargs)
        reports.append(result.report)
    summary = summarize_frontier(points, reports)
    notes = _plot(summary, out / "frontier.png")  # never raises: a figure that fails is a note
    summary["figure_notes"] = notes
    write_json(out / FRONTIER_FILE, summary)
    write_text(out / "frontier.md", "# Frontier\n\n```\n" + format_frontier(summary) + "\n```\n"
               + "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "") + "\n![frontier](frontier.png)\n")
    return summary


def _planned(point: FrontierPoint) -> dict | None:
    planner = (point.build_info or {}).get("planner")
    return planner if planner and not planner.get("simulated") else None


def summarize_frontier(points: list[FrontierPoint], reports: list[dict]) -> dict:
    """The frontier's table: for each point and each closed-form procedure at its largest N measured,
    the win rate beside the best-of-n sampling frontier at the point's KL and, where the point's build
    was planned for that procedure and N, the plan's win rate there and the KL efficiency.
    """
    from ctrl_offline.maths.procedures import closed_form_names

    rows = []
    for point, report in zip(points, reports):
        kl = report["kl"]
        diagnostics = report.get("plan_diagnostics") or {}
        win_rates = []
        for selector in closed_form_names():
            sizes = [r["n"] for r in report["win_rates"] if r["selector"] == selector]
            if not sizes:
                continue
            row = next(r for r in report["win_rates"] if r["selector"] == selector and r["n"] == max(sizes))
            frontier = best_of_n_at_kl(selector, row["n"], max(kl["value"], 0.0)) if math.isfinite(kl["value"]) \
                else math.nan
            planned = diagnostics.get("procedure") == f"{selector}-{row['n']}"
            entry = {"selector": selector, "n": row["n"], "value": row["value"], "ci_low": row["ci_low"],
                     "ci_high": row["ci_high"], "best_of_n": frontier, "gap_to_best_of_n": row["value"] - frontier,
                     "plan_at_kl": diagnostics.get("planned_at_kl_spent") if planned else None,
                     "kl_efficiency": diagnostics.get("kl_efficiency") if planned else None}
            entry["gap_to_plan"] = None if entry["plan_at_kl"] is None else row["value"] - entry["plan_at_kl"]
            win_rates.append(entry)
        rows.append({"label": point.label, "adapter": point.adapter, "folder": point.label,
                     "kl": {k: kl[k] for k in ("value", "ci_low", "ci_high", "num_prompts", "sd")},
                     "kl_sequence": {k: report["kl_sequence"][k] for k in ("value", "ci_low", "ci_high")},
                     "planner": _planned(point), "win_rates": win_rates})
    first = reports[0] if reports else {}
    return {"model": first.get("model"), "reward": first.get("reward"), "prompts": first.get("prompts"),
            "policy_samples": first.get("policy_samples"), "reference_samples": first.get("reference_samples"),
            "reference_pool": first.get("reference_pool"), "points": rows,
            "best_of_n": [{"n": n, "kl": best_of_n_kl(n)} for n in (2, 3, 4, 8, 16, 32)]}


def read_frontier(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """(label, report folder) of each point of a frontier folder, or of a single report folder."""
    folder = Path(folder)
    if (folder / FRONTIER_FILE).is_file():
        try:
            summary = json.loads((folder / FRONTIER_FILE).read_text())
        except ValueError as err:
            raise DataError(f"cannot read {folder / FRONTIER_FILE}: {err}") from err
        return [(p["label"], folder / p["folder"]) for p in summary["points"]]
    if (folder / "report.json").is_file():
        return [(folder.name, folder)]
    raise DataError(f"{folder} is neither an evaluation report folder (report.json) nor a frontier folder "
                    f"({FRONTIER_FILE}), as ctrl-data eval writes")


def _number(x, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def format_frontier(summary: dict) -> str:
    """A plain-text table of :func:`summarize_frontier`'s summary: one line per point and procedure."""
    header = ["point", "procedure", "KL [95% CI]", "win rate [95% CI]", "best-of-n", "Δ best-of-n", "plan",
              "Δ plan", "KL eff."]
    cells = []
    for point in summary["points"]:
        kl = point["kl"]
        for row in point["win_rates"]:
            cells.append([point["label"], f"{row['selector']}-{row['n']}",
                          f"{kl['value']:.3f} [{kl['ci_low']:.3f}, {kl['ci_high']:.3f}]",
                          f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]",
                          _number(row["best_of_n"]), _number(row["gap_to_best_of_n"]), _number(row["plan_at_kl"]),
                          _number(row["gap_to_plan"]), _number(row["kl_efficiency"], 2)])
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda c: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))  # noqa: E731
    prompts = (summary.get("prompts") or {}).get("count")
    return "\n".join([f"{len(summary['points'])} points on {prompts} prompts, {summary.get('policy_samples')} policy × "
                      f"{summary.get('reference_samples')} reference samples each; best-of-n: the reference's "
                      "best-of-n at the same KL (KL log n − (n−1)/n)", "",
                      line(header), line(["-" * w for w in widths]), *map(line, cells)])


def _or_nan(compute, kl: float) -> float:
    try:
        return compute(kl)
    except ValueError:  # beyond the plan's curve
        return math.nan


def _plot(summary: dict, path: Path) -> list[str]:
    """``frontier.png``: per procedure, every point with both intervals, the best-of-n curve and each plan's curve.

    Returns notes on what was left off (a plan's curve it cannot draw); a figure that fails is a note too.
    """
    from ctrl_offline.maths.diagnostics import PlanCurve
    from ctrl_offline.reports.reporting import save_figure

    notes: list[str] = []
    panels = sorted({(r["selector"], r["n"]) for p in summary["points"] for r in p["win_rates"]})
    if not panels:
        return ["no closed-form procedure was measured: no frontier figure"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        highest = max([p["kl"]["ci_high"] for p in summary["points"] if math.isfinite(p["kl"]["ci_high"])] + [0.2])
        grid = np.linspace(0.0, math.sqrt(1.15 * highest), 60) ** 2  # even in √KL, the axis's scale
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
        colours = plt.get_cmap("tab10")  # one colour per point, the same in every panel
        for ax, (selector, n) in zip(axes[0], panels):
            ax.plot(grid, [best_of_n_at_kl(selector, n, k) for k in grid], color="grey", linestyle="--",
                    label="best-of-n of the reference")
            for m in (2, 3, 4, 8, 16):
                if best_of_n_kl(m) <= grid[-1]:
                    ax.plot([best_of_n_kl(m)], [best_of_n_at_kl(selector, n, best_of_n_kl(m))], "s", color="grey",
                            markersize=4)
                    ax.annotate(f"n={m}", (best_of_n_kl(m), best_of_n_at_kl(selector, n, best_of_n_kl(m))),
                                textcoords="offset points", xytext=(3, -10), fontsize=7, color="grey")
            drawn = set()
            for point in summary["points"]:
                planner = point["planner"]
                key = json.dumps(planner, sort_keys=True, default=str)
                if planner is None or key in drawn or (planner.get("inference"), planner.get("n")) != (selector, n):
                    continue
                drawn.add(key)
                try:
                    curve = PlanCurve.from_planner(planner)
                except ValueError as err:
                    notes.append(f"{point['label']}: its plan's curve is left off the {selector}-{n} panel ({err})")
                    continue
                values = [_or_nan(curve.win_rate_at_kl, k) for k in grid[1:]]
                if any(math.isnan(v) for v in values):
                    notes.append(f"{point['label']}: its plan's curve stops where the planner cannot solve the KL")
                ax.plot(grid[1:], values, linewidth=1, color="black",
                        label=f"plan: {curve.transform.spec}, K={curve.k if curve.k else '∞'}")
            for point in summary["points"]:
                row = next((r for r in point["win_rates"] if (r["selector"], r["n"]) == (selector, n)), None)
                if row is None or not math.isfinite(point["kl"]["value"]):
                    continue
                kl = point["kl"]
                ax.errorbar([kl["value"]], [row["value"]],
                            xerr=[[kl["value"] - kl["ci_low"]], [kl["ci_high"] - kl["value"]]],
                            yerr=[[row["value"] - row["ci_low"]], [row["ci_high"] - row["value"]]], fmt="o", capsize=3,
                            label=point["label"], color=colours(summary["points"].index(point) % 10))
            ax.axhline(0.5, color="lightgrey", linewidth=0.8)
            # √KL: the scale on which compare interpolates, where small KLs are not crushed against 0.
            ax.set_xscale("function", functions=(lambda x: np.sqrt(np.clip(x, 0, None)), np.square))
            ticks = [0.0]
            for k in (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64):  # apart on the √ scale
                if k <= grid[-1] and math.sqrt(k) - math.sqrt(ticks[-1]) >= 0.08 * math.sqrt(grid[-1]):
                    ticks.append(k)
            ax.set_xticks(ticks, [f"{k:g}" for k in ticks])
            ax.set_xlabel("KL(π ‖ π_ref) [nats, per-token estimate; √ scale]")
            ax.set_ylabel(f"{selector}-{n} win rate vs the reference")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save_figure(fig, path)
    except Exception as err:  # noqa: BLE001 — the table and the reports are worth more than a figure
        logger.warning("frontier figure not drawn: %s: %s", type(err).__name__, err)
        notes.append(f"frontier.png not drawn: {type(err).__name__}: {err}")
    return notes
