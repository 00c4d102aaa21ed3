import math

import mpmath as mp
import numpy as np
import pytest

from ctrl_offline.maths.transforms import (
    FunctionTransform,
    Rescaled,
    Transform,
    available_transforms,
    family_has_t,
    get_transform,
    register_transform,
    unit_scale,
)

mp.mp.dps = 30

PHI = {
    "identity": lambda t: (lambda v: v),
    "log": lambda t: (lambda v: mp.log(v)),
    "exp": lambda t: (lambda v: mp.e ** (t * v)),
    "negexp": lambda t: (lambda v: -mp.e ** (-t * v)),
}


def quadrature_log_cumulative(name, t, beta, u):
    """log ∫₀ᵘ exp(Φ(v)/β) dv by adaptive high-precision quadrature (an independent oracle)."""
    phi = PHI[name](None if t is None else mp.mpf(t))
    beta, u = mp.mpf(beta), mp.mpf(u)
    top = phi(u) / beta  # the integrand's maximum on [0, u] (Φ increasing)
    # Break points crowd toward u, where the integrand peaks, and spread evenly for negexp's front.
    points = sorted({mp.mpf(0), u, *(u * (1 - mp.mpf(2) ** -k) for k in range(1, 64)), *(u * j / 32 for j in range(33))})
    value = mp.quad(lambda v: mp.e ** (phi(v) / beta - top) if v > 0 else mp.mpf(0), points)
    return float(mp.log(value) + top)


GRID = [
    (name, t, beta)
    for name, ts in [("identity", [None]), ("log", [None]), ("exp", [0.01, 1.0, 8.0, 40.0]), ("negexp", [0.01, 1.0, 8.0, 40.0])]
    for t in ts
    for beta in [1e-4, 1e-2, 0.3, 3.0, 1e3, 1e8]
]


@pytest.mark.parametrize("name,t,beta", GRID)
def test_log_partition_matches_quadrature(name, t, beta):
    transform = get_transform(name, t)
    expected = quadrature_log_cumulative(name, t, beta, 1)
    assert float(transform.log_partition(beta)) == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("name,t,beta", [g for g in GRID if g[2] in (1e-2, 3.0)])
def test_log_cdf_matches_quadrature(name, t, beta):
    transform = get_transform(name, t)
    for u in [0.05, 0.5, 0.93]:
        expected = quadrature_log_cumulative(name, t, beta, u) - quadrature_log_cumulative(name, t, beta, 1)
        assert float(transform.log_cdf(u, beta)) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_closed_forms_of_the_design_notes():
    # identity β(e^{1/β} − 1), log β/(1+β)
    for beta in [0.1, 1.0, 7.0]:
        assert float(get_transform("identity").log_partition(beta)) == pytest.approx(math.log(beta * math.expm1(1 / beta)))
        assert float(get_transform("log").log_partition(beta)) == pytest.approx(math.log(beta / (1 + beta)))
    # exp [Ei(e^t/β) − Ei(1/β)]/t and negexp [E1(e^{−t}/β) − E1(1/β)]/t, where they do not overflow
    t, beta = 2.0, 0.5
    assert float(get_transform("exp", t).log_partition(beta)) == pytest.approx(
        float(mp.log((mp.ei(mp.e**t / beta) - mp.ei(1 / beta)) / t))
    )
    assert float(get_transform("negexp", t).log_partition(beta)) == pytest.approx(
        float(mp.log((mp.e1(mp.e**-t / beta) - mp.e1(1 / beta)) / t))
    )


@pytest.mark.parametrize("name,t", [("exp", 60.0), ("exp", 300.0), ("negexp", 300.0), ("identity", None), ("log", None)])
@pytest.mark.parametrize("beta", [1e-12, 1e-6, 1.0, 1e12])
def test_no_overflow_for_large_t_and_extreme_beta(name, t, beta):
    transform = get_transform(name, t)
    log_z = float(transform.log_partition(beta))
    assert math.isfinite(log_z)
    u = np.linspace(0, 1, 101)
    log_f = transform.log_density(u[1:], beta)
    assert np.all(np.isfinite(log_f) | (log_f == -np.inf))
    log_cdf = transform.log_cdf(u, beta)
    assert log_cdf[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(log_cdf) >= -1e-12)


