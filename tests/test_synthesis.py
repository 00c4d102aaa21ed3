"""Target synthesis (ctrl_offline.synthesis) against brute-force and closed-form oracles."""

import itertools
import math
import time

import numpy as np
import pytest

from ctrl_offline.calibration import calibrate_reference
from ctrl_offline.synthesis import (
    SynthesisError,
    log_partition_gap,
    make_pairs,
    pointwise_targets,
    sft_weights,
)
from ctrl_offline.transforms import Transform, get_transform

EXP = get_transform("exp", 3.0)
NEGEXP = get_transform("negexp", 5.0)


def rows(seed=0, prompts=12, kmax=6, int_ids=False):
    """Interleaved rows of prompts with 1..kmax responses each; u on a 4-point grid, so ties abound."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, kmax + 1, size=prompts)
    names = rng.permutation(prompts) * 7 + 3 if int_ids else np.array([f"p{i}" for i in range(prompts)])
    ids = np.repeat(names, k)
    perm = rng.permutation(len(ids))
    u = rng.integers(0, 4, size=len(ids)) / 3
    return ids[perm], u[perm]


def brute_pairs(ids, u, strategy, drop_ties=True):
    """(chosen, rejected) lists by plain loops, in the documented output order."""
    ids, u = list(ids), list(u)
    first_seen = {p: ids.index(p) for p in ids}
    out = []
    for p in first_seen:
        idx = [i for i in range(len(ids)) if ids[i] == p]
        best = max(idx, key=lambda i: (u[i], -i))
        worst = min(idx, key=lambda i: (u[i], i))
        if strategy == "all":
            cand = list(itertools.combinations(idx, 2))
        elif strategy == "best_vs_rest":
            cand = [(best, j) for j in idx if j != best]
        else:
            cand = [(best, worst)] if best != worst else []
        for a, b in cand:
            if drop_ties and u[a] == u[b]:
                continue
            out.append((first_seen[p],) + ((b, a) if u[b] > u[a] else (a, b)))
    out.sort()
    return [c for _, c, _ in out], [r for _, _, r in out]


def local_ranks(ids):
    """Position of each row among its prompt's rows (input order)."""
    seen = {}
    out = []
    for p in ids:
        out.append(seen.get(p, 0))
        seen[p] = out[-1] + 1
    return np.array(out)


