"""Why the retrained dynamic hierarchy's assignments are uniform: Eq. 4's soft blocks of one SAE's latents under several groupings.

Run from the repository root with the benchmark's work folder (weights are not in git):

    .venv/bin/python docs/results/benchmark-studies/seed001-dynamic-uniform/diag.py seed001_dynamic_hier-l0=48 [WORK]

WORK defaults to /work/bench-data (the SAE in WORK/runs/NAME/NAME, the store in WORK/store-train).
"""
import math, torch, sys
from saestrata.train.sae_io import load_sae
from saestrata.store.reader import ActivationStore, shuffled_batches
from saestrata.train.seed001_grouped import latent_gram, _ortho_terms, usage_entropy
torch.manual_seed(0)
name = sys.argv[1]
work = sys.argv[2] if len(sys.argv) > 2 else "/work/bench-data"
sae, cfg = load_sae(f"{work}/runs/{name}/{name}")
store = ActivationStore(f"{work}/store-train")
x = next(shuffled_batches(store, "blocks.8.hook_resid_post", 4096, seed=5)).float()
with torch.no_grad():
    f = sae.encode(x)
    print("L0", float((f > 0).sum(-1).float().mean()))
    gsq = latent_gram(f).pow(2)
    coarse, fine = sae.live_assignments()
    H = lambda a: float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean())
    print("live: per-latent entropy coarse %.4f fine %.4f (max %.4f / %.4f); usage %.4f / %.4f" % (
        H(coarse), H(fine), math.log(8), math.log(64), float(usage_entropy(coarse)), float(usage_entropy(fine))))
    print("tau", float(sae.log_tau.exp()), "|W_key|", float(sae.W_key.norm()), "|q_coarse|", float(sae.q_coarse.norm()),
          "q_coarse spread", float((sae.q_coarse - sae.q_coarse.mean(0)).norm()), "q_fine spread", float((sae.q_fine - sae.q_fine.mean(1, keepdim=True)).norm()))
    d = f.shape[1]
    def onehot(ids, n):
        """One-hot ``[d_sae, n]`` membership of group ids ``[d_sae]``."""
        return torch.nn.functional.one_hot(ids, n).float()
    groupings = {
        "live (trained attention)": (coarse, fine),
        "cached buffers": (sae.assign_coarse, sae.assign_fine),
        "exactly uniform": (torch.full((d, 8), 1 / 8), torch.full((d, 64), 1 / 64)),
        "hard: argmax of live": (onehot(fine.argmax(-1) // 8, 8), onehot(fine.argmax(-1), 64)),
        "hard: static layout (index blocks)": (onehot(torch.arange(d) * 8 // d, 8), onehot(torch.arange(d) * 64 // d, 64)),
    }
    perm = torch.randperm(d)
    groupings["hard: random balanced"] = (onehot(perm * 8 // d, 8), onehot(perm * 64 // d, 64))
    for k, (c, fi) in groupings.items():
        o1, o2 = _ortho_terms(gsq, c, fi, 8)
        print(f"{k:38s} ortho_level1 {float(o1):9.4f}  ortho_level2 {float(o2):9.4f}  weighted 0.4*o1+0.2*o2 {float(0.4*o1+0.2*o2):9.4f}")
