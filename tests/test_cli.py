import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrl_offline.maths.calibration import calibrate_reference
from ctrl_offline.io.files import read_metadata
from ctrl_offline.stages.calibrate import calibrate_scored, load_tables
from data_tools.cli import main


def scored_frame(seed=0, prompts=30, k=6):
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"{i:016x}" for i in rng.integers(0, 2**62, size=prompts)], k)
    frame = pd.DataFrame(
        {
            "prompt_id": ids,
            "prompt": [f"prompt {p}" for p in ids],
            "completion": [f"answer {i}" for i in range(len(ids))],
            "sample_idx": np.tile(np.arange(k), prompts),
            "reward": np.round(rng.normal(size=len(ids)), 1),
        }
    )
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def run_cli(*args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_calibrate_reference_set_writes_tables_and_rows(tmp_path, capsys):
    frame = scored_frame()
    frame.to_parquet(tmp_path / "scored.parquet")
    code, out, err = run_cli("calibrate", tmp_path / "scored.parquet", "--out", tmp_path / "calib", capsys=capsys)
    assert code == 0, err
    assert "180 rows over 30 prompts" in out
    calibrated = pq.read_table(tmp_path / "calib" / "calibrated.parquet").to_pandas()
    assert list(calibrated.columns) == list(frame.columns) + ["u"]
    _, expected = calibrate_reference(frame.prompt_id.to_numpy(), frame.reward.to_numpy())
    np.testing.assert_allclose(calibrated.u, expected)
    tables = pq.read_table(tmp_path / "calib" / "tables.parquet").to_pandas()
    assert set(tables.columns) == {"prompt_id", "ref_rewards"}
    for pid, ref in zip(tables.prompt_id, tables.ref_rewards):
        np.testing.assert_array_equal(ref, np.sort(frame.reward[frame.prompt_id == pid]))
    meta = read_metadata(tmp_path / "calib" / "calibrated.parquet")
    assert meta["stage"] == "calibrate" and meta["settings"]["min_k"] == 2 and meta["num_prompts"] == 30
    assert meta["inputs"]["scored"]["fingerprint"]


def test_apply_tables_to_policy_samples(tmp_path, capsys):
    frame = scored_frame()
    frame.to_parquet(tmp_path / "scored.parquet")
    assert run_cli("calibrate", tmp_path / "scored.parquet", "--out", tmp_path / "calib", capsys=capsys)[0] == 0
    policy = frame.drop(columns=["sample_idx"]).assign(reward=frame.reward + 0.05)
    policy.to_parquet(tmp_path / "policy.parquet")
    code, out, err = run_cli(
        "calibrate", tmp_path / "policy.parquet", "--tables", tmp_path / "calib", "--out", tmp_path / "pol", capsys=capsys
    )
    assert code == 0, err
    assert not (tmp_path / "pol" / "tables.parquet").exists()
    u = pq.read_table(tmp_path / "pol" / "calibrated.parquet").column("u").to_numpy()
    tables = load_tables(tmp_path / "calib")
    for pid, r, value in zip(policy.prompt_id, policy.reward, u):
        ref = tables.table(pid)
        assert value == pytest.approx(((ref < r).sum() + 0.5 * (ref == r).sum()) / len(ref))


def test_leave_one_out_column_when_applying_tables(tmp_path, capsys):
    frame = scored_frame()
    frame.to_parquet(tmp_path / "scored.parquet")
    run_cli("calibrate", tmp_path / "scored.parquet", "--out", tmp_path / "calib", capsys=capsys)
    frame.assign(is_ref=True).to_parquet(tmp_path / "again.parquet")
    code, _, err = run_cli("calibrate", tmp_path / "again.parquet", "--tables", tmp_path / "calib" / "tables.parquet",
                           "--leave-one-out-column", "is_ref", "--out", tmp_path / "again", capsys=capsys)
    assert code == 0, err
    first = pq.read_table(tmp_path / "calib" / "calibrated.parquet").column("u").to_numpy()
    again = pq.read_table(tmp_path / "again" / "calibrated.parquet").column("u").to_numpy()
    np.testing.assert_allclose(again, first)


def test_reads_parquet_folders_and_datasets_folders(tmp_path):
    import datasets

    frame = scored_frame(prompts=12)
    (tmp_path / "shards").mkdir()
    frame.iloc[:30].to_parquet(tmp_path / "shards" / "part-0.parquet")
    frame.iloc[30:].to_parquet(tmp_path / "shards" / "part-1.parquet")
    datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(tmp_path / "hf"))
    a = calibrate_scored(tmp_path / "shards", tmp_path / "a")
    b = calibrate_scored(tmp_path / "hf", tmp_path / "b")
    ua = pq.read_table(a.calibrated_path).to_pandas().sort_values(["prompt_id", "sample_idx"]).u.to_numpy()
    ub = pq.read_table(b.calibrated_path).to_pandas().sort_values(["prompt_id", "sample_idx"]).u.to_numpy()
    np.testing.assert_allclose(ua, ub)
    assert a.num_rows == b.num_rows == len(frame)


