"""The evaluation report: Markdown summary and figures next to ``report.json``.

The win-rate-vs-KL figure overlays the planner's curves at the measured KL. A family that cannot
be planned there (a KL beyond what the plan covers: no trainable β, or past the planner's range)
is left off the figure with a note; the report is written whatever the figures can show.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["write_report", "describe_beta", "describe_build", "theory_curves", "save_figure"]

logger = logging.getLogger(__name__)


def _short(x: float, digits: int) -> str:
    """``x`` to ``digits`` significant digits, exponents written 2.9e5 rather than 2.9e+05."""
    text = f"{x:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def describe_beta(beta: float | None, phi_scale: float | None = None, unscaled_beta: float | None = None) -> str:
    """``β=0.31 (Φ rescaled by 2.9e5; raw-Φ β=9.5e4)``: the trainer's β (for Φ rescaled to span 1 on [0, 1])
    and, when Φ was rescaled, the scale and the β of the raw Φ (``unscaled_beta``, what the planner prints)."""
    if beta is None:
        return "β=?"
    text = f"β={_short(beta, 3)}"
    if phi_scale is None:
        return text
    if phi_scale == 1:
        return text + " (Φ spans 1: not rescaled)"
    raw = beta * phi_scale if unscaled_beta is None else unscaled_beta
    return text + f" (Φ rescaled by {_short(phi_scale, 2)}; raw-Φ β={_short(raw, 2)})"


def describe_build(build: dict) -> str:
    """``exp t=12.6, β=0.31 (Φ rescaled by 2.9e5; raw-Φ β=9.5e4)`` from a build's metadata."""
    t = "" if build.get("t") is None else f" t={build['t']:.3g}"
    return (f"{build.get('transform')}{t}, "
            + describe_beta(build.get("beta"), build.get("phi_scale"), build.get("unscaled_beta")))


_LINE_STYLES = ("-", "--", "-.", ":")


def _pct(est: dict) -> str:
    return f"{100 * est['value']:.1f}% [{100 * est['ci_low']:.1f}, {100 * est['ci_high']:.1f}]"


def _label(name: str) -> str:
    """A procedure's description (``best-of-N``), or its name when it is not registered."""
    from ctrl_offline.maths.procedures import get_procedure, procedure_names

    return get_procedure(name).description if name in procedure_names() else name


def _nats(est: dict) -> str:
    """``0.1234 nats [0.1000, 0.1500]``, with the prompt-to-prompt sd and standard error when recorded."""
    text = f"{est['value']:.4f} nats [{est['ci_low']:.4f}, {est['ci_high']:.4f}]"
    if est.get("sd") is not None:
        text += f" (sd over prompts {est['sd']:.4f}, stderr {est['stderr']:.4f})"
    return text


def _kl_lines(report: dict) -> list[str]:
    kl = report["kl"]
    if "kl_sequence" not in report:  # a report without the two estimators: its one KL as it is
        return [f"- KL(π‖π_ref) estimate: {_nats(kl)}"]
    lines = [f"- KL(π‖π_ref), per-token estimate (`kl`: Σ_t of the exact next-token KL along each policy sample): "
             f"{_nats(kl)}",
             f"- KL(π‖π_ref), sequence-level estimate (`kl_sequence`: mean of log π(y|x) − log π_ref(y|x)): "
             f"{_nats(report['kl_sequence'])}"]
    held = report.get("kl_training_prompts")
    if held:
        left = "" if held.get("held_in_training") is None else (
            f"; the KL callback left {held['held_in_training']:.4f} (budget {held.get('budget')})")
        lines.append(f"- KL on the {held['num_prompts']} prompts training was held on (`kl_training_prompts`, "
                     f"{held['samples_per_prompt']} samples each, ≤ {held['max_new_tokens']} tokens): per-token "
                     f"{_nats(held['kl'])}; sequence-level {held['kl_sequence']['value']:.4f}{left}")
    return lines


def _interval(est: dict) -> str:
    return f"{est['value']:.4f} [{est['ci_low']:.4f}, {est['ci_high']:.4f}]"


def _diagnostic_lines(report: dict) -> list[str]:
    """How the KL was spent against the build's plan (docs/diagnostics.md): one line per diagnostic, then the notes."""
    from ctrl_offline.maths.diagnostics import PlanDiagnostics

    keys = ("plan_diagnostics", "kl_split", "tilt_fidelity", "diagnostic_notes")
    if not any(report.get(key) for key in keys):  # a report of an earlier version, or nothing to say
        return []
    lines = ["", "Against the plan (docs/diagnostics.md):", ""]
    plan = report.get("plan_diagnostics")
    if plan:
        lines.append(f"- plan: {PlanDiagnostics(**plan).line()}")
    split = report.get("kl_split")
    if split:
        m = split["num_stored"]
        planned = ("" if split.get("planned_on_target") is None else
                   f" (the plan's at M = {m}: {split['planned_on_target']:.4f})")
        lines.append(f"- KL split from the policy samples' levels among M = {m} reference rewards (nats): on target "
                     f"{_interval(split['on_target'])}{planned}, off target {_interval(split['off_target'])}, of the "
                     f"sequence-level total {_interval(split['total'])}")
    tilt = report.get("tilt_fidelity")
    if tilt:
        lines.append(f"- tilt fidelity on {tilt['num_points']} reference samples (h = log π_θ − log π_ref against "
                     f"the planned log f(u)): R² {tilt['r_squared']:.3f}, slope {tilt['slope']:.3f} (1 = the planned "
                     f"strength); the binned curve is `tilt_fidelity` in report.json")
    lines += [f"- note: {note}" for note in report.get("diagnostic_notes") or []]
    return lines


