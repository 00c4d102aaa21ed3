#!/usr/bin/env bash
# The prepared GPU check (issue 15, item 7), as one command for a GPU machine without network.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # here, with network: fills benchmarks/wheels/ (git-ignored)
#   bash benchmarks/gpu_check.sh             # there, with benchmarks/wheels carried along
#   bash benchmarks/gpu_check.sh --toy       # any machine: tiny sizes (extra flags go to gpu_check.py)
#
# 1. Installs, offline and without dependency resolution, each package of benchmarks/wheels/ whose module
#    cannot be found (find_spec) by this Python: bitsandbytes, trl, datasets, dill, multiprocess, xxhash,
#    fsspec. Into the Python's own environment; where that is not writable, into /tmp/gpu_check_site,
#    put on PYTHONPATH.
# 2. Runs benchmarks/gpu_check.py --out "${OUT:-runs/gpu_check}" "$@", which keeps itself within its
#    budget (500 s by default; the installation takes a few seconds more): under 9 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/wheels}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

missing=$("$PY" - <<'EOF'
import importlib.util
# distribution name: module name
wanted = {"bitsandbytes": "bitsandbytes", "trl": "trl", "datasets": "datasets", "dill": "dill",
          "multiprocess": "multiprocess", "xxhash": "xxhash", "fsspec": "fsspec"}
print(" ".join(dist for dist, module in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)
installable=()
for dist in $missing; do
    if compgen -G "$WHEELS/${dist}-*.whl" >/dev/null; then
        installable+=("$dist")
    else
        echo "gpu_check.sh: $dist is missing and $WHEELS has no wheel of it (run benchmarks/fetch_gpu_wheels.sh" \
             "and carry $WHEELS); the parts that need it will fail and say so"
    fi
done
if [ ${#installable[@]} -gt 0 ]; then
    echo "gpu_check.sh: installing from $WHEELS: ${installable[*]}"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --find-links "$WHEELS" "${installable[@]}"; then
        echo "gpu_check.sh: could not install into $("$PY" -c 'import sys; print(sys.prefix)'); trying /tmp/gpu_check_site"
        "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --find-links "$WHEELS" \
            --target /tmp/gpu_check_site "${installable[@]}" \
            && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
    fi
else
    echo "gpu_check.sh: nothing to install (all of bitsandbytes, trl, datasets and their small needs are present)"
fi
export GPU_CHECK_INSTALLED="${installable[*]}"

"$PY" benchmarks/gpu_check.py --out "${OUT:-runs/gpu_check}" "$@"
