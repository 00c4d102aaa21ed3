"""ctrl-offline: inference-aware offline alignment by calibrating and transforming rewards.

The numeric core (calibration, transforms, theory, procedures, planner) imports numpy/scipy/pandas only;
file-level stages live in :mod:`ctrl_offline.stages`.
"""

from ctrl_offline._version import __version__

from ctrl_offline.maths.calibration import CalibrationError, CalibrationTables, build_tables, calibrate, calibrate_reference
from ctrl_offline.maths.diagnostics import (
    PlanDiagnostics,
    exact_kl_split,
    kl_efficiency,
    label_entropy_floor,
    plan_fidelity,
    sampled_kl_split,
    tilt_fidelity,
)
from ctrl_offline.maths.win_rates import (
    decision_verdict,
    paired_bootstrap_difference,
    subset_selection_weights,
    u_statistic_per_prompt,
    u_statistic_win_rate,
)
from ctrl_offline.maths.planner import Plan, PlanRow, plan, solve_beta, tradeoff_curve
from ctrl_offline.maths.procedures import (
    OrderStatistic,
    Procedure,
    closed_form_names,
    drawn_pick,
    get_procedure,
    procedure_names,
    register_procedure,
    select,
    tilted_win_rate,
    unregister_procedure,
)
from ctrl_offline.maths.theory import (
    bon_win_rate,
    kl_divergence,
    monte_carlo_win_rate,
    sample_tilted,
    tilted_density,
    tilted_standard_win_rate,
    won_win_rate,
)
from ctrl_offline.maths.transforms import Transform, available_transforms, get_transform, register_transform

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
    "Procedure",
    "OrderStatistic",
    "register_procedure",
    "unregister_procedure",
    "get_procedure",
    "procedure_names",
    "closed_form_names",
    "select",
    "drawn_pick",
    "tilted_density",
    "kl_divergence",
    "tilted_standard_win_rate",
    "bon_win_rate",
    "won_win_rate",
    "tilted_win_rate",
    "monte_carlo_win_rate",
    "sample_tilted",
    "Plan",
    "PlanRow",
    "plan",
    "solve_beta",
    "tradeoff_curve",
    "u_statistic_win_rate",
    "u_statistic_per_prompt",
    "subset_selection_weights",
    "decision_verdict",
    "paired_bootstrap_difference",
    "PlanDiagnostics",
    "kl_efficiency",
    "plan_fidelity",
    "exact_kl_split",
    "sampled_kl_split",
    "tilt_fidelity",
    "label_entropy_floor",
    # KL budget during training (imported on first use: it pulls in torch / transformers)
    "KLEstimate",
    "KLBudgetCallback",
    "SampledKL",
    # pipeline stages (imported on first use: they pull in torch / transformers / datasets)
    "calibrate_scored",
    "load_tables",
    "save_tables",
    "sample_prompts",
    "score_samples",
    "build_dataset",
    "inspect_output",
    "compare_reports",
]

_LAZY = {
    "calibrate_scored": "stages.calibrate",
    "load_tables": "stages.calibrate",
    "save_tables": "stages.calibrate",
    "sample_prompts": "stages.sample",
    "score_samples": "stages.score",
    "build_dataset": "stages.build",
    "inspect_output": "stages.inspect",
    "compare_reports": "stages.compare",
    "KLEstimate": "training.kl_budget",
    "KLBudgetCallback": "training.kl_budget",
    "SampledKL": "training.kl_budget",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
