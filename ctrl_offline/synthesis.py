"""Training targets from calibrated rewards (docs/theory.md §4–5, docs/finite_k.md): pairs, pointwise targets, weights.

Pure numpy (pandas for hashing prompt ids), vectorised over prompts: prompt ids become integer
codes in order of first appearance and every per-prompt quantity is group arithmetic on those
codes (sorts, ``bincount``, ``repeat``/``cumsum``), so millions of rows need no loop per prompt.
The inputs are the calibrated rows of the ``build`` stage, one per response: a prompt id and
Ĉ = u ∈ [0, 1]. The outputs index, or align with, those rows.

With ρ = log π_θ − log π_ref, the tilted policy π* ∝ π_ref·exp(Φ(Ĉ)/β) is the unique solution of
β·ρ(x, y) = Φ(Ĉ(x, y)) − β·log Z, so

* pairs: ``target_margin`` = Φ(u_chosen) − Φ(u_rejected) = β(ρ*₁ − ρ*₂) ≥ 0 (the IPO and
  distillation target) and the Bradley–Terry soft label ``label`` = σ(target_margin) =
  σ(β(ρ*₁ − ρ*₂)), which is exactly what ``losses.dpo_loss`` (logits β·Δρ) is fitted to at π*;
* pointwise: ``target`` = Φ(u) − β·log Z = β·ρ* (``losses.pointwise_loss``);
* weights: w ∝ exp(Φ(u)/β) within each prompt (``losses.weighted_sft_loss``).

>>> import numpy as np
>>> pairs = make_pairs(["a", "a", "b", "b"], [0.0, 1.0, 0.5, 0.5], "identity", 0.5)
>>> pairs.chosen.tolist(), pairs.rejected.tolist(), pairs.target_margin.tolist()
([1], [0], [1.0])
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .prompt_ids import SHOW as _SHOW, name_some as _name_some  # the same message format as calibration's errors
from .transforms import Transform, get_transform

__all__ = [
    "SynthesisError",
    "Pairs",
    "PAIR_STRATEGIES",
    "LOG_PARTITIONS",
    "TARGET_SCHEMES",
    "make_pairs",
    "pointwise_targets",
    "sft_weights",
    "log_partition_gap",
]

PAIR_STRATEGIES = ("all", "best_vs_rest", "best_vs_worst", "sampled")
LOG_PARTITIONS = ("population", "empirical", "continuous")
TARGET_SCHEMES = ("loo", "cell")



class SynthesisError(ValueError):
    """Bad input to target synthesis; the message names the offending rows or prompts."""


@dataclass(frozen=True)
class Pairs:
    """Preference pairs within prompts, one entry per pair (arrays of equal length).

    ``chosen`` / ``rejected``: row indices into the input arrays; ``target_margin``:
    Φ(u_chosen) − Φ(u_rejected) ≥ 0; ``label``: the soft label σ(target_margin) (Φ in the units
    of β — see :func:`make_pairs`); ``weight``: per-pair weight, 1.0.
    """

    chosen: np.ndarray
    rejected: np.ndarray
    target_margin: np.ndarray
    label: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)


# -- validation -----------------------------------------------------------------------------------
def _rows_and_prompts(mask: np.ndarray, prompt_ids: np.ndarray) -> str:
    """'rows 3, 7 (prompt_id 'p1', 'p2')': the offending rows and their prompts, the first few of each."""
    rows = np.flatnonzero(mask)
    return f"{_name_some(rows, 'rows')} ({_name_some(pd.unique(prompt_ids[rows]), 'prompt_id')})"


def _transform(transform) -> Transform:
    try:
        return get_transform(transform)
    except (TypeError, ValueError) as err:
        raise SynthesisError(str(err)) from None


def _check_beta(beta) -> float:
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise SynthesisError(f"beta must be a finite number > 0, got {beta!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise SynthesisError(f"beta must be a finite number > 0, got {beta!r}")
    return value


def _prepare(prompt_ids, u, transform, beta, *, allow_minus_inf: bool = False, targets: str = "loo", k=None):
    """Validated (codes, unique prompt ids, u, node values, β, transform).

    ``codes`` number the prompts 0, 1, … in order of first appearance (``uniques[code]``). The node
    value of a row is Φ(u) (``targets="loo"``) or the tilt's mass on its quantile cell (``"cell"``).
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
    beta = _check_beta(beta)
    transform = _transform(transform)
    codes, uniques = pd.factorize(prompt_ids)
    if np.any(codes < 0):
        missing = np.flatnonzero(codes < 0)
        raise SynthesisError(
            f"{len(missing)} row(s) have a missing prompt id (None/NaN): {_name_some(missing, 'rows')}"
        )
    bad = ~((u >= 0) & (u <= 1))  # NaN fails both comparisons
    if bad.any():
        raise SynthesisError(
            f"{int(bad.sum())} calibrated value(s) u are NaN or outside [0, 1]: {_rows_and_prompts(bad, prompt_ids)}"
        )
    codes = codes.astype(np.int64)
    if targets == "cell":
        phi = _cell_targets(codes, len(uniques), u, transform, beta, k, prompt_ids)
    else:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            phi = np.asarray(transform.phi(u), dtype=float)
    bad = ~np.isfinite(phi)
    if allow_minus_inf:
        bad &= phi != -np.inf
    if bad.any():
        raise SynthesisError(
            f"transform {transform.spec!r} gives a non-finite Φ(u) for {int(bad.sum())} row(s): "
            f"{_rows_and_prompts(bad, prompt_ids)}, u = {u[bad][:_SHOW].tolist()}. The tilted policy gives such "
            "responses zero (or unbounded) weight, so no finite margin or target exists; drop those rows or use "
            "a transform that is finite on [0, 1] (log has Φ(0) = −∞)"
        )
    return codes, np.asarray(uniques), u, phi, beta, transform