# -- pairs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["all", "best_vs_rest", "best_vs_worst"])
@pytest.mark.parametrize("drop_ties", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_pairs_match_brute_force(strategy, drop_ties, seed):
    ids, u = rows(seed, int_ids=seed % 2 == 1)
    transform = EXP if seed < 2 else NEGEXP
    pairs = make_pairs(ids, u, transform, 0.7, strategy=strategy, drop_ties=drop_ties)
    chosen, rejected = brute_pairs(ids, u, strategy, drop_ties)
    # Same pairs, same orientation, same (first appearance, chosen, rejected) order.
    assert pairs.chosen.tolist() == chosen and pairs.rejected.tolist() == rejected
    np.testing.assert_array_equal(pairs.target_margin, transform.phi(u[pairs.chosen]) - transform.phi(u[pairs.rejected]))
    np.testing.assert_allclose(pairs.label, 1 / (1 + np.exp(-pairs.target_margin)), rtol=1e-15)
    np.testing.assert_array_equal(pairs.weight, np.ones(len(pairs)))
    assert np.all(pairs.target_margin >= 0) and np.all(u[pairs.chosen] >= u[pairs.rejected])
    if drop_ties:
        assert np.all(pairs.target_margin > 0)


def test_pair_counts_for_tie_free_prompts():
    ids = np.repeat(np.arange(5), 6)
    u = np.tile(np.arange(6) / 5, 5)
    assert len(make_pairs(ids, u, "identity", 1.0)) == 5 * 15
    assert len(make_pairs(ids, u, "identity", 1.0, strategy="best_vs_rest")) == 5 * 5
    worst_best = make_pairs(ids, u, "identity", 1.0, strategy="best_vs_worst")
    assert len(worst_best) == 5 and np.all(worst_best.target_margin == 1.0)


def test_ties_kept_on_request_have_margin_zero_and_label_half():
    ids, u = np.array(["a", "a", "a"]), np.array([0.5, 0.5, 1.0])
    kept = make_pairs(ids, u, EXP, 1.0, drop_ties=False)
    assert list(zip(kept.chosen.tolist(), kept.rejected.tolist())) == [(0, 1), (2, 0), (2, 1)]
    assert kept.target_margin[0] == 0.0 and kept.label[0] == 0.5
    assert len(make_pairs(ids, u, EXP, 1.0)) == 2
    # A prompt whose responses all tie gives no pair unless ties are kept; one row never does.
    assert len(make_pairs(["a", "a", "b"], [0.3, 0.3, 0.9], EXP, 1.0)) == 0
    assert len(make_pairs(["a", "a", "b"], [0.3, 0.3, 0.9], EXP, 1.0, strategy="best_vs_rest", drop_ties=False)) == 1


def test_soft_labels_are_the_bradley_terry_probabilities_of_the_tilted_policy():
    # Tabular check: each row is one response with equal reference mass; π* ∝ π_ref·exp(Φ/β) over
    # the prompt's rows. DPO's logit is β(ρ₁ − ρ₂), so the soft label must be σ(β(ρ*₁ − ρ*₂)).
    ids, u = rows(9, prompts=8)
    beta = 0.4
    pairs = make_pairs(ids, u, NEGEXP, beta)
    # π* over the stored rows themselves is the memorising regime: the empirical normaliser is exact there.
    targets = pointwise_targets(ids, u, NEGEXP, beta, log_partition="empirical")
    rho = np.empty(len(u))
    for p in set(ids.tolist()):
        sel = ids == p
        pi_star = np.exp(NEGEXP.phi(u[sel]) / beta)
        pi_star /= pi_star.sum()
        rho[sel] = np.log(pi_star * sel.sum())  # log π*/π_ref with π_ref = 1/n
    delta = beta * (rho[pairs.chosen] - rho[pairs.rejected])
    np.testing.assert_allclose(pairs.target_margin, delta, atol=1e-12)
    np.testing.assert_allclose(pairs.label, 1 / (1 + np.exp(-delta)), atol=1e-12)
    np.testing.assert_allclose(targets, beta * rho, atol=1e-12)  # pointwise target = β ρ*
    assert not np.allclose(pairs.label, 1 / (1 + np.exp(-pairs.target_margin / beta)))


# -- sampled pairs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 5, 100])
def test_sampled_pairs_are_a_reproducible_subset_with_the_right_counts(m):
    ids, u = rows(4, prompts=40, kmax=7)
    everything = make_pairs(ids, u, EXP, 1.0)
    every = set(zip(everything.chosen.tolist(), everything.rejected.tolist()))
    a = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=m, seed=7)
    b = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=m, seed=7)
    for field in ("chosen", "rejected", "target_margin", "label", "weight"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    got = list(zip(a.chosen.tolist(), a.rejected.tolist()))
    assert len(set(got)) == len(got) and set(got) <= every
    available = {p: 0 for p in ids.tolist()}
    for c, _ in every:
        available[ids[c]] += 1
    picked = {p: 0 for p in ids.tolist()}
    for c in a.chosen:
        picked[ids[c]] += 1
    assert picked == {p: min(m, n) for p, n in available.items()}
    # Sorted like every other strategy, with margins and labels from the formula.
    order = [(list(dict.fromkeys(ids.tolist())).index(ids[c]), c, r) for c, r in got]
    assert order == sorted(order)
    np.testing.assert_array_equal(a.target_margin, EXP.phi(u[a.chosen]) - EXP.phi(u[a.rejected]))
    if m == 100:
        np.testing.assert_array_equal(a.chosen, everything.chosen)
    else:
        other = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=m, seed=8)
        assert set(zip(other.chosen.tolist(), other.rejected.tolist())) != set(got)


