"""Anthropic HH helpfulness, aligned for best-of-N decoding with CTRL.

    accelerate launch recipes/hh_bon.py --config recipes/configs/hh_bon.yaml
    python recipes/hh_bon.py --config recipes/configs/hh_bon_tiny.yaml --output_dir runs/tiny   # CPU, no network

prompts → K reference samples → reward → per-prompt calibration → planner's transform and β for
best-of-N at the KL budget → training rows (reference pairs, or the pointwise targets of on-policy
rounds: docs/rounds.md) → QLoRA → best-of-N / worst-of-N win rates and KL → Hub. Each stage is skipped when its output exists. Every setting is in the YAML
file (without --config: configs/hh_bon.yaml); any key can be overridden on the command line
(``--learning_rate 1e-4``). The pipeline is ``ctrl_pipeline.py`` beside this file.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ctrl_pipeline, however this script is launched

from ctrl_pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_config=HERE / "configs" / "hh_bon.yaml"))
