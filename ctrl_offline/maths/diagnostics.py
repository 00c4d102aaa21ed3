"""How a trained policy spent its KL, measured against its plan (docs/diagnostics.md).

Pure maths (numpy / scipy; no I/O). A plan promises a win rate at a KL budget; a trained policy
reaches some win rate at some KL. Four diagnostics say where the gap is:

* **KL efficiency** (§2): KL(β') / KL spent, β' the point of the plan's curve (same transform,
  K and estimator, β varied) whose win rate equals the one reached — 1 on the plan's frontier,
  below 1 when the policy paid more KL than the plan's family needs for what it got;
* **plan fidelity** (§2): (reached − ½) / (w(β'') − ½), β'' the point of the curve at the KL
  spent — the share of the planned win-rate gain at that KL that was reached;
* **the KL split** (§1, §3): by the chain rule over the calibrated quantile c,
  KL(π‖π_ref) = KL(g_θ‖U) + E_{c~g_θ} KL(π(·|c)‖π_ref(·|c)): *on target* (the law g_θ of the
  quantile of the policy's samples against the uniform law it has under π_ref) plus *off target*
  (moves among responses of the same quantile, which no selector sees) — exact over every
  response in the LM testbed (:func:`exact_kl_split`), or from samples against the reference
  tables (:func:`sampled_kl_split`, §4);
* **tilt fidelity** (§5): the log-ratio h = log π_θ − log π_ref against the planned
  log-density log f(c), binned, with the R² and slope of the regression of h on log f;

and the soft-label DPO **entropy floor** (§6), the lowest loss its labels allow.

>>> from ctrl_offline.maths.diagnostics import kl_efficiency, plan_fidelity
>>> from ctrl_offline.maths.planner import solve_beta
>>> from ctrl_offline.maths.theory import bon_win_rate
>>> w = bon_win_rate("identity", solve_beta("identity", 0.5), 4)
>>> round(kl_efficiency("identity", "bon", 4, kl_spent=0.5, reached=w), 6)
1.0
>>> round(plan_fidelity("identity", "bon", 4, kl_spent=0.5, reached=0.5 + (w - 0.5) / 2), 6)
0.5
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

from ctrl_offline.maths._quadrature import nodes_and_weights
from ctrl_offline.maths.calibration import quantile_cells
from ctrl_offline.maths.estimates import Estimate, bootstrap_mean, percentile_estimate
from ctrl_offline.maths.finite_k import Estimator, TrainedTilt, ideal_tilt, tilt_from_log_density, trained_tilt
# The planner's own β root-finder, its starting scale and its KL ceiling: the curve here is the
# planner's curve, solved the same way.
from ctrl_offline.maths.planner import MAX_KL, beta_scale, root_in_log_beta, solve_beta, solve_trained_beta
from ctrl_offline.maths.procedures import get_procedure
from ctrl_offline.maths.theory import kl_divergence
from ctrl_offline.maths.transforms import Transform, get_transform

__all__ = [
    "MAX_CURVE_KL",
    "PlanCurve",
    "kl_efficiency",
    "plan_fidelity",
    "PlanDiagnostics",
    "KLSplit",
    "exact_kl_split",
    "SampledKLSplit",
    "sampled_kl_split",
    "miller_madow_kl",
    "level_distribution",
    "TiltFidelity",
    "tilt_fidelity",
    "label_entropy_floor",
    "loss_gap",
    "planned_tilt",
    "plan_diagnostics",
    "planned_on_target",
    "level_kl_split",
    "reference_tilt_fidelity",
]

#: The largest KL on a plan's curve (the planner's ceiling: beyond it tilted densities are narrower
#: than double precision resolves).
MAX_CURVE_KL = MAX_KL


# A weighted-SFT win rate this close to its β → 0 limit counts as the limit (see PlanCurve.kl_at_win_rate).
_SATURATION_TOL = 1e-6


class _OffCurve(Exception):
    """The win rate asked for lies above every point of the curve with KL ≤ MAX_CURVE_KL."""


class _BelowResolution(Exception):
    """The win-rate gain asked for is too small for the curve's win rate to resolve (≲ 1e-12)."""


