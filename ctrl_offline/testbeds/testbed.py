"""A finite-K testbed: train each offline estimator on K sampled references per prompt, exactly measured.

No language model can say whether an estimator trains the tilt the planner promised: it never
reaches its optimum, and its KL and win rates are themselves noisy estimates. Here everything is
known (docs/finite_k.md §6):

* each prompt has a finite response set of ``responses`` equally likely responses under π_ref with
  distinct rewards, so a response's exact quantile is C = (rank + ½)/responses;
* K reference samples per prompt are drawn from π_ref, and Ĉ comes from the library's own
  calibration (:func:`ctrl_offline.maths.calibration.calibrate_reference`, leave-one-out, mid-rank ties);
* the training set is the library's own synthesis (pairs, pointwise targets, weights) with Φ
  rescaled to span 1, as ``ctrl-data build`` writes it, and the loss is the trainer's
  (:mod:`ctrl_offline.maths.losses`);
* the policy is a *generalising* one (the population regime): its log-ratio is a smooth function of
  the response's exact quantile, log π_θ/π_ref = g(C) − log E_ref[e^{g}], with g a Legendre
  series — it cannot see the other samples of the prompt;
* the trained policy's KL and win rates are then exact integrals over C
  (:class:`ctrl_offline.maths.finite_k.TrainedTilt`), compared with the K-aware plan's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ctrl_offline.maths.calibration import calibrate_reference
from ctrl_offline.maths.finite_k import Estimator, TrainedTilt
from ctrl_offline.maths.losses import get_loss
from ctrl_offline.rows.pairs import make_pairs
from ctrl_offline.rows.pointwise import pointwise_targets, sft_weights
from ctrl_offline.maths.transforms import Rescaled, Transform, get_transform, unit_scale
from ctrl_offline.maths._quadrature import nodes_and_weights

__all__ = ["TestbedResult", "run_testbed"]


@dataclass(frozen=True)
class TestbedResult:
    kl: float
    bon_win_rate: float
    won_win_rate: float
    standard_win_rate: float
    tilt: TrainedTilt
    examples: int


def _legendre(c: np.ndarray, degree: int) -> torch.Tensor:
    return torch.from_numpy(np.polynomial.legendre.legvander(2.0 * np.asarray(c, float) - 1.0, degree))


def run_testbed(transform: Transform | str, beta: float, k: int, estimator: Estimator | None = None, *,
                prompts: int = 2000, responses: int = 2**20, degree: int = 20, n: int = 4,
                seed: int = 0) -> TestbedResult:
    """Train ``estimator`` in the population regime on ``prompts`` × K samples; exact figures of the result.

    ``transform``/``beta`` are the raw ones (as the planner reports them); the training set is
    written with Φ rescaled to span 1 and the trainer's β, as ``ctrl-data build`` does.
    """
    estimator = estimator or Estimator()
    transform = get_transform(transform)
    rng = np.random.default_rng(seed)
    ranks = rng.integers(0, responses, size=(prompts, k))
    exact = (ranks.ravel() + 0.5) / responses
    ids = np.repeat(np.arange(prompts), k)
    _, u = calibrate_reference(ids, ranks.ravel().astype(float))
    scale = unit_scale(transform)
    unit, unit_beta = Rescaled(transform, scale), beta / scale

    nodes, weights = nodes_and_weights()
    basis_nodes = _legendre(nodes, degree)
    log_weights = torch.from_numpy(np.log(weights))
    theta = torch.zeros(degree + 1, dtype=torch.float64, requires_grad=True)

    def log_ratio(basis: torch.Tensor) -> torch.Tensor:
        # ρ = g(C) − log E_ref[e^{g(C)}]; C is uniform under π_ref (the response set is uniform).
        return basis @ theta - torch.logsumexp(basis_nodes @ theta + log_weights, dim=0)

    loss_kind, loss = estimator.loss, get_loss(estimator.loss)
    if loss.pairwise:
        pairs = make_pairs(ids, u, unit, unit_beta, strategy=estimator.strategy, targets=estimator.targets,
                           pairs_per_prompt=None if estimator.strategy == "all" else 2 * k, seed=seed)
        chosen, rejected = _legendre(exact[pairs.chosen], degree), _legendre(exact[pairs.rejected], degree)
        batch = {"target_phi_gap": torch.from_numpy(pairs.target_phi_gap), "label": torch.from_numpy(pairs.label)}
        examples = len(pairs)

        def objective() -> torch.Tensor:
            # The normaliser cancels in a difference: the pairs' log-ratios are the basis times θ.
            return loss.compute(chosen @ theta, rejected @ theta, unit_beta, batch).mean()
    else:
        basis = _legendre(exact, degree)
        examples = len(exact)
        if loss_kind == "pointwise":
            batch = {"target": torch.from_numpy(pointwise_targets(ids, u, unit, unit_beta,
                                                                  log_partition=estimator.log_partition,
                                                                  targets=estimator.targets))}
        else:
            batch = {"weight": torch.from_numpy(sft_weights(ids, u, unit, unit_beta, targets=estimator.targets))}

        def objective() -> torch.Tensor:
            # log π_θ − log π_ref for both: the reference's log-prob is constant in θ (weighted SFT's gradient is
            # unchanged by it).
            ratio = log_ratio(basis)
            return loss.compute(ratio, ratio, unit_beta, batch).mean()

    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = objective()
        value.backward()
        return value

    for _ in range(2):  # one restart: L-BFGS's history can stall on the first pass
        optimiser.step(closure)
    coef = theta.detach().numpy().copy()
    tilt = TrainedTilt(lambda c: np.polynomial.legendre.legval(2.0 * np.asarray(c, float) - 1.0, coef),
                       f"testbed {transform.spec} K={k} {loss_kind}")
    return TestbedResult(kl=tilt.kl(), bon_win_rate=tilt.bon_win_rate(n), won_win_rate=tilt.won_win_rate(n),
                         standard_win_rate=tilt.standard_win_rate(), tilt=tilt, examples=examples)
