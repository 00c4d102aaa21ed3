import math

import pytest

from ctrl_offline.maths.planner import MIN_TRAINABLE_BETA, plan, solve_beta, trainable_beta, tradeoff_curve
from ctrl_offline.maths.procedures import tilted_win_rate
from ctrl_offline.maths.theory import kl_divergence
from ctrl_offline.maths.transforms import get_transform


@pytest.mark.parametrize("name,t", [("identity", None), ("log", None), ("exp", 0.5), ("exp", 30.0), ("negexp", 12.0)])
@pytest.mark.parametrize("kl", [0.01, 0.5, 4.0])
def test_solve_beta_meets_the_budget(name, t, kl):
    beta = solve_beta(get_transform(name, t), kl)
    assert kl_divergence(get_transform(name, t), beta) == pytest.approx(kl, rel=1e-8)


def test_log_budget_of_best_of_n_recovers_beta_one_over_n_minus_one():
    n = 4
    assert solve_beta("log", math.log(n) - (n - 1) / n) == pytest.approx(1 / (n - 1), rel=1e-8)


@pytest.fixture(scope="module")
def bon_plan():
    return plan("bon", 4, 0.5)


@pytest.fixture(scope="module")
def won_plan():
    return plan("won", 4, 0.5)


def test_plan_rows_meet_budget_and_name_the_families(bon_plan, won_plan):
    for result in (bon_plan, won_plan):
        assert [r.transform for r in result.rows] == ["identity", "log", "exp", "negexp"]
        for row in result.rows:
            assert row.kl == pytest.approx(0.5, rel=1e-6)
            transform = get_transform(row.transform, row.t)
            assert row.win_rate == pytest.approx(tilted_win_rate(transform, row.beta, result.inference, 4))
            assert 0.5 < row.win_rate < 1 and 0.5 < row.standard_win_rate < 1


def test_the_matching_transform_wins(bon_plan, won_plan):
    # exp is built for best-of-N, negexp for worst-of-N (InfAlign's finding).
    assert bon_plan.best().transform == "exp"
    assert won_plan.best().transform == "negexp"
    by_name = {r.transform: r for r in bon_plan.rows}
    assert by_name["exp"].win_rate > by_name["identity"].win_rate + 0.03
    # The transformed reward trades standard win rate for inference-time win rate.
    assert by_name["exp"].standard_win_rate < by_name["identity"].standard_win_rate


@pytest.mark.parametrize("fixture", ["bon_plan", "won_plan"])
def test_chosen_t_is_a_local_optimum(fixture, request):
    result = request.getfixturevalue(fixture)
    for row in result.rows:
        if row.t is None:
            continue
        for factor in (0.9, 1.1):
            t = row.t * factor
            if not 0.01 <= t <= 40:
                continue
            other = get_transform(row.transform, t)
            rate = tilted_win_rate(other, solve_beta(other, result.kl), result.inference, result.n)
            assert rate <= row.win_rate + 1e-7


def test_tradeoff_curve_is_increasing():
    curve = tradeoff_curve(get_transform("exp", 5.0), "bon", 4, [0.05, 0.2, 0.8, 2.0])
    assert all(b > a for a, b in zip(curve, curve[1:]))


def test_plan_to_dict_is_the_cli_json_shape(bon_plan):
    d = bon_plan.to_dict()
    assert set(d) == {"inference", "n", "kl", "rows"}
    assert set(d["rows"][0]) == {"transform", "t", "beta", "kl", "win_rate", "standard_win_rate"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(inference="nope", n=4, kl=0.5), "unknown inference procedure"),
        (dict(inference="bot", n=4, kl=0.5), "has no closed-form win rate: plan it on calibration tables"),
        (dict(inference="bon", n=0, kl=0.5), "positive integer"),
        (dict(inference="bon", n=4, kl=0.0), "KL budget"),
        (dict(inference="bon", n=4, kl=float("nan")), "KL budget"),
        (dict(inference="bon", n=4, kl=0.5, t_range=(2.0, 1.0)), "t_range"),
    ],
)
def test_bad_plan_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(**kwargs)


def test_plans_keep_beta_trainable():
    # Unguarded, worst-of-4 at KL 2 rides negexp to the top of the t range with β ≈ 1e-16: exact
    # in theory, but the gradients then vanish and training does nothing.
    unguarded = {r.transform: r for r in plan("won", 4, 2.0, min_beta=0).rows}["negexp"]
    assert trainable_beta(get_transform("negexp", unguarded.t), unguarded.beta) < 1e-10
    guarded = {r.transform: r for r in plan("won", 4, 2.0).rows}["negexp"]
    assert trainable_beta(get_transform("negexp", guarded.t), guarded.beta) >= MIN_TRAINABLE_BETA * (1 - 1e-9)
    assert kl_divergence(get_transform("negexp", guarded.t), guarded.beta) == pytest.approx(2.0, rel=1e-8)
    assert guarded.win_rate <= unguarded.win_rate
    with pytest.raises(ValueError, match="trainable"):
        plan("won", 4, 2.0, families=("negexp",), t_range=(20.0, 40.0))