def test_sampled_pairs_do_not_depend_on_other_prompts_or_their_order():
    ids, u = rows(5, prompts=30, kmax=7)

    def picked(ids, u):
        pairs = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=2, seed=3)
        r = local_ranks(ids)
        return {(ids[c], r[c], r[j]) for c, j in zip(pairs.chosen.tolist(), pairs.rejected.tolist())}

    reference = picked(ids, u)
    # Keep 20 of the 30 prompts, in a new order and freshly interleaved; each prompt's own rows
    # keep their relative order.
    rng = np.random.default_rng(0)
    names = list(dict.fromkeys(ids.tolist()))
    kept = [names[i] for i in rng.permutation(len(names))[:20]]
    queues = {p: list(np.flatnonzero(ids == p)) for p in kept}
    new_order = np.array([queues[p].pop(0) for p in rng.permutation([p for p in kept for _ in queues[p]])])
    assert set(ids[new_order][:5].tolist()) != set(ids[:5].tolist())
    moved = picked(ids[new_order], u[new_order])
    assert moved == {x for x in reference if x[0] in kept}


def test_sampled_pairs_are_uniform():
    # 24000 tie-free prompts of 4 rows: each of the 6 pairs is drawn with probability m/6.
    rng = np.random.default_rng(1)
    n = 24_000
    ids = np.repeat(np.arange(n), 4)
    u = rng.permuted(np.tile(np.arange(4) / 3, (n, 1)), axis=1).ravel()
    for m in (1, 2):
        pairs = make_pairs(ids, u, "identity", 1.0, strategy="sampled", pairs_per_prompt=m, seed=11)
        lo = np.minimum(pairs.chosen, pairs.rejected) % 4
        hi = np.maximum(pairs.chosen, pairs.rejected) % 4
        freq = np.bincount(lo * 4 + hi, minlength=16)[[1, 2, 3, 6, 7, 11]] / n
        sd = math.sqrt(m / 6 * (1 - m / 6) / n)
        np.testing.assert_allclose(freq, m / 6, atol=5 * sd)
    # The m = 2 draws of a prompt are two distinct pairs, with the 15 possible couples equally likely.
    couples = np.sort((lo * 4 + hi).reshape(n, 2), axis=1)
    codes = np.unique(couples[:, 0] * 16 + couples[:, 1], return_counts=True)[1]
    assert len(codes) == 15 and codes.min() > n / 15 - 5 * math.sqrt(n / 15)


# -- pointwise targets ------------------------------------------------------------------------------
@pytest.mark.parametrize("transform,beta", [(EXP, 1.5), (NEGEXP, 0.05), (get_transform("identity"), 0.2)])
def test_pointwise_targets_both_normalisers(transform, beta):
    ids, u = rows(5)
    continuous = pointwise_targets(ids, u, transform, beta, log_partition="continuous")
    np.testing.assert_allclose(continuous, transform.phi(u) - beta * float(transform.log_partition(beta)), rtol=1e-14)
    empirical = pointwise_targets(ids, u, transform, beta, log_partition="empirical")
    for p in set(ids.tolist()):
        sel = ids == p
        phi = transform.phi(u[sel])
        expected = phi - beta * np.log(np.mean(np.exp(phi / beta)))
        np.testing.assert_allclose(empirical[sel], expected, rtol=1e-12, atol=1e-12)
        # Self-normalised: the mean over the prompt's rows of exp(target/β) is exactly 1.
        assert np.mean(np.exp(empirical[sel] / beta)) == pytest.approx(1.0, rel=1e-13)


