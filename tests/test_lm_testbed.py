"""The exact LM testbed's building blocks: enumeration, exact figures, oracle tilts, exact sampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ctrl_offline.maths.calibration import quantile_cells
from ctrl_offline.maths.finite_k import ideal_tilt, trained_tilt
from ctrl_offline.testbeds.lm_testbed import (
    ExactKL,
    Reward,
    SyntheticLanguage,
    build_reference_model,
    exact_metrics,
    pretrain_reference,
    response_index,
    response_logprobs,
    sample_from_model,
    sequence_logprobs,
    tilted_policy,
)
from ctrl_offline.maths.planner import plan

SMALL = SyntheticLanguage(vocab=3, length=3, prompt_vocab=2, prompt_length=2, seed=3)


@pytest.fixture(scope="module")
def random_lm():
    torch.manual_seed(0)
    model, tokenizer = build_reference_model(SMALL, hidden=32)
    return model, tokenizer


@pytest.fixture(scope="module")
def pretrained_lm():
    torch.manual_seed(0)
    model, tokenizer, _ = pretrain_reference(SMALL, steps=80, per_prompt=64, batch_size=64, hidden=32, lr=1e-2)
    return model, tokenizer


def test_language_enumerates_every_response_once():
    responses = SMALL.responses()
    assert responses.shape == (27, 3)
    assert len({tuple(r) for r in responses}) == 27
    np.testing.assert_array_equal(response_index(SMALL, responses), np.arange(27))
    prompts = SMALL.all_prompts()
    assert sorted(prompts) == sorted(" ".join(p) for p in itertools.product(["p0", "p1"], repeat=2))
    train, held_out = SMALL.split_prompts(3, 1)
    assert not set(train) & set(held_out)
    with pytest.raises(ValueError, match="too many"):
        SyntheticLanguage(vocab=20, length=5)


def test_tree_enumeration_matches_whole_sequences_and_sums_to_the_valid_mass(random_lm):
    model, tokenizer = random_lm
    prompts = SMALL.all_prompts()[:2]
    logp, valid = response_logprobs(model, tokenizer, SMALL, prompts)
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-12)
    responses = np.broadcast_to(SMALL.responses(), (2, 27, 3))
    whole = sequence_logprobs(model, tokenizer, SMALL, prompts, responses)  # one forward per sequence
    np.testing.assert_allclose(whole, logp + np.log(valid)[:, None], atol=1e-5)
    # The mass left over is the LM's on everything else: a random LM puts most of it on invalid strings.
    assert np.all((valid > 0) & (valid < 1))
    np.testing.assert_allclose(np.exp(whole).sum(axis=1), valid, rtol=1e-5)


def test_kl_of_the_reference_to_itself_is_zero_and_every_win_rate_a_half(random_lm):
    model, tokenizer = random_lm
    prompts = SMALL.all_prompts()
    logp, _ = response_logprobs(model, tokenizer, SMALL, prompts)
    for ties in (False, True):
        rewards = Reward(SMALL, ties=ties, grid=1.0).table(prompts)
        m = exact_metrics(logp, logp, rewards, n_values=(1, 2, 4))
        assert m.kl == pytest.approx(0.0, abs=1e-12)
        assert m.standard_win_rate == pytest.approx(0.5, abs=1e-12)
        for n in (1, 2, 4):
            assert m.bon_win_rate[n] == pytest.approx(0.5, abs=1e-12)
            assert m.won_win_rate[n] == pytest.approx(0.5, abs=1e-12)
    assert ExactKL(tokenizer, SMALL, prompts, logp)(model).value == pytest.approx(0.0, abs=1e-9)


def _brute_force(p, q, r, n, worst):
    """Win rate of T_N(p) over T_N(q) by enumerating every N-tuple of responses on both sides."""
    total = 0.0
    responses = range(len(p))
    pick = min if worst else max
    for a in itertools.product(responses, repeat=n):
        pa = np.prod(p[list(a)])
        ra = pick(r[list(a)])
        for b in itertools.product(responses, repeat=n):
            rb = pick(r[list(b)])
            total += pa * np.prod(q[list(b)]) * ((ra > rb) + 0.5 * (ra == rb))
    return total


@pytest.mark.parametrize("ties", [False, True])
def test_exact_win_rates_match_enumeration_of_every_n_tuple(ties):
    rng = np.random.default_rng(1)
    p, q = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(5))
    r = np.array([0.3, 1.0, 0.3, -2.0, 1.0]) if ties else rng.normal(size=5)
    m = exact_metrics(np.log(p), np.log(q), r, n_values=(2, 3))
    assert m.kl == pytest.approx(float(np.sum(p * np.log(p / q))))
    assert m.standard_win_rate == pytest.approx(_brute_force(p, q, r, 1, False))
    for n in (2, 3):
        assert m.bon_win_rate[n] == pytest.approx(_brute_force(p, q, r, n, False))
        assert m.won_win_rate[n] == pytest.approx(_brute_force(p, q, r, n, True))


def test_reward_is_tie_free_with_per_prompt_scale_and_offset():
    language = SyntheticLanguage()
    prompts = language.all_prompts()[:4]
    table = Reward(language).table(prompts)
    assert all(len(np.unique(row)) == language.num_responses for row in table)
    # Raw rewards are not comparable across prompts; their within-prompt order is the same.
    scales = [Reward(language).scale_offset(p) for p in prompts]
    assert len({round(a, 6) for a, _ in scales}) == 4 and len({round(b, 6) for _, b in scales}) == 4
    np.testing.assert_array_equal(np.argsort(table[0]), np.argsort(table[1]))
    tied = Reward(language, ties=True).table(prompts[:1])
    assert len(np.unique(tied)) < language.num_responses / 10


def _random_reference(num_prompts=3, seed=0):
    language = SyntheticLanguage(vocab=4, length=5, seed=seed)  # 1024 responses
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(num_prompts, language.num_responses))
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return language, logp, Reward(language).table(language.all_prompts()[:num_prompts])


@pytest.mark.parametrize("inference,family", [("bon", "identity"), ("bon", "exp"), ("won", "negexp")])
def test_tilted_policies_reproduce_the_plan_exactly(inference, family):
    _, ref_logp, rewards = _random_reference()
    for k in (None, 8):
        p = plan(inference, 4, 0.5, families=(family,), k=k, loss="dpo", strategy="all")
        row = p.rows[0]
        spec = row.transform if row.t is None else f"{row.transform}:{row.t}"
        tilt = ideal_tilt(spec, row.beta) if k is None else trained_tilt(spec, row.beta, k, p.estimator)
        m = exact_metrics(tilted_policy(ref_logp, rewards, tilt.log_density), ref_logp, rewards)
        win = m.bon_win_rate[4] if inference == "bon" else m.won_win_rate[4]
        assert m.kl == pytest.approx(row.kl, abs=0.005)
        assert win == pytest.approx(row.win_rate, abs=0.005)


def test_tilted_policy_shares_a_tied_cell_in_proportion_to_the_reference():
    ref = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    rewards = np.array([1.0, 1.0, 2.0, 0.0])  # the first two tie
    lp = tilted_policy(ref, rewards, ideal_tilt("identity", 0.5).log_density)[0]
    p = np.exp(lp)
    assert p.sum() == pytest.approx(1.0)
    assert p[1] / p[0] == pytest.approx(2.0)
    (group, lo, hi), = quantile_cells(ref, rewards)
    np.testing.assert_allclose(hi - lo, [0.4, 0.3, 0.3])
    # Identity at β: mass of cell [a, b] is ∫ e^{u/β} / Z.
    beta = 0.5
    z = beta * (np.exp(1 / beta) - 1)
    mass = beta * (np.exp(hi / beta) - np.exp(lo / beta)) / z
    np.testing.assert_allclose([p[3], p[0] + p[1], p[2]], mass, rtol=1e-9)


def test_sampling_follows_the_enumerated_distribution(pretrained_lm):
    model, tokenizer = pretrained_lm
    prompts = SMALL.all_prompts()[:2]
    logp, valid = response_logprobs(model, tokenizer, SMALL, prompts)
    assert valid.min() > 0.9  # pretraining teaches the fixed length and EOS
    draws = 6000
    symbols = sample_from_model(model, tokenizer, SMALL, prompts, draws, seed=0)
    assert symbols.shape == (2, draws, 3)
    for row in range(2):
        counts = np.bincount(response_index(SMALL, symbols[row]), minlength=SMALL.num_responses)
        expected = draws * np.exp(logp[row])
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < 60  # 26 degrees of freedom: the 99.99th percentile is ~60
    again = sample_from_model(model, tokenizer, SMALL, prompts, 5, seed=1)
    np.testing.assert_array_equal(again, sample_from_model(model, tokenizer, SMALL, prompts, 5, seed=1))


def test_exact_kl_of_a_moved_model(pretrained_lm):
    import copy

    model, tokenizer = pretrained_lm
    prompts = SMALL.all_prompts()
    ref_logp, _ = response_logprobs(model, tokenizer, SMALL, prompts)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.3 * torch.randn_like(moved.lm_head.weight))
    estimate = ExactKL(tokenizer, SMALL, prompts, ref_logp)(moved)
    logp, _ = response_logprobs(moved, tokenizer, SMALL, prompts)
    expected = np.mean(np.sum(np.exp(logp) * (logp - ref_logp), axis=1))
    assert estimate.value == pytest.approx(expected) and estimate.value > 0.01
    assert estimate.stderr == 0.0
    with pytest.raises(ValueError, match="shape"):
        ExactKL(tokenizer, SMALL, prompts[:1], ref_logp)
