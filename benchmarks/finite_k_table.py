"""Planned vs reached, per estimator and K: the table of docs/finite_k.md.

For each setting, two plans side by side:
* the K = ∞ plan (today's `ctrl-data plan` without --k): its β trained at K — what the finite-K theory
  predicts and what the testbed reaches;
* the K-aware plan (`plan(k=K, loss=...)`, same t): planned KL / win rate and what the testbed reaches.

    python benchmarks/finite_k_table.py [--prompts 4000] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from ctrl_offline.maths.finite_k import Estimator, trained_tilt
from ctrl_offline.maths.planner import plan, solve_beta, solve_trained_beta
from ctrl_offline.testbeds.testbed import run_testbed
from ctrl_offline.maths.transforms import get_transform

SETTINGS = [  # (procedure, N, KL budget, K, estimators)
    ("bon", 4, 0.5, 8, [Estimator("dpo"), Estimator("ipo"), Estimator("distill"), Estimator("pointwise"),
                        Estimator("pointwise", log_partition="continuous"), Estimator("weighted_sft"),
                        Estimator("dpo", targets="cell"), Estimator("pointwise", targets="cell")]),
    ("bon", 4, 0.5, 4, [Estimator("dpo"), Estimator("pointwise"), Estimator("weighted_sft")]),
    ("bon", 4, 0.5, 16, [Estimator("dpo"), Estimator("pointwise"), Estimator("weighted_sft")]),
    ("won", 4, 0.5, 8, [Estimator("dpo"), Estimator("ipo"), Estimator("pointwise"), Estimator("weighted_sft")]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    start = time.time()
    for inference, n, kl, k, estimators in SETTINGS:
        family = "exp" if inference == "bon" else "negexp"
        ideal = next(r for r in plan(inference, n, kl, families=(family,)).rows)
        transform = get_transform(ideal.transform, ideal.t)
        for est in estimators:
            name = f"{est.loss}/{est.targets}" + (f"/{est.log_partition}" if est.loss == "pointwise" else "")
            row = {"procedure": f"{inference}-{n}", "transform": transform.spec, "K": k, "estimator": name,
                   "ideal_plan": {"kl": ideal.kl, "win_rate": ideal.win_rate}}
            try:
                predicted = trained_tilt(transform, ideal.beta, k, est)
                reached = run_testbed(transform, ideal.beta, k, est, prompts=args.prompts, n=n, seed=1)
                row["k_infinity_beta"] = {"predicted_kl": predicted.kl(),
                                          "predicted_win_rate": predicted.win_rate(inference, n),
                                          "reached_kl": reached.kl,
                                          "reached_win_rate": getattr(reached, f"{inference}_win_rate")}
            except ValueError as err:
                row["k_infinity_beta"] = {"error": str(err).split(";")[0]}
            beta = solve_trained_beta(transform, kl, k, est)
            planned = trained_tilt(transform, beta, k, est)
            reached = run_testbed(transform, beta, k, est, prompts=args.prompts, n=n, seed=2)
            row["k_aware"] = {"beta": beta, "planned_kl": planned.kl(), "planned_win_rate": planned.win_rate(inference, n),
                              "reached_kl": reached.kl, "reached_win_rate": getattr(reached, f"{inference}_win_rate")}
            rows.append(row)
    if args.json:
        print(json.dumps({"rows": rows, "prompts": args.prompts, "seconds": time.time() - start}, indent=1))
        return
    head = ("procedure", "t", "K", "estimator", "K=∞ plan KL/win", "K=∞ β: predicted", "K=∞ β: reached",
            "K-aware: planned", "K-aware: reached")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        a, b = r["k_infinity_beta"], r["k_aware"]
        inf = (f"{a['predicted_kl']:.2f} / {a['predicted_win_rate']:.3f}", f"{a['reached_kl']:.2f} / {a['reached_win_rate']:.3f}") \
            if "error" not in a else ("no minimiser", "—")
        print(" | ".join([r["procedure"], r["transform"], str(r["K"]), r["estimator"],
                          f"{r['ideal_plan']['kl']:.2f} / {r['ideal_plan']['win_rate']:.3f}", *inf,
                          f"{b['planned_kl']:.2f} / {b['planned_win_rate']:.3f}",
                          f"{b['reached_kl']:.2f} / {b['reached_win_rate']:.3f}"]))
    print(f"\n{args.prompts} prompts per testbed run; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
