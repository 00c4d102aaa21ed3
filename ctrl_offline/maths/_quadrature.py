"""A fixed quadrature rule on [0, 1] for densities of calibrated rewards.

Tilted densities exp(Φ(u)/β)/Z can be sharply peaked next to u = 1 (exp, identity, log at
small β) and have steep fronts inside (negexp at large t). The rule is composite
Gauss–Legendre on uniform panels of width 1/512, with each end panel split dyadically down to
the resolution of a double near 1 (where densities of increasing transforms peak), so peaks
of any representable width are resolved.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_UNIFORM_PANELS = 512
_NODES_PER_PANEL = 8


@lru_cache(maxsize=1)
def panel_breaks() -> np.ndarray:
    """Sorted panel boundaries covering [0, 1]."""
    uniform = np.linspace(0.0, 1.0, _UNIFORM_PANELS + 1)
    first = 1.0 / _UNIFORM_PANELS
    near_zero = first * 2.0 ** -np.arange(1, 60)
    near_one = 1.0 - first * 2.0 ** -np.arange(1, 60)
    near_one = near_one[near_one < 1.0]
    breaks = np.unique(np.concatenate([uniform, near_zero, near_one]))
    breaks.setflags(write=False)
    return breaks


@lru_cache(maxsize=1)
def nodes_and_weights() -> tuple[np.ndarray, np.ndarray]:
    """Nodes (strictly inside (0, 1)) and weights of the composite rule, in ascending order."""
    x, w = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    breaks = panel_breaks()
    lo, hi = breaks[:-1, None], breaks[1:, None]
    nodes = (0.5 * (lo + hi) + 0.5 * (hi - lo) * x[None, :]).ravel()
    weights = (0.5 * (hi - lo) * w[None, :]).ravel()
    nodes.setflags(write=False)
    weights.setflags(write=False)
    return nodes, weights


def gauss_legendre_between(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row nodes and weights (shape ``(len(lo), 8)``) of the 8-point rule on [lo, hi]."""
    x, w = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    lo, hi = np.asarray(lo, float)[:, None], np.asarray(hi, float)[:, None]
    return 0.5 * (lo + hi) + 0.5 * (hi - lo) * x[None, :], 0.5 * (hi - lo) * w[None, :]
