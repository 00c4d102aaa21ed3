"""benchmarks/bench_grouped.py: its units (pairs and supervision tokens per step), recorded lengths, and a toy run."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from benchmark_modules import load_benchmark

from ctrl_offline.io.files import write_parquet
from ctrl_offline.training.packing import pack_sequences


def test_every_trainer_is_counted_in_pairs_and_their_rows_tokens():
    bench = load_benchmark("bench_grouped")
    prompt, a, b, c = [1, 2, 3], [4, 5], [6], [7, 8, 9, 10]
    # Two pair rows (a, b) and (c, b), padded as TRL's collator does, and packed.
    padded = {"input_ids": torch.zeros(4, 7, dtype=torch.long),
              "attention_mask": torch.tensor([[1] * 5 + [0] * 2, [1] * 7, [1] * 4 + [0] * 3, [1] * 4 + [0] * 3])}
    packed = pack_sequences([(prompt, a), (prompt, c), (prompt, b), (prompt, b)])
    supervision = (3 + 2) + (3 + 1) + (3 + 4) + (3 + 1)
    assert bench._counts(padded) == {"pairs": 2, "supervision": supervision, "forwarded": 28, "sequences": 4}
    assert bench._counts(packed) == {"pairs": 2, "supervision": supervision, "forwarded": 20, "sequences": 4}
    # The same two pairs from one group: b forwarded once, each pair counted with its row's tokens.
    grouped = {**pack_sequences([(prompt, a), (prompt, b), (prompt, c)]), "pair_chosen": torch.tensor([0, 2]),
               "pair_rejected": torch.tensor([1, 1])}
    assert bench._counts(grouped) == {"pairs": 2, "supervision": supervision, "forwarded": 16, "sequences": 3}


def test_lengths_are_recorded_from_a_sample_folder(tiny_path, tmp_path):
    bench = load_benchmark("bench_grouped")
    samples = tmp_path / "samples"
    samples.mkdir()
    rows = {"prompt_id": [1, 1, 2, 2], "sample_idx": [0, 1, 0, 1], "prompt_text": ["the cat", "the cat", "a", "a"],
            "num_tokens": [3, 5, 2, 7], "finished": [True, False, True, True]}
    write_parquet(pa.table(rows), samples / "shard-00000.parquet", {"stage": "sample"})
    (samples / "_manifest.json").write_text(json.dumps({"settings": {"max_new_tokens": 5}}))
    record = bench.record_lengths(samples, tiny_path, tmp_path / "lengths.json", source="test")
    assert record["k"] == 2 and record["max_new_tokens"] == 5 and record["source"] == "test"
    assert record["prompts"] == [{"prompt_tokens": 2, "completion_tokens": [3, 5], "finished": [True, False]},
                                 {"prompt_tokens": 1, "completion_tokens": [2, 7], "finished": [True, True]}]
    assert bench.load_lengths(tmp_path / "lengths.json") == record
    shipped = bench.load_lengths(bench.LENGTHS_FILE)
    assert shipped["k"] == 8 and len(shipped["prompts"]) == 32
    assert all(len(p["completion_tokens"]) == 8 for p in shipped["prompts"])


@pytest.mark.slow  # 8 worker processes, each importing torch, transformers and TRL: about a minute on 2 cores
def test_a_toy_run_reports_every_trainer_and_ratio(capsys):
    bench = load_benchmark("bench_grouped")
    bench.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--vocab", "300",
                "--steps", "1", "--warmup", "1", "--repeats", "1", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for strategy, pairs in (("all", 28), ("sampled", 8)):
        rows = report["table"][strategy]
        assert set(rows) == {"trl", "pairs", "pairs_packed", "grouped"}
        assert rows["trl"]["pairs_per_step"] == rows["pairs_packed"]["pairs_per_step"] == 8
        assert rows["grouped"]["pairs_per_step"] == 2 * pairs  # two prompts' pairs a step
        assert rows["grouped"]["sequences_per_step"] <= 16
        assert set(report["ratios"][strategy]) == {"pairs", "pairs_packed", "grouped"}