# -- the plan's curve ---------------------------------------------------------------------------
class PlanCurve:
    """The plan's family with β varied: (KL(β), w(β)) for one transform, procedure, N, K and estimator.

    K = ``None`` is the exact tilt (docs/theory.md §3: :func:`ctrl_offline.maths.theory.kl_divergence` and
    the procedure's closed form, as :func:`ctrl_offline.maths.planner.plan` scores K = ∞ rows); a K is
    the tilt ``estimator`` trains from K samples per prompt (:func:`ctrl_offline.maths.finite_k.trained_tilt`
    and ``Procedure.trained_win_rate``, as K-aware rows). KL falls and the win rate falls towards ½
    as β grows, for every built-in family (docs/diagnostics.md §2).
    """

    def __init__(self, transform: Transform | str, inference: str, n: int, k: int | None = None,
                 estimator: Estimator | None = None):
        self.transform = get_transform(transform)
        self.procedure = get_procedure(inference)
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"N must be a positive integer, got {n!r}")
        self.n = int(n)
        if self.procedure.win_rate is None:
            raise ValueError(f"{self.procedure.name} ({self.procedure.description}) has no closed-form win rate: its "
                             "plans are simulated, and there is no exact curve to compare with")
        if k is None:
            if estimator is not None:
                raise ValueError("an estimator describes what is trained from K samples per prompt: pass k with it "
                                 "(or neither, for the K = ∞ curve)")
        else:
            if isinstance(k, bool) or int(k) != k or k < 2:
                raise ValueError(f"K must be an integer ≥ 2 or None (K = ∞), got {k!r}")
            if self.procedure.trained_win_rate is None:
                raise ValueError(f"{self.procedure.name} has no finite-K win rate (Procedure.trained_win_rate): "
                                 "use the K = ∞ curve (k=None)")
            k, estimator = int(k), estimator or Estimator()
        self.k, self.estimator = k, estimator

    @classmethod
    def from_planner(cls, planner: dict) -> "PlanCurve":
        """The curve of a build's plan, from the ``planner`` record of its ``ctrl_build.json``.

        ``planner.row`` (transform, t), ``planner.inference`` and ``planner.n``, ``planner.k`` and
        ``planner.estimator`` (K = ∞ when the build planned the exact tilt: ``--k-infinity``, or a
        procedure / pair strategy without a finite-K theory). Raises ValueError for a simulated plan
        or a record that is not a planner record.
        """
        if not isinstance(planner, dict) or not planner:
            raise ValueError(f"expected a ctrl_build.json planner record, got {planner!r}")
        if planner.get("simulated"):
            raise ValueError(f"the plan for {planner.get('inference')} was simulated on calibration tables: there "
                             "is no exact curve to compare with")
        try:
            row = planner["row"]
            transform = get_transform(row["transform"], row.get("t"))
            inference, n = planner["inference"], planner["n"]
        except KeyError as err:
            raise ValueError(f"the planner record lacks {err}: not a ctrl_build.json planner record") from None
        estimator = Estimator(**planner["estimator"]) if planner.get("estimator") else None
        return cls(transform, inference, n, planner.get("k"), estimator)

    @property
    def label(self) -> str:
        """``name-N`` of the procedure, e.g. ``bon-4``."""
        return f"{self.procedure.name}-{self.n}"

    def tilt(self, beta: float) -> TrainedTilt:
        """The density of the true quantile at β (K = ∞: the exact tilt)."""
        if self.k is None:
            return ideal_tilt(self.transform, beta)
        return trained_tilt(self.transform, beta, self.k, self.estimator)

    def point(self, beta: float) -> tuple[float, float]:
        """(KL, win rate) at the raw-Φ β."""
        if self.k is None:
            return (kl_divergence(self.transform, beta),
                    float(self.procedure.win_rate(self.transform, beta, self.n)))
        tilt = self.tilt(beta)
        return tilt.kl(), float(self.procedure.trained_win_rate(tilt, self.n))

    def _saturation_kl(self) -> float | None:
        """Weighted SFT's KL tends to best-of-K's, log K − (K−1)/K, as β → 0 (docs/finite_k.md §5)."""
        if self.k is not None and self.estimator.loss == "weighted_sft":
            return math.log(self.k) - (self.k - 1) / self.k
        return None

    def beta_at_kl(self, kl: float) -> float:
        """The β with KL(β) = ``kl`` (the planner's :func:`~ctrl_offline.maths.planner.solve_beta` /
        :func:`~ctrl_offline.maths.planner.solve_trained_beta`)."""
        if self.k is None:
            return solve_beta(self.transform, kl)
        return solve_trained_beta(self.transform, kl, self.k, self.estimator)

    def _saturation_win_rate(self) -> float:
        """The win rate of weighted SFT's β → 0 limit, best-of-K (quantile density K·c^{K−1})."""
        limit = tilt_from_log_density(lambda u: (self.k - 1) * np.log(u), f"best-of-{self.k}")
        return float(self.procedure.trained_win_rate(limit, self.n))

    def win_rate_at_kl(self, kl: float) -> float:
        """w(β'') with KL(β'') = ``kl``: the planned win rate at a KL.

        A curve whose KL saturates below ``kl`` (weighted SFT, at best-of-K's KL) gives its limit,
        the win rate of best-of-K: the most its family reaches at any KL.
        """
        kl = _check_kl(kl, "kl")
        saturation = self._saturation_kl()
        if saturation is not None and kl >= saturation:
            return self._saturation_win_rate()
        return self.point(self.beta_at_kl(kl))[1]

    def beta_at_win_rate(self, win_rate: float, beta_hint: float | None = None) -> float:
        """β' with w(β') = ``win_rate``: root in log β (the planner's bracket-then-Brent search).

        Raises the private ``_OffCurve`` when no β with KL ≤ :data:`MAX_CURVE_KL` reaches it and
        ``_BelowResolution`` when the gain over ½ is too small to resolve; :meth:`kl_at_win_rate`
        turns those into ∞ and 0.
        """
        def gap(log_beta: float) -> float:
            kl, w = self.point(math.exp(log_beta))
            if kl > MAX_CURVE_KL:
                raise _OffCurve
            return w - win_rate

        centre = math.log(beta_hint if beta_hint else beta_scale(self.transform))
        return root_in_log_beta(gap, centre, 1.0, 2.0, 60, 1e-10, lambda lo: _OffCurve(), lambda: _BelowResolution())

    def kl_at_win_rate(self, win_rate: float, beta_hint: float | None = None) -> float:
        """KL(β') with w(β') = ``win_rate``: the KL the plan's family needs for that win rate.

        0 for ``win_rate`` ≤ ½ (and for a gain over ½ too small to resolve, ≲ 1e-12); ``inf`` when
        the curve never reaches it: above the win rate at KL = :data:`MAX_CURVE_KL`, or, for weighted
        SFT, within 1e-6 of its β → 0 limit (best-of-K's win rate; the trained tilt's figures lose
        their accuracy at the tiny β that come closer).
        """
        win_rate = _check_win_rate(win_rate)
        if win_rate <= 0.5:
            return 0.0
        if self._saturation_kl() is not None and win_rate >= self._saturation_win_rate() - _SATURATION_TOL:
            return math.inf
        try:
            beta = self.beta_at_win_rate(win_rate, beta_hint)
        except _OffCurve:
            return math.inf
        except _BelowResolution:
            return 0.0
        return self.point(beta)[0]


