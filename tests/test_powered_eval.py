"""The powered evaluation: U-statistic win rates over every N-subset, paired comparisons, the eval stage's
reference pool and a null run (ctrl_offline.maths.win_rates, ctrl_offline.stages.evaluate/compare)."""

import itertools
import json
import math

import numpy as np
import pytest

from ctrl_offline.maths.win_rates import (
    bootstrap_mean,
    paired_bootstrap_difference,
    subset_selection_weights,
    u_statistic_per_prompt,
    u_statistic_win_rate,
)
from ctrl_offline.maths.procedures import select

SETTINGS = {"lam": 0.3, "beta": 0.5, "kappa0": 0.1}


def brute_force(policy, reference, n, selector, policy_logps=None, reference_logps=None):
    """Mean over every pair (policy N-subset, reference N-subset) of the exact one-duel win probability."""
    out = []
    for b in range(len(policy)):
        pi = [i for i in range(policy.shape[1]) if not np.isnan(policy[b, i])]
        ri = [j for j in range(reference.shape[1]) if not np.isnan(reference[b, j])]
        if len(pi) < n or len(ri) < n:
            out.append(np.nan)
            continue
        def picks(values, logps, subset):
            extra = {} if logps is None else {"ref_logps": logps[b, list(subset)][None]}
            chosen = values[b, list(subset)]
            return chosen, select(chosen[None], selector, **SETTINGS, **extra).probs[0]

        refs = [picks(reference, reference_logps, c) for c in itertools.combinations(ri, n)]
        duels = []
        for a in itertools.combinations(pi, n):
            r, p = picks(policy, policy_logps, a)
            for s, q in refs:
                w = (r[:, None] > s[None, :]) + 0.5 * (r[:, None] == s[None, :])
                duels.append(p @ w @ q)
        out.append(np.mean(duels))
    return np.array(out)


