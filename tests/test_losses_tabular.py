"""The tabular testbed (DESIGN.md §2.4): each offline loss, trained to convergence, solves CTRL exactly.

A policy with one free logit per response over a small finite response set per prompt, a known
π_ref and known rewards. On a finite set the exact calibrated reward is
C(y) = Σ_z π_ref(z)·(1[r(z) < r(y)] + ½·1[z = y]), and the exact target is
π*(y) ∝ π_ref(y)·exp(Φ(C(y))/β) normalised over the set. Each loss is minimised in population
(expectation over data drawn from π_ref) and must reach π* — total variation < 0.02 is the
specification; the assertions below are tighter, at what full-batch L-BFGS actually reaches.
"""

import math

import numpy as np
import pytest
import torch

from ctrl_offline.losses import distill_loss, dpo_loss, ipo_loss, pointwise_loss, soft_label, weighted_sft_loss
from ctrl_offline.transforms import get_transform


PROMPTS, RESPONSES = 3, 16
# β per transform, so that π* is far from π_ref (Φ's scale differs: exp's Φ = e^{tu} reaches e^t).
SETTINGS = {"identity": (None, 0.1), "exp": (3.0, 2.0), "negexp": (3.0, 0.1)}


def make_testbed(name: str, seed: int = 0):
    t, beta = SETTINGS[name]
    rng = np.random.default_rng(seed)
    log_ref = torch.log_softmax(torch.tensor(rng.normal(size=(PROMPTS, RESPONSES))), dim=1)
    rewards = rng.normal(size=(PROMPTS, RESPONSES))
    ref = log_ref.exp().numpy()
    below = (rewards[:, None, :] < rewards[:, :, None]).astype(float)  # [p, y, z] = 1[r(z) < r(y)]
    c = np.einsum("pyz,pz->py", below, ref) + 0.5 * ref
    phi = torch.tensor(get_transform(name, t).phi(c))
    target = torch.softmax(log_ref + phi / beta, dim=1)
    return log_ref, phi, beta, target, torch.tensor(rewards)


def total_variation(p, q) -> float:
    return float(0.5 * (p - q).abs().sum(dim=1).max())


def population_loss(kind: str, log_policy, log_ref, phi, beta, rewards=None):
    rho = log_policy - log_ref
    ref = log_ref.exp()
    if kind in ("dpo", "ipo", "distill", "dpo_hard"):
        r1, r2 = rho[:, :, None].expand(-1, -1, RESPONSES), rho[:, None, :].expand(-1, RESPONSES, -1)
        margin = phi[:, :, None] - phi[:, None, :]
        pair_weight = ref[:, :, None] * ref[:, None, :] * (1 - torch.eye(RESPONSES, dtype=ref.dtype))
        if kind == "dpo":
            losses = dpo_loss(r1, r2, beta, soft_label(margin))
        elif kind == "dpo_hard":
            # Pairs oriented by reward, hard label 1: the familiar DPO on (better, worse).
            better = (rewards[:, :, None] > rewards[:, None, :]).double()
            losses = dpo_loss(r1, r2, beta, 1.0) * better
        elif kind == "ipo":
            losses = ipo_loss(r1, r2, beta, margin)
        else:
            losses = distill_loss(r1, r2, beta, margin)
        return (pair_weight * losses).sum()
    log_z = torch.logsumexp(log_ref + phi / beta, dim=1, keepdim=True)  # discrete normaliser, E_ref[e^{Φ/β}]
    if kind == "pointwise":
        return (ref * pointwise_loss(rho, beta, phi - beta * log_z)).sum()
    weights = torch.exp(phi / beta - log_z)  # ∝ exp(Φ/β), mean 1 under π_ref
    return (ref * weighted_sft_loss(log_policy, weights)).sum()


def train(kind: str, log_ref, phi, beta, rewards=None, iterations: int = 60):
    theta = log_ref.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=50, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = population_loss(kind, torch.log_softmax(theta, dim=1), log_ref, phi, beta, rewards)
        loss.backward()
        return loss

    for _ in range(iterations):
        optimiser.step(closure)
    return torch.softmax(theta.detach(), dim=1)


@pytest.mark.parametrize("transform", ["identity", "exp", "negexp"])
@pytest.mark.parametrize("kind", ["dpo", "ipo", "distill", "pointwise", "weighted_sft"])
def test_every_loss_reaches_the_tilted_optimum(kind, transform):
    log_ref, phi, beta, target, _ = make_testbed(transform)
    assert total_variation(log_ref.exp(), target) > 0.1  # the tilt is far from trivial
    policy = train(kind, log_ref, phi, beta)
    assert total_variation(policy, target) < 1e-4  # spec: < 0.02


def test_hard_label_dpo_misses_the_tilted_optimum():
    # Hard labels keep only the order of the rewards, not the transform's shape: the population
    # optimum pushes every better-than margin towards infinity, so the policy drifts towards the
    # single best response instead of settling at π*.
    log_ref, phi, beta, target, rewards = make_testbed("exp")
    policy = train("dpo_hard", log_ref, phi, beta, rewards)
    assert total_variation(policy, target) > 0.05
    best = rewards.argmax(dim=1)
    assert float(policy[torch.arange(PROMPTS), best].min()) > float(target[torch.arange(PROMPTS), best].max())


def test_loss_values_by_hand():
    zero = torch.zeros(3)
    # Equal log-ratios: DPO is log 2 whatever the label.
    for label in (1.0, 0.3, torch.tensor([0.0, 0.5, 1.0])):
        torch.testing.assert_close(dpo_loss(zero, zero, 0.7, label), torch.full((3,), math.log(2)))
    chosen, rejected, beta, margin = torch.tensor([0.4]), torch.tensor([-0.1]), 0.5, torch.tensor([0.25])
    assert float(ipo_loss(chosen, rejected, beta, margin)) == pytest.approx((0.5 - 0.25 / 0.5) ** 2)
    assert float(distill_loss(chosen, rejected, beta, margin)) == pytest.approx((0.5 * 0.5 - 0.25) ** 2)
    assert float(pointwise_loss(torch.tensor([0.2]), 2.0, torch.tensor([0.4]))) == pytest.approx(0.0)
    assert float(weighted_sft_loss(torch.tensor([-3.0]), torch.tensor([2.0]))) == pytest.approx(6.0)
    assert float(soft_label(torch.tensor([0.0]))) == pytest.approx(0.5)


def test_gradients_vanish_at_the_targets():
    beta, margin = 0.5, torch.tensor([0.3, -0.2], dtype=torch.float64)
    rho1 = torch.tensor([0.1, 0.0], dtype=torch.float64, requires_grad=True)
    rho2 = (rho1.detach() - margin / beta).requires_grad_(True)  # β(ρ₁ − ρ₂) = margin exactly
    for loss_fn in (lambda a, b: dpo_loss(a, b, beta, soft_label(margin)),
                    lambda a, b: ipo_loss(a, b, beta, margin),
                    lambda a, b: distill_loss(a, b, beta, margin)):
        grad = torch.autograd.grad(loss_fn(rho1, rho2).sum(), (rho1, rho2))
        assert all(float(g.abs().max()) < 1e-12 for g in grad)
