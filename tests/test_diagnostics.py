"""ctrl_offline.maths.diagnostics against exact oracles (docs/diagnostics.md): the plan's own tilt is on its curve,
the chain-rule split of a tilt is all on target, a within-level move is all off target."""

import math

import numpy as np
import pytest

from ctrl_offline.maths.diagnostics import (
    PlanCurve,
    PlanDiagnostics,
    exact_kl_split,
    kl_efficiency,
    label_entropy_floor,
    level_distribution,
    loss_gap,
    miller_madow_kl,
    plan_fidelity,
    sampled_kl_split,
    tilt_fidelity,
)
from ctrl_offline.maths.finite_k import Estimator, ideal_tilt, trained_tilt
from ctrl_offline.maths.planner import plan, solve_beta, solve_trained_beta


# -- KL efficiency and plan fidelity --------------------------------------------------------------
ORACLES = [("identity", None), ("exp:8", None), ("identity", "pointwise"), ("exp:8", "pointwise"),
           ("identity", "dpo"), ("exp:8", "dpo")]


def _oracle(transform, loss, kl=0.5, inference="bon", n=4):
    """(kl, win rate, k, estimator) of the tilt the plan trains at ``kl``, K = 8 (K = ∞ when loss is None)."""
    if loss is None:
        tilt, k, estimator = ideal_tilt(transform, solve_beta(transform, kl)), None, None
    else:
        k, estimator = 8, Estimator(loss=loss)
        tilt = trained_tilt(transform, solve_trained_beta(transform, kl, k, estimator), k, estimator)
    return tilt.kl(), tilt.win_rate(inference, n), k, estimator


@pytest.mark.parametrize("transform,loss", ORACLES)
def test_the_plans_own_tilt_is_on_its_curve(transform, loss):
    kl, win, k, estimator = _oracle(transform, loss)
    args = dict(kl_spent=kl, k=k, estimator=estimator)
    assert kl_efficiency(transform, "bon", 4, reached=win, **args) == pytest.approx(1.0, abs=1e-3)
    assert plan_fidelity(transform, "bon", 4, reached=win, **args) == pytest.approx(1.0, abs=1e-3)
    # Half the win-rate gain at the same KL: fidelity ½, and the curve needs less KL for it.
    half = 0.5 + (win - 0.5) / 2
    assert plan_fidelity(transform, "bon", 4, reached=half, **args) == pytest.approx(0.5, abs=1e-3)
    assert 0 < kl_efficiency(transform, "bon", 4, reached=half, **args) < 1


def test_worst_of_n_oracle():
    kl, win, _, _ = _oracle("negexp:8", None, inference="won")
    assert kl_efficiency("negexp:8", "won", 4, kl_spent=kl, reached=win) == pytest.approx(1.0, abs=1e-3)
    assert plan_fidelity("negexp:8", "won", 4, kl_spent=kl, reached=win) == pytest.approx(1.0, abs=1e-3)


def test_twice_the_kl_for_the_same_win_rate_is_half_efficient():
    kl, win, _, _ = _oracle("identity", None)
    assert kl_efficiency("identity", "bon", 4, kl_spent=2 * kl, reached=win) == pytest.approx(0.5, abs=1e-3)
    # At twice the KL the curve promises more, so the same win rate is less of the promise.
    assert plan_fidelity("identity", "bon", 4, kl_spent=2 * kl, reached=win) < 1


def test_efficiency_edges():
    assert kl_efficiency("identity", "bon", 4, kl_spent=0.5, reached=0.5) == 0.0
    assert kl_efficiency("identity", "bon", 4, kl_spent=0.5, reached=0.3) == 0.0
    # Above the win rate at the curve's largest KL: reported, not raised.
    assert kl_efficiency("identity", "bon", 4, kl_spent=0.5, reached=1.0) == math.inf
    # Weighted SFT saturates at best-of-K: its curve never reaches a win rate above best-of-8's.
    sft = Estimator(loss="weighted_sft")
    assert kl_efficiency("identity", "bon", 4, kl_spent=0.5, reached=0.95, k=8, estimator=sft) == math.inf
    # Beyond its saturation KL the curve's win rate is its limit, best-of-8 (F = u⁸): 1 − ∫4u³·u³² du = 8/9.
    limit = PlanCurve("identity", "bon", 4, 8, sft).win_rate_at_kl(5.0)
    assert limit == pytest.approx(8 / 9, abs=1e-6)