def cases(seed, ties):
    rng = np.random.default_rng(seed)
    m, big_m = 5, 6
    if ties:
        policy = rng.integers(0, 4, size=(6, m)).astype(float)
        reference = rng.integers(0, 4, size=(6, big_m)).astype(float)
    else:
        policy = rng.normal(size=(6, m)) + 0.3
        reference = rng.normal(size=(6, big_m))
    return policy, reference, rng.normal(size=(6, m)), rng.normal(size=(6, big_m))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("selector", ["bon", "won", "rbon", "soft_bon", "itp"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_brute_force_over_every_subset(selector, n, ties):
    policy, reference, lp, lr = cases(10 * n + ties, ties)
    logps = {"policy_ref_logps": lp, "reference_ref_logps": lr} if selector == "rbon" else {}
    got, methods = u_statistic_per_prompt(policy, reference, n, selector, **logps, **SETTINGS, return_methods=True)
    want = brute_force(policy, reference, n, selector, lp if logps else None, lr if logps else None)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    expected = "closed_form" if n == 1 or selector in ("bon", "won", "rbon") else "all_subsets"
    assert methods == (expected, expected)


def test_best_of_n_weights_are_the_order_statistic_formula():
    # Ascending order statistics: the i-th smallest of m is the max of a random N-subset w.p. C(i−1, N−1)/C(m, N).
    r = np.array([[3.0, 1.0, 4.0, 1.5, 9.0, 2.6]])
    order = np.argsort(r[0])
    for n in (1, 2, 3, 6):
        bon, method = subset_selection_weights(r, n, "bon")
        won, _ = subset_selection_weights(r, n, "won")
        assert method == "closed_form"
        want_bon = [math.comb(i - 1, n - 1) / math.comb(6, n) for i in range(1, 7)]
        want_won = [math.comb(6 - i, n - 1) / math.comb(6, n) for i in range(1, 7)]
        np.testing.assert_allclose(bon[0, order], want_bon, atol=1e-15)
        np.testing.assert_allclose(won[0, order], want_won, atol=1e-15)
        assert bon.sum() == pytest.approx(1.0) and won.sum() == pytest.approx(1.0)


def test_ragged_rows_and_too_few_candidates():
    rng = np.random.default_rng(3)
    policy = rng.integers(0, 3, size=(4, 5)).astype(float)
    reference = rng.integers(0, 3, size=(4, 5)).astype(float)
    policy[0, [1, 3]] = np.nan  # 3 left
    reference[1, 0] = np.nan  # 4 left
    policy[2, :4] = np.nan  # 1 left: too few for N = 2
    for selector in ("bon", "won", "soft_bon"):
        got = u_statistic_per_prompt(policy, reference, 2, selector, **SETTINGS)
        want = brute_force(policy, reference, 2, selector)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert np.isnan(got[2]) and np.isfinite(got[[0, 1, 3]]).all()
    out = u_statistic_win_rate(policy, reference, 2, "bon", num_boot=50)
    assert out["prompts_without_candidates"] == 1 and out["num_prompts"] == 3 and out["excluded_candidates"] == 7
    assert (out["policy_samples"], out["reference_samples"], out["method"]) == (5, 5, "closed_form")


def test_random_subsets_above_the_cap_are_close_and_seeded():
    rng = np.random.default_rng(5)
    policy, reference = rng.normal(size=(3, 9)), rng.normal(size=(3, 9))
    exact, methods = u_statistic_per_prompt(policy, reference, 4, "soft_bon", lam=0.3, return_methods=True)
    assert methods == ("all_subsets", "all_subsets")  # C(9, 4) = 126
    approx, methods = u_statistic_per_prompt(policy, reference, 4, "soft_bon", lam=0.3, max_subsets=100, rng=1,
                                             return_methods=True)
    assert methods == ("random_subsets", "random_subsets")
    np.testing.assert_allclose(approx, exact, atol=0.03)
    again = u_statistic_per_prompt(policy, reference, 4, "soft_bon", lam=0.3, max_subsets=100, rng=1)
    np.testing.assert_array_equal(approx, again)
    assert u_statistic_win_rate(policy, reference, 4, "soft_bon", lam=0.3, max_subsets=100,
                                num_boot=20)["method"] == "random_subsets"


@pytest.mark.parametrize(("selector", "prompts"), [("bon", 3000), ("won", 3000), ("soft_bon", 3000), ("bot", 300)])
def test_policy_equal_to_reference_averages_one_half(selector, prompts):
    m, big_m, n = 6, 8, 3
    rng = np.random.default_rng(11)
    policy = rng.normal(size=(prompts, m))
    reference = rng.normal(size=(prompts, big_m))
    v = u_statistic_per_prompt(policy, reference, n, selector, lam=0.3)
    se = v.std(ddof=1) / math.sqrt(prompts)
    assert abs(v.mean() - 0.5) < 3 * se, (v.mean(), se)


@pytest.mark.parametrize("selector", ["bon", "won", "soft_bon", "itp", "bot"])
def test_the_same_multiset_on_both_sides_is_exactly_one_half(selector):
    rng = np.random.default_rng(2)
    reference = rng.integers(0, 4, size=(20, 6)).astype(float)  # ties
    policy = rng.permuted(reference, axis=1)  # the same samples per prompt, in another order
    for n in (1, 2, 4, 6):
        got = u_statistic_per_prompt(policy, reference, n, selector, **SETTINGS)
        np.testing.assert_allclose(got, 0.5, rtol=0, atol=1e-12)


def test_lower_variance_than_one_duel_per_prompt():
    # The U-statistic over m = M = 8 samples against a single best-of-4 duel on the first 4 of each side.
    prompts = 4000
    rng = np.random.default_rng(4)
    policy, reference = rng.normal(size=(prompts, 8)) + 0.2, rng.normal(size=(prompts, 8))
    u = u_statistic_per_prompt(policy, reference, 4, "bon")
    duel = u_statistic_per_prompt(policy[:, :4], reference[:, :4], 4, "bon")
    assert abs(u.mean() - duel.mean()) < 3 * duel.std() / math.sqrt(prompts)
    assert u.var() < 0.5 * duel.var()


def test_refusals():
    r = np.zeros((2, 3))
    with pytest.raises(ValueError, match="larger than the candidates available"):
        u_statistic_per_prompt(r, r, 4)
    with pytest.raises(ValueError, match="unknown inference procedure"):
        u_statistic_per_prompt(r, r, 2, "nope")
    with pytest.raises(ValueError, match="reference log-probs"):
        u_statistic_per_prompt(r, r, 2, "rbon")
    with pytest.raises(ValueError, match="same prompts"):
        u_statistic_per_prompt(r, np.zeros((3, 3)), 2)
    with pytest.raises(ValueError, match="finite"):
        u_statistic_per_prompt(np.full((2, 3), np.inf), r, 2)
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap_difference(np.zeros(3), np.zeros(4))


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=200)
    a, b = base + 0.02, base + rng.normal(scale=0.01, size=200)
    est = paired_bootstrap_difference(a, b, num_boot=500)
    assert est.num_prompts == 200 and est.ci_low < 0.02 < est.ci_high
    assert est.ci_low > 0  # pairing removes the shared prompt effect
    unpaired = bootstrap_mean(a, num_boot=500)
    assert est.ci_high - est.ci_low < 0.2 * (unpaired.ci_high - unpaired.ci_low)
    a[3] = np.nan
    assert paired_bootstrap_difference(a, b, num_boot=50).num_prompts == 199


# --------------------------------------------------------------------------------------------------
# The eval stage on a tiny model: null run, reference pool, paired comparison, CLI.
# --------------------------------------------------------------------------------------------------

REWARD = "tiny_models:word_count_reward"


def letter_count_reward(prompts, completions):
    """Another deterministic reward (a pool scored with one reward must not serve another)."""
    return [float(len(c)) for c in completions]


@pytest.fixture(autouse=True)
def no_figures(request, monkeypatch):
    """The stage tests skip report.md and the figures (the planner's curves take half a minute on a small CPU)."""
    if "tiny" in request.fixturenames:
        import ctrl_offline.reports.reporting

        monkeypatch.setattr(ctrl_offline.reports.reporting, "write_report", lambda report, policy_u, folder: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import WORDS, build_tiny_model

    root = tmp_path_factory.mktemp("powered")
    rng = np.random.default_rng(1)
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 5))) + f" {i}" for i in range(16)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"root": root, "prompts": str(root / "prompts.jsonl"), "model": str(build_tiny_model(root / "lm"))}