def test_pointwise_targets_do_not_overflow_for_sharp_tilts():
    ids, u = rows(6)
    transform, beta = get_transform("exp", 40.0), 1e-3  # Φ/β up to 2e20
    for kind in ("empirical", "continuous"):
        assert np.all(np.isfinite(pointwise_targets(ids, u, transform, beta, log_partition=kind)))
    empirical = pointwise_targets(ids, u, transform, beta, log_partition="empirical")
    for p in set(ids.tolist()):
        assert np.mean(np.exp(empirical[ids == p] / beta)) == pytest.approx(1.0, rel=1e-12)


def test_empirical_minus_continuous_is_the_log_partition_gap_on_calibrated_reference_samples():
    # Tie-free reference rewards, K = 8: calibrate_reference puts every prompt on the grid j/7.
    rng = np.random.default_rng(2)
    k, beta = 8, 0.25
    ids = np.repeat([f"q{i}" for i in range(50)], k)
    _, u = calibrate_reference(ids, rng.normal(size=len(ids)))
    np.testing.assert_allclose(np.sort(u.reshape(50, k), axis=1), np.tile(np.arange(k) / (k - 1), (50, 1)))
    for transform in (EXP, NEGEXP, get_transform("identity")):
        shift = pointwise_targets(ids, u, transform, beta, log_partition="continuous") - pointwise_targets(
            ids, u, transform, beta, log_partition="empirical"
        )
        np.testing.assert_allclose(shift, beta * log_partition_gap(transform, beta, k), rtol=1e-9, atol=1e-12)


def test_population_normaliser_normalises_the_bernstein_mean_of_the_targets():
    # The default normaliser: with targets T_j = Φ(j/(K−1)) − β·L, the fit a generalising policy makes is
    # E[T | c] = Σ_j T_j·Binom(j; K−1, c); L is chosen so that ∫ exp(E[T | c]/β) dc = 1 exactly.
    from scipy import integrate, stats

    rng = np.random.default_rng(3)
    k, beta = 6, 0.3
    ids = np.repeat([f"q{i}" for i in range(4)], k)
    _, u = calibrate_reference(ids, rng.normal(size=len(ids)))
    for transform in (EXP, NEGEXP, get_transform("identity")):
        target = pointwise_targets(ids, u, transform, beta)
        by_rank = np.empty(k)
        by_rank[np.rint(u[:k] * (k - 1)).astype(int)] = target[:k]
        mean = lambda c: stats.binom.pmf(np.arange(k), k - 1, c) @ by_rank  # noqa: E731
        mass, _ = integrate.quad(lambda c: math.exp(mean(c) / beta), 0, 1, epsabs=1e-12, epsrel=1e-12)
        assert mass == pytest.approx(1.0, rel=1e-9)


def test_cell_targets_are_the_tilts_mass_per_cell_and_finite_for_log():
    rng = np.random.default_rng(4)
    k, beta = 5, 0.5
    ids = np.repeat(["a", "b"], k)
    _, u = calibrate_reference(ids, rng.normal(size=len(ids)))
    log = get_transform("log")
    weights = sft_weights(ids, u, log, beta, targets="cell")
    # log at β: e^{Φ/β} = u^{1/β}, so the cell mass is ∫ v^{1/β} dv over [j/K, (j+1)/K] in closed form.
    j = np.rint(u * (k - 1))
    power = 1 + 1 / beta
    mass = ((j + 1) / k) ** power - (j / k) ** power
    np.testing.assert_allclose(weights, mass / mass[:k].mean(), rtol=1e-10)
    # β = 1/(N−1): the weights are the exact best-of-N law over the K stored samples (with replacement).
    n = 3
    w = sft_weights(ids, u, log, 1 / (n - 1), targets="cell")
    np.testing.assert_allclose(w / k, ((j + 1) / k) ** n - (j / k) ** n, rtol=1e-10)
    assert np.all(np.isfinite(pointwise_targets(ids, u, log, beta, targets="cell")))
    with pytest.raises(SynthesisError, match="non-finite"):
        pointwise_targets(ids, u, log, beta)
    # Ties share their block of cells: two tied rows of four get the mean mass of cells 1 and 2.
    tied = sft_weights(["p"] * 4, [0.0, 0.5, 0.5, 1.0], "identity", 0.2, targets="cell")
    assert tied[1] == tied[2]
    assert tied[0] < tied[1] < tied[3]


