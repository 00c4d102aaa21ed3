"""Calibrated rows for the pairs, pointwise and input tests: interleaved prompts, u on a coarse grid."""

import numpy as np

from ctrl_offline.maths.transforms import get_transform

EXP = get_transform("exp", 3.0)
NEGEXP = get_transform("negexp", 5.0)


def rows(seed=0, prompts=12, kmax=6, int_ids=False):
    """Interleaved rows of prompts with 1..kmax responses each; u on a 4-point grid, so ties abound."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, kmax + 1, size=prompts)
    names = rng.permutation(prompts) * 7 + 3 if int_ids else np.array([f"p{i}" for i in range(prompts)])
    ids = np.repeat(names, k)
    perm = rng.permutation(len(ids))
    u = rng.integers(0, 4, size=len(ids)) / 3
    return ids[perm], u[perm]
