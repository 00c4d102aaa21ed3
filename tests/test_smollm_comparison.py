"""benchmarks/smollm_comparison.py: the tie-broken reward, the decision rule, and --toy end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_modules import load_benchmark
from ctrl_offline.maths.losses import bonbon_beta

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "smollm_comparison.py"


def _module():
    return load_benchmark("smollm_comparison")


def test_tie_jitter_breaks_ties_without_reordering():
    sc = _module()
    texts = ["The sky is blue.", "A bus.", "It rains.", "The sky is blue."]
    scores = sc.vader_tiebroken(None, texts)
    base = [0.0, 0.0, 0.0, 0.0]  # VADER scores all four neutral
    assert all(0 <= s - b < sc.TIE_JITTER for s, b in zip(scores, base))
    assert len({scores[0], scores[1], scores[2]}) == 3  # different texts no longer tie
    assert scores[0] == scores[3]  # the same text still does
    assert sc.vader_tiebroken(None, texts) == scores  # fixed, not random
    # VADER rounds to 4 decimals: a jitter below 1e-5 cannot swap two distinct scores.
    assert sc.TIE_JITTER <= 1e-5


def test_verdicts():
    sc = _module()
    assert sc.verdict({"value": 0.05, "ci_low": 0.01, "ci_high": 0.09}) == "shows the effect"
    assert sc.verdict({"value": 0.05, "ci_low": -0.01, "ci_high": 0.11}) == "inconclusive"
    assert sc.verdict({"value": 0.005, "ci_low": -0.02, "ci_high": 0.025}) == "refutes it"
    assert sc.verdict({"value": -0.04, "ci_low": -0.07, "ci_high": -0.01}) == "refutes it"  # CTRL worse
    assert sc.verdict({"value": 0.02, "ci_low": 0.001, "ci_high": 0.04}) == "inconclusive"


def test_the_secondary_comparison_reads_only_long_trained_ctrl_runs_beside_a_long_trained_identity(monkeypatch,
                                                                                                   tmp_path):
    """docs/smollm_comparison.md's secondary rule: a CTRL-exp or CTRL-negexp run that ended at the step cap under its
    budget, against the calibrated identity run of the same budget that did too and against best-of-n sampling, at
    the smaller evaluation KL rounded down to 0.01, each run alone, on the selector the CTRL method was planned for."""
    sc = _module()
    import ctrl_offline.stages.compare as compare

    calls = []

    def fake_compare(a, b, kls, **kwargs):
        calls.append((a, b, kls))
        gap = {"value": 0.05, "ci_low": 0.02, "ci_high": 0.08}  # shows the effect by the rule's thresholds
        other = {"value": -0.3, "ci_low": -0.4, "ci_high": -0.2}  # on the selector that is not compared
        rows = [{"selector": sel, "n": 4, "kl": kls[0], "a": {"value": 0.6}, "b": {"value": 0.55},
                 "best_of_n": 0.7, "difference": gap if sel == "bon" else other,
                 "a_vs_best_of_n": {"value": -0.1, "ci_low": -0.13, "ci_high": -0.07}} for sel in ("bon", "won")]
        return {"rows": rows, "num_prompts": 256}

    monkeypatch.setattr(compare, "compare_frontiers", fake_compare)
    args = sc.resolve_sizes(sc.build_parser().parse_args([]))

    def summary(method, budget, kl, reached):
        return {"method": method, "kl_budget": budget, "kl_eval": {"value": kl}, "kl_budget_reached": reached}

    summaries = [summary("ctrl_exp_bon", 0.5, 0.2371, False), summary("calib_identity", 0.5, 0.1188, False),
                 summary("ctrl_negexp_won", 0.5, 0.3, True),  # reached its budget: not long-trained
                 summary("ctrl_exp_bon_rounds", 0.5, 0.05, False),  # not a soft-label pair run
                 summary("ctrl_exp_bon", 0.25, 0.2, False), summary("calib_identity", 0.25, 0.24, True)]
    runs = {(s["method"], s["kl_budget"]): {"dir": tmp_path / f"{s['method']}-{s['kl_budget']}"} for s in summaries}
    rows = sc.long_trained_comparisons(runs, summaries, args)
    exp, identity = tmp_path / "ctrl_exp_bon-0.5" / "eval", tmp_path / "calib_identity-0.5" / "eval"
    assert calls == [([exp], [identity], [0.11]), ([exp], None, [0.11])]
    assert [(r["ctrl"], r["baseline"], r["budget"], r["kl"], r["selector"]) for r in rows] == [
        ("ctrl_exp_bon", "calib_identity", 0.5, 0.11, "bon"), ("ctrl_exp_bon", "best-of-n sampling", 0.5, 0.11, "bon")]
    assert [r["verdict"] for r in rows] == ["shows the effect", "refutes it"]
    assert rows[0]["half_width"] == pytest.approx(0.03) and rows[1]["baseline_value"] == 0.7
    # Its table follows the main comparisons in results.md, with the runs' budget.
    table = sc.results_markdown({"runs": [], "comparisons": [], "long_trained": rows}, args).split("\n\n")[-1]
    assert table.splitlines()[2].startswith("| ctrl_exp_bon | calib_identity | 0.5 | 0.11 | bon-4 | 0.600 | 0.550 |")


def test_prompt_sets_are_disjoint_and_sized():
    sc = _module()
    args = sc.resolve_sizes(sc.build_parser().parse_args([]))
    sets = sc.prompt_sets(args)
    assert len(sets["eval"]) >= 256 and len(sets["train"]) == args.train_prompts
    assert not set(sets["eval"]) & (set(sets["train"]) | set(sets["kl"]))
    topics = {t for t in sc.TOPICS_EVAL if any(t in p for p in sets["eval"])}
    assert len(topics) >= 64
    estimate = sc.estimate_runtime(args, sc.COSTS["idle_2_cores"])
    assert estimate["total_s"] > 0 and estimate["runs"] == len(args.methods) * len(args.kl)


@pytest.mark.slow
def test_toy_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    out = tmp_path / "toy"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--out", str(out), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    assert stdout.index("Decision rule") < stdout.index("comparisons at common KLs")  # the rule comes first
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "results.json").read_text())
    config = result["config"]
    runs = {(r["method"], r["kl_budget"]) for r in result["runs"]}
    assert runs == {(m, b) for m in config["methods"] for b in config["kl"]}
    for run in result["runs"]:
        assert run["kl_held"] is not None and "value" in run["kl_held"] and "stderr" in run["kl_held"]
        assert {"value", "ci_low", "ci_high"} <= set(run["kl_eval"])
        for selector in ("bon", "won"):
            rate = run["win_rates"][selector]
            assert 0 <= rate["ci_low"] <= rate["value"] <= rate["ci_high"] <= 1
        assert run["policy_samples"] == config["m"] and run["reference_samples"] == config["big_m"]
        if run["method"] == "bonbon":  # IPO's margin 1/(2β) is best-of-K's mean gap (docs/theory.md §4.1)
            assert run["beta"] == pytest.approx(bonbon_beta(config["k"]))
    # One pool for every run: the first drew it, the others reused it.
    assert sum(not r["reference_pool_reused"] for r in result["runs"]) == 1
    # The KL the callback held against the evaluation's on the same KL prompts, for every run.
    for run in result["runs"]:
        agreement = run["kl_agreement"]
        assert agreement["held"] == run["kl_held"]["value"] and agreement["evaluated"] == run["kl_on_kl_prompts"]["value"]
    # Every CTRL method against every baseline and against best-of-n, at every common KL.
    ctrl = [m for m in config["methods"] if m.startswith("ctrl_")]
    base = [m for m in config["methods"] if not m.startswith("ctrl_")]
    assert len(result["comparisons"]) == len(ctrl) * (len(base) + 1) * len(config["common_kl"])
    for row in result["comparisons"]:
        reached = row["difference"] is not None
        assert row["verdict"] in (("shows the effect", "refutes it", "inconclusive") if reached else ("not reached",))
        if reached:
            assert row["half_width"] >= 0 and {"value", "ci_low", "ci_high"} <= set(row["difference"])
    # The tables docs/results.md records (a row per run, per comparison) and the frontier figure.
    runs_table, comparisons_table, *long_trained_table = (out / "results.md").read_text().split("\n\n")
    assert len(long_trained_table) == bool(result["long_trained"])
    assert sum(line.startswith(f"| {r['method']} | {r['kl_budget']:g} |") for r in result["runs"]
               for line in runs_table.splitlines()) == len(result["runs"])
    assert len(comparisons_table.strip().splitlines()) == 2 + len(result["comparisons"])
    assert (out / "frontier.png").stat().st_size > 0
    for run in result["runs"]:  # planned methods are measured against their plan
        assert (run["plan"] is not None) == (run["method"] not in ("raw_bvw_dpo", "bonbon"))
    # Resumable: a second invocation finds every stage cached and reprints the same results.
    again = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--out", str(out), "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert rerun["runs"] == result["runs"] and rerun["comparisons"] == result["comparisons"]


def test_baseline_budgets():
    """--baseline-kl holds the baselines at other budgets than CTRL's (the KL a CTRL run actually spent)."""
    module = _module()
    args = module.resolve_sizes(module.build_parser().parse_args(["--kl", "0.5", "--baseline-kl", "0.1", "0.2"]))
    assert module.method_budgets("ctrl_exp_bon", args) == [0.5]
    assert module.method_budgets("raw_bvw_dpo", args) == [0.1, 0.2]
    assert module.method_budgets("calib_identity", args) == [0.1, 0.2]
    same = module.resolve_sizes(module.build_parser().parse_args(["--kl", "0.25", "0.5"]))
    assert all(module.method_budgets(m, same) == [0.25, 0.5] for m in module.METHODS)
    # Runs to estimate: every CTRL method at 0.5, every baseline at 0.1 and 0.2.
    roles = [module.METHODS[m][2] for m in args.methods]
    assert module.estimate_runtime(args, module.COSTS["idle_2_cores"])["runs"] == roles.count("ctrl") + 2 * roles.count(
        "baseline") == 9