def _per_prompt_kl(report: dict) -> list[str]:
    """The per-prompt KL table (prompt index as in per_prompt.parquet's ``prompt_index``)."""
    token = report["kl"].get("per_prompt")
    if not token:
        return []
    sequence = (report.get("kl_sequence") or {}).get("per_prompt") or [float("nan")] * len(token)
    lines = ["", "Per-prompt KL(π‖π_ref) (nats; `per_prompt.parquet` has them by prompt_id):", "",
             "| prompt | kl (per-token) | kl_sequence |", "|---|---|---|"]
    lines += [f"| {i} | {a:.4f} | {b:.4f} |" for i, (a, b) in enumerate(zip(token, sequence))]
    return lines


def _markdown(report: dict, notes: list[str]) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{report['model']}`, adapter: `{report['adapter']}`, reward: `{report['reward']}`",
        f"- prompts: {report['prompts']['count']} from `{report['prompts']['source']}` "
        f"({report['prompts']['overlap_with_training']} also in the training data); "
        f"{report['candidates_per_side']} candidates per side",
        *_kl_lines(report),
        f"- standard win rate: {_pct(report['standard_win_rate'])}",
        *([f"- trained on: transform {describe_build(report['build'])}"] if report.get("build") else []),
        *_diagnostic_lines(report),
        "",
        "| selector | N | win rate vs reference (95% CI) | excluded candidates |",
        "|---|---|---|---|",
    ]
    for row in report["win_rates"]:
        lines.append(f"| {row['selector']} | {row['n']} | {_pct(row)} | {row['excluded_candidates']} |")
    shortcut = [name for name in (report["calibrated_shortcut"] or [{}])[0] if name not in ("n", "standard")]
    lines += ["", "Calibrated-reward shortcut (the policy's N candidates against the reference's best/worst of N drawn "
              "from its stored candidates; docs/evaluation_shortcut.md):", "",
              "| N | standard | " + " | ".join(_label(name) for name in shortcut) + " |",
              "|---|---|" + "---|" * len(shortcut)]
    for row in report["calibrated_shortcut"]:
        lines.append(f"| {row['n']} | {_pct(row['standard'])} | " + " | ".join(_pct(row[name]) for name in shortcut)
                     + " |")
    if notes:
        lines += ["", "Figures:", "", *(f"- {note}" for note in notes)]
    lines += ["", "![win rate vs KL](win_rate_vs_kl.png)", "![calibrated reward](calibration_hist.png)",
              "![win rate vs N](win_rate_vs_n.png)", *_per_prompt_kl(report), ""]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """Save ``fig`` to ``path`` atomically (a hidden temporary, then renamed) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def theory_curves(report: dict, num_points: int = 16) -> tuple[np.ndarray, list[dict], list[str]]:
    """The planner's curves for the win-rate-vs-KL figure: (KL grid, curves, notes).

    For each closed-form procedure measured (at its largest N), each transform family is planned
    at the measured KL and its tradeoff curve drawn over the grid (points the planner cannot solve
    are NaN). A family that cannot be planned at that KL is left out, with a note saying the KL is
    beyond what the plan covers and why; so is every family when the KL is not finite.
    """
    from ctrl_offline.maths.planner import DEFAULT_FAMILIES, plan
    from ctrl_offline.reports.plotting import tradeoff_points
    from ctrl_offline.maths.procedures import closed_form_names
    from ctrl_offline.maths.transforms import get_transform

    value = report["kl"]["value"]
    if value is None or not math.isfinite(value):
        return np.array([]), [], [f"KL(π‖π_ref) is {value}: no planner curve can be placed; measured points only"]
    kl = max(value, 1e-3)
    kls = np.geomspace(min(0.01, kl / 10), max(2 * kl, 1.0), num_points)
    curves, notes = [], []
    for inference in closed_form_names():
        sizes = [r["n"] for r in report["win_rates"] if r["selector"] == inference]
        if not sizes:
            continue
        size = max(sizes)
        left_out: dict[str, list[str]] = {}  # reason → families
        for family in DEFAULT_FAMILIES:
            try:
                row = plan(inference, size, kl, families=(family,)).rows[0]
            except ValueError as err:
                # The planner's reason without its advice on budgets (this KL was measured, not chosen).
                reason = str(err).split(";")[0].replace(f" {family} ", " the family ")
                left_out.setdefault(reason, []).append(family)
                continue
            curves.append({"inference": inference, "n": size, "transform": row.transform, "t": row.t,
                           "win_rate": tradeoff_points(get_transform(row.transform, row.t), inference, size, kls)})
        for reason, families in left_out.items():
            notes.append(f"KL {kl:.4g} nats is beyond what the plan covers for {inference}-{size} with "
                         f"{', '.join(families)} ({reason}): left off the win-rate-vs-KL figure")
    return kls, curves, notes


def _figure(name: str, draw, notes: list[str]) -> None:
    """Draw one figure; a failure is logged and noted, never raised (the report is worth more than a figure)."""
    try:
        draw()
    except Exception as err:  # noqa: BLE001
        import matplotlib.pyplot as plt

        plt.close("all")
        logger.warning("figure %s not drawn: %s: %s", name, type(err).__name__, err)
        notes.append(f"{name} not drawn: {type(err).__name__}: {err}")


def write_report(report: dict, policy_u: np.ndarray, folder: str | os.PathLike) -> list[str]:
    """``report.md`` and three PNGs: win rate vs KL (with the planner's curves), u histogram, win rate vs N.

    Returns the notes on what the figures leave out (also listed in ``report.md``): a planner curve
    that cannot be planned at the measured KL, or a figure that could not be drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrl_offline.maths.procedures import closed_form_names

    folder = Path(folder)
    notes: list[str] = []
    try:
        kls, curves, theory_notes = theory_curves(report)
    except Exception as err:  # noqa: BLE001 — the measured points are drawn without the theory
        logger.warning("no planner curves: %s: %s", type(err).__name__, err)
        kls, curves, theory_notes = np.array([]), [], [f"planner curves not drawn: {type(err).__name__}: {err}"]
    notes += theory_notes

    def win_rate_vs_kl():
        # The measured points against the theoretical tradeoff of each family.
        kl = max(report["kl"]["value"], 1e-3) if math.isfinite(report["kl"]["value"]) else float("nan")
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        measured = {(r["selector"], r["n"]): r for r in report["win_rates"]}
        names = closed_form_names()
        for curve in curves:
            t = "" if curve["t"] is None else f" t={curve['t']:.3g}"
            ax.plot(kls, curve["win_rate"], linestyle=_LINE_STYLES[names.index(curve["inference"]) % 4], linewidth=1,
                    label=f"theory {curve['inference']}-{curve['n']}: {curve['transform']}{t}")
        for inference in names:  # the measured points of procedures with theory curves
            sizes = [r["n"] for r in report["win_rates"] if r["selector"] == inference]
            if not sizes or not math.isfinite(kl):
                continue
            point = measured[(inference, max(sizes))]
            ax.errorbar([kl], [point["value"]],
                        yerr=[[point["value"] - point["ci_low"]], [point["ci_high"] - point["value"]]],
                        fmt="o", color="black", capsize=3)
            ax.annotate(f"measured {inference}-{max(sizes)}", (kl, point["value"]), textcoords="offset points",
                        xytext=(5, 5))
        ax.set_xscale("log")
        ax.set_xlabel("KL(π ‖ π_ref) [nats]")
        ax.set_ylabel("inference-time win rate")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
        save_figure(fig, folder / "win_rate_vs_kl.png")

    def calibration_hist():
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        ax.hist(policy_u, bins=np.linspace(0, 1, 11), density=True, alpha=0.8, label="policy")
        ax.axhline(1.0, color="grey", linestyle=":", label="reference (Uniform)")
        ax.set_xlabel("calibrated reward u")
        ax.legend()
        save_figure(fig, folder / "calibration_hist.png")

    def win_rate_vs_n():
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        for selector in sorted({r["selector"] for r in report["win_rates"]}):
            rows = sorted((r for r in report["win_rates"] if r["selector"] == selector), key=lambda r: r["n"])
            ns = [r["n"] for r in rows]
            ax.errorbar(ns, [r["value"] for r in rows],
                        yerr=[[r["value"] - r["ci_low"] for r in rows], [r["ci_high"] - r["value"] for r in rows]],
                        marker="o", capsize=3, label=selector)
        ax.axhline(0.5, color="grey", linestyle=":")
        ax.set_xlabel("N")
        ax.set_ylabel("win rate vs reference")
        ax.legend()
        save_figure(fig, folder / "win_rate_vs_n.png")

    for name, draw in (("win_rate_vs_kl.png", win_rate_vs_kl), ("calibration_hist.png", calibration_hist),
                       ("win_rate_vs_n.png", win_rate_vs_n)):
        _figure(name, draw, notes)
    (folder / "report.md").write_text(_markdown(report, notes))
    return notes
