"""Scaled exponential integrals, in the form the transforms' closed forms need.

The log-partitions of the exp and negexp transforms are differences of exponential
integrals, ``Ei(y) - Ei(x)`` and ``E1(x) - E1(y)``, whose values overflow (or underflow)
long before their logarithms do. Everything here works with the scaled integrals

    log_int_exp_over_s(x, y)      = log ∫_x^y e^{s} / s ds - y
    log_int_negexp_over_s(x, y)   = log ∫_x^y e^{-s} / s ds + x

for 0 < x ≤ y, which stay moderate (logarithmic in the arguments) for any finite input. Short intervals use Gauss–Legendre
quadrature (no cancellation); long ones use the scaled special functions
``e^{-z} Ei(z)`` and ``e^{z} E1(z)`` (asymptotic series past ``_ASYMPTOTIC_FROM``).
"""

from __future__ import annotations

import numpy as np
from scipy import special

_ASYMPTOTIC_FROM = 500.0
_ASYMPTOTIC_TERMS = 40
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(48)


def scaled_ei(z: np.ndarray) -> np.ndarray:
    """``e^{-z} Ei(z)`` for z > 0, finite for any z (≈ 1/z for large z)."""
    z = np.asarray(z, dtype=float)
    out = np.empty_like(z)
    small = z <= _ASYMPTOTIC_FROM
    out[small] = special.expi(z[small]) * np.exp(-z[small])
    big = z[~small]
    if big.size:
        # e^{-z} Ei(z) ~ (1/z) Σ_k k!/z^k; at z ≥ 500 forty terms are far past double precision.
        term = 1.0 / big
        total = term.copy()
        for k in range(1, _ASYMPTOTIC_TERMS):
            term = term * k / big
            total += term
        out[~small] = total
    return out


def scaled_e1(z: np.ndarray) -> np.ndarray:
    """``e^{z} E1(z)`` for z > 0, finite for any z (≈ 1/z for large z)."""
    z = np.asarray(z, dtype=float)
    out = np.empty_like(z)
    small = z <= _ASYMPTOTIC_FROM
    out[small] = special.exp1(z[small]) * np.exp(z[small])
    big = z[~small]
    if big.size:
        term = 1.0 / big
        total = term.copy()
        for k in range(1, _ASYMPTOTIC_TERMS):
            term = -term * k / big
            total += term
        out[~small] = total
    return out


def _use_quadrature(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Short intervals (relative to x, and in absolute length) make the closed-form difference
    # cancel; there the integrand is smooth and 48-point Gauss–Legendre is exact to rounding.
    return (y <= 2.0 * x) & (y - x <= 30.0)


def _gauss_legendre(x: np.ndarray, y: np.ndarray, log_integrand) -> np.ndarray:
    half = 0.5 * (y - x)
    s = (0.5 * (x + y))[:, None] + half[:, None] * _GL_NODES[None, :]
    with np.errstate(divide="ignore"):
        return np.log(half * (np.exp(log_integrand(s)) @ _GL_WEIGHTS))


def log_int_exp_over_s(x, y) -> np.ndarray:
    """``log ∫_x^y e^s/s ds - y`` for 0 < x ≤ y (``-inf`` when x == y)."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    x, y = x.ravel(), y.ravel()
    out = np.empty_like(x)
    quad = _use_quadrature(x, y)
    if quad.any():
        yq = y[quad]
        out[quad] = _gauss_legendre(x[quad], yq, lambda s: s - yq[:, None] - np.log(s))
    far = ~quad
    if far.any():
        xf, yf = x[far], y[far]
        # Ei(y) - Ei(x) = e^y [eEi(y) - eEi(x) e^{x-y}]; here y-x > 30 or y > 2x, so no cancellation.
        out[far] = np.log(scaled_ei(yf) - scaled_ei(xf) * np.exp(xf - yf))
    return out


def log_int_negexp_over_s(x, y) -> np.ndarray:
    """``log ∫_x^y e^{-s}/s ds + x`` for 0 < x ≤ y (``-inf`` when x == y)."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    x, y = x.ravel(), y.ravel()
    out = np.empty_like(x)
    quad = _use_quadrature(x, y)
    if quad.any():
        xq = x[quad]
        out[quad] = _gauss_legendre(xq, y[quad], lambda s: xq[:, None] - s - np.log(s))
    far = ~quad
    if far.any():
        xf, yf = x[far], y[far]
        # E1(x) - E1(y) = e^{-x} [eE1(x) - eE1(y) e^{x-y}]; eE1 is decreasing, so no cancellation.
        out[far] = np.log(scaled_e1(xf) - scaled_e1(yf) * np.exp(xf - yf))
    return out
