"""Anthropic HH harmlessness, aligned for worst-of-N (red-teaming) with CTRL and the negexp transform.

    accelerate launch recipes/hh_won.py --config recipes/configs/hh_won.yaml
    python recipes/hh_won.py --config recipes/configs/hh_won_tiny.yaml --output_dir runs/tiny-won   # CPU, no network

Worst-of-N asks that the *worst* of N samples still scores well, so the tilt falls on the bottom of
the calibrated reward: the negexp transform, with t and β from the planner at the KL budget.
"""

import sys

from ctrl_offline.recipe import main

DEFAULTS = {
    "dataset_name": "Anthropic/hh-rlhf",
    "dataset_subsets": ["harmless-base"],
    "inference": "won",
    "transform": "negexp",
    "model_name_or_path": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

if __name__ == "__main__":
    sys.exit(main(defaults=DEFAULTS))