def test_integer_prompt_ids_keep_their_type(tmp_path):
    frame = scored_frame(prompts=5)
    frame["prompt_id"] = pd.factorize(frame.prompt_id)[0].astype("int64")
    frame.to_parquet(tmp_path / "s.parquet")
    result = calibrate_scored(tmp_path / "s.parquet", tmp_path / "out")
    assert pq.read_table(result.tables_path).schema.field("prompt_id").type == pa.int64()


def test_tables_with_the_hex_ids_of_earlier_runs_calibrate_integer_ids(tmp_path):
    """Tables written when `sample` gave 16-hex-digit ids still serve rows with today's int64 ids."""
    from ctrl_offline.maths.calibration import int_prompt_ids

    frame = scored_frame(prompts=5)  # 16-hex-digit string ids, as earlier runs wrote them
    frame.to_parquet(tmp_path / "old.parquet")
    old = calibrate_scored(tmp_path / "old.parquet", tmp_path / "old")
    # The same rows with integer ids, each its prompt's own reference sample: the same leave-one-out u.
    rows = frame.assign(prompt_id=int_prompt_ids(frame.prompt_id.to_numpy()), reference=True)
    rows.to_parquet(tmp_path / "new.parquet")
    new = calibrate_scored(tmp_path / "new.parquet", tmp_path / "new", tables=old.out_dir,
                           leave_one_out_column="reference")
    assert pq.read_table(new.calibrated_path).schema.field("prompt_id").type == pa.int64()
    np.testing.assert_array_equal(pq.read_table(new.calibrated_path)["u"].to_numpy(),
                                  pq.read_table(old.calibrated_path)["u"].to_numpy())


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda f: f.assign(reward=f.reward.where(f.index != 3, np.nan)), r"NaN or infinite: row 3"),
        (lambda f: f.assign(reward=f.reward.where(f.index != 5, np.inf)), r"NaN or infinite: row 5"),
        (lambda f: f.drop(columns=["sample_idx"]), r"lacks column\(s\) sample_idx"),
        (lambda f: f.drop(columns=["reward"]), r"lacks column\(s\) reward"),
        (lambda f: f.assign(sample_idx=0), r"duplicate \(prompt_id, sample_idx\)"),
        (lambda f: f.iloc[: len(f) - 5], r"fewer than min_k=2 reference samples: prompt_id '"),
        (lambda f: f.assign(reward="high"), r"reward column 'reward' must be numeric"),
        (lambda f: f.assign(prompt_id=pd.factorize(f.prompt_id)[0] * 1.0), r"integers or strings, got float64 ids"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message_and_writes_nothing(tmp_path, capsys, mutate, message):
    frame = scored_frame()
    # Sorted, so dropping the last 5 rows leaves the last prompt (K = 6) a single sample.
    frame = mutate(frame.sort_values(["prompt_id", "sample_idx"]).reset_index(drop=True))
    frame.to_parquet(tmp_path / "bad.parquet")
    code, out, err = run_cli("calibrate", tmp_path / "bad.parquet", "--out", tmp_path / "out", capsys=capsys)
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("ctrl-data calibrate: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.parquet"]  # no temporary leftovers


def test_min_k_option(tmp_path, capsys):
    scored_frame(k=3).to_parquet(tmp_path / "s.parquet")
    code, _, err = run_cli("calibrate", tmp_path / "s.parquet", "--out", tmp_path / "o", "--min-k", "4", capsys=capsys)
    assert code == 2 and "fewer than min_k=4" in err


def test_prompt_without_table_and_unreadable_files(tmp_path, capsys):
    frame = scored_frame()
    frame.to_parquet(tmp_path / "scored.parquet")
    run_cli("calibrate", tmp_path / "scored.parquet", "--out", tmp_path / "calib", capsys=capsys)
    stray = frame.assign(prompt_id=np.where(frame.index == 0, "unknown-prompt", frame.prompt_id))
    stray.to_parquet(tmp_path / "stray.parquet")
    code, _, err = run_cli("calibrate", tmp_path / "stray.parquet", "--tables", tmp_path / "calib", "--out",
                           tmp_path / "x", capsys=capsys)
    assert code == 2 and "no calibration table: prompt_id 'unknown-prompt'" in err

    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    code, _, err = run_cli("calibrate", tmp_path / "garbage.parquet", "--out", tmp_path / "y", capsys=capsys)
    assert code == 2 and "cannot read" in err
    code, _, err = run_cli("calibrate", tmp_path / "missing.parquet", "--out", tmp_path / "z", capsys=capsys)
    assert code == 2 and "no such file" in err


def test_existing_output_needs_overwrite_and_survives_a_failed_run(tmp_path, capsys):
    frame = scored_frame()
    frame.to_parquet(tmp_path / "scored.parquet")
    run_cli("calibrate", tmp_path / "scored.parquet", "--out", tmp_path / "calib", capsys=capsys)
    before = (tmp_path / "calib" / "calibrated.parquet").read_bytes()
    code, _, err = run_cli("calibrate", tmp_path / "scored.parquet", "--out", tmp_path / "calib", capsys=capsys)
    assert code == 2 and "--overwrite" in err
    frame.assign(reward=np.nan).to_parquet(tmp_path / "nan.parquet")
    code, _, _ = run_cli("calibrate", tmp_path / "nan.parquet", "--out", tmp_path / "calib", "--overwrite", capsys=capsys)
    assert code == 2
    assert (tmp_path / "calib" / "calibrated.parquet").read_bytes() == before
    code, _, _ = run_cli("calibrate", tmp_path / "scored.parquet", "--out", tmp_path / "calib", "--overwrite", capsys=capsys)
    assert code == 0


def test_plan_table_json_and_plot(tmp_path, capsys):
    code, out, _ = run_cli("plan", "--inference", "bon", "--inference-n", "4", "--kl-budget", "0.5", capsys=capsys)
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["transform", "t", "beta"]
    assert "best for bon-4 at KL 0.5: exp" in out

    code, out, _ = run_cli("plan", "--inference", "won", "--inference-n", "4", "--kl-budget", "0.5", "--json", "--plot",
                           tmp_path / "won.png", capsys=capsys)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["inference"] == "won" and result["n"] == 4 and result["kl"] == 0.5
    assert [r["transform"] for r in result["rows"]] == ["identity", "log", "exp", "negexp"]
    assert max(result["rows"], key=lambda r: r["win_rate"])["transform"] == "negexp"
    assert all(set(r) >= {"transform", "t", "beta", "kl", "win_rate", "standard_win_rate"} for r in result["rows"])
    assert (tmp_path / "won.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--inference-n", "0", "--kl-budget", "0.5"], ["--inference-n", "4", "--kl-budget", "-1"],
                                  ["--inference-n", "4", "--kl-budget", "99"], ["--kl-budget", "0.5"]])
