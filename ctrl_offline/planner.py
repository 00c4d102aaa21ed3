"""Choosing the transform, t and β for an inference procedure and a KL budget (docs/theory.md §3).

For a target procedure (best-of-N or worst-of-N) and a budget KL(π*‖π_ref) = κ, each family
is tuned so as to maximise the predicted inference-time win rate:

* β is found by root-finding on log β (KL is strictly decreasing in β);
* for families with a shape parameter (exp, negexp), t is chosen by a coarse log-spaced scan
  followed by a bounded 1-D refinement, re-solving β for every candidate t.

With ``k=K`` the plan is *K-aware*: the KL and win rates are those of the tilt that the chosen
estimator (loss × pair strategy × targets × normaliser) actually trains from K reference samples
per prompt (:mod:`ctrl_offline.finite_k`, docs/finite_k.md), so β is solved for the trained tilt to
meet the budget and t maximises the trained win rate; each row also reports ``ideal_win_rate``,
the K = ∞ tilt's win rate at the same KL.

>>> from ctrl_offline.planner import plan
>>> result = plan("bon", n=4, kl=0.5)
>>> [row.transform for row in result.rows]
['identity', 'log', 'exp', 'negexp']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import optimize

from .finite_k import Estimator, TrainedTilt, trained_tilt
from .theory import INFERENCE_PROCEDURES, inference_win_rate, kl_divergence, standard_win_rate
from .transforms import Transform, family_has_t, get_transform, unit_scale

__all__ = ["PlanRow", "Plan", "solve_beta", "solve_trained_beta", "plan", "tradeoff_curve", "trainable_beta", "DEFAULT_FAMILIES",
           "MIN_TRAINABLE_BETA"]

DEFAULT_FAMILIES = ("identity", "log", "exp", "negexp")
DEFAULT_T_RANGE = (0.01, 40.0)
_MAX_KL = 25.0  # beyond this the tilted densities are narrower than double precision resolves
# Smallest β, on the scale where Φ spans 1 (what the trainers see), at which a plan can be trained.
# The DPO and pointwise gradients scale with β; below ~1e-3 the per-parameter LoRA gradients of a
# small model fall to Adam's ε (1e-8) and the adapter does not move (measured: negexp t = 40 at
# KL 2 planned β = 5.5e-16, gradient norm 1e-15, KL after training 0).
MIN_TRAINABLE_BETA = 1e-3


@dataclass(frozen=True)
class PlanRow:
    """One tuned transform. ``beta`` is for the raw Φ; the trainer's β is ``beta / phi_scale``.

    K-aware rows (``k`` set) report the trained tilt's ``kl``, ``win_rate`` and
    ``standard_win_rate``, and ``ideal_win_rate``: the family's K = ∞ win rate at the same KL
    (its own best t), so ``ideal_win_rate − win_rate`` is what finite K costs.
    """

    transform: str
    t: float | None
    beta: float
    kl: float
    win_rate: float
    standard_win_rate: float
    ideal_win_rate: float | None = None
    k: int | None = None
    phi_scale: float | None = None

    def to_dict(self) -> dict:
        row = asdict(self)
        if self.k is None:  # K = ∞: the rows as they have always been
            for key in ("ideal_win_rate", "k", "phi_scale"):
                row.pop(key)
        return row


@dataclass(frozen=True)
class Plan:
    inference: str
    n: int
    kl: float
    rows: list[PlanRow] = field(default_factory=list)
    k: int | None = None
    estimator: Estimator | None = None
    #: Families left out of a K-aware plan, with the reason (``log`` under ``"loo"`` targets, …).
    skipped: list[str] = field(default_factory=list)

    def best(self) -> PlanRow:
        """The row with the highest predicted inference-time win rate."""
        return max(self.rows, key=lambda row: row.win_rate)

    def to_dict(self) -> dict:
        out = {"inference": self.inference, "n": self.n, "kl": self.kl, "rows": [r.to_dict() for r in self.rows]}
        if self.k is not None:
            out.update(k=self.k, estimator=self.estimator.to_dict(), skipped=self.skipped)
        return out


def _check_budget(kl: float) -> float:
    if not (isinstance(kl, (int, float)) and math.isfinite(kl) and 0 < kl <= _MAX_KL):
        raise ValueError(f"the KL budget must be a number in (0, {_MAX_KL:g}] nats, got {kl!r}")
    return float(kl)


def _beta_scale(transform: Transform) -> float:
    # β acts on Φ's spread; start the bracket there so huge-t exp (Φ up to e^t) needs few steps.
    spread = float(transform.phi(np.array(1.0)) - transform.phi(np.array(0.5)))
    return spread if math.isfinite(spread) and spread > 0 else 1.0


def _root_in_log_beta(gap, centre: float, half_width: float, step: float, tries: int, tol: float,
                      unreachable, too_small) -> float:
    """β with gap(log β) = 0, gap decreasing: widen [centre ∓ half_width] by ``step`` until it brackets, then Brent.

    ``unreachable(lo)`` / ``too_small()`` give the error raised when no bracket is found.
    """
    lo, hi = centre - half_width, centre + half_width
    for _ in range(tries):
        if gap(lo) > 0:
            break
        lo -= step
    else:
        raise unreachable(lo)
    for _ in range(tries):
        if gap(hi) < 0:
            break
        hi += step
    else:
        raise too_small()
    return math.exp(optimize.brentq(gap, lo, hi, xtol=tol, rtol=tol))


def solve_beta(transform: Transform | str, kl: float) -> float:
    """The β at which KL(π*‖π_ref) equals ``kl`` for this transform."""
    transform, kl = get_transform(transform), _check_budget(kl)
    return _root_in_log_beta(
        lambda log_beta: kl_divergence(transform, math.exp(log_beta)) - kl,
        math.log(_beta_scale(transform)), 1.0, 2.0, 60, 1e-12,
        lambda lo: ValueError(f"KL budget {kl} is out of reach for transform {transform.spec!r}"),
        lambda: ValueError(f"KL budget {kl} is too small to resolve for transform {transform.spec!r}"))


def solve_trained_beta(transform: Transform | str, kl: float, k: int, estimator: Estimator) -> float:
    """The raw-Φ β at which the tilt ``estimator`` trains from K samples per prompt has KL ``kl``."""
    transform, kl = get_transform(transform), _check_budget(kl)

    def unreachable(lo: float | None = None) -> ValueError:
        if estimator.loss == "weighted_sft":
            # As β → 0 the weights pile onto each prompt's top sample: the tilt tends to best-of-K, whose
            # KL log K − (K−1)/K bounds it (the numeric KL at tiny β underflows, reading ~0).
            reach = math.log(k) - (k - 1) / k
            why = f"it saturates at best-of-K's KL, log K − (K−1)/K = {reach:.3g} nats"
        else:
            reach = trained_tilt(transform, math.exp(lo), k, estimator).kl()
            why = f"it saturates near {reach:.3g} nats"
        return ValueError(f"KL budget {kl:g} is out of reach for {transform.spec} trained by {estimator.loss} at "
                          f"K={k} ({why}); lower the budget or raise K")

    if estimator.loss == "weighted_sft" and kl >= math.log(k) - (k - 1) / k:
        # Above best-of-K's KL there is no root; refuse before the bracket search meets the tilt's KL
        # computed at underflowing β (spurious values there would pass for one).
        raise unreachable()
    # The K = ∞ β is a good centre: finite K changes KL by tens of percent, not orders of magnitude.
    return _root_in_log_beta(
        lambda log_beta: trained_tilt(transform, math.exp(log_beta), k, estimator).kl() - kl,
        math.log(solve_beta(transform, kl)), 0.5, 1.0, 40, 1e-10, unreachable,
        lambda: ValueError(f"KL budget {kl} is too small to resolve for transform {transform.spec!r}"))


def _trained_row(transform: Transform, inference: str, n: int, kl: float, k: int, estimator: Estimator) -> PlanRow:
    beta = solve_trained_beta(transform, kl, k, estimator)
    tilt: TrainedTilt = trained_tilt(transform, beta, k, estimator)
    # ideal_win_rate is filled in by plan(): the family's best K = ∞ win rate at the same KL.
    return PlanRow(transform=transform.name, t=transform.t, beta=beta, kl=tilt.kl(),
                   win_rate=tilt.win_rate(inference, n), standard_win_rate=tilt.standard_win_rate(),
                   k=k, phi_scale=unit_scale(transform))


def _row(transform: Transform, inference: str, n: int, kl: float, k: int | None = None,
         estimator: Estimator | None = None) -> PlanRow:
    if k is not None:
        return _trained_row(transform, inference, n, kl, k, estimator)
    beta = solve_beta(transform, kl)
    return PlanRow(
        transform=transform.name,
        t=transform.t,
        beta=beta,
        kl=kl_divergence(transform, beta),
        win_rate=inference_win_rate(transform, beta, inference, n),
        standard_win_rate=standard_win_rate(transform, beta),
    )


def trainable_beta(transform: Transform, beta: float) -> float:
    """β on the scale where Φ spans 1 on [0, 1] — the β the trainers get from ``ctrl-data build``."""
    return beta / unit_scale(transform)


def _best_t(name: str, inference: str, n: int, kl: float, t_range: tuple[float, float],
            min_beta: float, k: int | None = None, estimator: Estimator | None = None) -> PlanRow:
    lo, hi = math.log(t_range[0]), math.log(t_range[1])

    def objective(log_t: float) -> float:
        transform = get_transform(name, math.exp(log_t))
        try:
            row = _row(transform, inference, n, kl, k, estimator)
        except ValueError:  # this t cannot reach the budget at this K
            return 1.0
        # Untrainable t scores worse than any real plan (win rates lie in [0, 1]).
        return -row.win_rate if trainable_beta(transform, row.beta) >= min_beta else 1.0

    grid = np.linspace(lo, hi, 17)
    scores = [objective(x) for x in grid]
    i = int(np.argmin(scores))
    if scores[i] >= 1.0:
        raise ValueError(f"no t in {t_range} gives {name} a trainable β (≥ {min_beta:g} with Φ spanning 1) at "
                         f"KL {kl:g}; lower the KL budget, narrow t_range or pass a smaller min_beta")
    left, right = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    xatol = 1e-4 if k is None else 1e-3  # a trained tilt costs ~10× a closed form; t to 0.1% is plenty
    refined = optimize.minimize_scalar(objective, bounds=(left, right), method="bounded", options={"xatol": xatol})
    best_log_t = refined.x if refined.fun <= scores[i] else grid[i]
    return _row(get_transform(name, math.exp(best_log_t)), inference, n, kl, k, estimator)


def plan(
    inference: str,
    n: int,
    kl: float,
    families: tuple[str, ...] = DEFAULT_FAMILIES,
    t_range: tuple[float, float] = DEFAULT_T_RANGE,
    min_beta: float = MIN_TRAINABLE_BETA,
    *,
    k: int | None = None,
    loss: str = "dpo",
    strategy: str = "all",
    targets: str = "loo",
    log_partition: str = "population",
) -> Plan:
    """Tune every transform family for ``inference`` ('bon' or 'won') with N candidates.

    Families with a parameter t get the t in ``t_range`` that maximises the predicted
    inference-time win rate under the budget among the t whose β, with Φ rescaled to span 1,
    is at least ``min_beta`` (smaller β cannot be trained; 0 turns the guard off); each row
    reports the β that meets the budget for the raw Φ.

    ``k=None`` plans the exact tilt (K = ∞). ``k=K`` plans the tilt that ``loss`` trains from K
    reference samples per prompt (pairs drawn by ``strategy``, node values ``targets``, pointwise
    normaliser ``log_partition``; see :class:`ctrl_offline.finite_k.Estimator`): the rows' KL and
    win rates are what the trained policy reaches, and ``ideal_win_rate`` the K = ∞ figure at
    that KL. A family that cannot meet the budget at this K (``log`` with ``"loo"`` targets, whose
    rank-0 sample has Φ = −∞; weighted SFT beyond best-of-K's KL) is left out of the rows.
    """
    if inference not in INFERENCE_PROCEDURES:
        raise ValueError(f"unknown inference procedure {inference!r}; choose one of {INFERENCE_PROCEDURES}")
    if int(n) != n or n < 1:
        raise ValueError(f"N must be a positive integer, got {n!r}")
    kl = _check_budget(kl)
    if not (0 < t_range[0] < t_range[1] and math.isfinite(t_range[1])):
        raise ValueError(f"t_range must satisfy 0 < low < high < inf, got {t_range!r}")
    estimator = None
    if k is not None:
        if isinstance(k, bool) or int(k) != k or k < 2:
            raise ValueError(f"K must be an integer ≥ 2, got {k!r}")
        k = int(k)
        estimator = Estimator(loss=loss, strategy=strategy, targets=targets, log_partition=log_partition)
    rows, skipped = [], []
    for name in families:
        try:
            if family_has_t(name):
                rows.append(_best_t(name, inference, int(n), kl, t_range, min_beta, k, estimator))
            else:
                rows.append(_row(get_transform(name), inference, int(n), kl, k, estimator))
        except ValueError as err:
            if k is None:
                raise
            skipped.append(f"{name}: {err}")
    if not rows:
        raise ValueError("no transform family can be trained to this plan:\n  " + "\n  ".join(skipped))
    if k is not None:
        # What the same family promises at K = ∞ (its own best t) at the same KL: the cost of finite K.
        ideal = {row.transform: row.win_rate
                 for row in plan(inference, n, kl, families=tuple(r.transform for r in rows), t_range=t_range,
                                 min_beta=min_beta).rows}
        rows = [replace(row, ideal_win_rate=ideal[row.transform]) for row in rows]
    return Plan(inference=inference, n=int(n), kl=kl, rows=rows, k=k, estimator=estimator, skipped=skipped)


def tradeoff_curve(transform: Transform | str, inference: str, n: int, kls) -> np.ndarray:
    """Predicted inference-time win rate at each KL in ``kls`` (β re-solved for each)."""
    transform = get_transform(transform)
    return np.array([inference_win_rate(transform, solve_beta(transform, k), inference, n) for k in kls])
