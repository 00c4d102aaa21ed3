"""Choosing the transform, t and β for an inference procedure and a KL budget (docs/theory.md §3).

For a target procedure (any registered in :mod:`ctrl_offline.maths.procedures`) and a budget
KL(π*‖π_ref) = κ, each family is tuned so as to maximise the predicted inference-time win rate:
the procedure's closed form where it has one (best-of-N, worst-of-N), else a simulation on the
calibration tables (:func:`ctrl_offline.maths.simulation.simulated_win_rate`, docs/selector_planning.md):

* β is found by root-finding on log β (KL is strictly decreasing in β);
* for families with a shape parameter (exp, negexp), t is chosen by a coarse log-spaced scan
  followed by a bounded 1-D refinement, re-solving β for every candidate t.

With ``k=K`` the plan is *K-aware*: the KL and win rates are those of the tilt that the chosen
estimator (loss × pair strategy × targets × normaliser) actually trains from K reference samples
per prompt (:mod:`ctrl_offline.maths.finite_k`, docs/finite_k.md), so β is solved for the trained tilt to
meet the budget and t maximises the trained win rate; each row also reports ``ideal_win_rate``,
the K = ∞ tilt's win rate at the same KL.

>>> from ctrl_offline.maths.planner import plan
>>> result = plan("bon", n=4, kl=0.5)
>>> [row.transform for row in result.rows]
['identity', 'log', 'exp', 'negexp']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import optimize

from ctrl_offline.maths.calibration import CalibrationTables
from ctrl_offline.maths.finite_k import Estimator, TrainedTilt, trained_tilt
from ctrl_offline.maths.procedures import Procedure, get_procedure, tilted_win_rate
from ctrl_offline.maths.simulation import simulated_win_rate
from ctrl_offline.maths.theory import kl_divergence, tilted_standard_win_rate
from ctrl_offline.maths.transforms import Transform, family_has_t, get_transform, unit_scale

__all__ = ["PlanRow", "Plan", "solve_beta", "solve_trained_beta", "plan", "tradeoff_curve", "trainable_beta", "DEFAULT_FAMILIES",
           "MIN_TRAINABLE_BETA", "MAX_KL", "beta_scale", "root_in_log_beta"]

DEFAULT_FAMILIES = ("identity", "log", "exp", "negexp")
DEFAULT_T_RANGE = (0.01, 40.0)
#: Simulated prompts per win rate of a simulated plan (docs/selector_planning.md).
SIMULATION_PROMPTS = 4000
MAX_KL = 25.0  # beyond this the tilted densities are narrower than double precision resolves
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
    if not (isinstance(kl, (int, float)) and math.isfinite(kl) and 0 < kl <= MAX_KL):
        raise ValueError(f"the KL budget must be a number in (0, {MAX_KL:g}] nats, got {kl!r}")
    return float(kl)


def beta_scale(transform: Transform) -> float:
    """Φ(1) − Φ(½), the scale β acts on: where root-finding in log β starts (1 when it is not finite)."""
    # Starting the bracket there lets huge-t exp (Φ up to e^t) need few steps.
    spread = float(transform.phi(np.array(1.0)) - transform.phi(np.array(0.5)))
    return spread if math.isfinite(spread) and spread > 0 else 1.0


def root_in_log_beta(gap, centre: float, half_width: float, step: float, tries: int, tol: float,
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
    return root_in_log_beta(
        lambda log_beta: kl_divergence(transform, math.exp(log_beta)) - kl,
        math.log(beta_scale(transform)), 1.0, 2.0, 60, 1e-12,
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
    return root_in_log_beta(
        lambda log_beta: trained_tilt(transform, math.exp(log_beta), k, estimator).kl() - kl,
        math.log(solve_beta(transform, kl)), 0.5, 1.0, 40, 1e-10, unreachable,
        lambda: ValueError(f"KL budget {kl} is too small to resolve for transform {transform.spec!r}"))


@dataclass(frozen=True)
class _Target:
    """What a plan's rows are scored by: a procedure's win rate with N candidates, of the exact tilt
    (``win_rate(transform, β)``: closed form or simulation) or, with ``k``, of the tilt ``estimator``
    trains from K samples per prompt (``trained_win_rate(tilt)``). The search over t scans
    ``t_points`` log-spaced t, then pins log t to ``t_tolerance``: a closed form is cheap and exact,
    a trained tilt costs ~10× as much, a simulation ~1000× with a Monte Carlo error above 1%."""

    win_rate: Callable[[Transform, float], float]
    trained_win_rate: Callable[[TrainedTilt], float] | None = None
    k: int | None = None
    estimator: Estimator | None = None
    t_points: int = 17
    t_tolerance: float = 1e-4

    def row(self, transform: Transform, kl: float) -> PlanRow:
        """The transform's row: the β meeting the budget and the win rates there."""
        if self.k is not None:
            beta = solve_trained_beta(transform, kl, self.k, self.estimator)
            tilt = trained_tilt(transform, beta, self.k, self.estimator)
            # ideal_win_rate is filled in by plan(): the family's best K = ∞ win rate at the same KL.
            return PlanRow(transform=transform.name, t=transform.t, beta=beta, kl=tilt.kl(),
                           win_rate=self.trained_win_rate(tilt), standard_win_rate=tilt.standard_win_rate(),
                           k=self.k, phi_scale=unit_scale(transform))
        beta = solve_beta(transform, kl)
        return PlanRow(transform=transform.name, t=transform.t, beta=beta, kl=kl_divergence(transform, beta),
                       win_rate=self.win_rate(transform, beta),
                       standard_win_rate=tilted_standard_win_rate(transform, beta))