def _samples_per_prompt(codes: np.ndarray, n_groups: int, k, prompt_ids) -> np.ndarray:
    """K of each row's prompt: ``k`` (an integer or one per row), or the prompt's row count."""
    if k is None:
        per_row = np.bincount(codes, minlength=n_groups)[codes]
    else:
        per_row = np.broadcast_to(np.asarray(k), codes.shape)
        if not np.issubdtype(per_row.dtype, np.integer):
            raise SynthesisError(f"k must be an integer or one integer per row, got {k!r}")
    small = per_row < 2
    if small.any():
        raise SynthesisError(f"cell targets and the population normaliser need K ≥ 2 reference samples per prompt: "
                             f"{_rows_and_prompts(small, prompt_ids)}")
    return per_row.astype(np.int64)


def _cell_targets(codes, n_groups, u, transform, beta, k, prompt_ids) -> np.ndarray:
    """The tilt's mass on each row's quantile cell (docs/finite_k.md §5).

    A row of leave-one-out u among K samples with e − 1 others tied to it and b below
    (u = (b + (e − 1)/2)/(K − 1)) shares the block of cells [b/K, (b + e)/K] with its ties:
    value β·log(K/e·∫_{b/K}^{(b+e)/K} e^{Φ/β}).
    """
    from .finite_k import cell_values

    k_row = _samples_per_prompt(codes, n_groups, k, prompt_ids)
    # e: rows of the same prompt with the same u (the prompt's reference samples are its rows).
    _, tie_code = np.unique(np.stack([codes.astype(float), u]), axis=1, return_inverse=True)
    ties = np.bincount(tie_code.ravel())[tie_code.ravel()]
    below = np.rint(u * (k_row - 1) - (ties - 1) / 2.0)
    if np.any(below < 0) or np.any(below + ties > k_row):
        bad = (below < 0) | (below + ties > k_row)
        raise SynthesisError(f"u does not look like leave-one-out ranks among K samples for {int(bad.sum())} row(s): "
                             f"{_rows_and_prompts(bad, prompt_ids)}; cell targets need each prompt's reference "
                             "samples and their K")
    return cell_values(transform, beta, below / k_row, (below + ties) / k_row)


# -- group arithmetic -----------------------------------------------------------------------------
def _group_layout(codes: np.ndarray, n_groups: int):
    """Rows sorted by (prompt code, row index), each group's start and size, each row's rank in its group."""
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=n_groups)
    starts = np.cumsum(sizes) - sizes
    local = np.arange(len(codes)) - np.repeat(starts, sizes)  # position of each sorted row in its group
    rank_of_row = np.empty(len(codes), dtype=np.int64)
    rank_of_row[order] = local
    return order, sizes, local, rank_of_row


