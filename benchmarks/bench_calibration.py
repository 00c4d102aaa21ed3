"""Calibration throughput: ctrl_offline against a pandas groupby().rank() baseline, side by side.

    python benchmarks/bench_calibration.py                 # 1M and 10M samples, K = 10
    python benchmarks/bench_calibration.py --json --io     # + the file stages; last line is JSON

Synthetic scored reference samples: n // K prompts with random 64-bit ids, K samples each, rows
shuffled, rewards rounded to 2 decimals (many ties). Each size runs twice on the same prompts and
rewards, once per id kind:

* ``int``: the int64 ids the ``sample`` stage writes (the first 64 bits of the prompt's SHA-256);
* ``str``: the same 64 bits as 16 hex digits, Python strings as pyarrow returns a string column
  (what ``sample`` wrote before, and what a user's own string ids cost).

Ours: ``calibrate_reference`` (leave-one-out mid-rank u and the tables). Baseline: what a user
would write in pandas, ``(groupby.rank(method="average") − 1) / (group size − 1)``, DataFrame
construction included, on the same ids. Outputs are checked equal, and the two id kinds must give
the same u.

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

from ctrl_offline.maths.calibration import calibrate, calibrate_reference

ID_KINDS = ("int", "str")


def synthetic(n: int, k: int, seed: int):
    """(int64 ids, the same ids as 16-hex-digit strings, sample_idx, rewards)."""
    rng = np.random.default_rng(seed)
    prompts = n // k
    raw = np.unique(rng.integers(0, 2**64 - 1, size=prompts, dtype=np.uint64, endpoint=True))
    while len(raw) < prompts:  # a 64-bit collision among 1M ids is ~3e-8 likely; keep the count exact anyway
        raw = np.unique(np.concatenate([raw, rng.integers(0, 2**64 - 1, size=prompts - len(raw), dtype=np.uint64,
                                                          endpoint=True)]))
    raw = rng.permutation(raw)
    # Object array of str, as pyarrow's string column .to_numpy() gives the pipeline.
    hex_ids = np.char.mod("%016x", raw).astype(object)
    perm = rng.permutation(prompts * k)
    codes = np.repeat(np.arange(prompts), k)[perm]
    sample_idx = np.tile(np.arange(k), prompts)[perm]
    rewards = np.round(rng.normal(size=prompts * k) + rng.normal(size=prompts)[codes], 2)
    return raw.view(np.int64)[codes], hex_ids[codes], sample_idx, rewards


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


def _group_sort(codes: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Permutation sorting by (code, reward): a reward sort, then a stable sort by code."""
    by_reward = np.argsort(rewards)
    small = codes.astype(np.int32) if codes.size and codes.max() < 2**31 else codes
    return by_reward[np.argsort(small[by_reward], kind="stable")]


def _midrank_counts(codes, rewards, order, is_table):
    """For every element, the number of table entries of its prompt below it and equal to it
    (``order`` sorts by (code, reward); ``is_table`` marks the table entries)."""
    c, r = codes[order], rewards[order]
    n = len(c)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (c[1:] != c[:-1]) | (r[1:] != r[:-1])
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = c[1:] != c[:-1]
    run_start = np.flatnonzero(new_run)
    run_id = np.cumsum(new_run) - 1
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    t = is_table[order].astype(np.int64)
    tables_before = np.concatenate([[0], np.cumsum(t)])
    less_sorted = tables_before[run_start[run_id]] - tables_before[group_start]
    equal_sorted = np.add.reduceat(t, run_start)[run_id] if n else t
    less = np.empty(n, dtype=np.int64)
    equal = np.empty(n, dtype=np.int64)
    less[order] = less_sorted
    equal[order] = equal_sorted
    return less, equal


def concat_sort_baseline(tables, ids, rewards):
    """Ĉ of new rewards by sorting them together with the tables (the pre-bisection ``calibrate``)."""
    codes = pd.Index(tables.prompt_ids).get_indexer(ids)
    table_codes = np.repeat(np.arange(len(tables)), tables.k)
    all_codes = np.concatenate([table_codes, codes])
    all_rewards = np.concatenate([tables.rewards, rewards])
    is_table = np.concatenate([np.ones(len(table_codes), bool), np.zeros(len(codes), bool)])
    less, equal = _midrank_counts(all_codes, all_rewards, _group_sort(all_codes, all_rewards), is_table)
    return (less[~is_table] + 0.5 * equal[~is_table]) / tables.k[codes]


