"""L0/FVU on the eval store of: A at step 820 (before the decay), A/B/C finals, and hybrids of A820 and A-final."""
import json, sys
from pathlib import Path
import torch
from saestrata.store import ActivationStore
from saestrata.train.registry import build
from saestrata.train.sae_io import load_sae

OUT = Path("/work/exp/l0drift")  # run dir on the machine that trained them (weights not committed)
ev = ActivationStore("/work/bench-data/store-eval")
hook = "blocks.8.hook_resid_post"
x = ev.activations(hook, 0, 16384).float()
keep = torch.cat([torch.as_tensor(ev.not_bos(i, i + 8192)) for i in (0, 8192)])
x = x[keep]

def stats(sae, label):
    """Print L0, FVU and mean active value of ``sae`` on the eval tokens ``x``; return its latents ``[N, d_sae]``."""
    with torch.no_grad():
        f = sae.encode(x); xh = sae.decode(f)
        l0 = (f > 0).float().sum(-1).mean().item()
        fvu = ((x - xh).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()).item()
    print(f"{label:42s} L0 {l0:6.2f}  FVU {fvu:.4f}  mean act|fired {f[f>0].mean().item():.3f}")
    return f

final, meta = load_sae(OUT / "A" / "standard-l0=40")
scale = meta.get("input_scale") or json.load(open(OUT / "A" / "standard-l0=40" / "cfg.json"))["saestrata"]["input_scale"]
ck = torch.load(OUT / "A_step820.pt", weights_only=False)["slots"]["standard-l0=40"]["sae"]
early = build("standard", 640, 2048)
early.load_state_dict(ck); early.eval()
with torch.no_grad():
    early.fold_input_scale(scale)
p0 = stats(early, "A step 820 (lr decay starts)")
p1 = stats(final, "A final (decay, controller on)")
for name in ["B", "C"]:
    d = OUT / name / "standard-l0=40"
    if (d / "cfg.json").exists():
        stats(load_sae(d)[0], {"B": "B final (no decay)", "C": "C final (decay, controller frozen at 820)"}[name])
# hybrids: which parameters carry the L0 change
for swap in [("b_enc",), ("W_enc",), ("W_enc", "b_enc"), ("b_dec",), ("W_dec",)]:
    h = build("standard", 640, 2048); h.load_state_dict(early.state_dict()); h.eval()
    with torch.no_grad():
        for k in swap:
            getattr(h, k).copy_(getattr(final, k))
    stats(h, f"A820 with final {'+'.join(swap)}")
with torch.no_grad():
    d_b = (final.b_enc - early.b_enc); nE0 = early.W_enc.norm(dim=0); nE1 = final.W_enc.norm(dim=0)
    cos = torch.nn.functional.cosine_similarity(early.W_enc, final.W_enc, dim=0)
    cosd = torch.nn.functional.cosine_similarity(early.W_dec, final.W_dec, dim=1)
    print(f"b_enc change: mean {d_b.mean():.4f} median {d_b.median():.4f}; |W_enc col| ratio median {(nE1/nE0).median():.4f}; "
          f"enc col cos median {cos.median():.4f}; dec row cos median {cosd.median():.4f}")
    fired0 = (p0 > 0).float().mean(0); fired1 = (p1 > 0).float().mean(0)
    print(f'b_dec change norm {(final.b_dec-early.b_dec).norm():.3f} vs |b_dec| {early.b_dec.norm():.3f}, mean |x| {x.norm(dim=-1).mean():.1f}')
    dl = fired1 - fired0  # per-latent firing probability; sums to the L0 change
    print(f"per-latent firing-rate change: latents up {int((fired1>fired0).sum())}, down {int((fired1<fired0).sum())}; "
          f"sum of rises {dl.clamp(min=0).sum():.1f}, of falls {dl.clamp(max=0).sum():.1f} (L0 units)")
# effective bias c = b_enc - b_dec @ W_enc (pre = x @ W_enc + c): separate "directions" from "thresholds"
def hyb(W, c, label):
    """Print the L0 of ``x @ W + c`` (encoder ``W`` ``[d_in, d_sae]``, effective bias ``c`` ``[d_sae]``)."""
    with torch.no_grad():
        pre = x @ W + c
        print(f"{label:42s} L0 {(pre > 0).float().sum(-1).mean().item():6.2f}")
with torch.no_grad():
    c0 = early.b_enc - early.b_dec @ early.W_enc; c1 = final.b_enc - final.b_dec @ final.W_enc
hyb(early.W_enc, c1, "A820 W_enc, final effective bias")
hyb(final.W_enc, c0, "final W_enc, A820 effective bias")
print(f"effective bias change: mean {(c1-c0).mean():.4f}, median {(c1-c0).median():.4f}")
with torch.no_grad():
    s0 = x @ early.W_enc; s1 = x @ final.W_enc
    print(f"std over tokens of x@W_enc per latent, median: A820 {s0.std(0).median():.4f}, final {s1.std(0).median():.4f}")
    m0 = (s0 + c0); m1 = (s1 + c1)
    print(f"margin (c / std) median: A820 {(c0 / s0.std(0)).median():.3f}, final {(c1 / s1.std(0)).median():.3f}")
