"""Trainer throughput and peak memory: CTRLTrainer against TRL's stock DPOTrainer, side by side.

    python benchmarks/bench_trainer.py            # CPU here; uses the GPU when there is one
    python benchmarks/bench_trainer.py --json     # last line: one JSON object

Same small random Llama (built from a config and saved once, so both load the same folder), same
LoRA adapter, same synthetic pairs, batch size, steps and max length. TRL's DPOTrainer runs as a
user runs it by default: its reference forward pass (the base with the adapter disabled) happens
at every step and is counted in its time. CTRLTrainer reads the stored reference log-probs that
the pipeline records at sampling time, so it never runs the reference; computing those values
here (once, before timing) stands in for the sampling stage and is not counted. Each trainer runs
in its own process so its peak memory (resident set; CUDA peak allocation on GPUs) is its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = 3000


def build_assets(folder: Path, hidden: int, layers: int, pairs: int, seed: int) -> None:
    import numpy as np
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(WORDS)]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=int(2.6875 * hidden),
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = np.random.default_rng(seed)
    text = lambda n: " ".join(rng.choice(words, size=n))  # noqa: E731
    rows = {"prompt": [text(32) for _ in range(pairs)], "chosen": [" " + text(64) for _ in range(pairs)],
            "rejected": [" " + text(64) for _ in range(pairs)], "target_margin": rng.uniform(0, 2, pairs).tolist()}
    # Reference log-probs as the sampling stage records them: Σ log π_ref(completion + EOS | prompt).
    model = LlamaForCausalLM.from_pretrained(folder / "model").eval()
    for side in ("chosen", "rejected"):
        values = []
        for prompt, completion in zip(rows["prompt"], rows[side]):
            p = tokenizer(prompt)["input_ids"]
            ids = torch.tensor([tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            values.append(logp[len(p) - 1:].gather(1, ids[0, len(p):, None]).sum().item())
        rows[f"ref_{side}_logps"] = values
    Dataset.from_dict(rows).save_to_disk(str(folder / "pairs"))


def worker(which: str, folder: Path, args) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from ctrl_offline.config import CTRLConfig
    from ctrl_offline.modeling import ModelLoadingConfig, load_policy
    from ctrl_offline.trainer import CTRLTrainer

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    pairs = load_from_disk(str(folder / "pairs"))
    model, lora = load_policy(ModelLoadingConfig(str(folder / "model"), load_in_4bit=False,
                                                 gradient_checkpointing=False))
    common = dict(output_dir=str(folder / f"out-{which}"), per_device_train_batch_size=args.batch_size,
                  max_steps=args.steps, learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=10**6,
                  gradient_checkpointing=False, bf16=bf16, use_cpu=not cuda, max_length=512, seed=0)
    if which == "trl":
        data = pairs.select_columns(["prompt", "chosen", "rejected"])
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=data,
                             processing_class=tokenizer, peft_config=lora)
    else:
        trainer = CTRLTrainer(model, CTRLConfig(beta=0.1, ctrl_loss="dpo", **common), pairs,
                              processing_class=tokenizer, peft_config=lora)
    ds = trainer.train_dataset
    per_pair = [2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    tokens = sum(per_pair) / len(per_pair) * args.batch_size * args.steps
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    result = {"trainer": which, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), args)))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_assets(folder, args.hidden, args.layers, args.pairs, args.seed)
        results = {}
        for which in ("trl", "ours"):
            cmd = [sys.executable, __file__, "--worker", which, "--folder", tmp, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{which} worker failed:\n{out.stderr[-3000:]}")
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, trl = results["ours"], results["trl"]
    memory_key = "peak_cuda_mb" if "peak_cuda_mb" in ours else "peak_rss_mb"
    ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    print(f"{'trainer':<22} {'train s':>8} {'tokens/s':>10} {'peak MB':>9}")
    print(f"{'TRL DPOTrainer':<22} {trl['seconds']:>8.2f} {trl['tokens_per_s']:>10.0f} {trl[memory_key]:>9.0f}")
    print(f"{'CTRLTrainer (stored)':<22} {ours['seconds']:>8.2f} {ours['tokens_per_s']:>10.0f} {ours[memory_key]:>9.0f}")
    print(f"ratio (tokens/s, ours / TRL): {ratio:.2f}x   memory (ours / TRL): {ours[memory_key] / trl[memory_key]:.2f}x")
    if args.json:
        import torch
        import trl as trl_pkg

        print(json.dumps({
            "tokens_per_s": ours["tokens_per_s"], "trl_tokens_per_s": trl["tokens_per_s"], "ratio": ratio,
            "peak_mem_mb": ours[memory_key], "trl_peak_mem_mb": trl[memory_key], "memory_measure": memory_key,
            "settings": {k: getattr(args, k) for k in ("hidden", "layers", "pairs", "batch_size", "steps", "seed")},
            "machine": {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "torch": torch.__version__,
                        "trl": trl_pkg.__version__},
            "date": datetime.date.today().isoformat(),
        }))


if __name__ == "__main__":
    main()