def run_kind(ids, sample_idx, rewards, new_rewards, repeats: int, with_io: bool, kind: str) -> tuple[dict, np.ndarray]:
    n = len(ids)
    ours_times, pandas_times, (tables, u), expected = alternating(
        repeats, lambda: calibrate_reference(ids, rewards, sample_idx=sample_idx),
        lambda: pandas_baseline(ids, rewards))
    ours_s, pandas_s = min(ours_times), min(pandas_times)
    diff = float(np.max(np.abs(u - expected)))
    if diff > 1e-12:
        raise SystemExit(f"ours and pandas disagree by {diff} at n={n} ({kind} ids)")
    apply_times, sort_times, applied, by_sort = alternating(
        repeats, lambda: calibrate(tables, ids, new_rewards), lambda: concat_sort_baseline(tables, ids, new_rewards))
    if not np.array_equal(applied, by_sort):
        raise SystemExit(f"calibrate and the concatenate-and-sort baseline disagree at n={n} ({kind} ids)")
    apply_s, sort_s = min(apply_times), min(sort_times)
    result = {"ids": kind, "seconds": ours_s, "pandas_seconds": pandas_s, "ratio_vs_pandas": pandas_s / ours_s,
              "rows_per_s": n / ours_s, "apply_tables_seconds": apply_s, "apply_sort_baseline_seconds": sort_s,
              "apply_ratio_vs_sort": sort_s / apply_s, "max_abs_diff": diff, "ours_all_seconds": ours_times,
              "pandas_all_seconds": pandas_times}
    if with_io:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ctrl_offline.stages.calibrate import calibrate_scored

        column = pa.array(ids, pa.int64() if kind == "int" else pa.string())
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(pa.table({"prompt_id": column, "sample_idx": sample_idx, "reward": rewards}),
                           f"{tmp}/scored.parquet")
            io_s, _ = best_of(repeats, lambda: calibrate_scored(f"{tmp}/scored.parquet", f"{tmp}/out", overwrite=True))
            # The apply stage (ctrl-data calibrate --tables): read the tables back, calibrate new rows.
            pq.write_table(pa.table({"prompt_id": column, "reward": new_rewards}), f"{tmp}/policy.parquet")
            apply_io_s, _ = best_of(repeats, lambda: calibrate_scored(
                f"{tmp}/policy.parquet", f"{tmp}/applied", tables=f"{tmp}/out", overwrite=True))
        result["file_stage_seconds"] = io_s
        result["apply_file_stage_seconds"] = apply_io_s
    return result, u


def run_size(n: int, k: int, repeats: int, seed: int, with_io: bool) -> dict:
    int_ids, str_ids, sample_idx, rewards = synthetic(n, k, seed)
    new_rewards = np.round(np.random.default_rng(seed + 1).normal(size=len(rewards)), 2)
    result = {"n": n, "prompts": n // k, "k": k}
    u_int = None
    for kind, ids in (("int", int_ids), ("str", str_ids)):
        result[kind], u = run_kind(ids, sample_idx, rewards, new_rewards, repeats, with_io, kind)
        if u_int is None:
            u_int = u
        elif not np.array_equal(u, u_int):
            raise SystemExit(f"integer and string ids give different u at n={n}")
        del u
        gc.collect()
    del int_ids, str_ids, sample_idx, rewards, new_rewards, u_int
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
    print(f"{'samples':>11} {'prompts':>9} {'ids':>4} {'ours s':>8} {'pandas s':>9} {'speed-up':>9} {'rows/s':>12} "
          f"{'apply s':>8} {'by sort s':>10} {'speed-up':>9}"
          + (f" {'file stage s':>13} {'apply stage s':>14}" if args.io else ""))
    for r in results:
        for kind in ID_KINDS:
            m = r[kind]
            print(f"{r['n']:>11,} {r['prompts']:>9,} {kind:>4} {m['seconds']:>8.2f} {m['pandas_seconds']:>9.2f} "
                  f"{m['ratio_vs_pandas']:>8.2f}x {m['rows_per_s']:>12,.0f} {m['apply_tables_seconds']:>8.2f} "
                  f"{m['apply_sort_baseline_seconds']:>10.2f} {m['apply_ratio_vs_sort']:>8.2f}x"
                  + (f" {m['file_stage_seconds']:>13.2f} {m['apply_file_stage_seconds']:>14.2f}" if args.io else ""))
        print(f"{'':>11} {'':>9} int ids: {r['str']['seconds'] / r['int']['seconds']:.2f}x faster than str ids "
              f"(pandas: {r['str']['pandas_seconds'] / r['int']['pandas_seconds']:.2f}x)")
    largest = max(results, key=lambda r: r["n"])
    if args.json:
        print(json.dumps({
            # Headline: the integer ids the sample stage writes.
            "seconds": largest["int"]["seconds"],
            "ratio_vs_pandas": largest["int"]["ratio_vs_pandas"],
            "string_ids_seconds": largest["str"]["seconds"],
            "string_ids_ratio_vs_pandas": largest["str"]["ratio_vs_pandas"],
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
