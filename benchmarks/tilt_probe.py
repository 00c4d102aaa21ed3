"""Probe: which training reaches the planned tilt in the exact LM testbed? (issue 24, exploration)

    python benchmarks/tilt_probe.py --mode onpolicy --transform exp --inference bon --k 8 --kl 0.5

A plain torch loop over the testbed's tiny Llama (full fine-tuning), so that estimators can be
compared quickly before the winner goes through ``ctrl-data build``/``train``. Every ``--eval-every``
steps the policy is measured exactly on the held-out prompts (KL, BoN-4, WoN-4) and placed against
the plan's curve (same Φ, K and estimator, β varied): KL efficiency and plan fidelity.

Modes:
* ``offline``  — pointwise regression on the K reference samples (leave-one-out ranks, population log Z);
* ``onpolicy`` — rounds: draw ``--m`` samples per training prompt from the current policy, rank each
  against the prompt's K stored reference rewards (J ~ Bin(K, c)), regress β·ρ onto
  Φ(J/K) − β log Z_pop (the pointwise tilt of K + 1 ranks), ``--steps-per-round`` steps, repeat.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["offline", "onpolicy"], default="onpolicy")
    p.add_argument("--transform", default="exp")
    p.add_argument("--inference", default="bon")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--kl", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--m", type=int, default=8, help="policy samples per prompt per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps-per-round", type=int, default=50)
    p.add_argument("--steps", type=int, default=400, help="offline steps")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-end", type=float, default=None, help="linear decay to this learning rate")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--anchor", type=float, default=0.0, help="weight of an offline (reference-sample) term")
    p.add_argument("--out", type=Path, default=Path("runs/testbed"))
    p.add_argument("--tag", default="")
    p.add_argument("--t", type=float, help="fix exp/negexp's t instead of the planner's best")
    p.add_argument("--prompt-length", type=int, default=3)
    p.add_argument("--train-prompts", type=int, default=384)
    p.add_argument("--exact-u", action="store_true",
                   help="targets from each sample's exact quantile c (π_ref enumerated): the K = ∞ plan, no Bin(K, c) noise")
    p.add_argument("--fresh-tables", action="store_true", help="new K reference samples per prompt every round")
    p.add_argument("--eval-train", action="store_true", help="measure on 16 training prompts instead of held-out")
    args = p.parse_args()

    import pandas as pd
    import transformers

    transformers.logging.set_verbosity_error()
    import testbed as tb
    from ctrl_offline.maths.finite_k import Estimator, population_log_partition
    from ctrl_offline.testbeds.lm_testbed import exact_metrics, response_logprobs, sample_from_model, sequence_logprobs
    from ctrl_offline.maths.planner import plan
    from ctrl_offline.maths.transforms import Rescaled, get_transform, unit_scale

    size = dict(tb.SIZES["full"], prompt_length=args.prompt_length, train_prompts=args.train_prompts)
    out = args.out / ("tie_free" if args.prompt_length == 3 else f"tie_free_p{args.prompt_length}")
    setup = tb.prepare(out, size)
    scored = tb.reference_samples(out, setup, args.k, args.seed)
    frame = pd.read_parquet(scored)
    ref_rewards = np.stack([g["reward"].to_numpy() for _, g in frame.groupby("prompt_id", sort=False)])
    prompts = [g["prompt"].iloc[0] for _, g in frame.groupby("prompt_id", sort=False)]
    assert prompts == setup.train_prompts[:len(prompts)]
    ref_sorted = np.sort(ref_rewards, axis=1)
    if args.eval_train:  # measure where the policy was trained: memorisation vs generalisation
        setup.eval_prompts = prompts[:16]
        setup.ref_logp, _ = response_logprobs(setup.model, setup.tokenizer, setup.language, setup.eval_prompts)
        setup.eval_rewards = setup.reward.table(setup.eval_prompts)

    k_plan = None if args.exact_u else (args.k + 1 if args.mode == "onpolicy" else args.k)
    est = Estimator(loss="pointwise")
    extra = {} if args.t is None else {"t_range": (args.t, args.t * (1 + 1e-9))}
    row = plan(args.inference, 4, args.kl, families=(args.transform,), k=k_plan, loss="pointwise", **extra).rows[0]
    spec = row.transform if row.t is None else f"{row.transform}:{row.t}"
    transform = get_transform(spec)
    scale = unit_scale(transform)
    unit, beta = Rescaled(transform, scale), row.beta / scale
    log_z = float(unit.log_partition(beta)) if args.exact_u else population_log_partition(unit, beta, k_plan)
    log(f"plan {spec} β_unit={beta:.4g} planned KL {row.kl:.3f} win {row.win_rate:.4f} (K_plan={k_plan}) logZ={log_z:.4f}")

    tok = setup.tokenizer
    lang = setup.language
    offset, eos = tok.convert_tokens_to_ids("r0"), tok.eos_token_id
    prompt_ids = torch.tensor([tok(p)["input_ids"] for p in prompts])
    ref_model = setup.model
    model = copy.deepcopy(setup.model)
    model.train()
    torch.manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    plen = prompt_ids.shape[1]

    def to_ids(symbols):  # (P, m, L) → (P·m, plen + L + 1)
        P, m, L = symbols.shape
        return torch.cat([prompt_ids[:, None, :].expand(P, m, plen), torch.from_numpy(symbols) + offset,
                          torch.full((P, m, 1), eos)], dim=2).reshape(P * m, -1)

    def logps(mdl, ids):
        lp = torch.log_softmax(mdl(input_ids=ids[:, :-1], use_cache=False).logits.float(), dim=-1)
        return lp[:, plen - 1:].gather(-1, ids[:, plen:].unsqueeze(-1)).sum(dim=(1, 2))

    def targets_for(symbols, loo_self=False):
        """Φ_unit(rank/K) − β log Z for each sample (rank among the prompt's stored rewards)."""
        P, m, _ = symbols.shape
        r = np.stack([setup.reward(prompts[i], symbols[i]) for i in range(P)])
        if loo_self:
            ranks = (ref_rewards[:, :, None] > ref_rewards[:, None, :]).sum(axis=2)  # among the other K−1
            u = ranks / (args.k - 1)
        elif args.exact_u:  # the exact quantile: the cell midpoint of the response under π_ref
            from ctrl_offline.testbeds.lm_testbed import response_index

            u = np.stack([exact_c[i][response_index(lang, symbols[i])] for i in range(P)])
        else:
            ranks = np.stack([np.searchsorted(ref_sorted[i], r[i]) for i in range(P)])
            u = ranks / args.k
        return unit.phi(u) - beta * log_z, u

    exact_c = None
    if args.exact_u:
        from ctrl_offline.maths.calibration import quantile_cells

        cache = out / f"train_ref_logp_{len(prompts)}.npz"
        if not cache.exists():
            lp_train, _ = response_logprobs(setup.model, tok, lang, prompts)
            np.savez(cache, logp=lp_train)
        lp_train = np.load(cache)["logp"]
        exact_c = [((lo + hi) / 2)[g] for g, lo, hi in quantile_cells(lp_train, setup.reward.table(prompts))]

    history = []

    def evaluate(step):
        lp, valid = response_logprobs(model, tok, lang, setup.eval_prompts)
        m = exact_metrics(lp, setup.ref_logp, setup.eval_rewards, n_values=(4,))
        win = m.bon_win_rate[4] if args.inference == "bon" else m.won_win_rate[4]
        from ctrl_offline.maths.diagnostics import kl_efficiency, plan_fidelity

        curve = dict(kl_spent=m.kl, reached=win, k=k_plan, estimator=None if k_plan is None else est)
        eff = kl_efficiency(spec, args.inference, 4, **curve) if m.kl > 0 else 0.0
        fid = plan_fidelity(spec, args.inference, 4, **curve) if m.kl > 0 else 0.0
        from ctrl_offline.maths.diagnostics import exact_kl_split, tilt_fidelity
        from ctrl_offline.maths.finite_k import ideal_tilt, trained_tilt
        from ctrl_offline.maths.calibration import quantile_cells

        split = exact_kl_split(lp, setup.ref_logp, setup.eval_rewards, bins=50)
        cells = quantile_cells(setup.ref_logp, setup.eval_rewards)
        mids = np.concatenate([((lo + hi) / 2)[g] for g, lo, hi in cells])
        tilt = ideal_tilt(spec, row.beta) if k_plan is None else trained_tilt(spec, row.beta, k_plan, est)
        tf = tilt_fidelity(mids, (lp - setup.ref_logp).ravel(), tilt.log_density, weights=np.exp(setup.ref_logp).ravel())
        rec = dict(step=step, kl=m.kl, bon4=m.bon_win_rate[4], won4=m.won_win_rate[4], win=win, eff=eff, fid=fid,
                   valid=float(valid.mean()), on=split.on_target, off=split.off_target, r2=tf.r_squared)
        history.append(rec)
        log(f"step {step}: KL {m.kl:.3f} (on {split.on_target:.3f} off {split.off_target:.3f}) BoN4 {rec['bon4']:.3f} "
            f"WoN4 {rec['won4']:.3f} eff {eff:.2f} fid {fid:.2f} R2 {tf.r_squared:.2f} valid {rec['valid']:.3f}")
        model.train()

    # The offline data: reference samples with LOO targets.
    ref_symbols = np.stack([np.stack([np.array([int(t[1:]) for t in c.split()]) for c in g["completion"]])
                            for _, g in frame.groupby("prompt_id", sort=False)])
    ref_lp_stored = torch.tensor(np.stack([g["ref_logp"].to_numpy() for _, g in frame.groupby("prompt_id", sort=False)]))
    off_ids = to_ids(ref_symbols)
    off_tgt, _ = targets_for(ref_symbols, loo_self=True)
    off_tgt = torch.tensor(off_tgt.reshape(-1), dtype=torch.float32)
    off_ref = ref_lp_stored.reshape(-1).float()
    if args.mode == "offline":
        # Offline pointwise with the K-plan: targets from LOO ranks (the build's own).
        pass

    rng = np.random.default_rng(args.seed)
    step = 0
    evaluate(0)
    start = time.perf_counter()

    def train_on(ids, ref_lp, tgt, n_steps):
        nonlocal step
        n = len(ids)
        for _ in range(n_steps):
            idx = torch.from_numpy(rng.integers(0, n, args.batch))
            h = logps(model, ids[idx]) - ref_lp[idx]
            loss = ((tgt[idx] - beta * h) ** 2).mean()
            if args.anchor > 0 and args.mode == "onpolicy":
                j = torch.from_numpy(rng.integers(0, len(off_ids), args.batch))
                h0 = logps(model, off_ids[j]) - off_ref[j]
                loss = loss + args.anchor * ((off_tgt[j] - beta * h0) ** 2).mean()
            if args.lr_end is not None:
                total = args.steps if args.mode == "offline" else args.rounds * args.steps_per_round
                for g in opt.param_groups:
                    g["lr"] = args.lr + (args.lr_end - args.lr) * min(step / total, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % args.eval_every == 0:
                evaluate(step)

    if args.mode == "offline":
        train_on(off_ids, off_ref, off_tgt, args.steps)
    else:
        for rnd in range(args.rounds):
            if args.fresh_tables:  # a table the policy cannot memorise: K new reference rewards per prompt
                fresh = sample_from_model(ref_model, tok, lang, prompts, args.k, seed=50_000 + args.seed * 1000 + rnd)
                ref_sorted[:] = np.sort(np.stack([setup.reward(prompts[i], fresh[i]) for i in range(len(prompts))]),
                                        axis=1)
            symbols = sample_from_model(model, tok, lang, prompts, args.m, seed=10_000 + args.seed * 1000 + rnd)
            ids = to_ids(symbols)
            ref_lp = torch.tensor(sequence_logprobs(ref_model, tok, lang, prompts, symbols).reshape(-1)).float()
            tgt, u = targets_for(symbols)
            tgt = torch.tensor(tgt.reshape(-1), dtype=torch.float32)
            log(f"round {rnd}: policy samples' mean rank {u.mean():.3f}, top-rank share {(u == 1).mean():.3f}, "
                f"bottom share {(u == 0).mean():.3f}")
            model.train()
            train_on(ids, ref_lp, tgt, args.steps_per_round)
    res = dict(args={k: str(v) for k, v in vars(args).items()}, plan=dict(spec=spec, beta_unit=beta, kl=row.kl,
               win=row.win_rate, k_plan=k_plan), history=history, seconds=time.perf_counter() - start)
    path = Path("runs/probe") / f"{args.mode}_{args.transform}_{args.inference}_K{args.k}_s{args.seed}{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
