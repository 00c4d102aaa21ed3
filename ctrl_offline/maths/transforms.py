"""Reward transforms Φ applied to calibrated rewards u ∈ [0, 1] (docs/theory.md §2–3).

CTRL's target policy is π*(y|x) ∝ π_ref(y|x)·exp(Φ(C(x,y))/β). Under π_ref the calibrated
reward is Uniform[0, 1], so the whole tilt is described by the density of u under π*:

    f(u) = exp(Φ(u)/β) / Z(β),     Z(β) = ∫₀¹ exp(Φ(v)/β) dv.

Every transform exposes Φ and, in log space so that large t or small β never overflow,

* ``log_partition(beta)``       log Z(β)
* ``log_cdf(u, beta)``          log F(u), F the CDF of f
* ``log_density(u, beta)``      log f(u)

The four families of the paper have closed forms; a transform registered by a user falls back
on quadrature (accurate unless f is far narrower than 1e-12 somewhere).

>>> from ctrl_offline.maths.transforms import get_transform
>>> exp4 = get_transform("exp", t=4.0)
>>> float(exp4.log_partition(0.1)) > 0
True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ctrl_offline.maths._quadrature import gauss_legendre_between, nodes_and_weights, panel_breaks
from ctrl_offline.maths._special import log_int_exp_over_s, log_int_negexp_over_s

__all__ = [
    "SynthesisError",
    "as_transform",
    "check_beta",
    "Transform",
    "Rescaled",
    "unit_scale",
    "Identity",
    "Log",
    "Exp",
    "NegExp",
    "FunctionTransform",
    "register_transform",
    "get_transform",
    "family_has_t",
    "available_transforms",
]


def _check_beta(beta) -> np.ndarray:
    beta = np.asarray(beta, dtype=float)
    if not np.all(np.isfinite(beta) & (beta > 0)):
        raise ValueError(f"beta must be finite and > 0, got {beta!r}")
    return beta


def _check_u(u) -> np.ndarray:
    u = np.asarray(u, dtype=float)
    if not np.all((u >= 0) & (u <= 1)):
        raise ValueError("calibrated rewards u must lie in [0, 1]")
    return u


class Transform:
    """An increasing map Φ of calibrated rewards, with the tilted density it induces.

    Subclasses implement :meth:`phi`; they may override :meth:`_log_cumulative_excess` and
    :meth:`_gap` with closed forms (the defaults integrate numerically).
    """

    name: str = "transform"
    #: Whether the family has a shape parameter ``t``.
    has_t: bool = False

    def __init__(self, t: float | None = None):
        if self.has_t:
            if t is None or not math.isfinite(t) or t <= 0:
                raise ValueError(f"transform {self.name!r} needs a finite parameter t > 0, got t={t!r}")
            t = float(t)
        elif t is not None:
            raise ValueError(f"transform {self.name!r} takes no parameter t (got t={t!r})")
        self.t = t

    # -- the map itself -------------------------------------------------------------------
    def phi(self, u: np.ndarray) -> np.ndarray:
        """Φ(u)."""
        raise NotImplementedError

    def __call__(self, u) -> np.ndarray:
        return self.phi(np.asarray(u, dtype=float))

    # -- the tilted density -----------------------------------------------------------------
    def _gap(self, u: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """(Φ(1) − Φ(u))/β ≥ 0, the log-density below its maximum at u = 1."""
        return (self.phi(np.ones_like(u)) - self.phi(u)) / beta

    def _log_cumulative_excess(self, u: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """log ∫₀ᵘ exp(Φ(v)/β) dv − Φ(1)/β (generic composite Gauss–Legendre)."""
        u, beta = np.broadcast_arrays(u, beta)
        out = np.empty(u.shape)
        for b in np.unique(beta):
            sel = beta == b
            out[sel] = self._quadrature_log_cumulative(u[sel], float(b))
        return out

    def _quadrature_log_cumulative(self, u: np.ndarray, beta: float) -> np.ndarray:
        breaks = panel_breaks()
        nodes, weights = nodes_and_weights()
        integrand = np.exp(-self._gap(nodes, np.full_like(nodes, beta)))
        panel_mass = (integrand * weights).reshape(len(breaks) - 1, -1).sum(axis=1)
        cumulative = np.concatenate([[0.0], np.cumsum(panel_mass)])
        panel = np.clip(np.searchsorted(breaks, u, side="right") - 1, 0, len(breaks) - 2)
        x, w = gauss_legendre_between(breaks[panel], u)
        partial = (np.exp(-self._gap(x, np.full_like(x, beta))) * w).sum(axis=1)
        with np.errstate(divide="ignore"):
            return np.log(cumulative[panel] + partial)

    def log_partition(self, beta) -> np.ndarray:
        """log Z(β) = log ∫₀¹ exp(Φ(u)/β) du."""
        beta = _check_beta(beta)
        phi_one = self.phi(np.ones_like(beta))
        return phi_one / beta + self._log_cumulative_excess(np.ones_like(beta), beta)

    def log_cdf(self, u, beta) -> np.ndarray:
        """log F(u) with F(u) = ∫₀ᵘ f, f the tilted density of u under π*."""
        u, beta = np.broadcast_arrays(_check_u(u), _check_beta(beta))
        return self._log_cumulative_excess(u, beta) - self._log_cumulative_excess(np.ones_like(u), beta)

    def log_density(self, u, beta) -> np.ndarray:
        """log f(u) = Φ(u)/β − log Z(β)."""
        u, beta = np.broadcast_arrays(_check_u(u), _check_beta(beta))
        return -self._gap(u, beta) - self._log_cumulative_excess(np.ones_like(u), beta)

    # -- identity ---------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """``name`` or ``name:t``, the form :func:`get_transform` and the CLI accept."""
        return self.name if self.t is None else f"{self.name}:{self.t:g}"

    def to_dict(self) -> dict:
        return {"transform": self.name, "t": self.t}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t={self.t!r})" if self.has_t else f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return isinstance(other, Transform) and (self.name, self.t) == (other.name, other.t)

    def __hash__(self) -> int:
        return hash((self.name, self.t))


class Identity(Transform):
    """Φ(u) = u: the KL-regularised optimum of the standard win rate."""

    name = "identity"

    def phi(self, u):
        return np.asarray(u, dtype=float)

    def _gap(self, u, beta):
        return (1.0 - u) / beta

    def _log_cumulative_excess(self, u, beta):
        # log[β (e^{u/β} − 1)] − 1/β = log β + (u − 1)/β + log(1 − e^{−u/β})
        with np.errstate(divide="ignore"):
            return np.log(beta) + (u - 1.0) / beta + np.log(-np.expm1(-u / beta))


class Log(Transform):
    """Φ(u) = log u. With β = 1/(N−1) the tilted policy is exactly the best-of-N policy."""

    name = "log"

    def phi(self, u):
        with np.errstate(divide="ignore"):
            return np.log(np.asarray(u, dtype=float))

    def _gap(self, u, beta):
        with np.errstate(divide="ignore"):
            return -np.log(u) / beta

    def _log_cumulative_excess(self, u, beta):
        # ∫₀ᵘ v^{1/β} dv = u^{1+1/β} / (1 + 1/β), and Φ(1) = 0.
        with np.errstate(divide="ignore"):
            return (1.0 + 1.0 / beta) * np.log(u) - np.log1p(1.0 / beta)


class Exp(Transform):
    """Φ(u) = exp(t·u), t > 0: the transform for best-of-N decoding.

    Z = [Ei(e^t/β) − Ei(1/β)] / t, evaluated through scaled exponential integrals.
    """

    name = "exp"
    has_t = True

    def phi(self, u):
        return np.exp(self.t * np.asarray(u, dtype=float))

    def _gap(self, u, beta):
        top = np.exp(self.t) / beta
        return -top * np.expm1(self.t * (u - 1.0))

    def _log_cumulative_excess(self, u, beta):
        # With a = 1/β, s = a e^{tv}: ∫₀ᵘ e^{a e^{tv}} dv = (1/t) ∫_a^{a e^{tu}} e^s/s ds.
        t = self.t
        a = 1.0 / beta
        upper = a * np.exp(t * u)
        top = a * np.exp(t)
        scaled = log_int_exp_over_s(a, upper).reshape(np.shape(upper))
        return top * np.expm1(t * (u - 1.0)) + scaled - math.log(t)


class NegExp(Transform):
    """Φ(u) = −exp(−t·u), t > 0: the transform for worst-of-N decoding (red-teaming, safety).

    Z = [E1(e^{−t}/β) − E1(1/β)] / t, evaluated through scaled exponential integrals.
    """

    name = "negexp"
    has_t = True

    def phi(self, u):
        return -np.exp(-self.t * np.asarray(u, dtype=float))

    def _gap(self, u, beta):
        lower = np.exp(-self.t * u) / beta
        return -lower * np.expm1(-self.t * (1.0 - u))

    def _log_cumulative_excess(self, u, beta):
        # With a = 1/β, s = a e^{−tv}: ∫₀ᵘ e^{−a e^{−tv}} dv = (1/t) ∫_{a e^{−tu}}^a e^{−s}/s ds.
        t = self.t
        a = 1.0 / beta
        lower = a * np.exp(-t * u)
        scaled = log_int_negexp_over_s(lower, a).reshape(np.shape(lower))
        return lower * np.expm1(-t * (1.0 - u)) + scaled - math.log(t)


class FunctionTransform(Transform):
    """A user transform from a plain function ``phi(u)`` or ``phi(u, t)``."""

    def __init__(self, name: str, fn: Callable, has_t: bool = False, t: float | None = None):
        self.name = name
        self.has_t = has_t
        self._fn = fn
        super().__init__(t)
        _check_increasing(self)

    def phi(self, u):
        u = np.asarray(u, dtype=float)
        out = self._fn(u, self.t) if self.has_t else self._fn(u)
        return np.broadcast_to(np.asarray(out, dtype=float), u.shape)


class Rescaled(Transform):
    """Φ/s at β/s: the same tilted policy π* ∝ π_ref·exp(Φ/β), with Φ in other units.

    Training sets are written with Φ rescaled to span 1 on [0, 1] (see :func:`unit_scale`): for
    exp/negexp at large t, Φ spans e^t and a soft label σ(ΔΦ) would be 0 or 1 in float64.
    """

    def __init__(self, base: Transform, scale: float):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale!r}")
        self.base, self.scale = base, float(scale)
        self.name, self.has_t, self.t = base.name, base.has_t, base.t

    def phi(self, u):
        return self.base.phi(u) / self.scale

    def _gap(self, u, beta):
        return self.base._gap(u, beta * self.scale)

    def _log_cumulative_excess(self, u, beta):
        return self.base._log_cumulative_excess(u, beta * self.scale)

    def __repr__(self) -> str:
        return f"Rescaled({self.base!r}, scale={self.scale:g})"


def unit_scale(transform: Transform) -> float:
    """Φ(1) − Φ(0), the span of Φ on [0, 1]; 1 when it is infinite (log) or not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        span = float(transform.phi(np.ones(1))[0] - transform.phi(np.zeros(1))[0])
    return span if math.isfinite(span) and span > 0 else 1.0


