"""A prompt's samples as one group: what the grouped layout stores (docs/data_layout.md, docs/finite_k.md §9).

Every pairwise, pointwise and weighted loss of a prompt is a function of its K sequence log-probs,
so one row per prompt — its completions, their node values Φ, pointwise targets and SFT weights,
and which pairs the loss runs over — lets a trainer forward each response once and form every
loss from the K log-probs. The pairs are :func:`~ctrl_offline.rows.pairs.make_pairs`' (the same
strategy, seed and ties, so exactly the pairs the ``pairs`` format writes), as positions within the
group; a pair's Φ gap is ``phi[chosen] − phi[rejected]``, its soft label σ of that. Targets and
weights are :mod:`ctrl_offline.rows.pointwise`'s.

>>> groups = make_groups(["a", "b", "a", "a", "b"], [0.0, 0.5, 1.0, 0.5, 0.5], "identity", 0.5)
>>> [rows.tolist() for rows in groups.rows]
[[0, 2, 3], [1, 4]]
>>> [(c.tolist(), r.tolist()) for c, r in zip(groups.pair_chosen, groups.pair_rejected)]
[([1, 1, 2], [0, 2, 0]), ([], [])]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctrl_offline.maths.groups import group_layout
from ctrl_offline.rows.calibrated_rows import prepare
from ctrl_offline.rows.pairs import make_pairs
from ctrl_offline.rows.pointwise import pointwise_targets, sft_weights

__all__ = ["Groups", "make_groups"]


@dataclass(frozen=True)
class Groups:
    """Rows grouped by prompt, in order of the prompt's first appearance.

    ``rows[g]``: the input rows of group g, in input order; ``phi``, ``target`` and ``weight`` align
    with the input rows (node values, pointwise targets, SFT weights); ``pair_chosen[g]`` /
    ``pair_rejected[g]``: each pair of group g as positions in ``rows[g]`` (chosen has the larger u).
    """

    rows: list[np.ndarray]
    phi: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    pair_chosen: list[np.ndarray]
    pair_rejected: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_pairs(self) -> int:
        return int(sum(len(c) for c in self.pair_chosen))


def make_groups(prompt_ids, u, transform, beta: float, *, strategy: str = "all", pairs_per_prompt: int | None = None,
                seed: int = 0, targets: str = "loo", k=None, log_partition: str = "population") -> Groups:
    """The groups of calibrated rows, with what every registered loss needs (module docstring).

    ``strategy``, ``pairs_per_prompt``, ``seed``, ``targets`` and ``k`` as in
    :func:`~ctrl_offline.rows.pairs.make_pairs`; ``log_partition`` as in
    :func:`~ctrl_offline.rows.pointwise.pointwise_targets`.
    """
    codes, uniques, u, phi, beta, transform = prepare(prompt_ids, u, transform, beta, targets=targets, k=k)
    pairs = make_pairs(prompt_ids, u, transform, beta, strategy=strategy, pairs_per_prompt=pairs_per_prompt,
                       seed=seed, targets=targets, k=k)
    target = pointwise_targets(prompt_ids, u, transform, beta, log_partition=log_partition, targets=targets, k=k)
    weight = sft_weights(prompt_ids, u, transform, beta, targets=targets, k=k)
    n_groups = len(uniques)
    order, sizes, _, rank_of_row = group_layout(codes, n_groups)
    bounds = np.cumsum(sizes)[:-1]
    rows = np.split(order, bounds) if n_groups else []
    # make_pairs orders its pairs by the chosen row's prompt code (first appearance), as the groups are.
    pair_bounds = np.cumsum(np.bincount(codes[pairs.chosen], minlength=n_groups))[:-1]
    chosen = np.split(rank_of_row[pairs.chosen], pair_bounds) if n_groups else []
    rejected = np.split(rank_of_row[pairs.rejected], pair_bounds) if n_groups else []
    return Groups(rows=rows, phi=phi, target=target, weight=weight, pair_chosen=chosen, pair_rejected=rejected)
