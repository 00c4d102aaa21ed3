"""The evaluation report: Markdown summary and figures next to ``report.json``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["write_report", "describe_beta", "describe_build"]


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
    from .procedures import get_procedure, procedure_names

    return get_procedure(name).description if name in procedure_names() else name


def _markdown(report: dict) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{report['model']}`, adapter: `{report['adapter']}`, reward: `{report['reward']}`",
        f"- prompts: {report['prompts']['count']} from `{report['prompts']['source']}` "
        f"({report['prompts']['overlap_with_training']} also in the training data); "
        f"{report['candidates_per_side']} candidates per side",
        f"- KL(π‖π_ref) estimate: {report['kl']['value']:.4f} nats "
        f"[{report['kl']['ci_low']:.4f}, {report['kl']['ci_high']:.4f}]",
        f"- standard win rate: {_pct(report['standard_win_rate'])}",
        *([f"- trained on: transform {describe_build(report['build'])}"] if report.get("build") else []),
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
    lines += ["", "![win rate vs KL](win_rate_vs_kl.png)", "![calibrated reward](calibration_hist.png)",
              "![win rate vs N](win_rate_vs_n.png)", ""]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: dict, policy_u: np.ndarray, folder: str | os.PathLike) -> None:
    """``report.md`` and three PNGs: win rate vs KL (with the planner's curves), u histogram, win rate vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .planner import plan, tradeoff_curve
    from .procedures import closed_form_names
    from .transforms import get_transform

    folder = Path(folder)
    (folder / "report.md").write_text(_markdown(report))

    # Win rate vs KL: the measured points against the theoretical tradeoff of each family.
    kl = max(report["kl"]["value"], 1e-3)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    measured = {(r["selector"], r["n"]): r for r in report["win_rates"]}
    for inference in closed_form_names():  # the measured points of procedures with theory curves
        sizes = [r["n"] for r in report["win_rates"] if r["selector"] == inference]
        if not sizes:
            continue
        size = max(sizes)
        kls = np.geomspace(min(0.01, kl / 10), max(2 * kl, 1.0), 16)
        for row in plan(inference, size, kl).rows:
            curve = tradeoff_curve(get_transform(row.transform, row.t), inference, size, kls)
            t = "" if row.t is None else f" t={row.t:.3g}"
            ax.plot(kls, curve, linestyle=_LINE_STYLES[closed_form_names().index(inference) % 4], linewidth=1,
                    label=f"theory {inference}-{size}: {row.transform}{t}")
        point = measured[(inference, size)]
        ax.errorbar([kl], [point["value"]], yerr=[[point["value"] - point["ci_low"]], [point["ci_high"] - point["value"]]],
                    fmt="o", color="black", capsize=3)
        ax.annotate(f"measured {inference}-{size}", (kl, point["value"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("KL(π ‖ π_ref) [nats]")
    ax.set_ylabel("inference-time win rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, folder / "win_rate_vs_kl.png")

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.hist(policy_u, bins=np.linspace(0, 1, 11), density=True, alpha=0.8, label="policy")
    ax.axhline(1.0, color="grey", linestyle=":", label="reference (Uniform)")
    ax.set_xlabel("calibrated reward u")
    ax.legend()
    _save(fig, folder / "calibration_hist.png")

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
    _save(fig, folder / "win_rate_vs_n.png")
