#!/usr/bin/env bash
# The prepared GPU check (issue 15, item 7), as one command for a GPU machine without network.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # here, with network: fills benchmarks/wheels/ (git-ignored)
#   bash benchmarks/gpu_check.sh             # there, with benchmarks/wheels carried along
#   bash benchmarks/gpu_check.sh --toy       # any machine: tiny sizes (extra flags go to gpu_check.py)
#
# 1. Installs, offline and without dependency resolution, each package of benchmarks/wheels/ whose module
#    cannot be found by this Python (benchmarks/install_wheels.sh): bitsandbytes, trl, datasets, their
#    small needs, gguf and vaderSentiment.
# 2. Runs benchmarks/gpu_check.py --budget "${GPU_CHECK_BUDGET:-400}" --out "${OUT:-runs/gpu_check}" "$@", which
#    keeps itself within its budget (a --budget among the flags wins; the installation takes a few seconds more).
# 3. Runs benchmarks/bench_grouped.py --json --repeats 1 (grouped rows vs pair rows vs TRL's DPOTrainer, the
#    invocation of docs/trainer_benchmark.md, one run per trainer) under its own limit (GROUPED_TIMEOUT, 170 s),
#    its output in bench_grouped.log beside gpu_check.json. Both together: under 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/wheels}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

source benchmarks/install_wheels.sh
export GPU_CHECK_INSTALLED="${installable[*]}"

"$PY" benchmarks/gpu_check.py --budget "${GPU_CHECK_BUDGET:-400}" --out "${OUT:-runs/gpu_check}" "$@"
status=$?

out_dir=${OUT:-runs/gpu_check}
case "$out_dir" in *.json) out_dir=$(dirname "$out_dir") ;; esac
mkdir -p "$out_dir"
timeout "${GROUPED_TIMEOUT:-170}" "$PY" benchmarks/bench_grouped.py --json --repeats 1 >"$out_dir/bench_grouped.log" 2>&1 \
    || echo "bench_grouped.py failed or ran out of time (exit $?): see $out_dir/bench_grouped.log"
grep -v '^{' "$out_dir/bench_grouped.log" | tail -n 16
exit $status
