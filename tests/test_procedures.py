"""The registry of inference procedures (ctrl_offline.maths.procedures): one registration makes a new procedure known to
selection, the planner, the build, the evaluation and the command line (docs/selector_planning.md)."""

import json

import numpy as np
import pytest

from ctrl_offline.maths._quadrature import nodes_and_weights
from ctrl_offline.maths.calibration import build_tables
from ctrl_offline.maths.planner import plan
from ctrl_offline.maths.procedures import (
    Procedure,
    closed_form_names,
    get_procedure,
    procedure_names,
    register_procedure,
    select,
    unregister_procedure,
)
from ctrl_offline.maths.simulation import simulated_win_rate
from ctrl_offline.maths.transforms import get_transform
from data_tools.cli import main
from tiny_models import WORDS, build_tiny_model, build_tiny_reward_model


def second_best_of_n(rewards, ref_logps):
    """One-hot on the second-highest reward (the only candidate when one is available)."""
    valid = ~np.isnan(rewards)
    order = np.argsort(-np.where(valid, rewards, -np.inf), axis=1, kind="stable")
    pick = np.where(valid.sum(axis=1) >= 2, order[:, 1], order[:, 0])
    probs = np.zeros(rewards.shape)
    probs[np.arange(len(rewards)), pick] = 1.0
    return np.where(valid.any(axis=1, keepdims=True), probs, 0.0)


def second_best_win_rate(transform, beta, n):
    """1 − ∫ h(u) H(F(u)) du: the reference's pick has CDF H(u) = u^N + N u^{N−1}(1 − u), density
    h(u) = N(N−1) u^{N−2}(1 − u); the tilted policy's pick has CDF H(F)."""
    if n < 2:
        raise ValueError("second-best-of-N needs N ≥ 2")
    u, w = nodes_and_weights()
    f = np.exp(transform.log_cdf(u, beta))
    return float(1.0 - np.sum(w * n * (n - 1) * u ** (n - 2) * (1 - u) * (f**n + n * f ** (n - 1) * (1 - f))))


SBON = Procedure("sbon", "second-best-of-N", second_best_of_n)


@pytest.fixture
def sbon():
    """Second-best-of-N, registered in this one place (no closed form: planned by simulation)."""
    register_procedure(SBON)
    yield SBON
    unregister_procedure("sbon")


@pytest.fixture
def sbon_closed_form():
    """Second-best-of-N with its closed form."""
    procedure = register_procedure(Procedure("sbon", "second-best-of-N", second_best_of_n,
                                             win_rate=second_best_win_rate))
    yield procedure
    unregister_procedure("sbon")


@pytest.fixture(scope="module")
def uniform_tables():
    rng = np.random.default_rng(0)
    prompts, k = 200, 257
    return build_tables(np.repeat(np.arange(prompts), k), rng.random(prompts * k))


def test_the_built_in_procedures():
    assert procedure_names() == ("bon", "won", "soft_bon", "rbon", "itp", "tsallis", "bot")
    assert closed_form_names() == ("bon", "won")
    assert get_procedure("rbon").needs_ref_logps and get_procedure("bot").params["kappa0"] == 0.1


def test_register_get_and_their_errors(sbon):
    assert get_procedure("sbon") is SBON and "sbon" in procedure_names() and "sbon" not in closed_form_names()
    with pytest.raises(ValueError, match="'sbon' is already registered .*replace=True"):
        register_procedure(SBON)
    other = Procedure("sbon", "another second-best", second_best_of_n)
    assert register_procedure(other, replace=True) is get_procedure("sbon")
    with pytest.raises(ValueError, match="unknown inference procedure 'median'; choose one of bon, won, .*sbon"):
        get_procedure("median")
    with pytest.raises(ValueError, match="unknown inference procedure"):
        unregister_procedure("median")
    with pytest.raises(ValueError, match="Python identifier"):
        Procedure("second best", "x", second_best_of_n)
    with pytest.raises(TypeError, match="rule must be callable"):
        Procedure("sbon2", "x", None)
    with pytest.raises(TypeError, match="register a Procedure"):
        register_procedure("sbon")


def test_selection_picks_the_second_best(sbon):
    rewards = np.array([[1.0, 5.0, 3.0, 4.0], [2.0, np.nan, 0.0, 1.0], [np.nan, 7.0, np.nan, np.nan]])
    chosen = select(rewards, "sbon")
    assert chosen.index.tolist() == [3, 3, 1] and chosen.num_excluded == 4
    with pytest.raises(ValueError, match="unknown selector setting"):
        select(rewards, "sbon", temperature=1.0)


