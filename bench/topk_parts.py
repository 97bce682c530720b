"""The compiled parts of a TopK training step, each timed alone against its torch counterpart (issue 14).

Shapes of issue 14's step: batch 1024, d_in 640, d_sae 4096, k 32. Inputs are synthetic (Gaussian
encoder matmul output in bf16, a small bias, unit-norm decoder rows), so the candidate count per row
is that of i.i.d. columns; ``bench/topk_profile.py`` times the whole step on real activations.
Each line is the median of ``--reps`` calls of each side, alternating single calls after a warm-up, in ms:

* ``torch topk`` vs ``rowwise_topk`` (train/native.py) on the fp32 pre-activations;
* the fused forward (top-k of ``mm + b_enc`` straight from the bf16 matmul output, then the decode),
  beside its stock-op equivalent (bias add, torch ``topk``, ``embedding_bag`` decode);
* the fused backward (pair gradients, the three weight gradients, ``W_enc db_enc``) beside its
  stock-op equivalent (``sampled_addmm``, two ``embedding_bag`` weight sums over the latent-major
  order, ``index_add_``, ``addmv``).

    .venv/bin/python bench/topk_parts.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

from _common import machine, median_ms
from saestrata.allocator import tune_allocator


def main() -> None:
    """Print each part's time, compiled vs stock torch ops, and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    print(machine(), flush=True)
    tune_allocator()  # as the CLI does
    import torch
    import torch.nn.functional as F

    from saestrata.train.native import load_native

    if args.threads:
        torch.set_num_threads(args.threads)
    mod = load_native()
    if mod is None:
        raise SystemExit("the compiled kernels did not build here (g++ and ninja are needed)")
    B, L, D, k = 1024, 4096, 640, 32
    gen = torch.Generator().manual_seed(0)
    mm = (torch.randn(B, L, generator=gen) * 2).bfloat16()
    b_enc = torch.randn(L, generator=gen) * 0.1
    W_dec = F.normalize(torch.randn(L, D, generator=gen), dim=1)
    W_encT = W_dec.clone()
    b_dec = torch.randn(D, generator=gen)
    x = torch.randn(B, D, generator=gen) * 2
    g = torch.randn(B, D, generator=gen)
    pre = mm.float() + b_enc
    idx, val, _, e, _, de = mod.topk_fused_forward(mm, b_enc, k, W_dec, b_dec, x)

    def stock_forward():
        """Stock ops for the fused forward: bias add, torch ``topk``, ``embedding_bag`` decode, the error and its
        squared norm per row (the fused forward also forms ``<e, W_dec[c]>`` per pair, which the stock
        backward below computes instead: compare the sum of the two rows)."""
        p = mm + b_enc
        v, i = p.topk(k, dim=-1)
        err = F.embedding_bag(i, W_dec, mode="sum", per_sample_weights=v.clamp_min(0)) + b_dec - x
        return err, err.pow(2).sum(-1)

    rows = torch.arange(B).repeat_interleave(k)
    cols = idx.flatten()
    vals = val.flatten().clamp_min(0)
    crow = torch.arange(0, B * k + 1, k)

    def stock_backward():
        """Stock ops for the fused backward (train/kernels.py's way): ``sampled_addmm`` pair gradients, a stable
        argsort by latent, two ``embedding_bag`` weight sums, ``index_add_`` and ``addmv``; fp32 tensors."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparse CSR is "beta"
            mask = torch.sparse_csr_tensor(crow, cols, g.new_zeros(B * k), (B, L), check_invariants=False)
            dv = torch.sparse.sampled_addmm(mask, g, W_dec.t()).values() * (vals > 0)
        perm = torch.argsort(cols, stable=True)
        offsets = torch.zeros(L + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(cols, minlength=L).cumsum(0)
        d_dec = F.embedding_bag(rows[perm], g, offsets[:-1], mode="sum", per_sample_weights=vals[perm])
        d_enc = F.embedding_bag(rows[perm], x - b_dec, offsets[:-1], mode="sum", per_sample_weights=dv[perm])
        db = torch.zeros(L).index_add_(0, cols, dv)
        return d_dec, d_enc, db, W_encT.t() @ db

    parts = [
        ("top-k of fp32 pre [1024, 4096], k 32", lambda: pre.topk(k, dim=-1, sorted=False),
         lambda: mod.rowwise_topk(pre, k)),
        ("forward: bias + top-k + decode", stock_forward,
         lambda: mod.topk_fused_forward(mm, b_enc, k, W_dec, b_dec, x)),
        ("backward: pair + weight gradients", stock_backward,
         lambda: mod.topk_fused_backward(e, 2.0 / B, idx, val, de, x, b_dec, W_encT)),
    ]
    print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; B {B}, d_sae {L}, d_in {D}, k {k}; "
          f"median of {args.reps} calls")
    for name, stock, ours in parts:
        # alternate single calls: this VM's speed drifts within seconds, and both sides see the same drift
        pairs = [(median_ms(stock, 1, 1 if r == 0 else 0), median_ms(ours, 1, 1 if r == 0 else 0))
                 for r in range(args.reps)]
        t_stock = statistics.median(p[0] for p in pairs)
        t_ours = statistics.median(p[1] for p in pairs)
        print(f"  {name:40s} torch ops {t_stock:6.2f} ms   compiled {t_ours:6.2f} ms   {t_stock / t_ours:5.2f}x")


if __name__ == "__main__":
    main()
