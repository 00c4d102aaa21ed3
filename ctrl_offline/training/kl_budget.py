"""Training held to a KL budget: estimate KL(π‖π_ref) while training and stop where it is spent.

In a short LoRA run the KL(π‖π_ref) reached is set by learning rate × steps, not by β: the
loss's optimum sits at KL(π_β‖π_ref), but a run of a few hundred steps stops far before it (or,
with a large learning rate, overshoots it on the way). :class:`KLBudgetCallback` makes the KL of
the delivered weights the planned one instead. Every ``every_n_steps`` optimizer steps it
estimates KL(π_θ‖π_ref) and keeps the trainable parameters θ_under of the last estimate within
the budget B. The first estimate over B stops training; the callback then bisects on α ∈ [0, 1]
along the segment of the last step,

    θ(α) = θ_under + α (θ_over − θ_under),

until |KL(θ(α)) − B| ≤ ``tolerance`` or ``max_bisections`` estimates, and leaves the α whose KL
is closest to B among those below B or within the tolerance (α = 0, θ_under, if none is). Only
the trainable parameters move (the LoRA weights, or all weights in full fine-tuning); the
optimizer state is stale afterwards, which does not matter as training has stopped.

:class:`SampledKL` is the estimator for real models: ``num_samples`` completions per held-out
prompt drawn from π_θ (ancestral, temperature 1, the same seed at every call so successive
estimates share their random numbers), each scored by the exact per-token KL along it,

    KL ≈ (1/P) Σ_x (1/n) Σ_i Σ_t KL(π_θ(·|x, y_i,<t) ‖ π_ref(·|x, y_i,<t)),   y_i ~ π_θ(·|x),

(:func:`ctrl_offline.models.generation.completion_kl`; unbiased, with far less variance than the
sequence-level mean of log π_θ(y_i|x) − log π_ref(y_i|x), which it also returns), with standard
error std_x(per-prompt mean) / √P (prompt-to-prompt spread included). π_ref is the base with the
adapters disabled for a PEFT model, or a separate ``reference_model``. Completions cut at
``max_new_tokens`` give the KL of the first ``max_new_tokens`` tokens, a lower bound on the KL of
whole completions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import TrainerCallback

__all__ = ["KLEstimate", "KLBudgetCallback", "SampledKL"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KLEstimate:
    """An estimate of KL(π‖π_ref) in nats; ``stderr`` and ``num_samples`` are 0 when it is exact.

    A sampled estimate over prompts (:class:`SampledKL`) also carries ``per_prompt``, each
    prompt's mean in prompt order (``value`` is their mean, ``stderr`` their standard deviation
    over √P), and the sequence-level Monte Carlo estimate from the same samples,
    ``sequence_value`` ± ``sequence_stderr`` with its ``per_prompt_sequence``, for comparison
    (None and empty when not computed).
    """

    value: float
    stderr: float
    num_samples: int = 0
    per_prompt: tuple[float, ...] = ()
    sequence_value: float | None = None
    sequence_stderr: float | None = None
    per_prompt_sequence: tuple[float, ...] = ()

    @property
    def prompt_sd(self) -> float | None:
        """The standard deviation of ``per_prompt`` over prompts (the prompt-to-prompt spread), None below 2."""
        return _sd(self.per_prompt)


def _sd(values) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}


@torch.no_grad()
def _load(params: dict[str, torch.nn.Parameter], under: dict[str, torch.Tensor], over: dict[str, torch.Tensor],
          alpha: float) -> None:
    """θ ← θ_under + α (θ_over − θ_under), in float32, on the trainable parameters only."""
    for name, p in params.items():
        a, b = under[name].float(), over[name].float()
        p.copy_((a + alpha * (b - a)).to(device=p.device, dtype=p.dtype))


def _same_on_every_rank(estimate: KLEstimate, model) -> KLEstimate:
    """Rank 0's estimate everywhere (all of it, per-prompt values included), so that all ranks stop (and bisect)
    alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return estimate
    device = next(model.parameters()).device if dist.get_backend() == "nccl" else torch.device("cpu")
    held = [estimate]
    dist.broadcast_object_list(held, src=0, device=device)
    return held[0]


