"""The calibrated rows training targets are built from: their checks and each row's node value.

The rows are those of the ``build`` stage, one per response: a prompt id and Ĉ = u ∈ [0, 1]
(:mod:`ctrl_offline.maths.calibration`). Prompt ids become integer codes 0, 1, … in order of first
appearance, and every per-prompt quantity is group arithmetic on those codes
(:mod:`ctrl_offline.maths.groups`), so millions of rows need no loop per prompt. Pairs
(:mod:`ctrl_offline.rows.pairs`), pointwise targets and weights (:mod:`ctrl_offline.rows.pointwise`) start
from :func:`prepare`, and their outputs index, or align with, these rows.

With ρ = log π_θ − log π_ref, the tilted policy π* ∝ π_ref·exp(Φ(Ĉ)/β) is the unique solution of
β·ρ(x, y) = Φ(Ĉ(x, y)) − β·log Z (docs/theory.md §4–5). The *node value* of a row is what stands
for Φ(Ĉ) there (``targets``, docs/finite_k.md §2, §5):

* ``"loo"``: Φ(u), the transformed leave-one-out calibrated reward;
* ``"cell"``: the tilt's mass on the row's quantile cell among its prompt's K samples, finite for
  ``log`` (Φ(0) = −∞).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from ctrl_offline.maths.groups import group_size_of_row
from ctrl_offline.maths.prompt_ids import SHOW, name_rows_and_prompts, name_some
from ctrl_offline.maths.theory import cell_values
from ctrl_offline.maths.transforms import SynthesisError, Transform, as_transform, check_beta

__all__ = ["TARGET_SCHEMES", "CalibratedRows", "prepare", "samples_per_prompt"]

TARGET_SCHEMES = ("loo", "cell")


class CalibratedRows(NamedTuple):
    """Validated rows: ``codes`` number the prompts 0, 1, … in order of first appearance
    (``uniques[code]`` is the prompt id), ``phi`` is each row's node value."""

    codes: np.ndarray
    uniques: np.ndarray
    u: np.ndarray
    phi: np.ndarray
    beta: float
    transform: Transform


def prepare(prompt_ids, u, transform, beta, *, allow_minus_inf: bool = False, targets: str = "loo",
            k=None) -> CalibratedRows:
    """Validated rows and their node values: Φ(u) (``targets="loo"``) or the tilt's mass on the row's
    quantile cell (``"cell"``; ``k`` as in :func:`samples_per_prompt`).

    Raises :class:`SynthesisError` naming the rows with a missing prompt id, u outside [0, 1], or a
    non-finite node value (−∞ passes with ``allow_minus_inf``).
    """
    if targets not in TARGET_SCHEMES:
        raise SynthesisError(f"targets must be one of {', '.join(TARGET_SCHEMES)}, got {targets!r}")
    prompt_ids = np.asarray(prompt_ids)
    try:
        u = np.asarray(u, dtype=float)
    except (TypeError, ValueError):
        raise SynthesisError("calibrated values u must be numbers") from None
    if u.ndim != 1 or prompt_ids.shape != u.shape:
        raise SynthesisError(
            f"prompt ids and u must be 1-D arrays of one length, got shapes {prompt_ids.shape} and {u.shape}"
        )
    beta = check_beta(beta)
    transform = as_transform(transform)
    codes, uniques = pd.factorize(prompt_ids)
    if np.any(codes < 0):
        missing = np.flatnonzero(codes < 0)
        raise SynthesisError(
            f"{len(missing)} row(s) have a missing prompt id (None/NaN): {name_some(missing, 'rows')}"
        )
    bad = ~((u >= 0) & (u <= 1))  # NaN fails both comparisons
    if bad.any():
        raise SynthesisError(f"{int(bad.sum())} calibrated value(s) u are NaN or outside [0, 1]: "
                             f"{name_rows_and_prompts(bad, prompt_ids)}")
    codes = codes.astype(np.int64)
    if targets == "cell":
        phi = _cell_node_values(codes, len(uniques), u, transform, beta, k, prompt_ids)
    else:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            phi = np.asarray(transform.phi(u), dtype=float)
    bad = ~np.isfinite(phi)
    if allow_minus_inf:
        bad &= phi != -np.inf
    if bad.any():
        raise SynthesisError(
            f"transform {transform.spec!r} gives a non-finite Φ(u) for {int(bad.sum())} row(s): "
            f"{name_rows_and_prompts(bad, prompt_ids)}, u = {u[bad][:SHOW].tolist()}. The tilted policy gives such "
            "responses zero (or unbounded) weight, so no finite margin or target exists; drop those rows or use "
            "a transform that is finite on [0, 1] (log has Φ(0) = −∞)"
        )
    return CalibratedRows(codes, np.asarray(uniques), u, phi, beta, transform)


def samples_per_prompt(codes: np.ndarray, n_groups: int, k, prompt_ids) -> np.ndarray:
    """K of each row's prompt: ``k`` (an integer or one per row), or the prompt's row count."""
    if k is None:
        per_row = group_size_of_row(codes, n_groups)
    else:
        per_row = np.broadcast_to(np.asarray(k), codes.shape)
        if not np.issubdtype(per_row.dtype, np.integer):
            raise SynthesisError(f"k must be an integer or one integer per row, got {k!r}")
    small = per_row < 2
    if small.any():
        raise SynthesisError(f"cell targets and the population normaliser need K ≥ 2 reference samples per prompt: "
                             f"{name_rows_and_prompts(small, prompt_ids)}")
    return per_row.astype(np.int64)


def _cell_node_values(codes, n_groups, u, transform, beta, k, prompt_ids) -> np.ndarray:
    """The tilt's mass on each row's quantile cell (docs/finite_k.md §5).

    A row of leave-one-out u among K samples with e − 1 others tied to it and b below
    (u = (b + (e − 1)/2)/(K − 1)) shares the block of cells [b/K, (b + e)/K] with its ties:
    value β·log(K/e·∫_{b/K}^{(b+e)/K} e^{Φ/β}).
    """
    k_row = samples_per_prompt(codes, n_groups, k, prompt_ids)
    # e: rows of the same prompt with the same u (the prompt's reference samples are its rows).
    _, tie_code = np.unique(np.stack([codes.astype(float), u]), axis=1, return_inverse=True)
    ties = np.bincount(tie_code.ravel())[tie_code.ravel()]
    below = np.rint(u * (k_row - 1) - (ties - 1) / 2.0)
    if np.any(below < 0) or np.any(below + ties > k_row):
        bad = (below < 0) | (below + ties > k_row)
        raise SynthesisError(f"u does not look like leave-one-out ranks among K samples for {int(bad.sum())} row(s): "
                             f"{name_rows_and_prompts(bad, prompt_ids)}; cell targets need each prompt's reference "
                             "samples and their K")
    return cell_values(transform, beta, below / k_row, (below + ties) / k_row)
