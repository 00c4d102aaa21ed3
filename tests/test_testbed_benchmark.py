"""`benchmarks/testbed.py --quick --json`: the oracle check and one trained method, end to end (slow: ~3–5 min)."""

from __future__ import annotations

import json

import pytest
from benchmark_modules import load_benchmark


def test_paired_verdicts_follow_the_decision_rule():
    bench = load_benchmark("testbed")
    rows = []
    for seed in range(3):
        for method, shift in (("ctrl_exp_bon", 0.05), ("raw_bvw_dpo", 0.0)):
            rows.append({"method": method, "k": 8, "kl_budget": 0.5, "seed": seed, "exact_kl": 0.5 + 0.005 * seed,
                         "per_prompt": {"bon4": [0.6 + shift + 0.001 * p for p in range(16)]}})
    shows = bench.paired(rows, "ctrl_exp_bon", "raw_bvw_dpo", "bon4", 8, 0.5)
    assert shows["difference"] == pytest.approx(0.05) and shows["verdict"] == "shows the effect"
    same = bench.paired(rows, "raw_bvw_dpo", "raw_bvw_dpo", "bon4", 8, 0.5)
    assert same["difference"] == 0.0 and same["verdict"] == "refutes it"
    behind = bench.paired(rows, "raw_bvw_dpo", "ctrl_exp_bon", "bon4", 8, 0.5)  # 5 points behind refutes it too
    assert behind["difference"] == pytest.approx(-0.05) and behind["verdict"] == "refutes it"
    assert bench.paired(rows, "calib_identity", "raw_bvw_dpo", "bon4", 8, 0.5) is None
    rows[0]["exact_kl"] = 0.3  # a run that stopped short of the budget: no verdict at matched KL
    assert bench.paired(rows, "ctrl_exp_bon", "raw_bvw_dpo", "bon4", 8, 0.5)["verdict"].startswith("not at matched")


def test_pointwise_exp_is_on_request_compared_on_bon4_and_planned_for_its_estimator():
    bench = load_benchmark("testbed")
    assert "ctrl_exp_bon_pointwise" in bench.METHODS and bench.SIZES["full"]["methods"] == [
        "raw_bvw_dpo", "calib_identity", "ctrl_exp_bon", "ctrl_negexp_won"]  # the default run is unchanged
    rows = [{"method": m, "k": 32, "kl_budget": 0.5, "seed": 0, "exact_kl": 0.5,
             "per_prompt": {"bon4": [0.7] * 4, "won4": [0.7] * 4}}
            for m in ("raw_bvw_dpo", "calib_identity", "ctrl_exp_bon_pointwise")]
    assert {(r["method"], r["baseline"]) for r in bench.comparisons(rows) if r["method"] == "ctrl_exp_bon_pointwise"
            and r["metric"] == "bon4"} == {("ctrl_exp_bon_pointwise", "raw_bvw_dpo"),
                                           ("ctrl_exp_bon_pointwise", "calib_identity")}
    # The planned BoN-4 is the tilt of the estimator the run recorded (K = 8, exp t = 40 at its KL-0.5 plan);
    # a run without one (before it was recorded) is soft-label DPO on sampled pairs.
    plan = dict(transform="exp", t=40.0, unscaled_beta=7.813124753901446e16, plan_k=8)
    runs = [dict(plan, estimator=dict(loss="pointwise", strategy="all", targets="loo", log_partition="population")),
            dict(plan)]
    bench.add_planned_figures(runs)
    assert runs[0]["planned_bon4"] == pytest.approx(0.8664, abs=1e-3)
    assert runs[1]["planned_bon4"] == pytest.approx(0.8968, abs=1e-3)


@pytest.mark.slow
def test_quick_run_prints_the_oracle_and_one_method(tmp_path, capsys):
    bench = load_benchmark("testbed")
    assert bench.main(["--quick", "--json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["oracle"] and all(row["ok"] for row in report["oracle"])
    assert {row["k"] for row in report["oracle"]} == {None, 8}
    (run,) = report["runs"]
    assert run["method"] == "calib_identity" and run["reached"]
    assert run["exact_kl"] == pytest.approx(0.5, abs=0.011)
    assert 0.5 < run["bon4"] <= run["planned_bon4"] + 0.01
    assert run["planned_kl"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "tie_free" / "report.json").exists()


def test_a_run_on_its_plan_has_kl_efficiency_and_fidelity_one():
    """The diagnostics of a run read its own plan's curve: a run that lands on the plan scores 1, half the gain ½."""
    from ctrl_offline.maths.finite_k import Estimator, trained_tilt
    from ctrl_offline.maths.planner import plan

    bench = load_benchmark("testbed")
    estimator = Estimator(loss="pointwise")
    row = plan("bon", 4, 0.5, families=("exp",), k=9, loss="pointwise").rows[0]
    tilt = trained_tilt(f"exp:{row.t}", row.beta, 9, estimator)
    on_plan = dict(method="ctrl_exp_bon", transform="exp", t=row.t, unscaled_beta=row.beta, plan_k=9,
                   estimator=estimator.to_dict(), exact_kl=tilt.kl(), bon4=tilt.bon_win_rate(4),
                   won4=tilt.won_win_rate(4))
    half = dict(on_plan, bon4=0.5 + (tilt.bon_win_rate(4) - 0.5) / 2)
    baseline = dict(method="raw_bvw_dpo", exact_kl=0.5, bon4=0.7, won4=0.7)
    bench.add_diagnostics([on_plan, half, baseline])
    assert on_plan["bon4_efficiency"] == pytest.approx(1, abs=1e-3)
    assert on_plan["bon4_fidelity"] == pytest.approx(1, abs=1e-3)
    assert on_plan["won4_fidelity"] == pytest.approx(1, abs=1e-3)
    assert half["bon4_fidelity"] == pytest.approx(0.5, abs=1e-3) and half["bon4_efficiency"] < 0.5
    assert "bon4_efficiency" not in baseline  # no plan, no curve


def test_bonbon_is_set_against_ctrl_exp_and_raw_dpo_on_bon4():
    bench = load_benchmark("testbed")
    assert bench.METHODS["bonbon"]["kind"] == "bonbon" and "bonbon" not in bench.SIZES["full"]["methods"]
    rows = [{"method": m, "k": 8, "kl_budget": 0.5, "seed": 0, "exact_kl": 0.5,
             "per_prompt": {"bon4": [0.7] * 4, "won4": [0.7] * 4}} for m in ("raw_bvw_dpo", "ctrl_exp_bon", "bonbon")]
    pairs = {(r["method"], r["baseline"], r["metric"]) for r in bench.comparisons(rows)}
    assert {("ctrl_exp_bon", "bonbon", "bon4"), ("bonbon", "raw_bvw_dpo", "bon4")} <= pairs
