import numpy as np
import pytest

from ctrl_offline.maths.calibration import build_tables
from ctrl_offline.maths.planner import MIN_TRAINABLE_BETA, plan, trainable_beta
from ctrl_offline.maths.simulation import quantile_rewards, simulated_win_rate
from ctrl_offline.maths.theory import bon_win_rate, won_win_rate


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    prompts, k = 300, 257
    scale = rng.gamma(2.0, size=prompts)
    ids = np.repeat(np.arange(prompts), k)
    return build_tables(ids, scale[ids] * rng.standard_t(4, size=len(ids)))


def test_quantiles_interpolate_the_tables(tables):
    ref = tables.table(0)
    np.testing.assert_allclose(quantile_rewards(tables, np.array([0, 0, 0]), np.array([0.0, 0.5, 1.0])),
                               [ref[0], ref[len(ref) // 2], ref[-1]])
    u = np.array([[0.1, 0.7]])
    assert np.all(np.diff(quantile_rewards(tables, np.array([3]), u)) > 0)


@pytest.mark.parametrize("selector,closed", [("bon", bon_win_rate), ("won", won_win_rate)])
def test_order_based_selectors_match_the_closed_forms(tables, selector, closed):
    # For rules that only see the order of rewards, simulation on any tie-free tables must agree
    # with the calibrated-space closed form.
    for name, t, beta in [("identity", None, 0.3), ("exp", 4.0, 20.0)]:
        from ctrl_offline.maths.transforms import get_transform

        transform = get_transform(name, t)
        predicted = simulated_win_rate(tables, transform, beta, selector, 4, prompts=40_000, seed=1)
        assert predicted == pytest.approx(closed(transform, beta, 4), abs=0.01)


def test_plan_for_best_of_tails(tables):
    result = plan("bot", 8, 0.5, tables=tables, simulation_prompts=3000, selector_args={"lam": 0.1})
    assert [r.transform for r in result.rows] == ["identity", "log", "exp", "negexp"]
    assert all(r.kl == pytest.approx(0.5, rel=1e-6) and 0.5 < r.win_rate < 1 for r in result.rows)
    assert result.inference == "bot"
    # The same β guard as closed-form plans: every row can be trained.
    from ctrl_offline.maths.transforms import get_transform

    assert all(trainable_beta(get_transform(r.transform, r.t), r.beta) >= MIN_TRAINABLE_BETA * (1 - 1e-9)
               for r in result.rows)


def test_simulated_plans_keep_beta_trainable(tables):
    with pytest.raises(ValueError, match="trainable"):
        plan("soft_bon", 4, 2.0, families=("negexp",), t_range=(20.0, 40.0), tables=tables, simulation_prompts=500)


def test_bad_budget(tables):
    with pytest.raises(ValueError, match="KL budget"):
        plan("soft_bon", 4, 0.0, tables=tables)
    with pytest.raises(ValueError, match="finite-K plans"):
        plan("soft_bon", 4, 0.5, tables=tables, k=8)