def test_plan_bad_arguments_exit_non_zero(args, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(["plan", "--inference", "bon", *args])
        raise SystemExit(code)
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_one_name_per_flag_no_old_spelling_and_no_abbreviation(capsys):
    new = ["plan", "--inference", "bon", "--inference-n", "4", "--kl-budget", "0.5", "--num-samples", "8",
           "--pair-strategy", "sampled", "--json"]
    assert main(new) == 0
    capsys.readouterr()
    for wrong in (["--n", "4", "--kl-budget", "0.5"], ["--inference-n", "4", "--kl", "0.5"],
                  ["--inference-n", "4", "--kl-budget", "0.5", "--pair", "sampled"]):
        with pytest.raises(SystemExit) as exc:
            main(["plan", "--inference", "bon", *wrong])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err or "arguments are required" in err


def test_choice_lists_come_from_the_library():
    from ctrl_offline.maths import losses
    from ctrl_offline.maths.finite_k import POINTWISE_NORMALISERS, TARGET_SCHEMES, THEORY_STRATEGIES
    from ctrl_offline.rows.pairs import PAIR_STRATEGIES
    from ctrl_offline.maths.procedures import procedure_names
    from ctrl_offline.stages.build import FORMATS
    from ctrl_offline.maths.transforms import available_transforms
    from data_tools.cli import build_parser

    stages = build_parser()._subparsers._group_actions[0].choices

    def choices(stage, flag):
        return tuple(next(a for a in stages[stage]._actions if flag in a.option_strings).choices)

    assert choices("build", "--data-format") == (*losses.format_losses(), "grouped") == FORMATS == losses.DATA_FORMATS
    assert choices("train", "--loss") == losses.loss_names() == losses.LOSS_TYPES
    assert choices("build", "--pair-strategy") == PAIR_STRATEGIES
    assert choices("plan", "--pair-strategy") == THEORY_STRATEGIES
    assert choices("build", "--transform") == choices("plan", "--transforms") == tuple(available_transforms())
    assert choices("plan", "--targets") == choices("build", "--targets") == TARGET_SCHEMES
    assert choices("build", "--log-partition") == POINTWISE_NORMALISERS
    assert choices("eval", "--eval-selectors") == choices("build", "--inference") == tuple(procedure_names())


def test_console_script_runs_as_a_module():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "data_tools", "plan", "--inference", "bon", "--inference-n", "2",
                           "--kl-budget", "0.1", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 2


def test_plan_simulates_raw_reward_selectors_on_tables(tmp_path, capsys):
    frame = scored_frame(prompts=40, k=16)
    frame.to_parquet(tmp_path / "scored.parquet")
    assert main(["calibrate", str(tmp_path / "scored.parquet"), "--out", str(tmp_path / "calib")]) == 0
    capsys.readouterr()
    assert main(["plan", "--inference", "bot", "--inference-n", "4", "--kl-budget", "0.5", "--json"]) == 2
    assert "give --tables" in capsys.readouterr().err
    assert main(["plan", "--inference", "bot", "--inference-n", "4", "--kl-budget", "0.5", "--tables", str(tmp_path / "calib"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["inference"] == "bot" and len(result["rows"]) == 4
    assert all(0.5 < r["win_rate"] < 1 for r in result["rows"])


def test_eval_records_the_build_of_its_training_data(tmp_path, capsys, monkeypatch):
    """`ctrl-data eval --train-data <build folder>` passes the folder's ctrl_build.json on, so the report's "build"
    is filled in (it was null); without --train-data, or with a training set that has none, no build is passed."""
    import ctrl_offline.stages.evaluate as evaluate
    from ctrl_offline.io.files import BUILD_INFO_FILE

    calls = []

    def fake_evaluate_policy(prompts, out, model, reward, **kwargs):
        calls.append(kwargs)
        win = {"selector": "bon", "n": 1, "value": 0.5, "ci_low": 0.4, "ci_high": 0.6}
        report = {"kl": {"value": 0.0}, "standard_win_rate": win, "policy_samples": 2, "reference_samples": 2,
                  "win_rates": [win], "reference_pool": None}
        return evaluate.EvalResult(tmp_path / "out", report)

    monkeypatch.setattr(evaluate, "evaluate_policy", fake_evaluate_policy)
    build = {"transform": "exp", "t": 12.5, "beta": 0.31, "phi_scale": 2.0, "unscaled_beta": 0.62, "num_rows": 10}
    data = tmp_path / "data"
    data.mkdir()
    (data / BUILD_INFO_FILE).write_text(json.dumps(build))
    plain = tmp_path / "plain"
    plain.mkdir()
    base = ["eval", tmp_path / "prompts.jsonl", "--model", "m", "--reward", "r", "--out", tmp_path / "out", "--eval-n", "1"]
    for extra in (["--train-data", data], [], ["--train-data", plain]):
        code, out, err = run_cli(*base, *extra, capsys=capsys)
        assert code == 0, err
    with_build, without, no_metadata = calls
    assert {k: with_build["build_info"][k] for k in build} == build
    assert (with_build["transform"], with_build["t"]) == ("exp", 12.5)
    assert with_build["train_data"] == str(data)
    for kwargs in (without, no_metadata):
        assert kwargs["build_info"] is None and kwargs["transform"] is None and kwargs["t"] is None
