"""Pipeline stages: each reads the previous stage's files and writes its own (DESIGN.md §1)."""

from .calibrate import CalibrateResult, calibrate_scored, load_tables, save_tables

__all__ = ["CalibrateResult", "calibrate_scored", "load_tables", "save_tables"]