class KLBudgetCallback(TrainerCallback):
    """Stops training when KL(π‖π_ref) reaches ``budget`` and leaves weights that spend it.

    ``estimate_kl(model)`` returns a :class:`KLEstimate` of the model as it stands; the callback
    calls it in eval mode under ``torch.no_grad`` every ``every_n_steps`` optimizer steps (and
    once more at the end of training when the last step was not estimated). An estimate ≤
    ``budget`` makes the trainable parameters the new last-under-budget state; the first above it
    stops training and, with ``interpolate``, bisects between that state and the current weights
    (see the module docstring), otherwise restores the last-under-budget state. The state at the
    start of training counts as under budget; its KL is estimated only if the callback leaves it.

    After training: ``history`` holds one dict per estimate (``step``, ``kl``, ``stderr`` and,
    during the bisection, ``alpha``), also appended to ``trainer.state.log_history`` as
    ``kl``/``kl_stderr``(/``kl_alpha``); ``reached`` says whether the budget was reached (training
    was stopped, or its last estimate was over the budget); ``final`` is the KL of the weights
    left in the model. A run that ends under budget logs a warning saying how far it got. Resumed
    from a checkpoint, the callback takes up the estimates before it from the trainer state's log,
    and the checkpoint's weights as the last under budget, so the run goes on as if never stopped.

    In a data-parallel run every rank estimates and then takes rank 0's estimate, so all ranks
    stop and bisect alike. Parameters sharded by ZeRO-3 or FSDP are not supported.
    """

    def __init__(self, budget: float, estimate_kl: Callable[[torch.nn.Module], KLEstimate], *,
                 every_n_steps: int = 1, interpolate: bool = True, tolerance: float = 0.01,
                 max_bisections: int = 12):
        if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a finite KL > 0 in nats, got {budget!r}")
        if isinstance(every_n_steps, bool) or not (isinstance(every_n_steps, int) and every_n_steps >= 1):
            raise ValueError(f"every_n_steps must be an integer ≥ 1, got {every_n_steps!r}")
        if not (isinstance(tolerance, (int, float)) and tolerance > 0):
            raise ValueError(f"tolerance must be > 0 (nats), got {tolerance!r}")
        if not (isinstance(max_bisections, int) and max_bisections >= 0):
            raise ValueError(f"max_bisections must be an integer ≥ 0, got {max_bisections!r}")
        if not callable(estimate_kl):
            raise TypeError(f"estimate_kl must be a callable model -> KLEstimate, got {type(estimate_kl).__name__}")
        self.budget = float(budget)
        self.estimate_kl = estimate_kl
        self.every_n_steps = every_n_steps
        self.interpolate = interpolate
        self.tolerance = float(tolerance)
        self.max_bisections = max_bisections
        self.history: list[dict] = []
        self.reached = False
        self.final: KLEstimate | None = None
        self._under: dict[str, torch.Tensor] | None = None
        self._under_kl: KLEstimate | None = None
        self._last_step: int | None = None
        self._noisy_warned = False
        self._settled_before = False

    # -- estimates --------------------------------------------------------------------------------
    def _estimate(self, model, state, alpha: float | None = None) -> KLEstimate:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                estimate = self.estimate_kl(model)
        finally:
            model.train(was_training)
        if not isinstance(estimate, KLEstimate):
            raise TypeError(f"estimate_kl must return a KLEstimate, got {type(estimate).__name__}")
        estimate = _same_on_every_rank(estimate, model)
        entry = {"step": state.global_step, "kl": estimate.value, "stderr": estimate.stderr}
        log = {"kl": estimate.value, "kl_stderr": estimate.stderr}
        if estimate.sequence_value is not None:  # the sequence-level estimate beside it, for comparison
            entry["kl_sequence"] = log["kl_sequence"] = estimate.sequence_value
        if alpha is not None:
            entry["alpha"] = log["kl_alpha"] = alpha
        self.history.append(entry)
        # What Trainer.log records; the callback has no trainer to log through.
        state.log_history.append({**log, **({"epoch": state.epoch} if state.epoch is not None else {}),
                                  "step": state.global_step})
        logger.info("step %d: KL(π‖π_ref) = %.4g ± %.2g nats (budget %.4g)%s", state.global_step, estimate.value,
                    estimate.stderr, self.budget, "" if alpha is None else f" at α = {alpha:.4g}")
        if estimate.stderr > self.tolerance and not self._noisy_warned:
            # The bisection compares estimates this noisy with the budget: the KL it leaves is as uncertain.
            self._noisy_warned = True
            logger.warning("the KL estimate's standard error (%.2g nats) exceeds the tolerance (%.2g): the KL held to "
                           "the budget is only known to about ±%.2g. Estimate on more prompts or samples.",
                           estimate.stderr, self.tolerance, 2 * estimate.stderr)
        self._last_step = state.global_step
        return estimate

    # -- trainer events ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = _trainable(model)
        if not params:
            raise ValueError("KLBudgetCallback: no parameter of the model requires grad, so there is nothing to hold "
                             "to the budget (freeze fewer parameters, or attach the LoRA adapter before training)")
        self.history, self.reached, self.final = _history_from_log(state.log_history), False, None
        self._under, self._under_kl, self._last_step = _snapshot(params), None, None
        self._settled_before = False
        settled = _settled_from_log(state.log_history, state.global_step)
        if settled is not None:
            # Resumed from the checkpoint saved as the budget was reached: its weights are the ones left, so
            # nothing more is trained (the trainer takes one step before it looks; on_step_end undoes it).
            self.reached, self.final, self._settled_before = True, settled, True
            control.should_training_stop = True
            logger.info("resumed from step %d, where the KL budget %.4g was reached (KL left %.4g): its weights "
                        "are final, nothing more is trained", state.global_step, self.budget, settled.value)
            return
        last = self.history[-1] if self.history else None
        if last is not None and last["step"] == state.global_step and "alpha" not in last:
            # Resumed from the checkpoint of a step that was estimated (and under budget, or training would have
            # stopped): those are the weights that estimate was of. Its per-prompt values are not in the log.
            self._under_kl = KLEstimate(last["kl"], last["stderr"], sequence_value=last.get("kl_sequence"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._settled_before:
            _load(_trainable(model), self._under, self._under, 0.0)  # back to the checkpoint's weights
            control.should_training_stop = True
            return
        if self.reached or state.global_step % self.every_n_steps:
            return
        estimate = self._estimate(model, state)
        if estimate.value <= self.budget:
            self._under, self._under_kl = _snapshot(_trainable(model)), estimate
            return
        control.should_training_stop = True
        self._settle(model, state, estimate)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.reached:
            return
        if self._last_step == state.global_step and self._under_kl is not None:
            estimate = self._under_kl  # just estimated, under budget
        else:
            estimate = self._estimate(model, state)
        if estimate.value > self.budget:
            self._settle(model, state, estimate)
            return
        self.final = estimate
        logger.warning(
            "KL budget not reached: training ended at KL(π‖π_ref) = %.4g ± %.2g nats, under the budget of %.4g. The "
            "adapter spends less KL than planned; train for more steps, raise the learning rate, or lower β.",
            estimate.value, estimate.stderr, self.budget)

    # -- over budget ------------------------------------------------------------------------------
    def _settle(self, model, state, over_kl: KLEstimate) -> None:
        """Leave the weights at the budget: bisect between θ_under and θ_over, or restore θ_under."""
        self.reached = True
        params = _trainable(model)
        over = _snapshot(params)
        best_alpha, best = 0.0, self._under_kl
        if self.interpolate:
            lo, hi = 0.0, 1.0
            for _ in range(self.max_bisections):
                alpha = (lo + hi) / 2
                _load(params, self._under, over, alpha)
                estimate = self._estimate(model, state, alpha)
                gap = estimate.value - self.budget
                if gap <= self.tolerance and (best is None or abs(gap) < abs(best.value - self.budget)):
                    best_alpha, best = alpha, estimate
                if abs(gap) <= self.tolerance:
                    break
                lo, hi = (alpha, hi) if gap < 0 else (lo, alpha)
        _load(params, self._under, over, best_alpha)
        if best is None:  # the start of training, never estimated
            best = self._estimate(model, state, best_alpha if self.interpolate else None)
        self.final = best
        # Marks the checkpoint saved after this step as settled: a run resumed from it trains no further.
        state.log_history.append({"kl_final": best.value, "kl_final_stderr": best.stderr,
                                  **({"kl_final_alpha": best_alpha} if self.interpolate else {}),
                                  "step": state.global_step})
        logger.info("KL budget %.4g reached at step %d (KL %.4g): stopped, leaving %s with KL %.4g ± %.2g nats",
                    self.budget, state.global_step, over_kl.value,
                    f"α = {best_alpha:.4g} of the last step" if self.interpolate else "the last weights under budget",
                    best.value, best.stderr)
        if self._under_kl is None:
            # Nothing was measured under the budget after the start: the weights left are a fraction of
            # the first few optimizer steps, not a trained policy.
            logger.warning(
                "the KL budget %.4g was already passed at the first check (step %d, KL %.4g): the weights left are "
                "%s of the first %d step(s). Check more often (every_n_steps) or lower the learning rate so that "
                "training sees more data before it spends the budget.", self.budget, state.global_step,
                over_kl.value, f"α = {best_alpha:.3g}" if self.interpolate else "the start",
                state.global_step)
        if best.value > self.budget + self.tolerance:
            logger.warning("the weights left have KL %.4g > budget %.4g: the start of training was already over it",
                           best.value, self.budget)


class SampledKL:
    """KL(π‖π_ref) on held-out prompts by the per-token estimator: a ``Callable[[model], KLEstimate]``.

    Draws ``num_samples`` completions per prompt from the model passed (ancestral sampling,
    temperature 1, at most ``max_new_tokens`` tokens, ``batch_size`` prompts per generate call;
    seeded with ``seed`` at every call without disturbing the caller's random state) and scores
    each by :func:`~ctrl_offline.models.generation.completion_kl` against π_ref (the model with its PEFT
    adapters disabled, or ``reference_model``): Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)), exact over
    the vocabulary at every position of the sample. The estimate is the mean over prompts of the
    per-prompt mean, its standard error the standard deviation of the per-prompt means over √P;
    the :class:`KLEstimate` also holds the per-prompt values and the sequence-level estimate
    (mean of log π(y|x) − log π_ref(y|x)) from the same samples. ``chunk_size`` completion
    positions at a time are scored (memory, not results). Prompts are text or chat messages;
    ``chat_template`` None applies the tokenizer's chat template when it has one, True requires it,
    False feeds text prompts as they are. ``prompts`` keeps the prompts as given.
    """

    def __init__(self, prompts: list[str], tokenizer, *, num_samples: int = 4, max_new_tokens: int = 64,
                 batch_size: int = 8, seed: int = 0, chat_template: bool | None = None, reference_model=None,
                 chunk_size: int = 256):
        from ctrl_offline.models.generation import render_prompt

        if not prompts:
            raise ValueError("SampledKL needs at least one prompt")
        for name, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens),
                            ("batch_size", batch_size), ("chunk_size", chunk_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        if chat_template is False or (chat_template is None and not has_template):
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("chat-message prompts need a tokenizer with a chat template (chat_template=True)")
            self.prompt_texts = list(prompts)
        else:
            self.prompt_texts = [render_prompt(tokenizer, p) for p in prompts]
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.num_samples, self.max_new_tokens, self.batch_size, self.seed = num_samples, max_new_tokens, batch_size, seed
        self.chunk_size = chunk_size
        self.reference_model = reference_model

    def _check_reference(self, model) -> None:
        if self.reference_model is None and not hasattr(model, "disable_adapter"):
            raise ValueError(f"SampledKL needs a reference: {type(model).__name__} is not a PEFT model (no adapters to "
                             "disable); pass reference_model= (a frozen copy of the starting model)")

    @torch.no_grad()
    def __call__(self, model) -> KLEstimate:
        from ctrl_offline.models.generation import SamplingConfig, completion_kl, sample_completions

        self._check_reference(model)
        config = SamplingConfig(k=max(2, self.num_samples), max_new_tokens=self.max_new_tokens,
                                batch_size=self.batch_size)
        config.k = self.num_samples  # K ≥ 2 is calibration's need, not this estimate's
        device = next(model.parameters()).device
        cuda = [device.index or 0] if device.type == "cuda" else []
        padding_side = self.tokenizer.padding_side
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=cuda):
                rows = sample_completions(model, self.tokenizer, self.prompt_texts, config, self.seed)
            texts = [self.prompt_texts[r["batch_prompt"]] for r in rows]
            ids = [r["completion_ids"] for r in rows]
            # Both models teacher-forced on the same batches: identical models give exactly 0.
            scored = completion_kl(model, self.tokenizer, texts, ids, reference=self.reference_model,
                                   batch_size=self.batch_size * self.num_samples, chunk_size=self.chunk_size)
        finally:
            model.train(was_training)
            self.tokenizer.padding_side = padding_side
        shape = (len(self.prompt_texts), self.num_samples)
        token = _per_prompt_means(scored.token.reshape(shape))
        sequence = _per_prompt_means(scored.sequence.reshape(shape))
        return KLEstimate(_mean(token), _stderr(token), len(rows), per_prompt=token, sequence_value=_mean(sequence),
                          sequence_stderr=_stderr(sequence), per_prompt_sequence=sequence)


def _history_from_log(log_history: list[dict]) -> list[dict]:
    """The callback's ``history`` as :meth:`KLBudgetCallback._estimate` logged it: empty for a fresh run, the
    estimates before the checkpoint for a run resumed from one (the trainer state holds its log)."""
    keys = {"kl": "kl", "kl_stderr": "stderr", "kl_sequence": "kl_sequence", "kl_alpha": "alpha"}
    return [{"step": entry["step"], **{name: entry[key] for key, name in keys.items() if key in entry}}
            for entry in log_history if "kl" in entry and "kl_stderr" in entry]


def _settled_from_log(log_history: list[dict], step: int) -> KLEstimate | None:
    """The KL left where the budget was reached at ``step``, if the log says it was (see ``_settle``)."""
    for entry in reversed(log_history):
        if "kl_final" in entry and entry.get("step") == step:
            return KLEstimate(entry["kl_final"], entry["kl_final_stderr"])
    return None


def _per_prompt_means(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values.mean(axis=1))


def _mean(values: tuple[float, ...]) -> float:
    return float(math.fsum(values) / len(values))


def _stderr(values: tuple[float, ...]) -> float:
    """std over prompts / √P (0 for one prompt: no spread to measure)."""
    sd = _sd(values)
    return 0.0 if sd is None else sd / math.sqrt(len(values))