def _check_kl(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number of nats, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0 nats, got {value!r}")
    if value > MAX_CURVE_KL:
        raise ValueError(f"{name} = {value:g} nats is beyond the plan's curve (at most {MAX_CURVE_KL:g} nats)")
    return value


def _check_win_rate(value: float) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"a win rate lies in [0, 1], got {value!r}")
    return value


def kl_efficiency(transform: Transform | str, inference: str, n: int, *, kl_spent: float, reached: float,
                  k: int | None = None, estimator: Estimator | None = None) -> float:
    """KL efficiency = KL(β') / ``kl_spent``, w(β') = ``reached`` on the plan's curve (docs/diagnostics.md §2).

    The plan's curve is :class:`PlanCurve` (``transform``, ``inference``-``n``, ``k``, ``estimator``,
    β varied). 1: the policy sits on the plan's frontier; < 1: it spent more KL than the family
    needs for what it reached; > 1: it reached more than the family does at its KL. ``reached`` ≤ ½
    gives 0; a ``reached`` above every point of the curve gives ``inf``. Raises ValueError for
    ``kl_spent`` ≤ 0 (or beyond the curve's :data:`MAX_CURVE_KL`) and a ``reached`` outside [0, 1].
    """
    kl_spent = _check_kl(kl_spent, "kl_spent")
    return PlanCurve(transform, inference, n, k, estimator).kl_at_win_rate(reached) / kl_spent


def plan_fidelity(transform: Transform | str, inference: str, n: int, *, kl_spent: float, reached: float,
                  k: int | None = None, estimator: Estimator | None = None) -> float:
    """Plan fidelity = (``reached`` − ½) / (w(β'') − ½), KL(β'') = ``kl_spent`` (docs/diagnostics.md §2).

    The share of the win-rate gain the plan's curve promises at the KL that was spent; 1 on the
    curve, negative when the policy loses to the reference. Raises ValueError for ``kl_spent`` ≤ 0.
    """
    kl_spent = _check_kl(kl_spent, "kl_spent")
    reached = _check_win_rate(reached)
    planned = PlanCurve(transform, inference, n, k, estimator).win_rate_at_kl(kl_spent)
    return (reached - 0.5) / (planned - 0.5)


