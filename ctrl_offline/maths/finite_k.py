"""The tilt an offline estimator actually trains from K reference samples per prompt (docs/finite_k.md).

The planner's K = ∞ theory (:mod:`ctrl_offline.maths.theory`) describes π* ∝ π_ref·exp(Φ(C)/β) with C the
*true* quantile of a response. The training sets are built from Ĉ, the leave-one-out rank of a
sample among the K stored samples of its prompt, and every estimator's population minimiser is a
different tilt. In the *population regime* — the policy's log-ratio ρ is a function of the response
(of its true quantile c), it cannot see the other K − 1 samples of its prompt, and there are many
prompts — that tilt is again a density of c on [0, 1], the same for every prompt, and depends only
on (Φ, β, K, estimator). With a tie-free reward the leave-one-out rank J of a sample whose true
quantile is c is Binomial(K − 1, c); the estimators see Φ only through the *node values* v_j that
the targets give rank j (``targets``):

* ``"loo"``: v_j = Φ(j/(K − 1)), the transformed leave-one-out calibrated reward;
* ``"cell"``: v_j = β·log(K·∫_{j/K}^{(j+1)/K} e^{Φ/β}), the tilt's mass on the j-th quantile cell.

With m(c) = Σ_j v_j·b_j(c), b_j the Bernstein basis of degree K − 1 (docs/finite_k.md §2–4):

=================  ===========================================================================
estimator          trained log-density ℓ(c) of the true quantile (up to its normaliser)
=================  ===========================================================================
pointwise          m(c)/β with the ``population`` normaliser log ∫e^{m/β}; any other constant
                   normaliser L gives the constrained fit ρ = (m/β − L) − W(q·e^{m/β − L})
weighted_sft       log Σ_j b_j(c)·e^{v_j/β}
ipo, distill       (m(c) − n(c))/β, n(c) the partner's expected node value (leave-two-out)
dpo (soft labels)  h(c)/β, h the root of ∫σ((h(c) − h(c'))/s)dc' = E[σ((v_Jc − v_Jc')/s) | c]
=================  ===========================================================================

(pairs: strategy ``all`` or ``sampled``, which draws uniformly among all pairs; s is the span of Φ,
since the training set is written with Φ rescaled to span 1.) The figures of the trained tilt —
KL(π‖π_ref), standard, best-of-N and worst-of-N win rates — are the K = ∞ formulas applied to its
density. :func:`ctrl_offline.maths.planner.plan` with ``k=K`` chooses t and β on them.

>>> from ctrl_offline.maths.finite_k import Estimator, trained_tilt
>>> tilt = trained_tilt("identity", 0.25, k=8, estimator=Estimator(loss="ipo"))
>>> round(tilt.kl(), 3) > 0
True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import special, stats

from ctrl_offline.maths._quadrature import gauss_legendre_between, nodes_and_weights, panel_breaks
from ctrl_offline.maths.losses import get_loss
from ctrl_offline.maths.theory import cell_values
from ctrl_offline.maths.transforms import (
    Rescaled,
    SynthesisError,
    Transform,
    as_transform,
    check_beta,
    get_transform,
    unit_scale,
)

__all__ = [
    "ESTIMATOR_LOSSES",
    "TARGET_SCHEMES",
    "POINTWISE_NORMALISERS",
    "THEORY_STRATEGIES",
    "Estimator",
    "TrainedTilt",
    "node_values",
    "trained_tilt",
    "tilt_from_log_density",
    "ideal_tilt",
    "population_log_partition",
    "log_partition_gap",
]

ESTIMATOR_LOSSES = ("dpo", "ipo", "distill", "pointwise", "weighted_sft")
TARGET_SCHEMES = ("loo", "cell")
POINTWISE_NORMALISERS = ("population", "empirical", "continuous")
#: Pair strategies with a finite-K theory: both make every pair of a prompt's samples equally likely.
THEORY_STRATEGIES = ("all", "sampled")

_DPO_NODES = 96  # Gauss–Legendre nodes for the DPO fixed point (its h is smooth: a few dozen suffice)


@dataclass(frozen=True)
class Estimator:
    """An offline estimator: the loss, how pairs are drawn, the node values and (pointwise) the normaliser."""

    loss: str = "dpo"
    strategy: str = "all"
    targets: str = "loo"
    log_partition: str = "population"

    def __post_init__(self):
        if self.loss not in ESTIMATOR_LOSSES:
            raise ValueError(f"no finite-K theory for loss {self.loss!r}; choose one of {', '.join(ESTIMATOR_LOSSES)}")
        if self.targets not in TARGET_SCHEMES:
            raise ValueError(f"targets must be one of {', '.join(TARGET_SCHEMES)}, got {self.targets!r}")
        if self.log_partition not in POINTWISE_NORMALISERS:
            raise ValueError(f"log_partition must be one of {', '.join(POINTWISE_NORMALISERS)}, "
                             f"got {self.log_partition!r}")
        if get_loss(self.loss).pairwise and self.strategy not in THEORY_STRATEGIES:
            raise ValueError(f"no finite-K theory for pair strategy {self.strategy!r} (its pairs are not uniform "
                             f"over a prompt's samples); use one of {', '.join(THEORY_STRATEGIES)}")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_k(k) -> int:
    if isinstance(k, bool) or int(k) != k or k < 2:
        raise ValueError(f"K must be an integer ≥ 2 (leave-one-out ranks need two samples per prompt), got {k!r}")
    return int(k)


# -- node values --------------------------------------------------------------------------------
def node_values(transform: Transform | str, beta: float, k: int, targets: str = "loo") -> np.ndarray:
    """v_0 … v_{K−1}: the target value an estimator gives the sample of leave-one-out rank j among K.

    In the units of ``transform`` and ``beta`` (β only matters for ``"cell"``).
    """
    transform, k = get_transform(transform), _check_k(k)
    if targets == "loo":
        with np.errstate(divide="ignore"):
            return np.asarray(transform.phi(np.arange(k) / (k - 1)), dtype=float)
    if targets == "cell":
        return _cell_values(transform, float(beta), k)
    raise ValueError(f"targets must be one of {', '.join(TARGET_SCHEMES)}, got {targets!r}")


def _cell_values(transform: Transform, beta: float, k: int) -> np.ndarray:
    j = np.arange(k)
    return cell_values(transform, beta, j / k, (j + 1) / k)


def population_log_partition(transform: Transform | str, beta: float, k: int, targets: str = "loo") -> float:
    """log ∫₀¹ exp(m(c)/β) dc, m the Bernstein mean of the node values: the pointwise normaliser whose
    population minimiser is exactly the tilt by m (docs/finite_k.md §3). In the units of ``transform``."""
    values = node_values(transform, beta, k, targets)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"transform {get_transform(transform).spec!r} with {targets!r} targets has Φ = −∞ at rank 0; "
                         "use targets='cell'")
    nodes, weights = nodes_and_weights()
    x = _bernstein_mean(values, nodes) / beta
    top = float(np.max(x))
    return top + math.log(float(np.sum(weights * np.exp(x - top))))


def log_partition_gap(transform: Transform | str, beta: float, k: int) -> float:
    """Empirical minus continuous log Z for a tie-free prompt with K reference samples (docs/log_partition.md).

    The leave-one-out calibrated values of such a prompt (what ``calibrate_reference`` gives) are
    exactly the grid j/(K−1), j = 0..K−1, so

        gap = log( (1/K) Σ_j exp(Φ(j/(K−1))/β) ) − log ∫₀¹ exp(Φ(v)/β) dv,

    in nats of Φ/β. Pointwise targets with the continuous normaliser sit β·gap above the
    empirical ones for every response of such a prompt. The gap → 0 like 1/K. Needs no data: it
    is the ``"empirical"`` against the ``"continuous"`` normaliser of
    :func:`ctrl_offline.rows.pointwise.pointwise_targets`; bad input raises
    :class:`ctrl_offline.maths.transforms.SynthesisError`, as those do.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2:
        raise SynthesisError(f"K must be an integer ≥ 2 (the grid j/(K−1) needs two points), got {k!r}")
    beta = check_beta(beta)
    transform = as_transform(transform)
    with np.errstate(divide="ignore"):
        x = np.asarray(transform.phi(np.arange(k) / (k - 1)), dtype=float) / beta
    top = x.max()
    empirical = top + math.log(np.mean(np.exp(x - top)))
    return float(empirical - float(transform.log_partition(beta)))


