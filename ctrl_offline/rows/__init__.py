"""Turning calibrated samples into training rows: transformed rewards as preference pairs, pointwise
targets or weights (pure numpy; above :mod:`ctrl_offline.maths`)."""
