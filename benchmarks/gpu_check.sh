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
# 2. Runs benchmarks/gpu_check.py --out "${OUT:-runs/gpu_check}" "$@", which keeps itself within its
#    budget (500 s by default; the installation takes a few seconds more): under 9 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/wheels}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

source benchmarks/install_wheels.sh
export GPU_CHECK_INSTALLED="${installable[*]}"

"$PY" benchmarks/gpu_check.py --out "${OUT:-runs/gpu_check}" "$@"
