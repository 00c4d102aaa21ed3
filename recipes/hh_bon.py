"""Anthropic HH helpfulness, aligned for best-of-N decoding with CTRL.

    accelerate launch recipes/hh_bon.py --config recipes/configs/hh_bon.yaml
    python recipes/hh_bon.py --config recipes/configs/hh_bon_tiny.yaml --output_dir runs/tiny   # CPU, no network

prompts → K reference samples → reward → per-prompt calibration → planner's transform and β for
best-of-N at the KL budget → synthetic pairs → QLoRA (CTRL soft-label DPO) → best-of-N / worst-of-N
win rates and KL → Hub. Each stage is skipped when its output exists. Any config key can be
overridden on the command line (``--learning_rate 1e-4``).
"""

import sys

from ctrl_offline.recipe import main

DEFAULTS = {
    "dataset_name": "Anthropic/hh-rlhf",
    "dataset_subsets": ["helpful-base"],
    "inference": "bon",
    "model_name_or_path": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

if __name__ == "__main__":
    sys.exit(main(defaults=DEFAULTS))