@dataclass(frozen=True)
class PlanDiagnostics:
    """A trained policy against its plan, in one line (docs/diagnostics.md §2).

    ``planned_kl`` / ``planned_win_rate``: the plan's budget and promise; ``kl_spent`` / ``reached``:
    the policy's; ``planned_at_kl_spent``: the curve's win rate at the KL spent, w(β'');
    ``kl_efficiency`` = KL(β')/``kl_spent`` with w(β') = ``reached``; ``plan_fidelity`` =
    (``reached`` − ½)/(``planned_at_kl_spent`` − ½).
    """

    procedure: str
    planned_kl: float
    planned_win_rate: float
    kl_spent: float
    reached: float
    kl_efficiency: float
    plan_fidelity: float
    planned_at_kl_spent: float
    transform: str = ""
    k: int | None = None

    @classmethod
    def compute(cls, transform: Transform | str, inference: str, n: int, *, planned_kl: float, kl_spent: float,
                reached: float, planned_win_rate: float | None = None, k: int | None = None,
                estimator: Estimator | None = None) -> "PlanDiagnostics":
        """Every figure from one :class:`PlanCurve`; ``planned_win_rate`` defaults to the curve's at ``planned_kl``."""
        curve = PlanCurve(transform, inference, n, k, estimator)
        kl_spent = _check_kl(kl_spent, "kl_spent")
        reached = _check_win_rate(reached)
        if planned_win_rate is None:
            planned_win_rate = curve.win_rate_at_kl(planned_kl)
        planned_at = curve.win_rate_at_kl(kl_spent)
        return cls(procedure=curve.label, planned_kl=float(planned_kl), planned_win_rate=float(planned_win_rate),
                   kl_spent=kl_spent, reached=reached, kl_efficiency=curve.kl_at_win_rate(reached) / kl_spent,
                   plan_fidelity=(reached - 0.5) / (planned_at - 0.5), planned_at_kl_spent=planned_at,
                   transform=curve.transform.spec, k=curve.k)

    @classmethod
    def from_build_info(cls, info: dict, kl_spent: float, reached: float) -> "PlanDiagnostics":
        """From the ``ctrl_build.json`` that ``ctrl-data build`` writes (its ``planner`` record).

        The curve is the plan's own: ``planner.row`` (transform, t, kl, win_rate), ``planner.inference``
        and ``planner.n``, ``planner.k`` and ``planner.estimator`` (K = ∞ when the build planned the
        exact tilt: ``--k-infinity``, or a procedure / pair strategy without a finite-K theory; the
        data's own K, ``info["k"]``, is then not the plan's). Raises ValueError for a build that was
        not planned (β given outright) or whose plan was simulated.
        """
        if not isinstance(info, dict):
            raise ValueError(f"expected the ctrl_build.json record as a dict, got {type(info).__name__}")
        planner = info.get("planner")
        if not planner:
            raise ValueError("this build was not planned (its transform and β were given outright): there is no "
                             "plan's curve to compare with")
        curve = PlanCurve.from_planner(planner)
        try:
            planned_kl, planned_win_rate = planner["row"]["kl"], planner["row"]["win_rate"]
        except KeyError as err:
            raise ValueError(f"the planner record lacks {err}: not a ctrl_build.json planner record") from None
        return cls.compute(curve.transform, curve.procedure.name, curve.n, planned_kl=planned_kl,
                           planned_win_rate=planned_win_rate, kl_spent=kl_spent, reached=reached, k=curve.k,
                           estimator=curve.estimator)

    def line(self) -> str:
        """One line for a report."""
        eff = "inf (above the plan's curve)" if math.isinf(self.kl_efficiency) else f"{self.kl_efficiency:.3f}"
        k = "∞" if self.k is None else self.k
        return (f"{self.procedure} ({self.transform}, K={k}): planned KL {self.planned_kl:.3f} → win "
                f"{self.planned_win_rate:.3f}; spent KL {self.kl_spent:.3f} → reached {self.reached:.3f} "
                f"(planned {self.planned_at_kl_spent:.3f} there); KL efficiency {eff}, "
                f"plan fidelity {self.plan_fidelity:.3f}")

    def __str__(self) -> str:
        return self.line()

    def to_dict(self) -> dict:
        return asdict(self)


# -- the exact KL split (every response) --------------------------------------------------------
@dataclass(frozen=True, eq=False)
class KLSplit:
    """KL(π‖π_ref) = on target + off target, averaged over prompts, with the per-prompt arrays."""

    total: float
    on_target: float
    off_target: float
    bins: int
    per_prompt_total: np.ndarray
    per_prompt_on_target: np.ndarray
    per_prompt_off_target: np.ndarray

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("per_prompt_total", "per_prompt_on_target", "per_prompt_off_target"):
            out[key] = out[key].tolist()
        return out


def _check_log_probs(name: str, logp: np.ndarray, atol: float = 1e-6) -> None:
    if np.any(np.isnan(logp)) or np.any(logp == np.inf):
        raise ValueError(f"{name} holds NaN or +inf")
    mass = special.logsumexp(logp, axis=1)
    if not np.allclose(mass, 0.0, atol=atol):
        worst = int(np.argmax(np.abs(mass)))
        raise ValueError(f"{name} must be normalised per prompt (each row's probabilities sum to 1); row {worst} "
                         f"sums to {math.exp(mass[worst]):.6g}")