def _check_increasing(transform: Transform) -> None:
    grid = np.linspace(0.0, 1.0, 1025)[1:]
    values = transform.phi(grid)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"transform {transform.spec!r}: Φ(u) must be finite on (0, 1]")
    if np.any(np.diff(values) < 0) or values[-1] <= values[0]:
        raise ValueError(f"transform {transform.spec!r}: Φ must be non-decreasing and not constant on [0, 1]")


# name -> (factory taking t, whether the family has a parameter t)
_REGISTRY: dict[str, tuple[Callable[[float | None], Transform], bool]] = {
    cls.name: (cls, cls.has_t) for cls in (Identity, Log, Exp, NegExp)
}


def register_transform(name: str, phi=None, *, has_t: bool = False, overwrite: bool = False):
    """Register a transform under ``name`` so :func:`get_transform` and the CLI know it.

    ``phi`` is either a :class:`Transform` subclass or a function ``phi(u)`` (``phi(u, t)``
    when ``has_t``) mapping an array of u ∈ [0, 1] to Φ(u). Usable as a decorator::

        @register_transform("sqrt")
        def sqrt(u):
            return np.sqrt(u)
    """
    if phi is None:
        return lambda fn: register_transform(name, fn, has_t=has_t, overwrite=overwrite) or fn
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a transform named {name!r} is already registered (pass overwrite=True)")
    if isinstance(phi, type) and issubclass(phi, Transform):
        _REGISTRY[name] = (phi, phi.has_t)
    elif callable(phi):
        factory = lambda t=None: FunctionTransform(name, phi, has_t=has_t, t=t)  # noqa: E731
        factory(1.0 if has_t else None)  # validate now, not at first use
        _REGISTRY[name] = (factory, has_t)
    else:
        raise TypeError("phi must be a Transform subclass or a callable")
    return None