# -- weighted SFT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("transform,beta", [(EXP, 0.7), (NEGEXP, 0.01), (get_transform("exp", 40.0), 1e-3)])
def test_sft_weights_average_one_and_follow_exp_phi_over_beta(transform, beta):
    ids, u = rows(6)
    w = sft_weights(ids, u, transform, beta)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    for p in set(ids.tolist()):
        sel = ids == p
        assert w[sel].mean() == pytest.approx(1.0, rel=1e-13)
        x = transform.phi(u[sel]) / beta
        expected = np.exp(x - x.max()) / np.mean(np.exp(x - x.max()))
        np.testing.assert_allclose(w[sel], expected, rtol=1e-12)


def test_sft_weights_give_zero_to_log_transform_at_u_zero():
    w = sft_weights(["a", "a", "a"], [0.0, 0.5, 1.0], "log", 0.5)
    np.testing.assert_allclose(w, [0.0, 3 * 0.25 / 1.25, 3 * 1.0 / 1.25])
    with pytest.raises(SynthesisError, match=r"Φ\(u\) = −∞ for every row of 1 prompt\(s\): prompt_id 'b'"):
        sft_weights(["a", "b", "b"], [0.5, 0.0, 0.0], "log", 0.5)


# -- the log-partition gap ---------------------------------------------------------------------------
def test_log_partition_gap_closed_form_for_identity():
    # Σ_j exp(j h/β) is geometric, Z = β(e^{1/β} − 1): no quadrature, no special functions.
    for beta, k in [(0.1, 4), (0.243, 8), (1.0, 16), (0.5, 64)]:
        h = 1 / (k - 1)
        r = math.exp(h / beta)
        empirical = math.log((r**k - 1) / (r - 1) / k)
        continuous = math.log(beta * math.expm1(1 / beta))
        assert log_partition_gap("identity", beta, k) == pytest.approx(empirical - continuous, rel=1e-12)


def test_log_partition_gap_matches_direct_computation():
    for transform, beta, k in [(EXP, 0.5, 4), (NEGEXP, 0.05, 8), (get_transform("exp", 10.0), 1e3, 16)]:
        phi = transform.phi(np.arange(k) / (k - 1))
        direct = np.log(np.mean(np.exp(phi / beta))) - float(transform.log_partition(beta))
        assert log_partition_gap(transform, beta, k) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("transform,beta", [(EXP, 2.0), (NEGEXP, 0.5), (get_transform("identity"), 0.243)])
def test_log_partition_gap_vanishes_like_one_over_k(transform, beta):
    gaps = [log_partition_gap(transform, beta, k) for k in (4, 16, 256, 4096)]
    assert np.all(np.diff(np.abs(gaps)) < 0) and abs(gaps[-1]) < 5e-3
    # The grid keeps both end points: K·gap → (f(0) + f(1))/2 − 1, f = exp(Φ/β)/Z the tilted density.
    ends = np.exp(transform.phi(np.array([0.0, 1.0])) / beta - float(transform.log_partition(beta)))
    assert (4096 - 1) * gaps[-1] == pytest.approx(ends.mean() - 1, rel=2e-3)


# -- empty input, validation ------------------------------------------------------------------------
def test_empty_input():
    empty_ids, empty_u = np.array([], dtype=object), np.array([])
    for strategy in ("all", "best_vs_rest", "best_vs_worst", "sampled"):
        pairs = make_pairs(empty_ids, empty_u, EXP, 1.0, strategy=strategy,
                           pairs_per_prompt=2 if strategy == "sampled" else None)
        assert len(pairs) == 0 and pairs.chosen.dtype.kind == "i"
    assert len(pointwise_targets(empty_ids, empty_u, EXP, 1.0)) == 0
    assert len(pointwise_targets(empty_ids, empty_u, EXP, 1.0, log_partition="continuous")) == 0
    assert len(sft_weights(empty_ids, empty_u, EXP, 1.0)) == 0