# -- Bernstein machinery ------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _cdf_points() -> np.ndarray:
    """The points at which :class:`TrainedTilt` evaluates its density for the CDF (fixed, so cached bases apply)."""
    breaks = panel_breaks()
    nodes = nodes_and_weights()[0]
    panel = np.repeat(np.arange(len(breaks) - 1), len(nodes) // (len(breaks) - 1))
    x, w = gauss_legendre_between(breaks[panel], nodes)
    x.setflags(write=False)
    w.setflags(write=False)
    return x, w


_BASIS_CACHE: dict = {}


def _cached(kind: str, u: np.ndarray, degree: int, make):
    # The two fixed grids (quadrature nodes, CDF points) are evaluated for every β and t of a plan:
    # cache their bases by identity; other arrays are computed afresh.
    if u is nodes_and_weights()[0] or u is _cdf_points()[0]:
        key = (kind, id(u), degree)
        if key not in _BASIS_CACHE:
            _BASIS_CACHE[key] = make()
        return _BASIS_CACHE[key]
    return make()


def _bernstein(u: np.ndarray, degree: int) -> np.ndarray:
    """b_j(u) = C(d, j) u^j (1−u)^{d−j}, shape u.shape + (d + 1,)."""
    return _cached("pmf", u, degree, lambda: stats.binom.pmf(np.arange(degree + 1), degree, np.asarray(u, float)[..., None]))


def _bernstein_mean(values: np.ndarray, u: np.ndarray) -> np.ndarray:
    """m(u) = Σ_j v_j b_j(u) (finite v only)."""
    return _bernstein(u, len(values) - 1) @ values


def _partner_mean(values: np.ndarray, u: np.ndarray) -> np.ndarray:
    """n(c): expected node value of a uniform partner drawn from the same K samples as a sample at c.

    n(c) = (1/(K−1)) Σ_{a=0}^{K−2} [v_a·P(Bin(K−1, c) > a) + v_{a+1}·P(Bin(K−1, c) ≤ a)]
    (docs/finite_k.md §4).
    """
    k = len(values)
    a = np.arange(k - 1)
    cdf = _cached("cdf", u, k - 1, lambda: stats.binom.cdf(a, k - 1, np.asarray(u, float)[..., None]))
    return ((1.0 - cdf) @ values[:-1] + cdf @ values[1:]) / (k - 1)


def _pair_label_matrix(values: np.ndarray, x: np.ndarray, scale: float) -> np.ndarray:
    """P[a, b] = E[σ((v_{J_a} − v_{J_b})/s) | true quantiles x_a, x_b] for two samples of one prompt.

    For x_a > x_b, with A of the other K − 2 samples below x_b and B between:
    J_a = 1 + A + B, J_b = A, (A, B, rest) ~ Multinomial(K − 2; x_b, x_a − x_b, 1 − x_a).
    """
    k = len(values)
    hi, lo = np.maximum.outer(x, x), np.minimum.outer(x, x)
    upper = np.zeros_like(hi)  # label of the sample at the larger quantile
    log_fact = special.gammaln(np.arange(k) + 1.0)
    with np.errstate(divide="ignore"):
        log_lo, log_mid, log_top = np.log(lo), np.log(hi - lo), np.log1p(-hi)
    for first in range(k - 1):
        for between in range(k - 1 - first):
            rest = k - 2 - first - between
            coef = log_fact[k - 2] - log_fact[first] - log_fact[between] - log_fact[rest]
            with np.errstate(invalid="ignore"):
                log_p = coef + _xlogy(first, log_lo) + _xlogy(between, log_mid) + _xlogy(rest, log_top)
            label = special.expit((values[first + between + 1] - values[first]) / scale)
            upper += np.exp(log_p) * label
    above = np.greater.outer(x, x)
    out = np.where(above, upper, 1.0 - upper)
    np.fill_diagonal(out, 0.5)
    return out


def _xlogy(n: int, log_x: np.ndarray) -> np.ndarray:
    return np.zeros_like(log_x) if n == 0 else n * log_x


@lru_cache(maxsize=4)
def _legendre01(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


_DPO_CACHE: dict = {}


def _dpo_fixed_point(values: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """h on Gauss nodes (cached: a β search with fixed node values re-uses it)."""
    key = (values.tobytes(), float(scale))
    if key not in _DPO_CACHE:
        if len(_DPO_CACHE) > 256:
            _DPO_CACHE.clear()
        _DPO_CACHE[key] = _solve_dpo_fixed_point(values, scale)
    return _DPO_CACHE[key]


def _solve_dpo_fixed_point(values: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """h on Gauss nodes minimising E[softplus((h(c)−h(c'))/s) − P(c,c')(h(c)−h(c'))/s] (Newton)."""
    x, w = _legendre01(_DPO_NODES)
    labels = _pair_label_matrix(values, x, scale)
    ww = np.outer(w, w)
    # Start from the squared-loss solution m − n, which is exact when labels are linear in the margin.
    h = (_bernstein_mean(values, x) - _partner_mean(values, x)) / scale
    for _ in range(100):
        s = special.expit(h[:, None] - h[None, :])
        grad = 2.0 * np.sum(ww * (s - labels), axis=1)
        curv = ww * s * (1.0 - s)
        hess = 2.0 * (np.diag(curv.sum(axis=1)) - curv)
        hess += np.outer(w, w)  # pins the free constant (Σ w h = 0 direction) without moving the optimum
        step = np.linalg.solve(hess, grad + np.outer(w, w) @ h)
        h = h - step
        if np.max(np.abs(step)) < 1e-11:
            break
    return x, h * scale


def _lagrangian_q(log_target: np.ndarray, weights: np.ndarray) -> float:
    """q of the ρ minimising ∫(T − βρ)² subject to ∫e^ρ = 1, with T/β = ``log_target`` on the rule's nodes.

    Stationarity gives ρ = T/β − w, w·e^w = q·e^{T/β}; q is found so that ∫e^ρ = ∫w/q = 1
    (docs/finite_k.md §3). ρ anywhere is then T/β − W(q·e^{T/β}).
    """
    def mass(q: float) -> float:
        return float(np.sum(weights * np.exp(log_target - _w_of(q, log_target))))

    base = mass(0.0)
    if abs(base - 1.0) < 1e-14:
        return 0.0
    if base > 1.0:
        lo, hi = 0.0, 1e-300
        while mass(hi) > 1.0:
            hi *= 10.0
    else:
        # Targets below the normaliser: the fit's infimum is not attained (docs/finite_k.md §3) — it matches
        # the targets almost everywhere and the missing mass 1 − base escapes into an ever narrower spike,
        # whose size depends on the model class, not on the loss.
        raise ValueError(
            f"pointwise targets with this normaliser leave {1.0 - base:.3g} of the policy's mass unaccounted for: "
            "the population fit has no minimiser (the mass escapes into a spike whose KL depends on the model), "
            "so there is no finite-K prediction; use log_partition='population'"
        )
    from scipy.optimize import brentq

    return brentq(lambda v: mass(v) - 1.0, lo, hi, xtol=1e-300, rtol=1e-14, maxiter=500)


def _w_of(q: float, z: np.ndarray) -> np.ndarray:
    """W(q·e^z) (principal branch), without overflowing e^z."""
    if q == 0.0:
        return np.zeros_like(z)
    if q < 0.0:
        return special.lambertw(q * np.exp(z)).real
    # W(e^y), y = log q + z: Newton on w + log w = y from w = y − log y (y > 1) or e^y.
    y = math.log(q) + z
    w = np.where(y > 1.0, y - np.log(np.maximum(y, 1.0)), np.exp(np.minimum(y, 1.0)))
    for _ in range(60):
        step = (w + np.log(w) - y) / (1.0 + 1.0 / w)
        w = np.maximum(w - step, w * 1e-3)
        if np.max(np.abs(step) / np.maximum(w, 1e-300)) < 1e-14:
            break
    return w


# -- the trained tilt ---------------------------------------------------------------------------
class TrainedTilt:
    """A density of the true quantile c under a policy, with its KL and win rates against π_ref.

    Built from a log-density known up to a constant; everything is integrated on the library's
    graded Gauss–Legendre rule, the CDF panel by panel.
    """

    def __init__(self, log_density_fn, description: str = ""):
        self._fn = log_density_fn
        self.description = description
        nodes, weights = nodes_and_weights()
        raw = np.asarray(log_density_fn(nodes), dtype=float)
        top = float(np.max(raw))
        self._log_norm = top + math.log(float(np.sum(weights * np.exp(raw - top))))
        self._nodes, self._weights = nodes, weights
        self._log_f = raw - self._log_norm
        self._cdf = None

    def log_density(self, u) -> np.ndarray:
        """log f(c), normalised: ∫₀¹ f = 1."""
        return np.asarray(self._fn(np.asarray(u, float)), dtype=float) - self._log_norm

    def _cdf_on_nodes(self) -> np.ndarray:
        if self._cdf is None:
            breaks = panel_breaks()
            f = np.exp(self._log_f)
            mass = (f * self._weights).reshape(len(breaks) - 1, -1).sum(axis=1)
            before = np.concatenate([[0.0], np.cumsum(mass)])
            panel = np.repeat(np.arange(len(breaks) - 1), len(self._nodes) // (len(breaks) - 1))
            x, w = _cdf_points()
            # log f between neighbouring nodes (≤ 1/4096 apart, closer where f is steep) is linear to
            # far better than the rule's accuracy; no second evaluation of the tilt is needed.
            log_f = np.interp(x, self._nodes, self._log_f)
            partial = (np.exp(log_f) * w).sum(axis=1)
            self._cdf = np.clip(before[panel] + partial, 0.0, 1.0)
        return self._cdf

    def kl(self) -> float:
        """KL(π ‖ π_ref) = ∫ f log f, in nats."""
        f = np.exp(self._log_f)
        return float(max(np.sum(self._weights * np.where(f > 0, f * self._log_f, 0.0)), 0.0))

    def standard_win_rate(self) -> float:
        return float(np.sum(self._weights * self._nodes * np.exp(self._log_f)))

    def bon_win_rate(self, n: int) -> float:
        cdf, u = self._cdf_on_nodes(), self._nodes
        return float(1.0 - np.sum(self._weights * n * u ** (n - 1) * cdf**n))

    def won_win_rate(self, n: int) -> float:
        cdf, u = self._cdf_on_nodes(), self._nodes
        return float(np.sum(self._weights * n * (1.0 - u) ** (n - 1) * (1.0 - cdf) ** n))

    def win_rate(self, inference: str, n: int) -> float:
        if inference == "bon":
            return self.bon_win_rate(n)
        if inference == "won":
            return self.won_win_rate(n)
        raise ValueError(f"unknown inference procedure {inference!r}; choose 'bon' or 'won'")

    def __repr__(self) -> str:
        return f"TrainedTilt({self.description}, kl={self.kl():.4g})"


def tilt_from_log_density(log_density_fn, description: str = "") -> TrainedTilt:
    """A :class:`TrainedTilt` from any log-density of the true quantile (up to a constant)."""
    return TrainedTilt(log_density_fn, description)


def ideal_tilt(transform: Transform | str, beta: float) -> TrainedTilt:
    """The K = ∞ tilt π* ∝ π_ref·e^{Φ(C)/β} as a :class:`TrainedTilt` (for side-by-side figures)."""
    transform = get_transform(transform)
    return TrainedTilt(lambda u: transform.log_density(u, beta), f"{transform.spec} β={beta:.4g} K=∞")


def trained_tilt(transform: Transform | str, beta: float, k: int, estimator: Estimator | None = None) -> TrainedTilt:
    """The population minimiser of ``estimator`` on K samples per prompt, at the planner's (Φ, β).

    ``transform`` and ``beta`` are the raw ones (as :func:`ctrl_offline.maths.planner.plan` reports them);
    the training set rescales Φ to span 1, which only matters for soft-label DPO.
    """
    estimator = estimator or Estimator()
    transform, k = get_transform(transform), _check_k(k)
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta!r}")
    scale = unit_scale(transform)
    unit, unit_beta = Rescaled(transform, scale), beta / scale
    values = node_values(unit, unit_beta, k, estimator.targets)
    label = f"{transform.spec} β={beta:.4g} K={k} {estimator.loss}/{estimator.targets}"
    loss = estimator.loss
    if loss == "weighted_sft":
        if not np.isfinite(values[-1]):
            raise ValueError(f"transform {transform.spec!r} gives no finite target at K={k}")
        log_w = values / unit_beta  # −∞ (log at rank 0) is weight 0
        return TrainedTilt(lambda u: _log_bernstein_exp(log_w, u), label)
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"transform {transform.spec!r} with {estimator.targets!r} targets gives Φ = −∞ to the rank-0 sample "
            "(log at u = 0): no finite target exists; use targets='cell', which gives each rank the tilt's mass "
            "on its quantile cell"
        )
    if loss in ("ipo", "distill"):
        return TrainedTilt(lambda u: (_bernstein_mean(values, u) - _partner_mean(values, u)) / unit_beta, label)
    if loss == "dpo":
        # Soft labels σ(Δv) against logits β·Δρ: the fixed point is in units where Φ spans 1 (s = 1 here).
        x, h = _dpo_fixed_point(values, 1.0)
        interp = _barycentric(x, h)
        return TrainedTilt(lambda u: interp(u) / unit_beta, label)
    # pointwise
    mean = lambda u: _bernstein_mean(values, u) / unit_beta  # noqa: E731
    if estimator.log_partition == "population":
        return TrainedTilt(mean, label)
    if estimator.log_partition == "empirical":
        top = float(np.max(values / unit_beta))
        log_norm = top + math.log(float(np.mean(np.exp(values / unit_beta - top))))
    else:
        log_norm = float(unit.log_partition(unit_beta))
    nodes, weights = nodes_and_weights()
    q_fit = _lagrangian_q(mean(nodes) - log_norm, weights)
    return TrainedTilt(lambda u: (mean(u) - log_norm) - _w_of(q_fit, mean(u) - log_norm), label)


def _log_bernstein_exp(log_w: np.ndarray, u) -> np.ndarray:
    """log Σ_j b_j(u)·e^{log_w_j}, stable for large weights."""
    degree = len(log_w) - 1
    with np.errstate(divide="ignore"):
        log_b = _cached("logpmf", u, degree,
                        lambda: stats.binom.logpmf(np.arange(degree + 1), degree, np.asarray(u, float)[..., None]))
    return special.logsumexp(log_b + log_w, axis=-1)


def _barycentric(x: np.ndarray, y: np.ndarray):
    """The polynomial through (x, y) on the DPO nodes; its matrix on the quadrature nodes is cached."""
    from scipy.interpolate import BarycentricInterpolator

    def evaluate(u):
        if u is nodes_and_weights()[0]:
            matrix = _cached("bary", u, len(x), lambda: BarycentricInterpolator(x, np.eye(len(x)))(u))
            return matrix @ y
        return BarycentricInterpolator(x, y)(np.asarray(u, float))

    return evaluate