def get_transform(name: str, t: float | None = None) -> Transform:
    """The registered transform ``name`` (with parameter ``t`` for exp/negexp).

    ``name`` may also carry the parameter, as in ``"exp:4"``.
    """
    if isinstance(name, Transform):
        return name
    if ":" in name and t is None:
        name, _, raw = name.partition(":")
        try:
            t = float(raw)
        except ValueError:
            raise ValueError(f"cannot read the parameter t from {raw!r}") from None
    if name not in _REGISTRY:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(available_transforms())}")
    return _REGISTRY[name][0](t)


def family_has_t(name: str) -> bool:
    """Whether the registered family ``name`` takes a shape parameter t."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(available_transforms())}")
    return _REGISTRY[name][1]


def available_transforms() -> list[str]:
    return sorted(_REGISTRY)


# -- validated inputs of target synthesis (node values, pairs, pointwise rows) -------------------------


class SynthesisError(ValueError):
    """Bad input to target synthesis (node values, pairs, pointwise rows); the message names the offending rows or
    prompts."""


def as_transform(transform) -> Transform:
    """``transform`` (a :class:`Transform` or its spec, e.g. ``"exp:3"``) as a Transform."""
    try:
        return get_transform(transform)
    except (TypeError, ValueError) as err:
        raise SynthesisError(str(err)) from None


def check_beta(beta) -> float:
    """β as a float; refuses anything but a finite number > 0."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise SynthesisError(f"beta must be a finite number > 0, got {beta!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise SynthesisError(f"beta must be a finite number > 0, got {beta!r}")
    return value