def evaluate(tiny, out, **kwargs):
    from ctrl_offline.stages.evaluate import evaluate_policy

    args = {"n": (1, 2, 4), "selectors": ("bon", "won", "itp"), "max_new_tokens": 6, "num_boot": 400,
            "policy_samples": 8, "reference_samples": 8, **kwargs}
    return evaluate_policy(tiny["prompts"], out, tiny["model"], kwargs.pop("reward", REWARD),
                           **{k: v for k, v in args.items() if k != "reward"})


def test_null_run_every_interval_contains_one_half(tiny):
    # The policy is the reference (no adapter): 16 prompts × 8 policy × 8 reference samples.
    result = evaluate(tiny, tiny["root"] / "null", seed=3)
    report = result.report
    assert (report["policy_samples"], report["reference_samples"], report["estimator"]) == (8, 8, "u_statistic")
    assert len(report["win_rates"]) == 9
    for row in [*report["win_rates"], report["standard_win_rate"]]:
        assert row["ci_low"] <= 0.5 <= row["ci_high"], row
        assert row["num_prompts"] == 16
    methods = {(r["selector"], r["n"]): r["method"] for r in report["win_rates"]}
    assert methods[("bon", 4)] == "closed_form" and methods[("itp", 4)] == "all_subsets"
    assert report["kl"]["value"] == report["kl_sequence"]["value"] == 0.0  # π is π_ref: one pass scores both
    per_prompt = pq_read(result.out_dir / "per_prompt.parquet")
    assert set(per_prompt.metric) == {"win_rate", "standard_win_rate", "kl", "kl_sequence"}
    assert per_prompt.prompt_id.nunique() == 16
    bon4 = per_prompt[(per_prompt.metric == "win_rate") & (per_prompt.selector == "bon") & (per_prompt.n == 4)]
    assert bon4.value.mean() == pytest.approx(next(r for r in report["win_rates"]
                                                   if (r["selector"], r["n"]) == ("bon", 4))["value"])