def _all_pairs(codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair (a, b), a < b, of rows sharing a prompt, in (prompt, a, b) order.

    With the rows of each prompt laid out contiguously, the row at position i of a group of size
    n pairs with the n − 1 − i rows after it: repeat i that many times and add 1, 2, … to it.
    """
    order, sizes, local, _ = _group_layout(codes, n_groups)
    later = np.repeat(sizes, sizes) - 1 - local  # partners after each sorted row
    first = np.repeat(np.arange(len(codes)), later)
    block_start = np.repeat(np.cumsum(later) - later, later)
    second = first + 1 + (np.arange(len(first)) - block_start)
    return order[first], order[second]


def _extreme_per_group(codes: np.ndarray, u: np.ndarray, best: bool) -> np.ndarray:
    """Row of the largest (or smallest) u of each prompt, ties to the lowest row index; in code order."""
    order = np.lexsort((np.arange(len(u)), -u if best else u, codes))
    first = np.ones(len(u), dtype=bool)
    first[1:] = codes[order][1:] != codes[order][:-1]
    return order[first]


def _rank_in_group(sorted_codes: np.ndarray) -> np.ndarray:
    """0, 1, 2, … within each run of equal codes of an array sorted by code."""
    n = len(sorted_codes)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_codes[1:] != sorted_codes[:-1]
    return np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 values (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _group_log_mean_exp(codes: np.ndarray, n_groups: int, x: np.ndarray):
    """Stable per-group log-mean-exp: (max of x per group, exp(x − max) per row, mean of it per group)."""
    top = np.full(n_groups, -np.inf)
    np.maximum.at(top, codes, x)
    with np.errstate(invalid="ignore"):  # a prompt whose every x is −∞ gives NaN; callers check top
        shifted = np.exp(x - top[codes])
    mean = np.bincount(codes, weights=shifted, minlength=n_groups) / np.bincount(codes, minlength=n_groups)
    return top, shifted, mean


# -- public API -----------------------------------------------------------------------------------
def make_pairs(
    prompt_ids,
    u,
    transform: Transform | str,
    beta: float,
    *,
    strategy: str = "all",
    pairs_per_prompt: int | None = None,
    drop_ties: bool = True,
    seed: int = 0,
    targets: str = "loo",
    k=None,
) -> Pairs:
    """Preference pairs within each prompt, oriented so the chosen response has the larger u.

    For a pair (1 = chosen, 2 = rejected)::

        target_margin = Φ(u₁) − Φ(u₂)  (≥ 0)         label = σ(target_margin)        weight = 1

    At π*, β(ρ₁ − ρ₂) = Φ(u₁) − Φ(u₂): the margin is the IPO / distillation target and the label is
    the Bradley–Terry probability σ(β(ρ₁ − ρ₂)) that ``losses.dpo_loss`` (logits β·Δρ) is fitted to,
    so its optimum is π*. (Φ is in the units of β, as the planner's β is: the label is σ(ΔΦ), not
    σ(ΔΦ/β).)

    Strategies:

    * ``all`` — every unordered pair of rows of a prompt (K(K−1)/2 for K rows);
    * ``best_vs_rest`` — the row with the largest u (ties to the lowest row index) against every
      other row of its prompt (K − 1);
    * ``best_vs_worst`` — one pair per prompt, largest u against smallest u (ties to the lowest row
      index): the familiar hard-label baseline, which discards the transform's shape;
    * ``sampled`` — ``pairs_per_prompt`` of the prompt's ``all`` pairs (after ``drop_ties``), drawn
      uniformly without replacement (all of them when fewer exist). The draw of a prompt depends
      only on ``seed``, its prompt id and its own rows (their order and u), not on the other
      prompts or where the prompt's rows sit in the input: each pair gets a hash key of
      (seed, prompt id, the pair's positions among the prompt's rows) and the smallest keys win.

    ``targets``: the node value Φ stands for — ``"loo"``, Φ(u); ``"cell"``, the tilt's mass on the
    row's quantile cell among the prompt's K samples (``k``: K, an integer or one per row; default the
    prompt's row count), finite for ``log`` (docs/finite_k.md §5).

    ``drop_ties`` skips pairs with equal u: they carry no preference under hard labels.
    ``drop_ties=False`` keeps them with margin 0 and label ½ (chosen = the earlier row), which
    the soft-label DPO, IPO and distillation losses can use (they pull ρ₁ − ρ₂ to 0).

    Output order: by the prompt's first appearance in ``prompt_ids``, then chosen row, then
    rejected row.
    """
    if strategy not in PAIR_STRATEGIES:
        raise SynthesisError(f"unknown pair strategy {strategy!r}; choose one of {', '.join(PAIR_STRATEGIES)}")
    if pairs_per_prompt is not None:
        integral = isinstance(pairs_per_prompt, numbers.Integral) and not isinstance(pairs_per_prompt, bool)
        if not integral or pairs_per_prompt < 1:
            raise SynthesisError(f"pairs_per_prompt must be an integer ≥ 1, got {pairs_per_prompt!r}")
        if strategy != "sampled":
            raise SynthesisError(f"pairs_per_prompt applies only to strategy 'sampled', not {strategy!r}")
    elif strategy == "sampled":
        raise SynthesisError("strategy 'sampled' needs pairs_per_prompt (an integer ≥ 1)")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise SynthesisError(f"seed must be an integer, got {seed!r}")
    codes, uniques, u, phi, _, transform = _prepare(prompt_ids, u, transform, beta, targets=targets, k=k)
    n_groups = len(uniques)

    if strategy in ("all", "sampled"):
        a, b = _all_pairs(codes, n_groups)
    elif strategy == "best_vs_rest":
        best_of = np.empty(n_groups, dtype=np.int64)
        best = _extreme_per_group(codes, u, best=True)
        best_of[codes[best]] = best
        b = np.flatnonzero(best_of[codes] != np.arange(len(codes)))
        a = best_of[codes[b]]
    else:
        a, b = _extreme_per_group(codes, u, best=True), _extreme_per_group(codes, u, best=False)
        keep = a != b  # single-row prompts give no pair
        a, b = a[keep], b[keep]

    swap = u[b] > u[a]
    chosen, rejected = np.where(swap, b, a), np.where(swap, a, b)
    if drop_ties:
        distinct = u[chosen] != u[rejected]
        chosen, rejected = chosen[distinct], rejected[distinct]

    if strategy == "sampled":
        _, _, _, rank_of_row = _group_layout(codes, n_groups)
        lo = np.minimum(rank_of_row[chosen], rank_of_row[rejected]).astype(np.uint64)
        hi = np.maximum(rank_of_row[chosen], rank_of_row[rejected]).astype(np.uint64)
        salt = _mix64(np.array([int(seed) % 2**64], dtype=np.uint64))[0]
        prompt_key = _mix64(pd.util.hash_array(uniques) ^ salt)
        group = codes[chosen]
        # Distinct (lo, hi) of one prompt get distinct keys (_mix64 is a bijection). One stable
        # argsort of (prompt code in the high bits, the key's top bits below) orders each prompt's
        # pairs by key; a collision of the kept bits falls back on the (lo, hi) order.
        key = _mix64(prompt_key[group] ^ ((lo << np.uint64(32)) | hi))
        shift = np.uint64(max(int(n_groups - 1).bit_length(), 1))
        order = np.argsort((group.astype(np.uint64) << (np.uint64(64) - shift)) | (key >> shift), kind="stable")
        picked = order[_rank_in_group(group[order]) < pairs_per_prompt]
        chosen, rejected = chosen[picked], rejected[picked]

    order = np.lexsort((rejected, chosen, codes[chosen]))
    chosen, rejected = chosen[order], rejected[order]
    margin = phi[chosen] - phi[rejected]
    if np.any(margin < 0):
        wrong = np.flatnonzero(margin < 0)
        raise SynthesisError(
            f"transform {transform.spec!r} is not increasing: Φ(u_chosen) < Φ(u_rejected) for "
            f"{len(wrong)} pair(s), e.g. rows {chosen[wrong[0]]} (u = {u[chosen[wrong[0]]]}) and "
            f"{rejected[wrong[0]]} (u = {u[rejected[wrong[0]]]})"
        )
    return Pairs(
        chosen=chosen,
        rejected=rejected,
        target_margin=margin,
        label=1.0 / (1.0 + np.exp(-margin)),  # margin ≥ 0: no overflow
        weight=np.ones(len(chosen)),
    )


def pointwise_targets(
    prompt_ids, u, transform: Transform | str, beta: float, *, log_partition: str = "population",
    targets: str = "loo", k=None,
) -> np.ndarray:
    """Per-row regression target Φ(u) − β·log Z, the value of β·ρ* = β·(log π* − log π_ref).

    ``targets`` and ``k`` as in :func:`make_pairs`. ``log_partition`` chooses Z:

    * ``"population"`` (the default): per prompt of K samples, log ∫₀¹ exp(m_K(c)/β) dc with m_K the
      Bernstein mean of the node values (:func:`ctrl_offline.finite_k.population_log_partition`).
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
      the tilt (t, 1/β) and shrinks like 1/K (:func:`log_partition_gap`, docs/log_partition.md).
      It is right only in the memorising regime, where the policy fits the K stored samples
      themselves rather than a function of the response.
    * ``"continuous"``: the prompt-independent continuous-limit
      ``transform.log_partition(beta)`` = log ∫₀¹ exp(Φ(v)/β) dv (u ~ Uniform[0, 1]). Use it when
      the rows are not the prompt's own reference set (e.g. a few fresh policy samples), where a
      per-prompt mean would be a poor estimate of Z.
    """
    if log_partition not in LOG_PARTITIONS:
        raise SynthesisError(f"log_partition must be one of {', '.join(LOG_PARTITIONS)}, got {log_partition!r}")
    codes, uniques, u, phi, beta, transform = _prepare(prompt_ids, u, transform, beta, targets=targets, k=k)
    n_groups = len(uniques)
    if log_partition == "continuous":
        return phi - beta * float(transform.log_partition(beta))
    if log_partition == "population":
        from .finite_k import population_log_partition

        k_row = _samples_per_prompt(codes, n_groups, k, prompt_ids)
        log_z = {int(size): population_log_partition(transform, beta, int(size), targets) for size in np.unique(k_row)}
        return phi - beta * np.array([log_z[int(size)] for size in k_row]) if len(k_row) else phi
    if len(u) == 0:
        return phi
    x = phi / beta
    top, _, mean = _group_log_mean_exp(codes, n_groups, x)
    # β·((x − max) − log mean) rather than Φ − β·log Z: no cancellation of two huge numbers when
    # Φ/β is large (the top row's target is then exactly −β·log mean).
    return beta * ((x - top[codes]) - np.log(mean)[codes])


def sft_weights(prompt_ids, u, transform: Transform | str, beta: float, *, targets: str = "loo", k=None) -> np.ndarray:
    """Reward-weighted-regression weights w_i ∝ exp(Φ(u_i)/β) within each prompt, mean 1 per prompt.

        w_i = exp(Φ(u_i)/β − m_x) / mean_{j in x} exp(Φ(u_j)/β − m_x),   m_x = max_{j in x} Φ(u_j)/β

    (the per-prompt max m_x cancels; subtracting it keeps large Φ/β from overflowing). Φ = −∞
    (log at u = 0) gives weight 0, as long as the prompt has a row with finite Φ.
    """
    codes, uniques, u, phi, beta, transform = _prepare(prompt_ids, u, transform, beta, allow_minus_inf=True,
                                                       targets=targets, k=k)
    n_groups = len(uniques)
    if len(u) == 0:
        return phi
    top, shifted, mean = _group_log_mean_exp(codes, n_groups, phi / beta)
    if np.any(top == -np.inf):
        dead = np.flatnonzero(top == -np.inf)
        raise SynthesisError(
            f"transform {transform.spec!r} gives Φ(u) = −∞ for every row of {len(dead)} prompt(s): "
            + _name_some(uniques[dead], "prompt_id")
        )
    return shifted / mean[codes]


def log_partition_gap(transform: Transform | str, beta: float, k: int) -> float:
    """Empirical minus continuous log Z for a tie-free prompt with K reference samples.

    The leave-one-out calibrated values of such a prompt (what ``calibrate_reference`` gives) are
    exactly the grid j/(K−1), j = 0..K−1, so

        gap = log( (1/K) Σ_j exp(Φ(j/(K−1))/β) ) − log ∫₀¹ exp(Φ(v)/β) dv,

    in nats of Φ/β. Pointwise targets with the continuous normaliser sit β·gap above the
    empirical ones for every response of such a prompt. The gap → 0 like 1/K.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2:
        raise SynthesisError(f"K must be an integer ≥ 2 (the grid j/(K−1) needs two points), got {k!r}")
    beta = _check_beta(beta)
    transform = _transform(transform)
    with np.errstate(divide="ignore"):
        x = np.asarray(transform.phi(np.arange(k) / (k - 1)), dtype=float) / beta
    top = x.max()
    empirical = top + math.log(np.mean(np.exp(x - top)))
    return float(empirical - float(transform.log_partition(beta)))
