"""Pointwise targets and SFT weights from calibrated rows (docs/theory.md §4, docs/finite_k.md §3, §5).

With ρ = log π_θ − log π_ref, the tilted policy π* ∝ π_ref·exp(Φ(Ĉ)/β) solves
β·ρ(x, y) = Φ(Ĉ(x, y)) − β·log Z, so each row gets

* a regression target ``target`` = Φ(u) − β·log Z = β·ρ* (``losses.pointwise_loss``), with a choice
  of normaliser Z (:data:`LOG_PARTITIONS`, docs/log_partition.md);
* a weight w ∝ exp(Φ(u)/β) within its prompt (``losses.weighted_sft_loss``).

The rows, their checks and node values Φ: :mod:`ctrl_offline.rows.calibrated_rows`; per-prompt sums are
group arithmetic on prompt codes (:mod:`ctrl_offline.maths.groups`), no loop per prompt.

>>> sft_weights(["a", "a"], [0.0, 1.0], "identity", 1.0).round(3).tolist()
[0.538, 1.462]
"""

from __future__ import annotations

import numpy as np

from ctrl_offline.maths.transforms import SynthesisError
from ctrl_offline.rows.calibrated_rows import prepare, samples_per_prompt
from ctrl_offline.maths.groups import group_log_mean_exp
from ctrl_offline.maths.prompt_ids import name_some
from ctrl_offline.maths.transforms import Transform

__all__ = ["LOG_PARTITIONS", "pointwise_targets", "sft_weights"]

LOG_PARTITIONS = ("population", "empirical", "continuous")


def pointwise_targets(
    prompt_ids, u, transform: Transform | str, beta: float, *, log_partition: str = "population",
    targets: str = "loo", k=None,
) -> np.ndarray:
    """Per-row regression target Φ(u) − β·log Z, the value of β·ρ* = β·(log π* − log π_ref).

    ``targets`` and ``k`` as in :func:`ctrl_offline.rows.pairs.make_pairs`. ``log_partition`` chooses Z:

    * ``"population"`` (the default): per prompt of K samples, log ∫₀¹ exp(m_K(c)/β) dc with m_K the
      Bernstein mean of the node values (:func:`ctrl_offline.maths.finite_k.population_log_partition`).
      A policy that generalises (its log-ratio a function of the response, not of the other samples
      of its prompt) is fitted to E[Φ(Ĉ) | C] = m_K(C); with this normaliser those targets are
      already normalised, so the population minimiser is exactly the tilt by m_K, the one
      ``plan(k=K, loss="pointwise")`` plans (docs/finite_k.md §3). Every other constant leaves the
      fit constrained: too high a normaliser makes it fit a different shape, too low one has no
      minimiser at all (the missing mass escapes into a spike; measured KL 1.83 for a 0.5 plan).
    * ``"empirical"``: per prompt, Z_x = (1/n_x) Σ_{rows i of x} exp(Φ(u_i)/β),
      computed as a per-prompt log-sum-exp. The targets are then self-normalised:
      mean over the prompt's rows of exp(target/β) = 1. This is exact for the data at hand when
      the rows are the prompt's reference samples: Ĉ from K samples lives on a grid (the
      leave-one-out values of a tie-free prompt are exactly j/(K−1)), not on Uniform[0, 1], so
      the continuous log Z mis-states the normaliser by an amount that grows with the sharpness of
      the tilt (t, 1/β) and shrinks like 1/K (:func:`ctrl_offline.maths.finite_k.log_partition_gap`,
      docs/log_partition.md). It is right only in the memorising regime, where the policy fits the
      K stored samples themselves rather than a function of the response.
    * ``"continuous"``: the prompt-independent continuous-limit
      ``transform.log_partition(beta)`` = log ∫₀¹ exp(Φ(v)/β) dv (u ~ Uniform[0, 1]). Use it when
      the rows are not the prompt's own reference set (e.g. a few fresh policy samples), where a
      per-prompt mean would be a poor estimate of Z.
    """
    if log_partition not in LOG_PARTITIONS:
        raise SynthesisError(f"log_partition must be one of {', '.join(LOG_PARTITIONS)}, got {log_partition!r}")
    codes, uniques, u, phi, beta, transform = prepare(prompt_ids, u, transform, beta, targets=targets, k=k)
    n_groups = len(uniques)
    if log_partition == "continuous":
        return phi - beta * float(transform.log_partition(beta))
    if log_partition == "population":
        from ctrl_offline.maths.finite_k import population_log_partition

        k_row = samples_per_prompt(codes, n_groups, k, prompt_ids)
        log_z = {int(size): population_log_partition(transform, beta, int(size), targets) for size in np.unique(k_row)}
        return phi - beta * np.array([log_z[int(size)] for size in k_row]) if len(k_row) else phi
    if len(u) == 0:
        return phi
    x = phi / beta
    top, _, mean = group_log_mean_exp(codes, n_groups, x)
    # β·((x − max) − log mean) rather than Φ − β·log Z: no cancellation of two huge numbers when
    # Φ/β is large (the top row's target is then exactly −β·log mean).
    return beta * ((x - top[codes]) - np.log(mean)[codes])


def sft_weights(prompt_ids, u, transform: Transform | str, beta: float, *, targets: str = "loo", k=None) -> np.ndarray:
    """Reward-weighted-regression weights w_i ∝ exp(Φ(u_i)/β) within each prompt, mean 1 per prompt.

        w_i = exp(Φ(u_i)/β − m_x) / mean_{j in x} exp(Φ(u_j)/β − m_x),   m_x = max_{j in x} Φ(u_j)/β

    (the per-prompt max m_x cancels; subtracting it keeps large Φ/β from overflowing). Φ = −∞
    (log at u = 0) gives weight 0, as long as the prompt has a row with finite Φ. ``targets`` and
    ``k`` as in :func:`ctrl_offline.rows.pairs.make_pairs`.
    """
    codes, uniques, u, phi, beta, transform = prepare(prompt_ids, u, transform, beta, allow_minus_inf=True,
                                                      targets=targets, k=k)
    n_groups = len(uniques)
    if len(u) == 0:
        return phi
    top, shifted, mean = group_log_mean_exp(codes, n_groups, phi / beta)
    if np.any(top == -np.inf):
        dead = np.flatnonzero(top == -np.inf)
        raise SynthesisError(
            f"transform {transform.spec!r} gives Φ(u) = −∞ for every row of {len(dead)} prompt(s): "
            + name_some(uniques[dead], "prompt_id")
        )
    return shifted / mean[codes]
