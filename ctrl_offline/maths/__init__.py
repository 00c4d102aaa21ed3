"""The maths of calibrated space: pure numpy / scipy, no I/O, no model.

Transforms Φ and their closed forms, the exact theory of the tilted policy, the inference
procedures and their registry, per-prompt calibration, the win-rate estimators (U-statistics,
bootstrap), the finite-K theory of what a loss trains from K samples, the simulated and closed-form
planner, the diagnostics of a trained policy against its plan, the frontier, and the losses as
functions of log-probabilities (torch is imported only when one is computed). Nothing here imports
from the layers above (rows, io, models, training, reports, testbeds, stages, pipeline).
"""
