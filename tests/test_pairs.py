"""Preference pairs (ctrl_offline.rows.pairs) against brute-force oracles: strategies, order, sampled draws."""

import itertools
import math
import time

import numpy as np
import pytest
from calibrated_rows_data import EXP, NEGEXP, rows

from ctrl_offline.maths.transforms import SynthesisError
from ctrl_offline.rows.pairs import make_pairs
from ctrl_offline.rows.pointwise import pointwise_targets
from ctrl_offline.maths.transforms import Transform


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
    np.testing.assert_array_equal(pairs.target_phi_gap, transform.phi(u[pairs.chosen]) - transform.phi(u[pairs.rejected]))
    np.testing.assert_allclose(pairs.label, 1 / (1 + np.exp(-pairs.target_phi_gap)), rtol=1e-15)
    np.testing.assert_array_equal(pairs.weight, np.ones(len(pairs)))
    assert np.all(pairs.target_phi_gap >= 0) and np.all(u[pairs.chosen] >= u[pairs.rejected])
    if drop_ties:
        assert np.all(pairs.target_phi_gap > 0)


def test_pair_counts_for_tie_free_prompts():
    ids = np.repeat(np.arange(5), 6)
    u = np.tile(np.arange(6) / 5, 5)
    assert len(make_pairs(ids, u, "identity", 1.0)) == 5 * 15
    assert len(make_pairs(ids, u, "identity", 1.0, strategy="best_vs_rest")) == 5 * 5
    worst_best = make_pairs(ids, u, "identity", 1.0, strategy="best_vs_worst")
    assert len(worst_best) == 5 and np.all(worst_best.target_phi_gap == 1.0)


def test_ties_kept_on_request_have_phi_gap_zero_and_label_half():
    ids, u = np.array(["a", "a", "a"]), np.array([0.5, 0.5, 1.0])
    kept = make_pairs(ids, u, EXP, 1.0, drop_ties=False)
    assert list(zip(kept.chosen.tolist(), kept.rejected.tolist())) == [(0, 1), (2, 0), (2, 1)]
    assert kept.target_phi_gap[0] == 0.0 and kept.label[0] == 0.5
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
    np.testing.assert_allclose(pairs.target_phi_gap, delta, atol=1e-12)
    np.testing.assert_allclose(pairs.label, 1 / (1 + np.exp(-delta)), atol=1e-12)
    np.testing.assert_allclose(targets, beta * rho, atol=1e-12)  # pointwise target = β ρ*
    assert not np.allclose(pairs.label, 1 / (1 + np.exp(-pairs.target_phi_gap / beta)))


# -- sampled pairs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 5, 100])
def test_sampled_pairs_are_a_reproducible_subset_with_the_right_counts(m):
    ids, u = rows(4, prompts=40, kmax=7)
    everything = make_pairs(ids, u, EXP, 1.0)
    every = set(zip(everything.chosen.tolist(), everything.rejected.tolist()))
    a = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=m, seed=7)
    b = make_pairs(ids, u, EXP, 1.0, strategy="sampled", pairs_per_prompt=m, seed=7)
    for field in ("chosen", "rejected", "target_phi_gap", "label", "weight"):
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
    # Sorted like every other strategy, with Φ gaps and labels from the formula.
    order = [(list(dict.fromkeys(ids.tolist())).index(ids[c]), c, r) for c, r in got]
    assert order == sorted(order)
    np.testing.assert_array_equal(a.target_phi_gap, EXP.phi(u[a.chosen]) - EXP.phi(u[a.rejected]))
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


# -- empty input, validation ------------------------------------------------------------------------
def test_empty_input():
    empty_ids, empty_u = np.array([], dtype=object), np.array([])
    for strategy in ("all", "best_vs_rest", "best_vs_worst", "sampled"):
        pairs = make_pairs(empty_ids, empty_u, EXP, 1.0, strategy=strategy,
                           pairs_per_prompt=2 if strategy == "sampled" else None)
        assert len(pairs) == 0 and pairs.chosen.dtype.kind == "i"


class _Decreasing(Transform):
    name = "decreasing"

    def phi(self, u):
        return -np.asarray(u, dtype=float)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="x"), "unknown pair strategy 'x'"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="sampled"), "needs pairs_per_prompt"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="sampled", pairs_per_prompt=0),
         "pairs_per_prompt must be an integer ≥ 1, got 0"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, strategy="sampled", pairs_per_prompt=1.5),
         "pairs_per_prompt must be an integer"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, pairs_per_prompt=2), "only to strategy 'sampled'"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 1.0, seed=True), "seed must be an integer"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], _Decreasing(), 1.0), "not increasing"),
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
    elapsed = time.perf_counter() - start
    extremes = make_pairs(ids, u, EXP, 1.0, strategy="best_vs_worst")
    assert len(pairs) == 100_000 * 28 and len(sampled) <= 400_000 and len(extremes) <= 100_000
    assert np.all(ids[pairs.chosen] == ids[pairs.rejected])
    assert elapsed < 5.0, f"{elapsed:.2f} s"
