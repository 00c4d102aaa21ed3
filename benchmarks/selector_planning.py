"""What the simulated planner predicts for raw-reward selectors, on light- and heavy-tailed tables.

    python benchmarks/selector_planning.py

Synthetic quantile tables (2,000 prompts × K = 64 reference rewards): Gaussian (light tail) and
Pareto(1.5) (heavy tail). For best-of-8 the simulation is checked against the closed form; for
soft best-of-8 (λ = 0.1) and Best-of-Tails (λ = 0.1, κ₀ = 0.1) it gives each family's best t and
predicted win rate at KL = 0.5 (the planner's search over t, with its trainable-β guard).
"""

import numpy as np

from ctrl_offline.maths.calibration import build_tables
from ctrl_offline.maths.planner import plan

rng = np.random.default_rng(0)
ids = np.repeat(np.arange(2000), 64)
worlds = {"light (Gaussian)": rng.normal(size=len(ids)), "heavy (Pareto 1.5)": rng.pareto(1.5, size=len(ids))}
closed = {r.transform: r for r in plan("bon", 8, 0.5).rows}
print("| rewards | selector | transform | t | predicted win rate | closed form (bon) |")
print("|---|---|---|---:|---:|---:|")
for world, rewards in worlds.items():
    tables = build_tables(ids, rewards)
    for selector in ("bon", "soft_bon", "bot"):
        # simulate=True: best-of-8 is simulated too, to check the simulation against its closed form.
        result = plan(selector, 8, 0.5, tables=tables, simulate=True, simulation_prompts=6000,
                      selector_args={"lam": 0.1})
        for row in result.rows:
            t = "-" if row.t is None else f"{row.t:g}"
            ref = f"{closed[row.transform].win_rate:.3f}" if selector == "bon" and row.t is None else ""
            print(f"| {world} | {selector} | {row.transform} | {t} | {row.win_rate:.3f} | {ref} |")
