"""One registry of inference-time procedures (docs/selector_planning.md, "Adding an inference procedure").

A :class:`Procedure` is a selection rule over N candidates and what the rest of the package needs
to know about it. Every place that takes a procedure by name reads this registry: selection
(:func:`select`), the closed forms (:func:`tilted_win_rate`),
the planner (:func:`ctrl_offline.maths.planner.plan`: closed form where there is one, simulation on the
calibration tables otherwise), the evaluation (:mod:`ctrl_offline.maths.win_rates`), the recipe and the
``ctrl-data`` command line (``--inference``, ``--eval-selectors``). The selection maths lives in
:mod:`ctrl_offline.maths.selection` as pure functions; the entries below refer to them.

>>> from ctrl_offline.maths.procedures import procedure_names, closed_form_names
>>> procedure_names()
('bon', 'won', 'soft_bon', 'rbon', 'itp', 'tsallis', 'bot')
>>> closed_form_names()
('bon', 'won')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from ctrl_offline.maths import selection, theory

__all__ = ["OrderStatistic", "Procedure", "register_procedure", "unregister_procedure", "get_procedure",
           "procedure_names", "closed_form_names", "select", "tilted_win_rate", "drawn_pick"]


@dataclass(frozen=True)
class OrderStatistic:
    """The pick is the candidate with the largest key (``largest``) or the smallest, the earlier one on ties.

    ``key(rewards, ref_logps, **params)`` gives the keys, ``ref_logps`` with 0 for missing candidates;
    None means the reward itself. The U-statistic evaluation then weighs candidates in closed form
    (docs/evaluation.md), and where the key is the reward the calibrated-reward shortcut applies
    (docs/evaluation_shortcut.md).
    """

    largest: bool = True
    key: Callable[..., np.ndarray] | None = None


@dataclass(frozen=True)
class Procedure:
    """An inference-time procedure: N candidates in, a selection distribution over them out.

    * ``rule(rewards (B, N), ref_logps (B, N) or None, **params) -> probs (B, N)``: NaN rewards mark
      missing candidates, which get probability 0 (see :mod:`ctrl_offline.maths.selection`);
    * ``params``: the rule's settings and their defaults (``{"lam": 0.1}``);
    * ``needs_ref_logps``: the rule reads the candidates' reference log-probs;
    * ``win_rate(transform, beta, n) -> float``: the closed-form win rate of the tilted policy's
      procedure over the reference's (docs/theory.md §3), used by the planner; None: plans are
      simulated on calibration tables (docs/selector_planning.md);
    * ``trained_win_rate(tilt, n) -> float``: the same for a finite-K trained tilt
      (:class:`ctrl_offline.maths.finite_k.TrainedTilt`), used by K-aware plans (docs/finite_k.md);
    * ``order``: set when the pick is an :class:`OrderStatistic` (fast, exact evaluation).
    """

    name: str
    description: str
    rule: Callable[..., np.ndarray]
    params: Mapping[str, object] = field(default_factory=dict)
    needs_ref_logps: bool = False
    win_rate: Callable[..., float] | None = None
    trained_win_rate: Callable[..., float] | None = None
    order: OrderStatistic | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a procedure name must be a Python identifier (letters, digits, _), got {self.name!r}")
        if not callable(self.rule):
            raise TypeError(f"procedure {self.name!r}: rule must be callable, got {self.rule!r}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def settings(self, given: Mapping[str, object]) -> dict:
        """This procedure's parameters: its defaults, overridden by those in ``given``.

        ``given`` may hold other procedures' parameters too (callers pass one set of selector
        settings to every procedure); a name no registered procedure takes is a ValueError.
        """
        known = {p for proc in _REGISTRY.values() for p in proc.params} | set(self.params)
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown selector setting(s) {unknown}; the registered procedures take {sorted(known)}")
        return {name: given.get(name, default) for name, default in self.params.items()}


_REGISTRY: dict[str, Procedure] = {}


def register_procedure(procedure: Procedure, *, replace: bool = False) -> Procedure:
    """Add ``procedure`` to the registry (``replace=True`` to overwrite one of the same name); returns it."""
    if not isinstance(procedure, Procedure):
        raise TypeError(f"register a Procedure, got {type(procedure).__name__}")
    if procedure.name in _REGISTRY and not replace:
        raise ValueError(f"an inference procedure named {procedure.name!r} is already registered "
                         f"({_REGISTRY[procedure.name].description}); pass replace=True to replace it")
    _REGISTRY[procedure.name] = procedure
    return procedure


def unregister_procedure(name: str) -> Procedure:
    """Remove a procedure from the registry; returns it."""
    return _REGISTRY.pop(get_procedure(name).name)


def get_procedure(name: str) -> Procedure:
    """The registered procedure ``name``; a ValueError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown inference procedure {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def procedure_names() -> tuple[str, ...]:
    """Names of the registered procedures, in registration order."""
    return tuple(_REGISTRY)


def closed_form_names() -> tuple[str, ...]:
    """Names of the registered procedures whose win rate has a closed form (planned without tables)."""
    return tuple(name for name, proc in _REGISTRY.items() if proc.win_rate is not None)


# -- procedures by name: the lookups the rest of the package goes through -----------------------


def select(rewards, method: str, *, ref_logps=None, sample: bool = False, rng=None, **params) -> selection.Selection:
    """Apply the registered procedure ``method`` (``bon``, ``won``, ``soft_bon``, ``rbon``, ``itp``,
    ``tsallis``, ``bot`` and any registered since) to ``rewards`` (B, N); NaN marks a missing candidate.

    ``params`` are selector settings (``lam``, ``beta``, ``kappa0``, ``k``, ``alpha``, …): each procedure
    takes its own and ignores the others', so one set of settings serves every procedure.
    """
    procedure = get_procedure(method)
    r, valid = selection.as_rewards(rewards)
    if procedure.needs_ref_logps and ref_logps is None:
        raise ValueError(f"{procedure.description} ({method}) needs the candidates' reference log-probs")
    probs = np.asarray(procedure.rule(r, ref_logps, **procedure.settings(params)), dtype=float)
    if probs.shape != r.shape:
        raise ValueError(f"procedure {method!r} returned probabilities of shape {probs.shape} for rewards {r.shape}")
    return selection.Selection(index=selection.choose(probs, sample=sample, rng=rng), probs=probs,
                               num_excluded=int((~valid).sum()))


def tilted_win_rate(transform, beta: float, inference: str, n: int) -> float:
    """The tilted policy's inference-time win rate, exactly: the closed form registered for ``inference``.

    ValueError for an unknown procedure or one without a closed form (:func:`closed_form_names`
    lists those with one).
    """
    from ctrl_offline.maths.transforms import get_transform

    procedure = get_procedure(inference)
    if procedure.win_rate is None:
        raise ValueError(f"inference procedure {inference!r} has no closed-form win rate (those with one: "
                         f"{', '.join(closed_form_names())}); simulate it on calibration tables "
                         "(ctrl_offline.maths.planner.plan(..., tables=...))")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"N must be a positive integer, got {n!r}")
    return float(procedure.win_rate(get_transform(transform), beta, int(n)))