@pytest.mark.parametrize("name", closed_form_names())
def test_closed_forms_agree_with_simulation_on_a_uniform_table(uniform_tables, name):
    procedure = get_procedure(name)
    for spec, beta in (("identity", 0.3), ("exp:4", 20.0), ("negexp:4", 0.2)):
        transform = get_transform(spec)
        simulated = simulated_win_rate(uniform_tables, transform, beta, name, 4, prompts=40_000, seed=1)
        assert simulated == pytest.approx(procedure.win_rate(transform, beta, 4), abs=0.01)


def test_a_registered_closed_form_plans_without_tables(uniform_tables, sbon_closed_form):
    transform = get_transform("identity")
    exact = second_best_win_rate(transform, 0.3, 4)
    assert simulated_win_rate(uniform_tables, transform, 0.3, "sbon", 4, prompts=40_000, seed=1) == pytest.approx(
        exact, abs=0.01)
    rows = {row.transform: row for row in plan("sbon", 4, 0.5).rows}
    assert 0.5 < rows["identity"].win_rate < 1
    with pytest.raises(ValueError, match="no finite-K win rate"):
        plan("sbon", 4, 0.5, k=8)


def test_a_procedure_without_closed_form_needs_tables(sbon):
    with pytest.raises(ValueError, match="sbon .second-best-of-N. has no closed-form win rate"):
        plan("sbon", 4, 0.5)


def test_a_new_procedure_through_the_command_line(sbon, tmp_path, capsys):
    """Registered once above; then ctrl-data plans for it, builds a dataset planned for it and evaluates with it."""
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 5))) + " " for _ in range(10)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:8]) + "\n")
    (tmp_path / "heldout.txt").write_text("\n".join(prompts[8:]) + "\n")
    model = build_tiny_model(tmp_path / "lm", hidden=32)
    reward = f"rm={build_tiny_reward_model(tmp_path / 'rm')}"

    def cli(*args):
        code = main([str(a) for a in args])
        assert code == 0, capsys.readouterr().err
        return capsys.readouterr().out

    cli("sample", tmp_path / "prompts.txt", "--model", model, "--out", tmp_path / "samples", "--num-samples", 8,
        "--max-new-tokens", 6)
    cli("score", tmp_path / "samples", "--reward", reward, "--out", tmp_path / "scored")
    cli("calibrate", tmp_path / "scored", "--out", tmp_path / "calib")

    # plan: no closed form, so simulated on the calibration tables
    assert main(["plan", "--inference", "sbon", "--inference-n", "4", "--kl-budget", "0.5"]) == 2
    assert "give --tables" in capsys.readouterr().err
    result = json.loads(cli("plan", "--inference", "sbon", "--inference-n", 4, "--kl-budget", 0.5, "--tables", tmp_path / "calib",
                            "--json").strip().splitlines()[-1])
    rows = {row["transform"]: row for row in result["rows"]}
    assert result["inference"] == "sbon" and set(rows) == {"identity", "log", "exp", "negexp"}
    assert 0.5 < rows["identity"]["win_rate"] < 1 and rows["identity"]["kl"] == pytest.approx(0.5)

    # build: the simulated plan on the tables the calibrated input came with (K = ∞: no finite-K theory)
    cli("build", tmp_path / "calib", "--inference", "sbon", "--inference-n", 4, "--kl-budget", 0.5, "--out", tmp_path / "pairs")
    build = json.loads((tmp_path / "pairs" / "ctrl_build.json").read_text())
    planner = build["planner"]
    assert (planner["inference"], planner["n"], planner["simulated"], planner["k"]) == ("sbon", 4, True, None)
    assert planner["row"]["transform"] == build["transform"] and planner["row"]["win_rate"] > 0.5

    # eval: sbon next to bon; at N = 1 every procedure picks the single candidate
    cli("eval", tmp_path / "heldout.txt", "--model", model, "--reward", reward, "--eval-n", 1, 2, 4,
        "--eval-selectors", "bon", "sbon", "--max-new-tokens", 6, "--out", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rates = {(row["selector"], row["n"]): row for row in report["win_rates"]}
    assert {("sbon", n) for n in (1, 2, 4)} <= set(rates)
    assert rates["sbon", 1]["value"] == pytest.approx(rates["bon", 1]["value"])
    assert rates["sbon", 4]["method"] == "all_subsets" and rates["bon", 4]["method"] == "closed_form"
    for row in rates.values():
        assert 0 <= row["ci_low"] <= row["value"] <= row["ci_high"] <= 1
    assert "| sbon | 4 |" in (tmp_path / "report" / "report.md").read_text()