def pq_read(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def test_reference_pool_is_written_then_reused(tiny, monkeypatch):
    import ctrl_offline.stages.evaluate as stage
    from ctrl_offline.io.files import DataError, read_metadata

    pool = tiny["root"] / "pool"
    first = evaluate(tiny, tiny["root"] / "a", reference_pool=pool, seed=0)
    assert first.report["reference_pool"] == {"path": str(pool), "reused": False}
    assert read_metadata(pool / "pool.parquet")["samples_per_prompt"] == 8
    pooled = pq_read(pool / "pool.parquet")
    assert len(pooled) == 16 * 8

    drawn = []
    real_draw = stage._draw
    monkeypatch.setattr(stage, "_draw", lambda *a, reference, **k: drawn.append(reference) or real_draw(
        *a, reference=reference, **k))
    second = evaluate(tiny, tiny["root"] / "b", reference_pool=pool, seed=5, reference_samples=None)
    assert drawn == [False]  # only the policy was sampled
    assert second.report["reference_pool"]["reused"] and second.report["reference_samples"] == 8
    ref_a = pq_read(tiny["root"] / "a" / "samples.parquet").query("side == 'reference'")
    ref_b = pq_read(tiny["root"] / "b" / "samples.parquet").query("side == 'reference'")
    np.testing.assert_array_equal(ref_a.reward.to_numpy(), ref_b.reward.to_numpy())
    assert list(ref_a.completion) == list(ref_b.completion)
    # Fewer reference samples than the pool holds: the first M of each prompt.
    third = evaluate(tiny, tiny["root"] / "c", reference_pool=pool, reference_samples=4, n=(1, 4))
    assert third.report["reference_samples"] == 4 and drawn == [False, False]

    with pytest.raises(DataError, match="holds other prompts"):
        evaluate(tiny, tiny["root"] / "x", reference_pool=pool, limit=12)
    with pytest.raises(DataError, match="reward"):
        evaluate(tiny, tiny["root"] / "x", reference_pool=pool, reward="test_powered_eval:letter_count_reward")
    with pytest.raises(DataError, match="max_new_tokens"):
        evaluate(tiny, tiny["root"] / "x", reference_pool=pool, max_new_tokens=5)
    with pytest.raises(DataError, match="fewer than the 16 reference samples"):
        evaluate(tiny, tiny["root"] / "x", reference_pool=pool, reference_samples=16)
    with pytest.raises(ValueError, match="policy_samples must be an integer ≥ max\\(N\\) = 4"):
        evaluate(tiny, tiny["root"] / "x", policy_samples=3)
    assert not (tiny["root"] / "x").exists()


def test_the_pool_survives_a_run_stopped_while_the_policy_samples(tiny, monkeypatch):
    """The reference side is drawn and written first: a run killed during the policy's samples keeps the pool."""
    import ctrl_offline.stages.evaluate as stage

    real_draw = stage._draw

    def draw(*args, reference, **kwargs):
        if not reference:
            raise KeyboardInterrupt  # the session ends while the policy samples
        return real_draw(*args, reference=reference, **kwargs)

    monkeypatch.setattr(stage, "_draw", draw)
    pool = tiny["root"] / "kept_pool"
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, tiny["root"] / "stopped", reference_pool=pool, seed=0)
    assert len(pq_read(pool / "pool.parquet")) == 16 * 8 and not (tiny["root"] / "stopped").exists()
    monkeypatch.setattr(stage, "_draw", real_draw)
    resumed = evaluate(tiny, tiny["root"] / "stopped", reference_pool=pool, seed=0)
    assert resumed.report["reference_pool"]["reused"]


def test_a_run_stopped_while_sampling_resumes_after_its_last_batch(tiny, monkeypatch):
    """Each finished batch is kept beside the output until the report is written: a stopped evaluation draws only
    what it had not, and reports exactly what an uninterrupted one reports."""
    import ctrl_offline.models.generation as generation
    from ctrl_offline.io.files import DataError

    whole = evaluate(tiny, tiny["root"] / "whole", seed=4, n=(1, 4))
    real_save, saved = generation._SamplingCheckpoint.save, []

    def save(self, start, rows):
        if self.folder.name == "policy" and ("policy", 0) in saved:
            raise KeyboardInterrupt  # the session ends during the policy's second batch
        saved.append((self.folder.name, start))
        real_save(self, start, rows)

    monkeypatch.setattr(generation._SamplingCheckpoint, "save", save)
    out = tiny["root"] / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, out, seed=4, n=(1, 4))
    kept = tiny["root"] / ".resumed.sampling"
    assert len(list((kept / "policy").glob("batch-*.pt"))) == 1 and not out.exists()
    saved.clear()
    monkeypatch.setattr(generation._SamplingCheckpoint, "save", lambda self, start, rows: saved.append(
        (self.folder.name, start)) or real_save(self, start, rows))
    resumed = evaluate(tiny, out, seed=4, n=(1, 4))
    assert saved == [("policy", 8)]  # only the batch it had not finished is drawn
    assert resumed.report["win_rates"] == whole.report["win_rates"] and resumed.report["kl"] == whole.report["kl"]
    assert pq_read(out / "samples.parquet").equals(pq_read(tiny["root"] / "whole" / "samples.parquet"))
    assert not kept.exists()  # gone once the report is written
    # A non-empty output is refused before any model is loaded or sample drawn.
    with pytest.raises(DataError, match="is not empty"):
        evaluate({**tiny, "model": str(tiny["root"] / "no-such-model")}, out)