def test_bad_inputs_raise():
    for kl in (0.0, -1.0, math.nan, 100.0):
        with pytest.raises(ValueError, match="kl_spent"):
            kl_efficiency("identity", "bon", 4, kl_spent=kl, reached=0.7)
        with pytest.raises(ValueError, match="kl_spent"):
            plan_fidelity("identity", "bon", 4, kl_spent=kl, reached=0.7)
    with pytest.raises(ValueError, match="win rate"):
        kl_efficiency("identity", "bon", 4, kl_spent=0.5, reached=1.5)
    with pytest.raises(ValueError, match="pass k"):
        PlanCurve("identity", "bon", 4, estimator=Estimator())
    with pytest.raises(ValueError, match="closed-form"):
        PlanCurve("identity", "soft_bon", 4)


def test_plan_diagnostics_from_build_info():
    result = plan("bon", 4, 0.5, families=("identity",), k=8, loss="pointwise")
    row = result.rows[0]
    info = {"transform": "identity", "beta": row.beta, "k": 8,
            "planner": {"inference": "bon", "n": 4, "kl": 0.5, "row": row.to_dict(), "k": 8,
                        "estimator": result.estimator.to_dict(), "simulated": False, "selector_args": None}}
    on_plan = PlanDiagnostics.from_build_info(info, kl_spent=row.kl, reached=row.win_rate)
    assert on_plan.procedure == "bon-4" and on_plan.k == 8
    assert on_plan.kl_efficiency == pytest.approx(1.0, abs=1e-3)
    assert on_plan.plan_fidelity == pytest.approx(1.0, abs=1e-3)
    assert on_plan.planned_at_kl_spent == pytest.approx(row.win_rate, abs=1e-6)
    assert "KL efficiency 1.000" in on_plan.line() and "plan fidelity 1.000" in str(on_plan)
    missed = PlanDiagnostics.from_build_info(info, kl_spent=1.0, reached=0.5 + (row.win_rate - 0.5) / 2)
    assert missed.kl_efficiency < 0.5 and missed.plan_fidelity < 0.5
    assert missed.to_dict()["planned_win_rate"] == row.win_rate
    with pytest.raises(ValueError, match="not planned"):
        PlanDiagnostics.from_build_info({**info, "planner": None}, kl_spent=0.5, reached=0.7)
    with pytest.raises(ValueError, match="simulated"):
        PlanDiagnostics.from_build_info({**info, "planner": {**info["planner"], "simulated": True}}, 0.5, 0.7)