def _closed_form(procedure: Procedure, n: int) -> Callable[[Transform, float], float]:
    return lambda transform, beta: float(procedure.win_rate(transform, beta, n))


def _simulation(procedure: Procedure, n: int, tables: CalibrationTables, selector_args: dict | None, prompts: int,
                seed: int) -> Callable[[Transform, float], float]:
    # The same seed for every (t, β): common random numbers keep the search over t smooth.
    return lambda transform, beta: simulated_win_rate(tables, transform, beta, procedure.name, n, prompts=prompts,
                                                      seed=seed, selector_args=selector_args)


def trainable_beta(transform: Transform, beta: float) -> float:
    """β on the scale where Φ spans 1 on [0, 1] — the β the trainers get from ``ctrl-data build``."""
    return beta / unit_scale(transform)


def _best_t(name: str, target: _Target, kl: float, t_range: tuple[float, float], min_beta: float) -> PlanRow:
    lo, hi = math.log(t_range[0]), math.log(t_range[1])

    def objective(log_t: float) -> float:
        transform = get_transform(name, math.exp(log_t))
        try:
            row = target.row(transform, kl)
        except ValueError:  # this t cannot reach the budget at this K
            return 1.0
        # Untrainable t scores worse than any real plan (win rates lie in [0, 1]).
        return -row.win_rate if trainable_beta(transform, row.beta) >= min_beta else 1.0

    grid = np.linspace(lo, hi, target.t_points)
    scores = [objective(x) for x in grid]
    i = int(np.argmin(scores))
    if scores[i] >= 1.0:
        raise ValueError(f"no t in {t_range} gives {name} a trainable β (≥ {min_beta:g} with Φ spanning 1) at "
                         f"KL {kl:g}; lower the KL budget, narrow t_range or pass a smaller min_beta")
    left, right = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    refined = optimize.minimize_scalar(objective, bounds=(left, right), method="bounded",
                                       options={"xatol": target.t_tolerance})
    best_log_t = refined.x if refined.fun <= scores[i] else grid[i]
    return target.row(get_transform(name, math.exp(best_log_t)), kl)


