"""Where a seed 001 dynamic / contrastive hierarchy puts its LIVE latents: group sizes of the argmax
assignments, all latents vs latents that fired on 16,384 training tokens vs the rest.

Run from the repository root with the benchmark's work folder (weights are not in git):

    .venv/bin/python docs/results/benchmark-studies/seed001-contrastive-collapse/groups.py seed001_contrastive_hier-l0=24 [WORK]

WORK defaults to /work/bench-data (the SAE in WORK/runs/NAME/NAME, the store in WORK/store-train).
Usage entropy (nats) is that of the group sizes; ln 8 = 2.079 and ln 64 = 4.159 are balanced.
"""
import math
import sys

import torch

from saestrata.store.reader import ActivationStore, shuffled_batches
from saestrata.train.sae_io import load_sae

name = sys.argv[1]
work = sys.argv[2] if len(sys.argv) > 2 else "/work/bench-data"
sae, cfg = load_sae(f"{work}/runs/{name}/{name}")
batches = shuffled_batches(ActivationStore(f"{work}/store-train"), "blocks.8.hook_resid_post", 4096, seed=5)


def entropy(ids: torch.Tensor, n: int) -> float:
    """Entropy (nats) of the group sizes of group ids ``[m]`` over ``n`` groups."""
    p = torch.bincount(ids, minlength=n).float()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


with torch.no_grad():
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for _ in range(4):
        fired |= (sae.encode(next(batches).float()) > 0).any(0)
    coarse, fine = (a.argmax(-1) for a in sae.live_assignments())
print(f"{name}: {int(fired.sum())} of {fired.numel()} latents fired on 16,384 tokens")
for label, m in (("all", torch.ones_like(fired)), ("fired", fired), ("not fired", ~fired)):
    c, f = torch.bincount(coarse[m], minlength=8), torch.bincount(fine[m], minlength=64)
    print(f"  {label:9s} coarse sizes {sorted(c.tolist(), reverse=True)}  usage entropy {entropy(coarse[m], 8):.3f} of {math.log(8):.3f}")
    print(f"  {label:9s} fine: {int((f > 0).sum())} of 64 groups used, largest {sorted(f.tolist(), reverse=True)[:6]}"
          f"  usage entropy {entropy(fine[m], 64):.3f} of {math.log(64):.3f}")
