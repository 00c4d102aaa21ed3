"""The frontier: ctrl_offline/maths/frontier.py, stages/frontier.py and `ctrl-data compare --at-kl` (docs/evaluation.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate

from ctrl_offline.maths.frontier import (
    best_of_n_at_kl,
    best_of_n_for_kl,
    best_of_n_kl,
    best_of_n_win_rate,
    frontier_at_kl,
    interpolate_at_kl,
    paired_frontier_difference,
    pool_best_of_n_win_rate,
)


# -- the best-of-n sampling frontier --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4, 8, 32])
def test_best_of_n_is_the_log_tilt_and_matches_order_statistics(n):
    from ctrl_offline.maths.theory import kl_divergence

    assert best_of_n_kl(n) == pytest.approx(kl_divergence("log", 1 / (n - 1)), abs=1e-9)
    # Best-of-N of best-of-n draws is the best of nN reference draws: it beats the best of N others
    # with probability nN / (nN + N), whatever the (tie-free) reward.
    for size in (1, 2, 4):
        assert best_of_n_win_rate("bon", size, n) == pytest.approx(n / (n + 1), abs=1e-9)
    # Worst-of-N, integrated here directly: P(min of N (max of n uniforms) > min of N uniforms).
    for size in (1, 4):
        exact = integrate.quad(lambda u: size * (1 - u) ** (size - 1) * (1 - u**n) ** size, 0, 1)[0]
        assert best_of_n_win_rate("won", size, n) == pytest.approx(exact, abs=1e-8)


def test_best_of_n_for_kl_inverts_the_kl_over_real_n():
    for n in (1.0, 1.001, 1.5, 2.0, 7.3, 100.0):
        assert best_of_n_for_kl(best_of_n_kl(n)) == pytest.approx(n, rel=1e-8)
    assert best_of_n_at_kl("bon", 4, 0.0) == 0.5
    assert best_of_n_at_kl("bon", 4, best_of_n_kl(4)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="n ≥ 1"):
        best_of_n_kl(0.5)
    with pytest.raises(ValueError, match="≥ 0 nats"):
        best_of_n_for_kl(-0.1)
    with pytest.raises(ValueError, match="no closed-form"):
        best_of_n_win_rate("soft_bon", 4, 2)


def test_the_pool_estimate_agrees_with_the_exact_frontier_on_a_continuous_reward():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(300, 96))
    for selector in ("bon", "won"):
        est = pool_best_of_n_win_rate(rewards, 4, selector, 4, rng=1, num_boot=300)
        assert est.value == pytest.approx(best_of_n_win_rate(selector, 4, 4), abs=0.01)
    null = pool_best_of_n_win_rate(rewards, 1, "bon", 4, rng=1, num_boot=300)
    assert null.ci_low <= 0.5 <= null.ci_high
    # A value-reading selector: soft best-of-N gains from best-of-n too, less than a hard best-of-N.
    soft = pool_best_of_n_win_rate(rewards, 4, "soft_bon", 4, lam=1.0, rng=1, num_boot=300)
    assert 0.55 < soft.value < 0.8
    with pytest.raises(ValueError, match="M ≥ 2"):
        pool_best_of_n_win_rate(rewards[:, :1], 2, "bon", 1)


# -- interpolation at common KLs --------------------------------------------------------------------------------------

def test_interpolation_is_linear_in_root_kl_from_the_reference():
    kls, wins = np.array([0.36, 0.04]), np.array([0.8, 0.6])  # any order
    # √KL: 0 → ½, 0.2 → 0.6, 0.6 → 0.8.
    got = interpolate_at_kl(kls, wins, [0.01, 0.04, 0.16, 0.36, 0.5])
    assert got[:4] == pytest.approx([0.55, 0.6, 0.7, 0.8])
    assert math.isnan(got[4])  # beyond the largest point: not reached
    no_anchor = interpolate_at_kl(kls, wins, [0.01, 0.16], anchor=None)
    assert math.isnan(no_anchor[0]) and no_anchor[1] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="matching 1-d"):
        interpolate_at_kl([0.1, 0.2], [0.5], [0.1])


def _method(rng, prompts, kls, gain, shift=0.0):
    """(points, prompts) per-prompt KLs and win rates: win = ½ + gain·√KL + shift, prompt noise on both axes."""
    kl = np.array([k * rng.gamma(4.0, 0.25, size=prompts) for k in kls])
    win = 0.5 + gain * np.sqrt(np.array(kls))[:, None] + shift + rng.normal(0, 0.1, size=(len(kls), prompts))
    return kl, win


def test_frontier_at_kl_recovers_a_root_kl_curve_and_marks_what_is_not_reached():
    rng = np.random.default_rng(3)
    kl, win = _method(rng, 400, [0.05, 0.2, 0.6], gain=0.3)
    rows = frontier_at_kl(kl, win, [0.1, 0.4, 1.0], num_boot=500, rng=0)
    assert rows[2] is None
    for row, target in zip(rows[:2], (0.1, 0.4)):
        assert row["ci_low"] < row["value"] < row["ci_high"]
        assert row["ci_low"] - 0.01 < 0.5 + 0.3 * math.sqrt(target) < row["ci_high"] + 0.01
        assert row["reached_share"] == 1.0 and row["num_prompts"] == 400


def test_paired_difference_sees_a_shift_its_separate_intervals_cannot():
    rng = np.random.default_rng(4)
    b_kl, b_win = _method(rng, 200, [0.1, 0.3, 0.9], gain=0.25)
    # A: the same prompts' values shifted by 2 points, at KLs shared with B up to a small factor.
    a_kl, a_win = b_kl * 1.05, b_win + 0.02
    rows = paired_frontier_difference(a_kl, a_win, b_kl, b_win, [0.25, 0.5], num_boot=500, rng=0)
    for row in rows:
        d = row["difference"]
        assert d["ci_low"] > 0 and d["value"] == pytest.approx(row["a"]["value"] - row["b"]["value"])
        # each side's own interval is wider than the gap: only the pairing shows it
        assert row["a"]["ci_high"] - row["a"]["ci_low"] > 0.02
    unreached = paired_frontier_difference(a_kl, a_win, b_kl, b_win, [2.0], num_boot=100)
    assert unreached[0]["a"] is None and unreached[0]["difference"] is None
    with pytest.raises(ValueError, match="same prompts"):
        paired_frontier_difference(a_kl[:, :10], a_win[:, :10], b_kl, b_win, [0.2])


# -- the stage: several adapters, checkpoints, compare --at-kl -----------------------------------------------------------

REWARD = "test_eval_diagnostics:good_count_reward"


@pytest.fixture(scope="module")
def frontier(tmp_path_factory):
    """Three adapters of one 'run' that boost "good" more and more, one of them planned, evaluated as a frontier."""
    from test_eval_diagnostics import PLAN, boosting_adapter, planned_build
    from tiny_models import WORDS, build_tiny_model

    import ctrl_offline.reports.reporting
    from ctrl_offline.maths.planner import plan
    from ctrl_offline.stages.frontier import evaluate_frontier
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("frontier")
    rng = np.random.default_rng(5)
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 5))) + f" {i}" for i in range(10)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    model = build_tiny_model(root / "lm", hidden=32)
    run = root / "ctrl.checkpoints"
    for step, boost in ((10, 0.5), (20, 1.5), (30, 3.0)):
        boosting_adapter(model, run / f"checkpoint-{step}", boost=boost)
    row = plan(PLAN["inference"], PLAN["n"], PLAN["kl"], families=("exp",)).best().to_dict()
    data = root / "build"
    data.mkdir()
    (data / "ctrl_build.json").write_text(json.dumps(planned_build(row)))
    pq.write_table(pa.table({"prompt": [prompts[0]]}), data / "rows.parquet")  # one evaluation prompt was trained on
    (run / "ctrl_train_settings.json").write_text(json.dumps({"data": str(data)}))
    other = boosting_adapter(model, root / "other", boost=2.0)  # no build: no plan
    settings = dict(n=(1, 4), selectors=("bon", "won"), max_new_tokens=6, policy_samples=6, reference_samples=6,
                    num_boot=300, tilt_fidelity=False)
    original = ctrl_offline.reports.reporting.write_report
    ctrl_offline.reports.reporting.write_report = lambda report, policy_u, folder: []  # each point's own figures: not needed
    try:
        summary = evaluate_frontier(str(root / "prompts.jsonl"), root / "out", str(model), REWARD, [str(run)],
                                    **settings)
        single = evaluate_frontier(str(root / "prompts.jsonl"), root / "single", str(model), REWARD, [str(other)],
                                   **settings)
    finally:
        ctrl_offline.reports.reporting.write_report = original
    return {"root": root, "summary": summary, "single": single, "settings": settings, "model": str(model),
            "run": run, "other": other, "row": row}


def test_a_runs_checkpoints_become_a_frontier_against_one_pool(frontier):
    summary, root = frontier["summary"], frontier["root"]
    labels = [p["label"] for p in summary["points"]]
    assert labels == ["ctrl-checkpoint-10", "ctrl-checkpoint-20", "ctrl-checkpoint-30"]
    assert (root / "out" / "pool" / "pool.parquet").is_file()
    kls = [p["kl"]["value"] for p in summary["points"]]
    assert kls[0] < kls[1] < kls[2]  # a stronger boost spends more KL
    for point in summary["points"]:
        report = json.loads((root / "out" / point["folder"] / "report.json").read_text())
        assert report["reference_pool"]["path"] == str(root / "out" / "pool")
        assert report["prompts"]["overlap_with_training"] == 1  # the run's build, found through its settings
        for row in point["win_rates"]:
            assert (row["selector"], row["n"]) in {("bon", 4), ("won", 4)}
            assert row["best_of_n"] == pytest.approx(best_of_n_at_kl(row["selector"], 4, point["kl"]["value"]))
            assert row["gap_to_best_of_n"] == pytest.approx(row["value"] - row["best_of_n"])
            planned = row["selector"] == "bon"  # the build was planned for bon-4
            assert (row["kl_efficiency"] is not None) == planned == (row["plan_at_kl"] is not None)
            if planned:
                assert row["gap_to_plan"] == pytest.approx(row["value"] - report["plan_diagnostics"]
                                                           ["planned_at_kl_spent"])
        assert point["planner"]["row"] == frontier["row"]
    text = (root / "out" / "frontier.md").read_text()
    assert "ctrl-checkpoint-20" in text and "best-of-n" in text and "KL eff." in text
    assert (root / "out" / "frontier.png").is_file() and summary["figure_notes"] == []


def test_a_frontier_resumes_without_evaluating_again(frontier, monkeypatch):
    import ctrl_offline.stages.evaluate as evaluate
    import ctrl_offline.stages.frontier as stage

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(evaluate, "evaluate_policy", refuse)
    again = stage.evaluate_frontier(str(frontier["root"] / "prompts.jsonl"), frontier["root"] / "out",
                                    frontier["model"], REWARD, [str(frontier["run"])], **frontier["settings"])
    assert [p["kl"] for p in again["points"]] == [p["kl"] for p in frontier["summary"]["points"]]


def test_compare_at_common_kls_pairs_two_methods_and_best_of_n(frontier, capsys):
    from ctrl_offline.stages.compare import compare_frontiers
    from data_tools.cli import main

    root = frontier["root"]
    kls = [p["kl"]["value"] for p in frontier["summary"]["points"]]
    other_kl = frontier["single"]["points"][0]["kl"]["value"]
    inside = 0.5 * min(kls[-1], other_kl)
    beyond = 2 * max(kls[-1], other_kl)
    result = compare_frontiers(root / "out", root / "single", [inside, beyond], num_boot=300)
    assert result["num_prompts"] == 10 and len(result["a"]["points"]) == 3 and len(result["b"]["points"]) == 1
    rows = {(r["selector"], r["n"], r["kl"]): r for r in result["rows"]}
    assert {(s, n) for s, n, _ in rows} == {("bon", 1), ("bon", 4), ("won", 1), ("won", 4)}
    row = rows[("bon", 4, inside)]
    assert row["difference"]["value"] == pytest.approx(row["a"]["value"] - row["b"]["value"])
    assert row["verdict"] in {"shows the effect", "refutes it", "inconclusive"}
    assert row["best_of_n"] == pytest.approx(best_of_n_at_kl("bon", 4, inside))
    assert row["a_vs_best_of_n"]["value"] == pytest.approx(row["a"]["value"] - row["best_of_n"])
    # A method's points gathered from several report folders: the same as its frontier folder without the middle one.
    listed = compare_frontiers([root / "out" / "ctrl-checkpoint-10", root / "out" / "ctrl-checkpoint-30"],
                               root / "single", [inside], num_boot=300)
    assert [p["label"] for p in listed["a"]["points"]] == ["ctrl-checkpoint-10", "ctrl-checkpoint-30"]
    far = rows[("bon", 4, beyond)]
    assert far["a"] is None and far["b"] is None and far["difference"] is None and far["verdict"] is None

    assert main(["compare", str(root / "out"), "--at-kl", f"{inside}", "--num-boot", "200"]) == 0
    text = capsys.readouterr().out
    assert "best-of-n" in text and "ctrl-checkpoint-30" in text and "bon-4" in text
    assert main(["compare", str(root / "out")]) == 2  # two reports, or --at-kl
    assert "--at-kl" in capsys.readouterr().err


def test_eval_cli_with_several_adapters_writes_a_frontier(frontier, capsys, monkeypatch):
    import ctrl_offline.reports.reporting
    from data_tools.cli import main

    monkeypatch.setattr(ctrl_offline.reports.reporting, "write_report", lambda report, policy_u, folder: [])
    root = frontier["root"]
    code = main(["eval", str(root / "prompts.jsonl"), "--model", frontier["model"], "--reward", REWARD,
                 "--adapter", str(frontier["other"]), str(frontier["run"] / "checkpoint-10"), "--eval-n", "1", "2",
                 "--eval-policy-samples", "4", "--eval-reference-samples", "4", "--max-new-tokens", "6",
                 "--no-tilt-fidelity", "--out", str(root / "cli")])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "other" in out and "checkpoint-10" in out and "frontier.md" in out
    summary = json.loads((root / "cli" / "frontier.json").read_text())
    assert [p["label"] for p in summary["points"]] == ["other", "checkpoint-10"]
    assert main(["eval", str(root / "prompts.jsonl"), "--model", frontier["model"], "--reward", REWARD,
                 "--adapter", str(root), "--out", str(root / "bad")]) == 2
    assert "neither a PEFT adapter" in capsys.readouterr().err