# -- the exact KL split ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_testbed():
    """3 prompts × 2000 responses: random π_ref, tie-free rewards."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 2000))
    ref -= np.logaddexp.reduce(ref, axis=1, keepdims=True)
    return ref, rng.normal(size=(3, 2000))


def _within_level_move(ref, rewards, bins, rng, scale=1.0):
    """log π of a policy that keeps every bin's π_ref mass and reweights responses inside it."""
    from ctrl_offline.maths.diagnostics import _quantile_bins

    which = _quantile_bins(ref, rewards, bins)
    out = np.empty_like(ref)
    for row in range(len(ref)):
        lp = ref[row] + scale * rng.normal(size=ref.shape[1])
        q_bin = np.bincount(which[row], weights=np.exp(ref[row]), minlength=bins)
        p_bin = np.bincount(which[row], weights=np.exp(lp), minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: no response to reweight
            out[row] = lp + np.log(q_bin / p_bin)[which[row]]
    return out


@pytest.mark.parametrize("tilt", [ideal_tilt("identity", solve_beta("identity", 0.5)),
                                  trained_tilt("exp:8", solve_trained_beta("exp:8", 0.5, 8, Estimator()), 8)],
                         ids=["identity-K=inf", "exp8-dpo-K=8"])
def test_oracle_tilt_is_all_on_target(toy_testbed, tilt):
    from ctrl_offline.testbeds.lm_testbed import tilted_policy

    ref, rewards = toy_testbed
    policy = tilted_policy(ref, rewards, tilt.log_density)
    split = exact_kl_split(policy, ref, rewards, bins=200)
    assert split.total == pytest.approx(tilt.kl(), rel=2e-3)
    assert split.on_target == pytest.approx(split.total, rel=1e-3)
    assert 0 <= split.off_target < 1e-3 * split.total
    assert split.per_prompt_on_target.shape == (3,)
    np.testing.assert_allclose(split.per_prompt_total, split.per_prompt_on_target + split.per_prompt_off_target)


def test_within_level_move_is_all_off_target(toy_testbed):
    ref, rewards = toy_testbed
    policy = _within_level_move(ref, rewards, 50, np.random.default_rng(1))
    split = exact_kl_split(policy, ref, rewards, bins=50)
    assert split.total > 0.1
    assert abs(split.on_target) < 1e-10
    assert split.off_target == pytest.approx(split.total, rel=1e-9)


def test_moves_between_tied_responses_are_off_target():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(2, 300))
    ref -= np.logaddexp.reduce(ref, axis=1, keepdims=True)
    rewards = np.round(rng.normal(size=(2, 300)))  # ~7 reward values: many ties
    split = exact_kl_split(_within_level_move(ref, rewards, 10, rng), ref, rewards, bins=10)
    assert split.total > 0.05 and abs(split.on_target) < 1e-10


def test_exact_split_bad_input(toy_testbed):
    ref, rewards = toy_testbed
    with pytest.raises(ValueError, match="shapes differ"):
        exact_kl_split(ref[:, :10], ref, rewards)
    with pytest.raises(ValueError, match="normalised"):
        exact_kl_split(ref + 0.1, ref, rewards)
    with pytest.raises(ValueError, match="bins"):
        exact_kl_split(ref, ref, rewards, bins=0)


# -- the KL split from samples --------------------------------------------------------------------
def _kl_uniform(pmf):
    return float(np.sum(pmf * np.log(len(pmf) * pmf)))


def test_miller_madow_formula():
    plug_in = 0.75 * math.log(3.0)  # counts 3, 1, 0, 0: p̂ = ¾, ¼ against uniform on 4
    assert miller_madow_kl([3, 1, 0, 0]) == pytest.approx(plug_in - 1 / 8)
    with pytest.raises(ValueError):
        miller_madow_kl([0, 0])
    with pytest.raises(ValueError):
        miller_madow_kl([1, -1, 2])


def test_level_distribution():
    np.testing.assert_allclose(level_distribution(lambda u: np.zeros_like(u), 7), np.full(8, 1 / 8), atol=1e-12)
    # Best-of-2 (density 2c) among M = 1 stored rewards: P(level 1) = ∫ c·2c dc = 2/3.
    np.testing.assert_allclose(level_distribution(lambda u: np.log(u), 1), [1 / 3, 2 / 3], atol=1e-12)


def _level_draws(pmf, prompts, samples, off_target, rng):
    """Levels drawn from ``pmf``; log-ratios log((M+1)·pmf_j) + an off-target part of mean ``off_target``."""
    levels = rng.choice(len(pmf), size=(prompts, samples), p=pmf)
    extra = rng.exponential(off_target, size=levels.shape) if off_target else 0.0
    return levels, np.log(len(pmf) * pmf[levels]) + extra, np.zeros(levels.shape)


@pytest.mark.parametrize("pooled,prompts,samples", [(True, 400, 16), (False, 40, 400)])
def test_sampled_split_finds_a_known_level_law(pooled, prompts, samples):
    tilt = ideal_tilt("exp:8", solve_beta("exp:8", 0.5))
    pmf = level_distribution(tilt.log_density, 9)
    exact = _kl_uniform(pmf)
    assert exact < tilt.kl()  # the coarsening to M + 1 levels loses KL (data processing)
    levels, policy, reference = _level_draws(pmf, prompts, samples, 0.1, np.random.default_rng(3))
    split = sampled_kl_split(levels, 10, policy, reference, pooled=pooled, num_boot=500)
    sd = (split.on_target.ci_high - split.on_target.ci_low) / 3.92
    assert abs(split.on_target.value - exact) < 3 * sd
    assert split.on_target.ci_low <= exact <= split.on_target.ci_high
    assert split.total.value == pytest.approx(exact + 0.1, abs=0.03)
    assert split.off_target.value == pytest.approx(0.1, abs=0.03)
    assert split.off_target.value == pytest.approx(split.total.value - split.on_target.value)
    assert split.level_counts.sum() == prompts * samples and split.to_dict()["pooled"] is pooled


