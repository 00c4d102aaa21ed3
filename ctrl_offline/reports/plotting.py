"""Figures: the planner's win-rate-vs-KL curves (matplotlib, headless).

A curve is drawn where the planner can solve β for its KL; points beyond (a KL past the planner's
range, or one no β reaches) are left out of the line rather than stopping the figure
(:func:`tradeoff_points`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ctrl_offline.maths.planner import Plan, tradeoff_curve
from ctrl_offline.maths.procedures import get_procedure
from ctrl_offline.maths.transforms import get_transform

__all__ = ["plot_plan", "tradeoff_points"]


def tradeoff_points(transform, inference: str, n: int, kls) -> np.ndarray:
    """:func:`~ctrl_offline.maths.planner.tradeoff_curve` at each KL in ``kls``, NaN where β cannot be solved for it.

    A KL beyond what the planner resolves (over its maximum, or out of reach for the transform)
    raises there; a figure draws the rest of the curve and leaves a gap.
    """
    out = np.full(len(kls), np.nan)
    for i, kl in enumerate(kls):
        try:
            out[i] = tradeoff_curve(transform, inference, n, [kl])[0]
        except ValueError:
            continue
    return out


def plot_plan(plan: Plan, path: str | os.PathLike, num_points: int = 24) -> None:
    """Draw each planned transform's inference-time win rate against KL, marking the budget (closed forms only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kls = np.geomspace(min(0.01, plan.kl / 10), max(2.0 * plan.kl, 1.0), num_points)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = ["-", "--", "-.", ":"]
    for i, row in enumerate(plan.rows):
        transform = get_transform(row.transform, row.t)
        label = transform.name if row.t is None else f"{transform.name} (t={row.t:.3g})"
        ax.plot(kls, tradeoff_points(transform, plan.inference, plan.n, kls), styles[i % 4], label=label)
        ax.scatter([row.kl], [row.win_rate], s=18)
    ax.axvline(plan.kl, color="grey", linestyle=":", linewidth=1)
    procedure = get_procedure(plan.inference).description
    ax.set_xscale("log")
    ax.set_xlabel("KL(π ‖ π_ref)  [nats]")
    ax.set_ylabel(f"{plan.inference}-{plan.n} win rate vs reference")
    ax.set_title(f"Inference-aware tradeoff: {procedure}, N = {plan.n}, budget KL = {plan.kl:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keeps the format matplotlib infers
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