def _target(procedure: Procedure, n: int, k: int | None, estimator: Estimator | None,
            tables: CalibrationTables | None, selector_args: dict | None, simulate: bool, prompts: int,
            seed: int) -> _Target:
    """The closed form where the procedure has one (and ``simulate`` is off), else the simulation on ``tables``."""
    if procedure.win_rate is not None and not simulate:
        if k is not None and procedure.trained_win_rate is None:
            raise ValueError(f"{procedure.name} ({procedure.description}) has no finite-K win rate "
                             "(Procedure.trained_win_rate): plan it at K = ∞ (k=None)")
        trained = None if k is None else (lambda tilt: float(procedure.trained_win_rate(tilt, n)))
        return _Target(_closed_form(procedure, n), trained, k, estimator, t_tolerance=1e-4 if k is None else 1e-3)
    if tables is None:
        why = "is simulated (simulate=True)" if procedure.win_rate is not None else "has no closed-form win rate"
        raise ValueError(f"{procedure.name} ({procedure.description}) {why}: plan it on calibration tables "
                         "(tables=load_tables('calib/'); ctrl-data plan --tables calib/)")
    if k is not None:
        raise ValueError(f"a simulated plan ({procedure.name}) is of the exact tilt: finite-K plans (k=) need a "
                         "closed form; pass k=None")
    return _Target(_simulation(procedure, n, tables, selector_args, prompts, seed), t_points=9, t_tolerance=1e-2)


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
    tables: CalibrationTables | None = None,
    selector_args: dict | None = None,
    simulate: bool = False,
    simulation_prompts: int = SIMULATION_PROMPTS,
    seed: int = 0,
) -> Plan:
    """Tune every transform family for the registered procedure ``inference`` with N candidates.

    Families with a parameter t get the t in ``t_range`` that maximises the predicted
    inference-time win rate under the budget among the t whose β, with Φ rescaled to span 1,
    is at least ``min_beta`` (smaller β cannot be trained; 0 turns the guard off); each row
    reports the β that meets the budget for the raw Φ.

    The win rate is the procedure's closed form (``bon``, ``won``: docs/theory.md §3) or, for a
    procedure without one (or with ``simulate=True``), simulated on the calibration ``tables``
    (:func:`ctrl_offline.maths.simulation.simulated_win_rate`: ``simulation_prompts`` prompts drawn with
    ``seed``, the procedure's settings from ``selector_args``; docs/selector_planning.md). Planning
    a procedure without a closed form and without tables is a ValueError.

    ``k=None`` plans the exact tilt (K = ∞). ``k=K`` plans the tilt that ``loss`` trains from K
    reference samples per prompt (pairs drawn by ``strategy``, node values ``targets``, pointwise
    normaliser ``log_partition``; see :class:`ctrl_offline.maths.finite_k.Estimator`): the rows' KL and
    win rates are what the trained policy reaches, and ``ideal_win_rate`` the K = ∞ figure at
    that KL. A family that cannot meet the budget at this K (``log`` with ``"loo"`` targets, whose
    rank-0 sample has Φ = −∞; weighted SFT beyond best-of-K's KL) is left out of the rows. K-aware
    plans need the procedure's finite-K win rate (``Procedure.trained_win_rate``; simulated plans
    are of the exact tilt only).
    """
    procedure = get_procedure(inference)
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
    target = _target(procedure, int(n), k, estimator, tables, selector_args, simulate, simulation_prompts, seed)
    rows, skipped = [], []
    for name in families:
        try:
            if family_has_t(name):
                rows.append(_best_t(name, target, kl, t_range, min_beta))
            else:
                rows.append(target.row(get_transform(name), kl))
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
    """Closed-form inference-time win rate at each KL in ``kls`` (β re-solved for each)."""
    transform = get_transform(transform)
    return np.array([tilted_win_rate(transform, solve_beta(transform, k), inference, n) for k in kls])
