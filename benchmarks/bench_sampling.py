"""Sampling and scoring throughput: the pipeline's batched paths against one-prompt-at-a-time loops.

    python benchmarks/bench_sampling.py            # CPU here; the GPU when there is one
    python benchmarks/bench_sampling.py --json     # last line: one JSON object
    python benchmarks/bench_sampling.py --model embedded:smollm2 --prompts 16   # the real 135M model

Sampling: ``ctrl_offline.models.generation.sample_completions`` (batched prompts, K return sequences per
generate call, KV cache, left padding, the reference log-probs read off generate's own passes)
against the same with a second, teacher-forced log-prob pass (the earlier method) and against the
plain loop a user writes — one ``generate`` call per prompt and sample, log-probs from the
returned scores. Scoring: ``RewardModel`` (length-sorted batches) against one forward per
completion. Same model (a random Llama built from a config, or ``--model``) and reward model,
same prompts, same seed and token budget, measured one after the other in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import WORDS, build_tiny_model, build_tiny_reward_model, build_tokenizer  # noqa: E402

from ctrl_offline.models.generation import SamplingConfig, sample_completions  # noqa: E402
from ctrl_offline.models.rewards import RewardModel  # noqa: E402


@torch.no_grad()
def naive_sampling(model, tokenizer, prompts, k, max_new_tokens):
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(model.device)
        for _ in range(k):
            out = model.generate(**ids, do_sample=True, top_k=0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
            generated = out.sequences[0, ids["input_ids"].size(1):]
            logp = sum(torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, generated))
            rows.append((tokenizer.decode(generated, skip_special_tokens=True), logp, len(generated)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default=None,
                        help="a real model instead of the random Llama, e.g. embedded:smollm2 (chat prompts)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, size=12)) + " " for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM

        if args.model:
            from ctrl_offline.models.generation import load_causal_lm, render_prompt

            model, tokenizer = load_causal_lm(args.model, device="cpu")
            topics = ["tea", "rain", "a bus", "a park", "music", "bread", "a cat", "winter"]
            prompts = [render_prompt(tokenizer, f"Write one sentence about {topics[i % len(topics)]} ({i}).")
                       for i in range(args.prompts)]
        else:
            model = AutoModelForCausalLM.from_pretrained(build_tiny_model(Path(tmp) / "lm", hidden=args.hidden,
                                                                          layers=4)).eval()
            model.config.max_position_embeddings = 512
            tokenizer = build_tokenizer()
        config = SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

        start = time.perf_counter()
        ours_rows = sample_completions(model, tokenizer, prompts, config, seed=0)
        ours_s = time.perf_counter() - start
        # The same samples with the log-probs from a second, teacher-forced pass (the earlier method).
        from ctrl_offline.models import generation

        recorded = generation._RecordedLogps.token_logps
        generation._RecordedLogps.token_logps = lambda self, generated: None
        try:
            start = time.perf_counter()
            forced_rows = sample_completions(model, tokenizer, prompts, config, seed=0)
            forced_s = time.perf_counter() - start
        finally:
            generation._RecordedLogps.token_logps = recorded
        assert [r["completion_ids"] for r in forced_rows] == [r["completion_ids"] for r in ours_rows]
        logp_diff = max(abs(a["logp"] - b["logp"]) for a, b in zip(ours_rows, forced_rows))
        torch.manual_seed(0)
        start = time.perf_counter()
        naive_rows = naive_sampling(model, tokenizer, prompts, args.k, args.max_new_tokens)
        naive_s = time.perf_counter() - start
        ours_tokens = sum(r["num_tokens"] for r in ours_rows)
        naive_tokens = sum(n for _, _, n in naive_rows)

        rm = RewardModel(str(build_tiny_reward_model(Path(tmp) / "rm", hidden=args.hidden)), batch_size=32)
        completions = [r["completion"] for r in ours_rows]
        score_prompts = [prompts[r["batch_prompt"]] for r in ours_rows]
        start = time.perf_counter()
        batched = rm(score_prompts, completions)
        score_s = time.perf_counter() - start
        start = time.perf_counter()
        one_by_one = np.concatenate([rm([p], [c]) for p, c in zip(score_prompts, completions)])
        score_naive_s = time.perf_counter() - start
        max_diff = float(np.max(np.abs(batched - one_by_one)))

    n = len(ours_rows)
    result = {
        "completions_per_s": n / ours_s, "naive_completions_per_s": len(naive_rows) / naive_s,
        "tokens_per_s": ours_tokens / ours_s, "naive_tokens_per_s": naive_tokens / naive_s,
        "sampling_ratio": (n / ours_s) / (len(naive_rows) / naive_s),
        "teacher_forced_completions_per_s": n / forced_s, "recorded_vs_teacher_forced_ratio": forced_s / ours_s,
        "ref_logp_max_abs_diff_recorded_vs_teacher_forced": logp_diff,
        "scores_per_s": n / score_s, "naive_scores_per_s": n / score_naive_s, "scoring_ratio": score_naive_s / score_s,
        "score_max_abs_diff_batched_vs_single": max_diff,
        "settings": vars(args), "cuda": torch.cuda.is_available(), "cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
    }
    print(f"{'':<28} {'ours':>12} {'one at a time':>14} {'ratio':>7}")
    print(f"{'sampling completions/s':<28} {result['completions_per_s']:>12.1f} {result['naive_completions_per_s']:>14.1f} "
          f"{result['sampling_ratio']:>6.2f}x")
    print(f"{'  with a teacher-forced pass':<28} {result['teacher_forced_completions_per_s']:>12.1f} {'':>14} "
          f"{result['recorded_vs_teacher_forced_ratio']:>6.2f}x  (log-probs recorded vs re-scored; max |Δ ref_logp| "
          f"{logp_diff:.1e})")
    print(f"{'sampling tokens/s':<28} {result['tokens_per_s']:>12.0f} {result['naive_tokens_per_s']:>14.0f}")
    print(f"{'scoring completions/s':<28} {result['scores_per_s']:>12.1f} {result['naive_scores_per_s']:>14.1f} "
          f"{result['scoring_ratio']:>6.2f}x")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
