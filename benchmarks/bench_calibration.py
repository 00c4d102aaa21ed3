"""Calibration throughput: ctrl_offline against a pandas groupby().rank() baseline, side by side.

    python benchmarks/bench_calibration.py                 # 1M and 10M samples, K = 10
    python benchmarks/bench_calibration.py --json --io     # + the file stage; last line is JSON

Synthetic scored reference samples: n // K prompts with 16-hex-digit ids (like the hashes the
pipeline uses), K samples each, rows shuffled, rewards rounded to 2 decimals (many ties).
Ours: ``calibrate_reference`` (leave-one-out mid-rank u and the tables). Baseline: what a user
would write in pandas, ``(groupby.rank(method="average") − 1) / (group size − 1)``, DataFrame
construction included. Both outputs are checked equal.

Applying the tables to n new rewards: ``calibrate`` (bisection inside each prompt's sorted table)
against the concatenate-and-sort approach it replaced (``pd.Index.get_indexer`` for the ids, the
tables and the new rows sorted together by (prompt, reward), run-length counts), outputs checked equal.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from ctrl_offline.calibration import _group_sort, _midrank_counts, calibrate, calibrate_reference


def synthetic(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = n // k
    raw = np.unique(rng.integers(0, 2**64 - 1, size=prompts, dtype=np.uint64, endpoint=True))
    while len(raw) < prompts:  # a 64-bit collision among 1M ids is ~3e-8 likely; keep the count exact anyway
        raw = np.unique(np.concatenate([raw, rng.integers(0, 2**64 - 1, size=prompts - len(raw), dtype=np.uint64,
                                                          endpoint=True)]))
    # Object array of str, as pyarrow's string column .to_numpy() gives the pipeline.
    hex_ids = np.char.mod("%016x", rng.permutation(raw)).astype(object)
    perm = rng.permutation(prompts * k)
    codes = np.repeat(np.arange(prompts), k)[perm]
    ids = hex_ids[codes]
    sample_idx = np.tile(np.arange(k), prompts)[perm]
    rewards = np.round(rng.normal(size=prompts * k) + rng.normal(size=prompts)[codes], 2)
    return ids, sample_idx, rewards


def timed(fn):
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def best_of(repeats: int, fn):
    times, out = [], None
    for _ in range(repeats):
        out = None
        seconds, out = timed(fn)
        times.append(seconds)
    return min(times), out


def alternating(repeats: int, ours, baseline):
    """Time ours and the baseline in turn within each repeat, so a burst of load on the machine
    hits both alike. Returns both lists of seconds and the last output of each."""
    ours_times, baseline_times, ours_out, baseline_out = [], [], None, None
    for _ in range(repeats):
        ours_out = baseline_out = None  # free the last repeat's outputs before timing again
        seconds, ours_out = timed(ours)
        ours_times.append(seconds)
        seconds, baseline_out = timed(baseline)
        baseline_times.append(seconds)
    return ours_times, baseline_times, ours_out, baseline_out


def pandas_baseline(ids, rewards):
    frame = pd.DataFrame({"prompt_id": ids, "reward": rewards})
    groups = frame.groupby("prompt_id", sort=False)["reward"]
    return ((groups.rank(method="average") - 1) / (groups.transform("size") - 1)).to_numpy()


def concat_sort_baseline(tables, ids, rewards):
    """Ĉ of new rewards by sorting them together with the tables (the pre-bisection ``calibrate``)."""
    codes = pd.Index(tables.prompt_ids).get_indexer(ids)
    table_codes = np.repeat(np.arange(len(tables)), tables.k)
    all_codes = np.concatenate([table_codes, codes])
    all_rewards = np.concatenate([tables.rewards, rewards])
    is_table = np.concatenate([np.ones(len(table_codes), bool), np.zeros(len(codes), bool)])
    less, equal = _midrank_counts(all_codes, all_rewards, _group_sort(all_codes, all_rewards), is_table)
    return (less[~is_table] + 0.5 * equal[~is_table]) / tables.k[codes]


def run_size(n: int, k: int, repeats: int, seed: int, with_io: bool) -> dict:
    ids, sample_idx, rewards = synthetic(n, k, seed)
    ours_times, pandas_times, (tables, u), expected = alternating(
        repeats, lambda: calibrate_reference(ids, rewards, sample_idx=sample_idx),
        lambda: pandas_baseline(ids, rewards))
    ours_s, pandas_s = min(ours_times), min(pandas_times)
    diff = float(np.max(np.abs(u - expected)))
    if diff > 1e-12:
        raise SystemExit(f"ours and pandas disagree by {diff} at n={n}")
    new_rewards = np.round(np.random.default_rng(seed + 1).normal(size=len(rewards)), 2)
    apply_times, sort_times, applied, by_sort = alternating(
        repeats, lambda: calibrate(tables, ids, new_rewards), lambda: concat_sort_baseline(tables, ids, new_rewards))
    if not np.array_equal(applied, by_sort):
        raise SystemExit(f"calibrate and the concatenate-and-sort baseline disagree at n={n}")
    apply_s, sort_s = min(apply_times), min(sort_times)
    result = {"n": n, "prompts": n // k, "k": k, "seconds": ours_s, "pandas_seconds": pandas_s,
              "ratio_vs_pandas": pandas_s / ours_s, "rows_per_s": n / ours_s, "apply_tables_seconds": apply_s,
              "apply_sort_baseline_seconds": sort_s, "apply_ratio_vs_sort": sort_s / apply_s,
              "max_abs_diff": diff, "ours_all_seconds": ours_times, "pandas_all_seconds": pandas_times}
    if with_io:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ctrl_offline.stages.calibrate import calibrate_scored

        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(pa.table({"prompt_id": ids.astype(str), "sample_idx": sample_idx, "reward": rewards}),
                           f"{tmp}/scored.parquet")
            io_s, _ = best_of(repeats, lambda: calibrate_scored(f"{tmp}/scored.parquet", f"{tmp}/out", overwrite=True))
            # The apply stage (ctrl-data calibrate --tables): read the tables back, calibrate new rows.
            pq.write_table(pa.table({"prompt_id": ids.astype(str), "reward": new_rewards}), f"{tmp}/policy.parquet")
            apply_io_s, _ = best_of(repeats, lambda: calibrate_scored(
                f"{tmp}/policy.parquet", f"{tmp}/applied", tables=f"{tmp}/out", overwrite=True))
        result["file_stage_seconds"] = io_s
        result["apply_file_stage_seconds"] = apply_io_s
    del ids, sample_idx, rewards, tables, u, expected, new_rewards, applied, by_sort
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--io", action="store_true",
                        help="also time the whole file stages, build and apply (Parquet in and out)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args()

    load_before = os.getloadavg()
    results = [run_size(n, args.k, args.repeats, args.seed, args.io) for n in args.sizes]
    print(f"{'samples':>11} {'prompts':>9} {'ours s':>8} {'pandas s':>9} {'speed-up':>9} {'rows/s':>12} "
          f"{'apply s':>8} {'by sort s':>10} {'speed-up':>9}"
          + (f" {'file stage s':>13} {'apply stage s':>14}" if args.io else ""))
    for r in results:
        print(f"{r['n']:>11,} {r['prompts']:>9,} {r['seconds']:>8.2f} {r['pandas_seconds']:>9.2f} "
              f"{r['ratio_vs_pandas']:>8.2f}x {r['rows_per_s']:>12,.0f} {r['apply_tables_seconds']:>8.2f} "
              f"{r['apply_sort_baseline_seconds']:>10.2f} {r['apply_ratio_vs_sort']:>8.2f}x"
              + (f" {r['file_stage_seconds']:>13.2f} {r['apply_file_stage_seconds']:>14.2f}" if args.io else ""))
    largest = max(results, key=lambda r: r["n"])
    if args.json:
        print(json.dumps({
            "seconds": largest["seconds"],
            "ratio_vs_pandas": largest["ratio_vs_pandas"],
            "n": largest["n"],
            "results": results,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                        "pandas": pd.__version__, "platform": platform.platform(),
                        # 1-minute load average before and after: > 0 means other work shared the cores
                        "loadavg_1min_before": load_before[0], "loadavg_1min_after": os.getloadavg()[0]},
            "date": datetime.date.today().isoformat(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        }))


if __name__ == "__main__":
    main()
