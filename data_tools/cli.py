"""`ctrl-data <stage>`: thin argument parsing over ctrl_offline's library functions.

Errors in the input (bad files, bad values, bad arguments) print one clear line on stderr and
exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXAMPLES_CALIBRATE = """examples:
  ctrl-data calibrate scored.parquet --out calib/
      tables of the reference samples + every row's leave-one-out u
  ctrl-data calibrate policy_scored.parquet --tables calib/ --out policy_calib/
      calibrate other responses (e.g. policy samples) against existing tables
"""

EXAMPLES_PLAN = """examples:
  ctrl-data plan --inference bon --n 4 --kl 0.5
  ctrl-data plan --inference won --n 8 --kl 1 --json
  ctrl-data plan --inference bon --n 4 --kl 0.5 --plot tradeoff.png
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrl-data", description="Build calibrated, inference-aware training data.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    cal = stages.add_parser(
        "calibrate",
        help="per-prompt quantile tables and calibrated rewards u",
        description="Build per-prompt quantile tables from scored reference samples and add the calibrated "
        "reward u to every row (leave-one-out for the reference set itself).",
        epilog=EXAMPLES_CALIBRATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cal.add_argument("scored", help="Parquet file, Parquet folder or datasets folder with prompt_id, sample_idx, reward")
    cal.add_argument("--out", required=True, help="output folder (tables.parquet, calibrated.parquet)")
    cal.add_argument("--tables", help="existing tables (file or calibrate output folder) to apply instead of building")
    cal.add_argument("--min-k", type=int, default=2, help="fewest reference samples a prompt may have (default 2)")
    cal.add_argument("--reward-column", default="reward", help="column holding the reward (default: reward)")
    cal.add_argument(
        "--leave-one-out-column",
        help="with --tables: boolean column marking rows that are their prompt's own reference samples",
    )
    cal.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    cal.set_defaults(func=_run_calibrate)

    pl = stages.add_parser(
        "plan",
        help="choose transform, t and β for an inference procedure and a KL budget",
        description="Predict the inference-time win rate of each transform family at a KL budget "
        "(closed forms of the tilted policy) and pick exp/negexp's best t.",
        epilog=EXAMPLES_PLAN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("--inference", required=True, choices=["bon", "won"], help="best-of-N or worst-of-N")
    pl.add_argument("--n", required=True, type=_positive_int, help="number of candidates N")
    pl.add_argument("--kl", required=True, type=_positive_float, help="KL budget in nats")
    pl.add_argument("--transforms", nargs="+", default=None, help="families to tune (default: identity log exp negexp)")
    pl.add_argument("--t-range", nargs=2, type=_positive_float, default=None, metavar=("LOW", "HIGH"),
                    help="search range of t for exp/negexp (default 0.01 40)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    pl.add_argument("--plot", metavar="FILE.png", help="draw win rate vs KL for the planned transforms")
    pl.set_defaults(func=_run_plan)
    return parser


def _run_calibrate(args) -> int:
    from ctrl_offline.stages import calibrate_scored

    if args.leave_one_out_column and not args.tables:
        raise ValueError("--leave-one-out-column only applies with --tables (the reference set is always leave-one-out)")
    result = calibrate_scored(
        args.scored,
        args.out,
        tables=args.tables,
        min_k=args.min_k,
        reward_column=args.reward_column,
        leave_one_out_column=args.leave_one_out_column,
        overwrite=args.overwrite,
    )
    written = [p for p in (result.tables_path, result.calibrated_path) if p is not None]
    print(f"calibrated {result.num_rows:,} rows over {result.num_prompts:,} prompts in {result.seconds:.1f}s")
    for path in written:
        print(f"  wrote {path}")
    return 0


def _format_plan(plan) -> str:
    header = ["transform", "t", "beta", "KL", "standard win rate", f"{plan.inference}-{plan.n} win rate"]
    rows = [
        [r.transform, "-" if r.t is None else f"{r.t:.4g}", f"{r.beta:.4g}", f"{r.kl:.4f}",
         f"{r.standard_win_rate:.4f}", f"{r.win_rate:.4f}"]
        for r in plan.rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    best = plan.best()
    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    out.append(f"best for {plan.inference}-{plan.n} at KL {plan.kl:g}: {best.transform}"
               + ("" if best.t is None else f" (t={best.t:.4g})") + f", beta={best.beta:.4g}")
    return "\n".join(out)


def _run_plan(args) -> int:
    from ctrl_offline.planner import DEFAULT_FAMILIES, DEFAULT_T_RANGE, plan

    result = plan(
        args.inference,
        args.n,
        args.kl,
        families=tuple(args.transforms or DEFAULT_FAMILIES),
        t_range=tuple(args.t_range or DEFAULT_T_RANGE),
    )
    if args.plot:
        from ctrl_offline.plotting import plot_plan

        plot_plan(result, args.plot)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(_format_plan(result))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # input errors: one line, no traceback
        print(f"ctrl-data {args.stage}: error: {err}", file=sys.stderr)
        return 2
