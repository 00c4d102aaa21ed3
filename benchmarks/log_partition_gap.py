"""Empirical (K reference samples) minus continuous-limit log Z, per transform, β and K.

    python benchmarks/log_partition_gap.py
"""
from ctrl_offline.maths.finite_k import log_partition_gap
from ctrl_offline.maths.planner import plan
from ctrl_offline.maths.transforms import get_transform
cases=[("identity",None,[0.1,0.243,1.0]),("exp",2.0,[1.0,5.0]),("exp",5.0,[10.0,100.0]),("exp",10.0,[1e3,1e4]),("negexp",5.0,[0.05,0.5])]
b=plan("bon",4,0.5); w=plan("won",4,0.5)
for r in b.rows+w.rows: cases.append((r.transform, r.t, [r.beta]))
print("| transform | t | β | K=4 | K=8 | K=16 | K=64 |"); print("|---|---|---|---:|---:|---:|---:|")
seen=set()
for name,t,betas in cases:
  for beta in betas:
    key=(name, None if t is None else round(t,3), round(beta,6))
    if key in seen: continue
    seen.add(key)
    tr=get_transform(name,t)
    g=[log_partition_gap(tr,beta,k) for k in (4,8,16,64)]
    print(f"| {name} | {'-' if t is None else f'{t:.3g}'} | {beta:.4g} | "+" | ".join(f"{x:+.3f}" for x in g)+" |")
