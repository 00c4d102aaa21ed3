"""The checks and node values every target starts from (ctrl_offline.rows.calibrated_rows)."""

import numpy as np
import pytest
from calibrated_rows_data import EXP, rows

from ctrl_offline.maths.transforms import SynthesisError, check_beta
from ctrl_offline.rows.calibrated_rows import prepare, samples_per_prompt
from ctrl_offline.maths.calibration import calibrate_reference
from ctrl_offline.maths.theory import cell_values
from ctrl_offline.rows.pairs import make_pairs
from ctrl_offline.rows.pointwise import pointwise_targets, sft_weights


@pytest.mark.parametrize("int_ids", [False, True])
def test_prompts_are_coded_in_order_of_first_appearance(int_ids):
    ids, u = rows(3, int_ids=int_ids)
    codes, uniques, u_out, phi, beta, transform = prepare(ids, u, EXP, 0.5)
    first_seen = list(dict.fromkeys(ids.tolist()))
    assert uniques.tolist() == first_seen
    assert codes.dtype == np.int64 and codes.tolist() == [first_seen.index(p) for p in ids.tolist()]
    np.testing.assert_array_equal(phi, EXP.phi(u))
    assert beta == 0.5 and transform is EXP and u_out.dtype == float


def test_cell_node_values_share_a_block_of_cells_among_ties():
    rng = np.random.default_rng(0)
    ids = np.repeat(["a", "b", "c"], 6)
    _, u = calibrate_reference(ids, rng.integers(0, 3, size=len(ids)).astype(float))  # ties
    phi = prepare(ids, u, EXP, 0.4, targets="cell").phi
    for p in ("a", "b", "c"):
        sel = np.flatnonzero(ids == p)
        for i in sel:
            below = sum(u[j] < u[i] for j in sel)
            ties = sum(u[j] == u[i] for j in sel)
            assert phi[i] == pytest.approx(cell_values(EXP, 0.4, below / 6, (below + ties) / 6), rel=1e-12)


def test_samples_per_prompt_counts_rows_or_takes_k():
    codes = np.array([0, 1, 0, 2, 1, 0])
    ids = np.array(["a", "b", "a", "c", "b", "a"])
    with pytest.raises(SynthesisError, match=r"rows 3 \(prompt_id 'c'\)"):
        samples_per_prompt(codes, 3, None, ids)
    np.testing.assert_array_equal(samples_per_prompt(np.array([0, 1, 0, 1, 1]), 2, None, ids[:5]), [2, 3, 2, 3, 3])
    np.testing.assert_array_equal(samples_per_prompt(codes, 3, 8, ids), np.full(6, 8))  # k overrides the count
    np.testing.assert_array_equal(samples_per_prompt(codes, 3, np.arange(2, 8), ids), np.arange(2, 8))
    with pytest.raises(SynthesisError, match="k must be an integer"):
        samples_per_prompt(codes, 3, 4.0, ids)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf"), float("nan"), "x", None])
def test_beta_must_be_finite_and_positive(beta):
    with pytest.raises(SynthesisError, match="beta must be a finite number > 0"):
        check_beta(beta)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: make_pairs(["a"] * 9, [0.2, 1.5, -0.1, 2, 3, 4, 5, 0.5, 9], "identity", 1.0),
         r"7 calibrated value\(s\) u are NaN or outside \[0, 1\]: rows 1, 2, 3, 4, 5 and 2 more \(prompt_id 'a'\)"),
        (lambda: pointwise_targets(["a", "b"], [0.2, np.nan], "identity", 1.0), r"NaN .*rows 1 \(prompt_id 'b'\)"),
        (lambda: sft_weights(["a"], [0.2, 0.3], "identity", 1.0), "1-D arrays of one length"),
        (lambda: make_pairs([["a", "a"]], [[0.2, 0.3]], "identity", 1.0), "1-D arrays of one length"),
        (lambda: make_pairs(["a"], ["x"], "identity", 1.0), "calibrated values u must be numbers"),
        (lambda: make_pairs(np.array(["a", None, None], dtype=object), [0.2, 0.3, 0.4], "identity", 1.0),
         r"2 row\(s\) have a missing prompt id \(None/NaN\): rows 1, 2"),
        (lambda: make_pairs(["a", "a"], [0.2, 0.3], "identity", 0.0), "beta must be a finite number > 0"),
        (lambda: pointwise_targets(["a"], [0.2], "identity", -1.0), "beta"),
        (lambda: sft_weights(["a"], [0.2], "identity", float("inf")), "beta"),
        (lambda: make_pairs(["a"], [0.2], "identity", "x"), "beta"),
        (lambda: make_pairs(["a"], [0.2], "nope", 1.0), "unknown transform 'nope'"),
        (lambda: make_pairs(["a"], [0.2], "identity", 1.0, targets="x"), "targets must be one of loo, cell"),
        (lambda: make_pairs(["a", "a"], [0.0, 0.3], "log", 1.0),
         r"transform 'log' gives a non-finite Φ\(u\) for 1 row\(s\): rows 0 \(prompt_id 'a'\)"),
        # Three rows tied at u = 0 cannot be leave-one-out ranks among K = 3 (they would be at ½).
        (lambda: sft_weights(["a", "a", "a", "b", "b"], [0.0, 0.0, 0.0, 1.0, 0.0], "identity", 1.0, targets="cell"),
         r"u does not look like leave-one-out ranks among K samples for 3 row\(s\): rows 0, 1, 2 \(prompt_id 'a'\)"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(SynthesisError, match=message):
        call()
