"""Anthropic HH harmlessness, aligned for worst-of-N (red-teaming) with CTRL and the negexp transform.

    accelerate launch recipes/hh_won.py --config recipes/configs/hh_won.yaml
    python recipes/hh_won.py --config recipes/configs/hh_won_tiny.yaml --output_dir runs/tiny-won   # CPU, no network

Worst-of-N asks that the *worst* of N samples still scores well, so the tilt falls on the bottom of
the calibrated reward: the negexp transform, with t and β from the planner at the KL budget. Every
setting is in the YAML file (without --config: configs/hh_won.yaml); the pipeline is
``ctrl_pipeline.py`` beside this file.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ctrl_pipeline, however this script is launched

from ctrl_pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_config=HERE / "configs" / "hh_won.yaml"))
