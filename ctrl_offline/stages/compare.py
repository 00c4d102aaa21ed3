"""The ``compare`` stage: evaluations of the same prompts, paired prompt by prompt.

``ctrl-data eval`` writes each prompt's win rates (and KL) to ``per_prompt.parquet``. For two such
reports A and B on the same prompts — typically two adapters evaluated against one shared
reference pool — :func:`compare_reports` gives, per selector and N, value_A, value_B and the
difference A − B with a paired percentile bootstrap interval over prompts
(:func:`ctrl_offline.maths.win_rates.paired_bootstrap_difference`), plus the standard win rate and
KL(π‖π_ref) of each. Pairing removes the prompt-to-prompt variation both share, so the
difference's interval is narrower than the two reports' own intervals suggest.

:func:`compare_frontiers` compares two methods as curves (each a frontier folder of several
evaluated adapters, or one report): their win rates interpolated at common KLs, A − B with a paired
bootstrap over prompts on both axes, and each against the best-of-n sampling frontier there
(:mod:`ctrl_offline.maths.frontier`, docs/evaluation.md, "A frontier, not a point").
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ctrl_offline.maths.win_rates import decision_verdict, paired_bootstrap_difference
from ctrl_offline.maths.frontier import best_of_n_at_kl, frontier_at_kl, paired_frontier_difference
from ctrl_offline.io.files import DataError, read_table, require_columns
from ctrl_offline.stages.evaluate import PER_PROMPT_FILE
from ctrl_offline.stages.frontier import read_frontier

__all__ = ["compare_reports", "format_comparison", "compare_frontiers", "format_frontier_comparison"]

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


def _method(folders) -> list[tuple[str, object, object]]:
    """(label, report, per-prompt frame) of every point of a frontier folder or a report folder, or of a list of them."""
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    return [(label, *_load(path)) for folder in folders for label, path in read_frontier(folder)]


def _prompt_order(points, where) -> list:
    ids = sorted(points[0][2].loc[points[0][2].metric == "kl", "prompt_id"])
    for label, _, frame in points[1:]:
        if sorted(frame.loc[frame.metric == "kl", "prompt_id"]) != ids:
            raise DataError(f"{where}: {label} was not evaluated on the same prompts as {points[0][0]}: a paired "
                            "comparison needs every point on the same prompts (evaluate them with ctrl-data eval "
                            "--adapter … on one prompt file)")
    return ids


def _arrays(points, metric_rows, index):
    """(points, prompts) arrays of per-prompt KL and win rate, rows aligned to ``index`` (prompt_id, occurrence)."""
    kl, win = [], []
    for label, _, frame in points:
        for metric, selector, n, out in (("kl", None, None, kl), (*metric_rows, win)):
            values = _values(frame, metric, selector, n).reindex(index)
            if values.isna().all():
                raise DataError(f"{label} has no {metric} {selector}-{n} values")
            out.append(values.to_numpy(float))
    return np.array(kl), np.array(win)


def compare_frontiers(a, b, at_kl, *, num_boot: int = 2000,
                      level: float = 0.95, seed: int = 0, effect: float = 0.03, null: float = 0.01) -> dict:
    """Methods A and B as curves, compared at the common KLs ``at_kl`` (docs/evaluation.md, "A frontier, not a point").

    ``a`` and ``b``: frontier folders (``ctrl-data eval --adapter …`` with several adapters or a run's
    checkpoints) or report folders (a single point), or lists of them (a method's points gathered from
    several folders); every point of both on the same prompts. For every
    (selector, N) all points measured and every KL of ``at_kl``: each method's win rate interpolated
    there (:func:`~ctrl_offline.maths.frontier.frontier_at_kl`; None where its largest KL does not reach it),
    A − B with a paired bootstrap interval over prompts on both axes
    (:func:`~ctrl_offline.maths.frontier.paired_frontier_difference`) and its ``verdict`` under the rule of
    :func:`~ctrl_offline.maths.u_statistics.decision_verdict` (``effect``, ``null``), and, for closed-form
    procedures, the best-of-n sampling frontier at that KL with each method's gap to it (the method's
    interval, shifted: the frontier is exact). ``b`` None compares A with the best-of-n frontier only.
    """
    from ctrl_offline.maths.procedures import closed_form_names

    at = sorted(float(k) for k in at_kl)
    if not at or at[0] <= 0:
        raise ValueError(f"common KLs must be > 0 nats, got {at_kl}")
    methods = {"a": _method(a)} | ({} if b is None else {"b": _method(b)})
    order = _prompt_order(methods["a"], str(a))
    if b is not None and _prompt_order(methods["b"], str(b)) != order:
        raise DataError(f"{a} and {b} are not evaluations of the same prompts: a paired comparison needs them")
    rewards = {report.get("reward") for points in methods.values() for _, report, _ in points}
    if len(rewards) > 1:
        raise DataError(f"the points were evaluated with different rewards ({sorted(map(str, rewards))}): their win "
                        "rates are not comparable")
    index = methods["a"][0][2].loc[methods["a"][0][2].metric == "kl"].set_index(["prompt_id", "occurrence"]).index
    index = index.sort_values()
    keys = None
    for points in methods.values():
        for _, report, _ in points:
            found = {(r["selector"], r["n"]) for r in report["win_rates"]}
            keys = found if keys is None else keys & found
    rows = []
    for selector, n in sorted(keys or ()):
        arrays = {side: _arrays(points, ("win_rate", selector, n), index) for side, points in methods.items()}
        if b is None:
            results = [{"kl": kl, "a": est, "b": None, "difference": None}
                       for kl, est in zip(at, frontier_at_kl(*arrays["a"], at, num_boot=num_boot, level=level,
                                                             rng=seed))]
        else:
            results = paired_frontier_difference(*arrays["a"], *arrays["b"], at, num_boot=num_boot, level=level,
                                                 rng=seed)
        for result in results:
            frontier = best_of_n_at_kl(selector, n, result["kl"]) if selector in closed_form_names() else None
            row = {"selector": selector, "n": n, **result, "best_of_n": frontier,
                   "verdict": None if result["difference"] is None else decision_verdict(
                       result["difference"]["value"], result["difference"]["ci_low"],
                       result["difference"]["ci_high"], effect=effect, null=null)}
            for side in ("a", "b"):
                est = result[side]
                row[f"{side}_vs_best_of_n"] = None if est is None or frontier is None else {
                    "value": est["value"] - frontier, "ci_low": est["ci_low"] - frontier,
                    "ci_high": est["ci_high"] - frontier}
            rows.append(row)

    def describe(path, points):
        path = str(path) if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]
        return {"path": path, "points": [{"label": label, "adapter": report.get("adapter"),
                                          "kl": report.get("kl", {}).get("value")} for label, report, _ in points]}

    return {"a": describe(a, methods["a"]), "b": None if b is None else describe(b, methods["b"]),
            "num_prompts": len(order), "level": level, "at_kl": at, "rule": {"effect": effect, "null": null},
            "rows": rows}


def format_frontier_comparison(result: dict) -> str:
    """A plain-text table of :func:`compare_frontiers`' result."""
    level = round(100 * result["level"])

    def est(e, signed=False):
        if e is None:
            return "not reached"
        fmt = "+.3f" if signed else ".3f"
        return f"{e['value']:{fmt}} [{e['ci_low']:{fmt}}, {e['ci_high']:{fmt}}]"

    header = ["procedure", "KL", "A", "B", "A - B", "verdict", "best-of-n", "A - best-of-n"]
    cells = [[f"{r['selector']}-{r['n']}", f"{r['kl']:.3g}", est(r["a"]), est(r["b"]) if result["b"] else "—",
              est(r["difference"], True) if r["difference"] else "—", r["verdict"] or "—",
              "—" if r["best_of_n"] is None else f"{r['best_of_n']:.3f}", est(r["a_vs_best_of_n"], True)
              if r["a_vs_best_of_n"] else "—"] for r in result["rows"]]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda c: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths)))  # noqa: E731

    def points(side):
        return ", ".join(f"{p['label']} (KL {p['kl']:.3f})" for p in side["points"])

    out = [f"A: {result['a']['path']}: {points(result['a'])}"]
    if result["b"]:
        out.append(f"B: {result['b']['path']}: {points(result['b'])}")
    rule = result["rule"]
    out += [f"{result['num_prompts']} prompts; win rates interpolated in √KL from the reference (KL 0, ½) through each "
            f"method's points; {level}% paired bootstrap over prompts on both axes; verdict: shows the effect at A − B "
            f"≥ {rule['effect']:g} with the interval above 0, refutes it at ≤ {rule['null']:g} with the upper bound "
            f"below {rule['effect']:g}", "", line(header), line(["-" * w for w in widths]), *map(line, cells)]
    return "\n".join(out)