class _Decreasing(Transform):
    name = "decreasing"

    def phi(self, u):
        return -np.asarray(u, dtype=float)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: make_pairs(["a"] * 9, [0.2, 1.5, -0.1, 2, 3, 4, 5, 0.5, 9], "identity", 1.0),
         r"7 calibrated value\(s\) u are NaN or outside \[0, 1\]: rows 1, 2, 3, 4, 5 and 2 more \(prompt_id 'a'\)"),
        (lambda: pointwise_targets(["a", "b"], [0.2, np.nan], "identity", 1.0), r"NaN .*rows 1 \(prompt_id 'b'\)"),
        (lambda: sft_weights(["a"], [0.2, 0.3], "identity", 1.0), "1-D arrays of one length"),
        (lambda: make_pairs([["a", "a"]], [[0.2, 0.3]], "identity", 1.0), "1-D arrays of one length"),
        (lambda: make_pairs(np.array(["a", None, None], dtype=object), [0.2, 0.3, 0.4], "identity", 1.0),
         r"2 row\(s\) have a missing prompt id \(None/NaN\): rows 1, 2"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 0.0), "beta must be a finite number > 0"),
        (lambda: pointwise_targets(["a"], [0.2], "identity", -1.0), "beta"),
        (lambda: sft_weights(["a"], [0.2], "identity", float("inf")), "beta"),
        (lambda: make_pairs(["a"], [0.2], "identity", "x"), "beta"),
        (lambda: make_pairs(["a"], [0.2], "nope", 1.0), "unknown transform 'nope'"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="x"), "unknown pair strategy 'x'"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="sampled"), "needs pairs_per_prompt"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="sampled", pairs_per_prompt=0),
         "pairs_per_prompt must be an integer ≥ 1, got 0"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="sampled", pairs_per_prompt=1.5),
         "pairs_per_prompt must be an integer"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, pairs_per_prompt=2), "only to strategy 'sampled'"),
        (lambda: make_pairs(["a", "a"], [0.0, 0.3], "log", 1.0),
         r"transform 'log' gives a non-finite Φ\(u\) for 1 row\(s\): rows 0 \(prompt_id 'a'\)"),
        (lambda: pointwise_targets(["a", "b"], [0.5, 0.0], "log", 1.0), r"non-finite Φ\(u\).*rows 1 \(prompt_id 'b'\)"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], _Decreasing(), 1.0), "not increasing"),
        (lambda: pointwise_targets(["a"], [0.2], "identity", 1.0, log_partition="x"), "log_partition must be one of"),
        (lambda: log_partition_gap("identity", 1.0, 1), "K must be an integer ≥ 2"),
        (lambda: log_partition_gap("identity", 0.0, 8), "beta"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(SynthesisError, match=message):
        call()


def test_vectorised_at_scale():
    # 100k prompts × K = 8: 2.8M pairs from one pass of group arithmetic, no loop per prompt.
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(100_000), 8)
    u = rng.integers(0, 8, size=len(ids)) / 7
    start = time.perf_counter()
    pairs = make_pairs(ids, u, EXP, 1.0, drop_ties=False)
    sampled = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=4)
    targets = pointwise_targets(ids, u, EXP, 1.0)
    elapsed = time.perf_counter() - start
    assert len(pairs) == 100_000 * 28 and len(sampled) <= 400_000 and len(targets) == len(u)
    assert np.all(ids[pairs.chosen] == ids[pairs.rejected])
    assert elapsed < 5.0, f"{elapsed:.2f} s"