def _quantile_bins(reference_logp: np.ndarray, rewards: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of each response: ⌊B·(G⁻ + G)/2⌋, its reward's quantile-cell midpoint under π_ref."""

    out = np.empty(reference_logp.shape, dtype=np.int64)
    for row, (group, lo, hi) in enumerate(quantile_cells(reference_logp, rewards)):
        mid = 0.5 * (lo + hi)[group]
        out[row] = np.minimum((mid * bins).astype(np.int64), bins - 1)
    return out


def _kl_terms(p: np.ndarray, logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """p·(log p − log q) with 0·log 0 = 0."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (logp - logq), 0.0)


def exact_kl_split(policy_logp, reference_logp, rewards, bins: int = 100) -> KLSplit:
    """The chain-rule split of KL(π‖π_ref) over every response (docs/diagnostics.md §3).

    Arrays (prompts, responses), log-probabilities normalised per row (the LM testbed's
    :func:`ctrl_offline.testbeds.lm_testbed.response_logprobs`). Each response is put in one of B = ``bins``
    equal-width bins of [0, 1] by the midpoint of its quantile cell under π_ref
    (:func:`ctrl_offline.maths.calibration.quantile_cells`; tied responses share a cell). Per prompt, with
    P_b, Q_b the policy's and the reference's mass on bin b:

        total = Σ_y π(y) log π(y)/π_ref(y),   on target = Σ_b P_b log P_b/Q_b,
        off target = total − on target = Σ_b P_b·KL(π(·|b) ‖ π_ref(·|b)) ≥ 0   (chain rule),

    averaged over prompts. On target is KL(g_θ‖U) at resolution 1/B (≤ it, by data processing);
    off target counts moves within a bin. With a tie-free reward each response is its own quantile,
    so B must stay well below the responses per prompt for the split to mean anything.
    """
    policy_logp, reference_logp = np.atleast_2d(policy_logp).astype(float), np.atleast_2d(reference_logp).astype(float)
    rewards = np.atleast_2d(rewards)
    if not policy_logp.shape == reference_logp.shape == rewards.shape:
        raise ValueError(f"shapes differ: policy {policy_logp.shape}, reference {reference_logp.shape}, "
                         f"rewards {rewards.shape}")
    if isinstance(bins, bool) or int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    bins = int(bins)
    _check_log_probs("policy_logp", policy_logp)
    _check_log_probs("reference_logp", reference_logp)
    which = _quantile_bins(reference_logp, rewards, bins)
    p, q = np.exp(policy_logp), np.exp(reference_logp)
    total = _kl_terms(p, policy_logp, reference_logp).sum(axis=1)
    on = np.empty(len(p))
    for row in range(len(p)):
        pb = np.bincount(which[row], weights=p[row], minlength=bins)
        qb = np.bincount(which[row], weights=q[row], minlength=bins)
        with np.errstate(divide="ignore"):
            on[row] = _kl_terms(pb, np.log(pb), np.log(qb)).sum()
    off = total - on
    return KLSplit(total=float(total.mean()), on_target=float(on.mean()), off_target=float(off.mean()), bins=bins,
                   per_prompt_total=total, per_prompt_on_target=on, per_prompt_off_target=off)


# -- the KL split from samples ------------------------------------------------------------------
def miller_madow_kl(counts) -> float:
    """KL of a level histogram against the uniform law on its L levels, Miller–Madow corrected (unclipped).

    With N = Σ n_j, p̂_j = n_j/N and m̂ the levels seen (docs/diagnostics.md §4):

        KL̂ = Σ_j p̂_j log(L·p̂_j) − (m̂ − 1)/(2N),

    the plug-in less its leading bias (the plug-in entropy is low by (m − 1)/(2N)). Can be < 0.
    """
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 1 or len(counts) < 2:
        raise ValueError(f"counts must be a 1-D histogram over ≥ 2 levels, got shape {counts.shape}")
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("counts must be finite and ≥ 0")
    total = counts.sum()
    if total <= 0:
        raise ValueError("an empty histogram has no KL")
    return _mm_kl(counts[None, :])[0]


def _mm_kl(counts: np.ndarray) -> np.ndarray:
    """Row-wise :func:`miller_madow_kl` of a (rows, L) count matrix."""
    total = counts.sum(axis=1)
    p = counts / total[:, None]
    levels = counts.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plug_in = np.where(p > 0, p * np.log(levels * p), 0.0).sum(axis=1)
    seen = (counts > 0).sum(axis=1)
    return plug_in - (seen - 1) / (2.0 * total)


@dataclass(frozen=True, eq=False)
class SampledKLSplit:
    """KL(π‖π_ref) = on target + off target from samples, each an :class:`Estimate` (bootstrap over prompts)."""

    total: Estimate
    on_target: Estimate
    off_target: Estimate
    num_levels: int
    pooled: bool
    #: The policy samples' level histogram, pooled over prompts (length ``num_levels``).
    level_counts: np.ndarray

    def to_dict(self) -> dict:
        return {"total": self.total.to_dict(), "on_target": self.on_target.to_dict(),
                "off_target": self.off_target.to_dict(), "num_levels": self.num_levels, "pooled": self.pooled,
                "level_counts": self.level_counts.tolist()}


def sampled_kl_split(levels, num_levels: int, policy_logps, reference_logps, *, pooled: bool = True,
                     num_boot: int = 2000, level: float = 0.95, rng=0) -> SampledKLSplit:
    """The chain-rule split of KL(π‖π_ref) from the policy's own samples (docs/diagnostics.md §4).

    ``levels[x, i]``: the level of the policy's i-th sample for prompt x, the number of the prompt's
    M stored reference rewards strictly below its reward (``below`` of
    :func:`ctrl_offline.maths.calibration.rank_counts`), so ``num_levels`` = M + 1; for a tie-free reward
    a fresh π_ref sample's level is uniform on {0, …, M}. ``policy_logps`` / ``reference_logps``: the
    same samples' log π_θ and log π_ref, all three (prompts, samples).

    * total: the mean over prompts of the samples' mean log-ratio (as
      :func:`ctrl_offline.maths.win_rates.kl_estimate`);
    * on target: :func:`miller_madow_kl` of the level histogram — pooled over prompts (default: the
      population regime, where every prompt has the same level law; otherwise a lower bound, by
      convexity) or per prompt and averaged (needs many samples per prompt) — clipped at ≥ 0;
    * off target: total − on target (not clipped: it is < 0 only by noise).

    At M stored rewards the level law is the Bernstein coarsening of g_θ (:func:`level_distribution`),
    so on target is ≤ KL(g_θ‖U) and off target ≥ the true off-target KL, both exact as M → ∞.
    Intervals: percentile bootstrap over prompts, the three figures from the same draws.
    """
    levels = np.asarray(levels)
    policy_logps = np.asarray(policy_logps, dtype=float)
    reference_logps = np.asarray(reference_logps, dtype=float)
    if levels.ndim != 2 or levels.size == 0:
        raise ValueError(f"levels must be a non-empty (prompts, samples) array, got shape {levels.shape}")
    if not levels.shape == policy_logps.shape == reference_logps.shape:
        raise ValueError(f"shapes differ: levels {levels.shape}, policy_logps {policy_logps.shape}, "
                         f"reference_logps {reference_logps.shape}")
    if isinstance(num_levels, bool) or int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels (M + 1 for M stored reference rewards) must be an integer ≥ 2, got {num_levels!r}")
    num_levels = int(num_levels)
    if not np.all(np.equal(np.mod(levels, 1), 0)) or levels.min() < 0 or levels.max() >= num_levels:
        raise ValueError(f"levels must be integers in [0, {num_levels - 1}] (num_levels = {num_levels})")
    if not (np.all(np.isfinite(policy_logps)) and np.all(np.isfinite(reference_logps))):
        raise ValueError("log-probabilities must be finite")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    prompts = len(levels)
    counts = np.zeros((prompts, num_levels))
    np.add.at(counts, (np.repeat(np.arange(prompts), levels.shape[1]), levels.astype(np.int64).ravel()), 1.0)
    total = (policy_logps - reference_logps).mean(axis=1)
    if not pooled:
        on = _mm_kl(counts)
        on_est = bootstrap_mean(on, num_boot=num_boot, level=level, rng=rng)
        on_est = Estimate(max(on_est.value, 0.0), max(on_est.ci_low, 0.0), max(on_est.ci_high, 0.0), prompts)
        off = total - on
        return SampledKLSplit(bootstrap_mean(total, num_boot=num_boot, level=level, rng=rng), on_est,
                              bootstrap_mean(off, num_boot=num_boot, level=level, rng=rng), num_levels, False,
                              counts.sum(axis=0))
    generator = np.random.default_rng(rng)
    # Each draw resamples prompts: how many times each prompt is drawn.
    times = generator.multinomial(prompts, np.full(prompts, 1.0 / prompts), size=num_boot).astype(float)
    draws_on = np.maximum(_mm_kl(times @ counts), 0.0)
    draws_total = times @ total / prompts
    on_value = max(float(_mm_kl(counts.sum(axis=0)[None, :])[0]), 0.0)
    total_value = float(total.mean())

    def estimate(value: float, draws: np.ndarray) -> Estimate:
        return percentile_estimate(value, draws, level, prompts)

    return SampledKLSplit(estimate(total_value, draws_total), estimate(on_value, draws_on),
                          estimate(total_value - on_value, draws_total - draws_on), num_levels, True,
                          counts.sum(axis=0))


def level_distribution(log_density, num_stored: int) -> np.ndarray:
    """The law of a sample's level among M = ``num_stored`` fresh reference rewards, its quantile c ~ f:

        ḡ_M(j) = ∫₀¹ C(M, j) c^j (1 − c)^{M−j} f(c) dc,   j = 0 … M

    (``log_density``: log f up to a constant, a callable on arrays, e.g. ``TrainedTilt.log_density``).
    KL(ḡ_M‖U) is what :func:`sampled_kl_split`'s on-target estimates for a policy with quantile law f.
    """
    if isinstance(num_stored, bool) or int(num_stored) != num_stored or num_stored < 1:
        raise ValueError(f"num_stored must be an integer ≥ 1, got {num_stored!r}")
    nodes, weights = nodes_and_weights()
    log_f = np.asarray(log_density(nodes), dtype=float)
    f = weights * np.exp(log_f - log_f.max())
    pmf = f @ stats.binom.pmf(np.arange(int(num_stored) + 1), int(num_stored), nodes[:, None])
    return pmf / pmf.sum()


# -- tilt fidelity -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TiltFidelity:
    """h = log π_θ − log π_ref against the planned log f(u): per-bin means and the regression of h on log f."""

    bin_edges: np.ndarray
    bin_centres: np.ndarray
    #: Weighted mean of h per bin (NaN for an empty bin).
    mean_h: np.ndarray
    #: Weighted mean of the planned log f(u) per bin (NaN for an empty bin).
    planned: np.ndarray
    #: Total weight (or count) per bin.
    weight: np.ndarray
    #: Share of h's (weighted) variance that a line in log f explains (squared correlation).
    r_squared: float
    #: The line's slope: 1 = the planned strength of tilt, < 1 too weak, > 1 too strong.
    slope: float
    intercept: float

    def to_dict(self) -> dict:
        return {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in asdict(self).items()}


def tilt_fidelity(u, h, planned_log_density, weights=None, bins: int = 20) -> TiltFidelity:
    """The tilt-fidelity curve: how the policy's log-ratio follows the planned log-density (docs/diagnostics.md §5).

    ``u``: each point's calibrated quantile (held-out reference samples' Ĉ, or in the LM testbed
    every response's cell midpoint); ``h``: log π_θ − log π_ref there; ``planned_log_density``: the
    planned log f (a callable on arrays, e.g. ``TrainedTilt.log_density``; for the K = ∞ tilt
    log f(u) = Φ(u)/β − log Z), or its values at ``u``; ``weights``: e.g. π_ref of every response
    in the testbed (default: equal). On the plan h = log f(u) exactly. Returns per equal-width bin
    the weighted means of h and of log f, and over all points the weighted least-squares line
    h ≈ a + b·log f(u) with R² = cov_w(h, log f)² / (var_w h · var_w log f) (NaN if either is constant).
    """
    u = np.asarray(u, dtype=float).ravel()
    h = np.asarray(h, dtype=float).ravel()
    if len(u) == 0 or u.shape != h.shape:
        raise ValueError(f"u and h must be non-empty and of one shape, got {np.shape(u)} and {np.shape(h)}")
    if not (np.all(np.isfinite(u)) and u.min() >= 0 and u.max() <= 1):
        raise ValueError("quantiles u must lie in [0, 1]")
    if not np.all(np.isfinite(h)):
        raise ValueError("h (log π_θ − log π_ref) must be finite")
    if callable(planned_log_density):
        log_f = np.asarray(planned_log_density(u), dtype=float).ravel()
    else:
        log_f = np.asarray(planned_log_density, dtype=float).ravel()
    if log_f.shape != u.shape or not np.all(np.isfinite(log_f)):
        raise ValueError(f"the planned log-density must give one finite value per point ({len(u)}), got "
                         f"shape {log_f.shape}")
    w = np.ones_like(u) if weights is None else np.asarray(weights, dtype=float).ravel()
    if w.shape != u.shape or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("weights must be finite, ≥ 0, not all 0, one per point")
    if isinstance(bins, bool) or int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    bins = int(bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.minimum((u * bins).astype(np.int64), bins - 1)
    mass = np.bincount(which, weights=w, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_h = np.bincount(which, weights=w * h, minlength=bins) / mass
        planned = np.bincount(which, weights=w * log_f, minlength=bins) / mass
    mean_h[mass == 0] = np.nan
    planned[mass == 0] = np.nan
    p = w / w.sum()
    dh, df = h - p @ h, log_f - p @ log_f
    var_h, var_f, cov = p @ (dh * dh), p @ (df * df), p @ (dh * df)
    if var_h > 0 and var_f > 0:
        r_squared, slope = float(cov * cov / (var_h * var_f)), float(cov / var_f)
    else:
        r_squared, slope = math.nan, math.nan
    intercept = float(p @ h - slope * (p @ log_f)) if math.isfinite(slope) else math.nan
    return TiltFidelity(edges, 0.5 * (edges[:-1] + edges[1:]), mean_h, planned, mass, r_squared, slope, intercept)


# -- the soft-label floor ------------------------------------------------------------------------
def label_entropy_floor(labels, weights=None) -> float:
    """The lowest soft-label DPO loss its labels allow: mean of w·H(p), H(p) = −p log p − (1−p) log(1−p).

    Cross-entropy −p log σ(z) − (1−p) log σ(−z) is ≥ H(p), with equality at σ(z) = p; the trainer
    averages w·loss over pairs (``weights``: the build's ``weight`` column; default 1), so this is
    the floor of what it reports (docs/diagnostics.md §6). Nats. Labels must lie in [0, 1].
    """
    p = np.asarray(labels, dtype=float).ravel()
    if len(p) == 0:
        raise ValueError("no labels")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("soft labels must lie in [0, 1]")
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=float).ravel()
    if w.shape != p.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite, ≥ 0 and one per label ({len(p)}), got shape {w.shape}")
    return float(np.mean(w * (special.entr(p) + special.entr(1.0 - p))))


def loss_gap(loss: float, labels, weights=None) -> float:
    """``loss`` − :func:`label_entropy_floor`: the part of a soft-label DPO loss that training can still remove."""
    loss = float(loss)
    if not math.isfinite(loss):
        raise ValueError(f"loss must be finite, got {loss!r}")
    return loss - label_entropy_floor(labels, weights)


# -- against a build's plan (ctrl_build.json; docs/diagnostics.md, docs/evaluation.md) --------------------------------------------------
def _planner_record(build_info: dict | None) -> dict:
    """The ``planner`` record of a ``ctrl_build.json``; ValueError, saying why, when there is none."""
    if build_info is None:
        raise ValueError("no build metadata (ctrl_build.json beside the adapter, or --train-data a build folder): "
                         "no plan to compare with")
    planner = build_info.get("planner")
    if not planner:
        raise ValueError("the build was not planned (its transform and β were given outright): no plan to compare "
                         "with")
    return planner


def planned_tilt(build_info: dict | None):
    """The quantile density f(c) the build's plan trains, as a :class:`~ctrl_offline.maths.finite_k.TrainedTilt`.

    From the planner record of ``ctrl_build.json`` (``planner.row``: transform, t and the raw-Φ β;
    ``planner.k``, ``planner.estimator``): K = ∞ (``planner.k`` null — ``--k-infinity``, simulated
    plans, procedures without a finite-K theory) is the exact tilt log f(c) = Φ(c)/β − log Z; a K
    is :func:`~ctrl_offline.maths.finite_k.trained_tilt`, what the estimator trains from K samples per
    prompt (docs/finite_k.md, docs/diagnostics.md §5). Raises ValueError for a build without a plan.
    """
    planner = _planner_record(build_info)
    try:
        row = planner["row"]
        transform, beta = get_transform(row["transform"], row.get("t")), row["beta"]
    except KeyError as err:
        raise ValueError(f"the planner record lacks {err}: not a ctrl_build.json planner record") from None
    if planner.get("k") is None:
        return ideal_tilt(transform, beta)
    estimator = Estimator(**planner["estimator"]) if planner.get("estimator") else None
    return trained_tilt(transform, beta, planner["k"], estimator)


def plan_diagnostics(build_info: dict | None, kl_spent: float, win_rates: list[dict]):
    """KL efficiency and plan fidelity of an evaluated policy against its build's plan (docs/diagnostics.md §2).

    ``kl_spent``: the evaluation's KL (nats, per-token estimate); ``win_rates``: its win-rate rows
    (``selector``, ``n``, ``value``), of which the procedure and N the build was planned for
    (``planner.inference``, ``planner.n``) is ``reached``. Returns
    :meth:`PlanDiagnostics.from_build_info`.
    Raises ValueError, saying why, when there is no plan, the plan was simulated (no closed form),
    that procedure was not evaluated at that N, or the KL is not on the plan's curve (≤ 0 or past
    :data:`~ctrl_offline.maths.diagnostics.MAX_CURVE_KL`).
    """
    planner = _planner_record(build_info)
    inference, n = planner.get("inference"), planner.get("n")
    if planner.get("simulated"):
        raise ValueError(f"the plan for {inference}-{n} was simulated on calibration tables (no closed-form win "
                         "rate): there is no exact curve to compare with")
    row = next((r for r in win_rates if r["selector"] == inference and r["n"] == n), None)
    if row is None:
        raise ValueError(f"the build was planned for {inference}-{n}, which this evaluation did not measure "
                         f"(add it: --eval-selectors {inference} --eval-n {n})")
    return PlanDiagnostics.from_build_info(build_info, kl_spent=kl_spent, reached=row["value"])


def planned_on_target(tilt, num_stored: int) -> float:
    """KL(ḡ_M‖U) = Σ_j ḡ_M(j) log((M + 1)·ḡ_M(j)): the on-target KL a policy on the plan shows at M rewards.

    ḡ_M is the law of its samples' levels among M = ``num_stored`` reference rewards (the Bernstein
    coarsening of f, :func:`~ctrl_offline.maths.diagnostics.level_distribution`): what
    :func:`level_kl_split` measures is to be read against this, not against the plan's KL
    (docs/diagnostics.md §4).
    """
    g = level_distribution(tilt.log_density, num_stored)
    return float(np.sum(np.where(g > 0, g * np.log(np.where(g > 0, (num_stored + 1) * g, 1.0)), 0.0)))


def level_kl_split(levels, num_stored: int, policy_logps, reference_logps, *, tilt=None, num_boot: int = 2000,
                   rng=0) -> dict:
    """Where the KL went, from samples: on target + off target (docs/diagnostics.md §4).

    ``levels[x, i]``: how many of prompt x's M = ``num_stored`` reference rewards lie strictly
    below the policy's i-th sample (``below`` of :func:`~ctrl_offline.maths.calibration.rank_counts`);
    ``policy_logps`` / ``reference_logps``: the same samples' log π_θ and log π_ref, all
    (prompts, samples). :func:`~ctrl_offline.maths.diagnostics.sampled_kl_split` over M + 1 levels:

        on target ≈ KL(ĝ‖U) (Miller–Madow, ≥ 0),   total = mean log π_θ/π_ref (= ``kl_sequence``),
        off target = total − on target,

    each with a bootstrap interval over prompts. With ``tilt`` (:func:`planned_tilt`) also
    ``planned_on_target``, the plan's own on-target at the same M (:func:`planned_on_target`).
    Returns the split's dict plus ``num_stored`` and ``planned_on_target`` (None without a tilt).
    """
    split = sampled_kl_split(levels, int(num_stored) + 1, policy_logps, reference_logps, num_boot=num_boot, rng=rng)
    return {**split.to_dict(), "num_stored": int(num_stored),
            "planned_on_target": None if tilt is None else planned_on_target(tilt, int(num_stored))}


def reference_tilt_fidelity(u, h, tilt, bins: int = 20) -> dict:
    """The tilt-fidelity curve on held-out reference samples (docs/diagnostics.md §5).

    ``u``: the samples' leave-one-out calibrated quantiles; ``h``: log π_θ − log π_ref of each;
    ``tilt``: the planned density (:func:`planned_tilt`), whose log f(u) h equals on the plan.
    :func:`~ctrl_offline.maths.diagnostics.tilt_fidelity` (equal weights: these are π_ref draws) — the
    per-bin means of h and log f, the regression h ≈ a + b·log f(u) with its ``r_squared`` and
    ``slope`` — plus ``num_points`` and ``mean_h`` (≈ −KL(π_ref‖π_θ) on reference samples).
    """
    fidelity = tilt_fidelity(u, h, tilt.log_density, bins=bins)
    h = np.asarray(h, dtype=float).ravel()
    return {**fidelity.to_dict(), "num_points": int(h.size), "mean_h": float(h.mean())}
