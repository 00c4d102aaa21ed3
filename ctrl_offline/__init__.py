"""ctrl-offline: inference-aware offline alignment by calibrating and transforming rewards.

The numeric core (calibration, transforms, theory, planner) imports numpy/scipy/pandas only;
file-level stages live in :mod:`ctrl_offline.stages`.
"""

__version__ = "0.1.0"

from .calibration import CalibrationError, CalibrationTables, build_tables, calibrate, calibrate_reference
from .planner import Plan, PlanRow, plan, solve_beta, tradeoff_curve
from .theory import (
    bon_win_rate,
    inference_win_rate,
    kl_divergence,
    monte_carlo_win_rate,
    sample_tilted,
    standard_win_rate,
    tilted_density,
    won_win_rate,
)
from .stages import calibrate_scored, load_tables, save_tables
from .transforms import Transform, available_transforms, get_transform, register_transform

__all__ = [
    "__version__",
    "CalibrationError",
    "CalibrationTables",
    "build_tables",
    "calibrate",
    "calibrate_reference",
    "Transform",
    "available_transforms",
    "get_transform",
    "register_transform",
    "tilted_density",
    "kl_divergence",
    "standard_win_rate",
    "bon_win_rate",
    "won_win_rate",
    "inference_win_rate",
    "monte_carlo_win_rate",
    "sample_tilted",
    "Plan",
    "PlanRow",
    "plan",
    "solve_beta",
    "tradeoff_curve",
    "calibrate_scored",
    "load_tables",
    "save_tables",
]