def drawn_pick(method: str, rng: np.random.Generator | int | None = None, **params):
    """The pick of a registered procedure as a function of calibrated values (B, N) → index per row, each row's
    pick drawn from its selection distribution: the ``select`` of :func:`ctrl_offline.maths.theory.monte_carlo_win_rate`."""
    get_procedure(method)
    rng = np.random.default_rng(rng)
    return lambda u: select(u, method, sample=True, rng=rng, **params).index


# -- the built-in procedures ----------------------------------------------------------------------


def _bon(rewards, ref_logps):
    return selection.best_of_n(rewards)


def _won(rewards, ref_logps):
    return selection.worst_of_n(rewards)


def _soft_bon(rewards, ref_logps, lam):
    return selection.soft_best_of_n(rewards, lam)


def _rbon(rewards, ref_logps, beta):
    return selection.regularized_best_of_n(rewards, ref_logps, beta)


def _rbon_key(rewards, ref_logps, beta):
    selection._check_positive("beta", beta)
    return rewards + beta * ref_logps


def _itp(rewards, ref_logps, beta):
    return selection.itp(rewards, beta)


def _tsallis(rewards, ref_logps, alpha, lam):
    return selection.tsallis_selection(rewards, alpha, lam)


def _bot(rewards, ref_logps, lam, kappa0, k):
    return selection.best_of_tails(rewards, lam, kappa0=kappa0, k=k)[0]


def _trained_bon(tilt, n):
    return tilt.bon_win_rate(n)


def _trained_won(tilt, n):
    return tilt.won_win_rate(n)


for _procedure in (
    Procedure("bon", "best-of-N", _bon, win_rate=theory.bon_win_rate, trained_win_rate=_trained_bon,
              order=OrderStatistic(largest=True)),
    Procedure("won", "worst-of-N", _won, win_rate=theory.won_win_rate, trained_win_rate=_trained_won,
              order=OrderStatistic(largest=False)),
    Procedure("soft_bon", "soft best-of-N (p ∝ exp(r/λ))", _soft_bon, {"lam": 0.1}),
    Procedure("rbon", "regularised best-of-N (argmax r + β·log π_ref)", _rbon, {"beta": 0.1}, needs_ref_logps=True,
              order=OrderStatistic(largest=True, key=_rbon_key)),
    Procedure("itp", "ITP (χ²-regularised selection)", _itp, {"beta": 0.1}),
    Procedure("tsallis", "Tsallis-regularised selection of order α", _tsallis, {"alpha": 1.5, "lam": 0.1}),
    Procedure("bot", "Best-of-Tails", _bot, {"lam": 0.1, "kappa0": 0.1, "k": None}),
):
    register_procedure(_procedure)
del _procedure
