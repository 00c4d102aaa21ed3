"""KL efficiency measured in the exact LM testbed, shipped with the package so plans can state it.

The planner's promise (this win rate at this KL) holds for the exact tilt; how much of it training
keeps is measured, not derived: ``benchmarks/testbed.py --write-efficiency`` writes
``data/testbed_efficiency.json`` from its runs (docs/lm_testbed.md, docs/results.md "Spending the KL
on the tilt"), and ``ctrl-data plan`` prints the rows that match the plan it makes. KL efficiency and
plan fidelity are defined in docs/diagnostics.md §2.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

__all__ = ["EFFICIENCY_FILE", "measured_efficiency", "format_measured"]

EFFICIENCY_FILE = Path(__file__).parent / "data" / "testbed_efficiency.json"


@lru_cache(maxsize=1)
def _load(path: str) -> dict:
    file = Path(path)
    return json.loads(file.read_text()) if file.exists() else {"rows": []}


def measured_efficiency(transform: str, procedure: str, path: str | Path = EFFICIENCY_FILE) -> list[dict]:
    """The testbed rows for a transform family (``"exp"``) on a procedure (``"bon-4"``), every training and K."""
    return [row for row in _load(str(path))["rows"] if row["transform"] == transform and row["procedure"] == procedure]


def format_measured(transform: str, procedure: str, path: str | Path = EFFICIENCY_FILE) -> list[str]:
    """One line per training: the KL efficiency and plan fidelity the testbed measured, or nothing."""
    data = _load(str(path))
    lines = []
    for row in measured_efficiency(transform, procedure, path):
        lines.append(f"  {row['training']}, K={row['k']}, KL {row['kl']:g}: KL efficiency {row['kl_efficiency']:.2f}, "
                     f"plan fidelity {row['plan_fidelity']:.2f} ({row['seeds']} seeds)")
    if lines:
        lines.insert(0, f"measured in the exact LM testbed for {transform} on {procedure} "
                        f"({data.get('date', '?')}, docs/results.md):")
    return lines