def test_exp_log_partition_is_exact_at_huge_scale():
    # For large a = 1/β and t, log Z = e^t/β − log(t e^t/β) + log(1 + 1/b + 2/b² …), b = e^t/β.
    t, beta = 60.0, 1e-6
    b = math.exp(t) / beta
    expected = b - math.log(t * b) + math.log1p(1 / b)
    assert float(get_transform("exp", t).log_partition(beta)) == pytest.approx(expected, rel=1e-14)


def test_all_transforms_are_half_at_large_beta_and_density_integrates_to_one():
    from ctrl_offline.maths._quadrature import nodes_and_weights

    nodes, weights = nodes_and_weights()
    for name, t in [("identity", None), ("log", None), ("exp", 5.0), ("negexp", 5.0)]:
        transform = get_transform(name, t)
        for beta in [0.01, 1.0, 100.0]:
            assert np.sum(weights * np.exp(transform.log_density(nodes, beta))) == pytest.approx(1.0, abs=1e-10)


def test_generic_quadrature_fallback_agrees_with_closed_forms():
    cases = [("identity", None, lambda u: u), ("log", None, np.log), ("exp", 4.0, lambda u: np.exp(4 * u)),
             ("negexp", 4.0, lambda u: -np.exp(-4 * u))]
    for name, t, fn in cases:
        closed = get_transform(name, t)
        generic = FunctionTransform(f"generic-{name}", lambda u, f=fn: f(np.maximum(u, 1e-300)))
        for beta in [0.01, 0.3, 10.0]:
            assert float(generic.log_partition(beta)) == pytest.approx(float(closed.log_partition(beta)), rel=1e-9)
            # The fallback resolves F to absolute, not relative, precision far in the tails.
            u = np.array([0.1, 0.5, 0.99])
            np.testing.assert_allclose(np.exp(generic.log_cdf(u, beta)), np.exp(closed.log_cdf(u, beta)), atol=1e-10)


def test_register_function_and_subclass():
    register_transform("sqrt_test", np.sqrt, overwrite=True)
    sqrt = get_transform("sqrt_test")
    assert sqrt(np.array([0.25])).tolist() == [0.5]
    assert "sqrt_test" in available_transforms()
    assert math.isfinite(float(sqrt.log_partition(0.2)))

    @register_transform("power_test", has_t=True, overwrite=True)
    def power(u, t):
        return u**t

    assert family_has_t("power_test")
    assert get_transform("power_test:3")(np.array([0.5])).tolist() == [0.125]

    class Cubic(Transform):
        name = "cubic_test"

        def phi(self, u):
            return np.asarray(u) ** 3

    register_transform("cubic_test", Cubic, overwrite=True)
    assert isinstance(get_transform("cubic_test"), Cubic)


def test_bad_transforms_and_parameters_are_refused():
    with pytest.raises(ValueError, match="needs a finite parameter t > 0"):
        get_transform("exp")
    with pytest.raises(ValueError, match="needs a finite parameter t > 0"):
        get_transform("negexp", -1.0)
    with pytest.raises(ValueError, match="takes no parameter t"):
        get_transform("identity", 2.0)
    with pytest.raises(ValueError, match="unknown transform 'nope'"):
        get_transform("nope")
    with pytest.raises(ValueError, match="non-decreasing"):
        register_transform("decreasing_test", lambda u: -u)
    with pytest.raises(ValueError, match="already registered"):
        register_transform("exp", np.exp)
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        get_transform("identity").log_partition(0.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        get_transform("identity").log_cdf(1.5, 1.0)


@pytest.mark.parametrize("spec", ["identity", "exp:12.6", "negexp:8", "log"])
def test_rescaled_transform_keeps_the_tilted_policy(spec):
    """Φ/s at β/s is the same π*: same density and CDF; Φ/s spans exactly 1 for finite families."""
    name, _, t = spec.partition(":")
    base = get_transform(name, float(t) if t else None)
    scale = unit_scale(base)
    scaled = Rescaled(base, scale)
    u = np.linspace(0.01, 1, 50)
    for beta in (0.05, 1.0, 3e4):
        np.testing.assert_allclose(scaled.log_density(u, beta / scale), base.log_density(u, beta), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(scaled.log_cdf(u, beta / scale), base.log_cdf(u, beta), rtol=1e-10, atol=1e-10)
    if spec != "log":
        assert scaled.phi(np.array([1.0]))[0] - scaled.phi(np.array([0.0]))[0] == pytest.approx(1.0)
    else:
        assert scale == 1.0
    with pytest.raises(ValueError, match="scale"):
        Rescaled(base, 0.0)
