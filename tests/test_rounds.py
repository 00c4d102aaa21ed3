"""On-policy rounds: responses calibrated against stored tables are planned as ranks among K (docs/finite_k.md §8)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from ctrl_offline.maths.finite_k import population_log_partition
from ctrl_offline.io.files import write_parquet
from ctrl_offline.stages.build import build_dataset
from ctrl_offline.stages.calibrate import calibrate_scored
from ctrl_offline.maths.transforms import Rescaled, get_transform, unit_scale


def _scored(path, rewards, model="ref"):
    """A scored file: one row per (prompt, sample), prompts p0, p1, …"""
    prompts, samples = rewards.shape
    rows = {"prompt_id": [f"p{i}" for i in range(prompts) for _ in range(samples)],
            "prompt": [f"prompt {i}" for i in range(prompts) for _ in range(samples)],
            "completion": [f" answer {i}.{j}" for i in range(prompts) for j in range(samples)],
            "sample_idx": [j for _ in range(prompts) for j in range(samples)],
            "reward": rewards.ravel().tolist()}
    write_parquet(pa.table(rows), path, metadata={"stage": "score", "reference_model": model})
    return path


@pytest.fixture()
def reference(tmp_path):
    rng = np.random.default_rng(0)
    scored = _scored(tmp_path / "ref.parquet", rng.normal(size=(24, 4)))
    calibrate_scored(scored, tmp_path / "cal0")
    return tmp_path / "cal0"


def test_policy_rows_ranked_against_tables_are_planned_as_k_plus_one(reference, tmp_path):
    rng = np.random.default_rng(1)
    policy = _scored(tmp_path / "policy.parquet", rng.normal(0.5, 1.0, size=(24, 3)))
    calibrate_scored(policy, tmp_path / "cal1", tables=reference / "tables.parquet")
    result = build_dataset(tmp_path / "cal1", tmp_path / "build1", format="pointwise", transform="exp",
                           inference="bon", n=4, kl=0.5)
    info = json.loads((tmp_path / "build1" / "ctrl_build.json").read_text())
    # Ranks among K = 4 stored rewards take 5 values: the K + 1 estimator, whatever the 3 rows per prompt.
    assert info["k"] == 5 and info["planner"]["k"] == 5 and result.k == 5
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "build1"))
    u = np.asarray(data["u"])
    assert set(np.round(u * 4, 9)) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    transform = get_transform("exp", result.t)
    unit = Rescaled(transform, unit_scale(transform))
    expected = unit.phi(u) - result.beta * population_log_partition(unit, result.beta, 5)
    np.testing.assert_allclose(np.asarray(data["target"]), expected, rtol=1e-9, atol=1e-12)


def test_reference_rows_keep_their_leave_one_out_k(reference, tmp_path):
    build_dataset(reference, tmp_path / "build0", format="pointwise", transform="exp", inference="bon", n=4, kl=0.5)
    info = json.loads((tmp_path / "build0" / "ctrl_build.json").read_text())
    assert info["k"] == 4 and info["planner"]["k"] == 4


def test_tables_that_are_gone_are_named(reference, tmp_path):
    import shutil

    rng = np.random.default_rng(2)
    policy = _scored(tmp_path / "policy.parquet", rng.normal(size=(24, 2)))
    tables = tmp_path / "moved_tables.parquet"
    shutil.copy(reference / "tables.parquet", tables)
    calibrate_scored(policy, tmp_path / "cal1", tables=tables)
    tables.unlink()
    with pytest.raises(Exception, match="calibrated against tables .* which are gone"):
        build_dataset(tmp_path / "cal1", tmp_path / "b", format="pointwise", transform="exp", inference="bon", n=4,
                      kl=0.5)


def test_plan_on_policy_plans_the_k_plus_one_pointwise_tilt(capsys):
    from ctrl_offline.maths.planner import plan
    from data_tools.cli import main

    assert main(["plan", "--inference", "bon", "--inference-n", "4", "--kl-budget", "0.5", "--num-samples", "8",
                 "--on-policy", "--transforms", "identity", "exp", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = plan("bon", 4, 0.5, families=("identity", "exp"), k=9, loss="pointwise")
    assert printed["k"] == 9 and printed["estimator"]["loss"] == "pointwise"
    assert [r["beta"] for r in printed["rows"]] == pytest.approx([r.beta for r in expected.rows], rel=1e-9)
    assert main(["plan", "--inference", "bon", "--inference-n", "4", "--kl-budget", "0.5", "--on-policy"]) == 2
    assert "give --num-samples" in capsys.readouterr().err
    assert main(["plan", "--inference", "bon", "--inference-n", "4", "--kl-budget", "0.5", "--num-samples", "8",
                 "--on-policy", "--loss", "dpo"]) == 2
    assert "train pointwise" in capsys.readouterr().err


def test_measured_efficiency_lines_come_from_the_testbed_file(tmp_path):
    from ctrl_offline.reports.measured import format_measured, measured_efficiency

    path = tmp_path / "eff.json"
    rows = [dict(training="on-policy rounds (pointwise)", transform="exp", procedure="bon-4", k=8, kl=0.5, seeds=3,
                 kl_efficiency=0.84, plan_fidelity=0.95),
            dict(training="offline soft-label DPO", transform="negexp", procedure="won-4", k=8, kl=0.5, seeds=3,
                 kl_efficiency=0.3, plan_fidelity=0.6)]
    path.write_text(json.dumps({"date": "2026-12-05", "rows": rows}))
    assert measured_efficiency("exp", "bon-4", path) == rows[:1]
    lines = format_measured("exp", "bon-4", path)
    assert "2026-12-05" in lines[0] and "KL efficiency 0.84, plan fidelity 0.95 (3 seeds)" in lines[1]
    assert format_measured("identity", "bon-4", path) == []
    assert format_measured("exp", "bon-4", tmp_path / "missing.json") == []