def test_compare_pairs_two_reports_on_the_same_prompts(tiny, capsys):
    from ctrl_offline.io.files import DataError
    from ctrl_offline.stages.compare import compare_reports
    from data_tools.cli import main

    root = tiny["root"]
    code = main(["eval", tiny["prompts"], "--model", tiny["model"], "--reward", REWARD, "--eval-n", "1", "4",
                 "--eval-selectors", "bon", "won", "--max-new-tokens", "6", "--eval-policy-samples", "8",
                 "--reference-pool", str(root / "cli-pool"), "--seed", "1", "--out", str(root / "cli-a")])
    assert code == 0, capsys.readouterr().err
    code = main(["eval", tiny["prompts"], "--model", tiny["model"], "--reward", REWARD, "--eval-n", "1", "4",
                 "--eval-selectors", "bon", "won", "--max-new-tokens", "6", "--eval-policy-samples", "8",
                 "--reference-pool", str(root / "cli-pool"), "--seed", "2", "--out", str(root / "cli-b")])
    out = capsys.readouterr().out
    assert code == 0 and "reference pool: " in out and "(reused)" in out and "8 policy × 4 reference" in out

    result = compare_reports(root / "cli-a", root / "cli-b", num_boot=300)
    assert result["num_prompts"] == 16
    names = [(r["metric"], r["selector"], r["n"]) for r in result["rows"]]
    assert names == [("win_rate", s, n) for s in ("bon", "won") for n in (1, 4)] + [
        ("standard_win_rate", None, 1), ("kl", None, None)]
    for row in result["rows"]:
        d = row["difference"]
        assert d["value"] == pytest.approx(row["value_a"] - row["value_b"])
        assert d["ci_low"] <= d["value"] <= d["ci_high"]
        if row["metric"] != "kl":  # both are the reference itself: no difference
            assert d["ci_low"] <= 0 <= d["ci_high"]

    assert main(["compare", str(root / "cli-a"), str(root / "cli-b")]) == 0
    text = capsys.readouterr().out
    assert "bon-4" in text and "paired CI" in text and "KL" in text
    assert main(["compare", str(root / "cli-a"), str(root / "cli-b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_prompts"] == 16

    evaluate(tiny, root / "fewer", limit=12, n=(1, 4), selectors=("bon",))
    with pytest.raises(DataError, match="not evaluations of the same prompts"):
        compare_reports(root / "cli-a", root / "fewer")
    assert main(["compare", str(root / "cli-a"), str(root / "fewer")]) == 2
    assert "same prompts" in capsys.readouterr().err


def test_a_pool_and_training_data_with_the_hex_ids_of_earlier_versions_still_match(tmp_path):
    """`sample` wrote prompt ids as 16 hex digits before it wrote int64s (the same 64 bits): a reference pool and a
    training set from then match today's ids."""
    import pyarrow as pa

    from ctrl_offline.models.generation import hex_prompt_id, prompt_id
    from ctrl_offline.io.files import write_parquet
    from ctrl_offline.stages.evaluate import POOL_FILE, _overlap, _read_pool

    prompts = ["first prompt ", "second prompt "]
    settings = {"model": "m", "reward": "r", "max_new_tokens": 8}
    rows = {"prompt_id": [hex_prompt_id(p) for p in prompts for _ in range(2)], "sample_idx": [0, 1, 0, 1],
            "completion": ["a", "b", "c", "d"], "reward": [0.1, 0.2, 0.3, 0.4], "ref_logp": [-1.0] * 4}
    write_parquet(pa.table(rows), tmp_path / "pool" / POOL_FILE, {"stage": "reference_pool", **settings})
    ids = [prompt_id(p) for p in prompts]
    pool = _read_pool(tmp_path / "pool", ids, settings, samples=2)
    assert set(pool) == set(ids) and list(pool[ids[1]].completion) == ["c", "d"]
    # ... and a caller still on hex ids (a process started before the change) gets its own keys back.
    hex_ids = [hex_prompt_id(p) for p in prompts]
    assert set(_read_pool(tmp_path / "pool", hex_ids, settings, samples=2)) == set(hex_ids)
    write_parquet(pa.table({"prompt_id": [hex_prompt_id(prompts[0])], "prompt": [prompts[0]]}), tmp_path / "train.parquet")
    assert _overlap(ids, str(tmp_path / "train.parquet")) == 1