def test_sampled_split_of_the_reference_is_near_zero():
    levels, policy, reference = _level_draws(np.full(10, 0.1), 200, 8, 0.0, np.random.default_rng(4))
    split = sampled_kl_split(levels, 10, policy, reference, num_boot=500)
    counts = split.level_counts
    plug_in = _kl_uniform(counts / counts.sum())
    assert split.on_target.value < plug_in / 5  # Miller–Madow removes the plug-in's (L − 1)/(2N) bias
    assert split.on_target.ci_low == 0.0 and split.on_target.value >= 0.0


def test_sampled_split_bad_input():
    levels = np.zeros((3, 4), dtype=int)
    logps = np.zeros((3, 4))
    with pytest.raises(ValueError, match="shapes differ"):
        sampled_kl_split(levels, 5, logps[:, :2], logps)
    with pytest.raises(ValueError, match="levels must be integers"):
        sampled_kl_split(levels + 5, 5, logps, logps)
    with pytest.raises(ValueError, match="num_levels"):
        sampled_kl_split(levels, 1, logps, logps)


# -- tilt fidelity --------------------------------------------------------------------------------
def test_tilt_fidelity_of_the_oracle_and_of_noise(toy_testbed):
    from ctrl_offline.maths.calibration import quantile_cells
    from ctrl_offline.testbeds.lm_testbed import tilted_policy

    ref, rewards = toy_testbed
    tilt = ideal_tilt("exp:8", solve_beta("exp:8", 0.5))
    policy = tilted_policy(ref, rewards, tilt.log_density)
    u = np.stack([0.5 * (lo + hi)[group] for group, lo, hi in quantile_cells(ref, rewards)])
    fit = tilt_fidelity(u, policy - ref, tilt.log_density, weights=np.exp(ref), bins=20)
    assert fit.r_squared > 0.999 and fit.slope == pytest.approx(1.0, abs=0.01)
    assert fit.intercept == pytest.approx(0.0, abs=0.01)
    np.testing.assert_allclose(fit.mean_h, fit.planned, atol=0.02)
    assert fit.weight.sum() == pytest.approx(3.0)  # π_ref mass of 3 prompts
    noise = tilt_fidelity(u, np.random.default_rng(5).normal(size=u.shape), tilt.log_density(u.ravel()))
    assert noise.r_squared < 0.01
    assert len(noise.bin_centres) == 20 and noise.to_dict()["bin_edges"][-1] == 1.0


def test_tilt_fidelity_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        tilt_fidelity(np.ones(3) / 2, np.ones(4), np.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tilt_fidelity(np.array([0.5, 1.5]), np.ones(2), np.zeros(2))
    with pytest.raises(ValueError, match="weights"):
        tilt_fidelity(np.ones(2) / 2, np.ones(2), np.zeros(2), weights=[1.0, -1.0])


# -- the soft-label floor -------------------------------------------------------------------------
def test_label_entropy_floor():
    assert label_entropy_floor([0.5, 0.5]) == pytest.approx(math.log(2))
    assert label_entropy_floor([0.0, 1.0, 1.0]) == 0.0
    assert label_entropy_floor([0.5, 0.0], weights=[2.0, 1.0]) == pytest.approx(math.log(2))  # mean of w·H
    assert loss_gap(0.9, [0.5]) == pytest.approx(0.9 - math.log(2))
    for bad in ([1.2], [-0.1], [math.nan], []):
        with pytest.raises(ValueError):
            label_entropy_floor(bad)
    with pytest.raises(ValueError, match="weights"):
        label_entropy_floor([0.5, 0.5], weights=[1.0])
