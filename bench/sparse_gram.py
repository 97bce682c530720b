"""Seed 000 / 001 training steps with the code's Gram from its non-zeros vs the dense ``f^T f`` (issue 14).

Seed 001's orthogonality (Eq. 4) and seed 000's disentanglement (eq. 4) need ``f^T f`` of each batch's code;
``train/sparse_gram.py`` forms it (and its backward) from the code's non-zeros with the compiled kernels. This
script trains one ``--arch`` SAE with the trainer's own step and L0 controller on a store's batches, untimed for
``--warm-steps``, then times ``--steps`` steps per round with the kernel and with the dense matmul (the module's
``load_native`` hidden) alternately on the same SAE, ``--rounds`` times, fresh batches throughout, and prints the
medians, their ratio, and how many timed steps the counter ``sparse_gram`` says took the kernel (fp32).

    .venv/bin/python bench/sparse_gram.py --store /work/bench-data/store-train --layer 8 --arch seed001_static_hier
    .venv/bin/python bench/sparse_gram.py --breakeven   # the Gram alone, dense vs kernel, over d_sae and L0
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import machine
from relu_sparse import _timed_steps, warmed_slot
from saestrata.allocator import tune_allocator

ARCHS = ("seed001_fixed_ortho", "seed001_adaptive_ortho32", "seed001_adaptive_ortho64", "seed001_static_hier",
         "seed001_dynamic_hier", "seed001_contrastive_hier", "seed000_hsae", "seed000_hsae_no_separation")


def breakeven(batch: int = 1024) -> None:
    """Print the Gram's forward + backward time, dense matmul vs kernel (no fallback), over d_sae and code density:
    where ``train/sparse_gram.py``'s ``RATIO`` comes from."""
    import torch

    from _common import median_ms
    from saestrata.train.native import load_native
    from saestrata.train.sparse_gram import _CodeGram

    mod = load_native()
    for d in (128, 256, 512, 1024, 2048):
        for frac in (0.01, 0.05, 0.15, 0.3):
            q = float(torch.randn(100_000, generator=torch.Generator().manual_seed(0)).quantile(1 - frac))
            pre = (torch.randn(batch, d) - q).requires_grad_(True)
            w = torch.randn(d, d)

            def dense():
                """Forward + backward of ``sum(G * w)`` with ``G = f^T f`` by the dense matmul."""
                f = torch.relu(pre)
                ((f.T @ f) * w).sum().backward()

            def kernel():
                """The same with ``G`` from the code's non-zeros (the compiled kernels, no fallback)."""
                f = torch.relu(pre)
                (_CodeGram.apply(f, *mod.code_gram(f.detach(), 1 << 62)) * w).sum().backward()

            pairs = int((pre > 0).sum(1).pow(2).sum())
            a, b = median_ms(dense, 5, 1), median_ms(kernel, 5, 1)
            print(f"d_sae {d:5d}, {frac:.0%} active: {pairs:10,d} products, B d^2 / products {batch * d * d / pairs:7.1f}; "
                  f"dense {a:7.2f} ms, kernel {b:7.2f} ms -> {a / b:5.2f}x", flush=True)


def main() -> None:
    """Print each round's kernel and dense medians, their ratio and the counter's share of kernel steps."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="activation store (needed unless --breakeven)")
    ap.add_argument("--arch", choices=ARCHS, default="seed001_static_hier")
    ap.add_argument("--layer", type=int, help="its layer (needed unless --breakeven)")
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--target-l0", type=float, default=32.0)
    ap.add_argument("--run-steps", type=int, default=1024, help="the schedule's length (lr, L1 warm-up, controller)")
    ap.add_argument("--warm-steps", type=int, default=150, help="untimed steps first (L0 falls towards the target)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--breakeven", action="store_true", help="only the Gram alone, dense vs kernel, over d_sae and L0")
    args = ap.parse_args()
    print(machine(), flush=True)
    if args.breakeven:
        breakeven(args.batch_size)
        return
    if args.store is None or args.layer is None:
        ap.error("--store and --layer are needed (or --breakeven)")
    tune_allocator()  # as the CLI does
    import torch

    import saestrata.train.sparse_gram as sparse_gram

    n = args.batch_size
    batches, slot, metrics = warmed_slot(args, args.warm_steps + 2 * args.rounds * args.steps, False)
    sae = slot.sae
    print(f"{torch.get_num_threads()} thread(s); {args.arch} SAE d_in {batches[0].shape[1]}, d_sae {args.d_sae}, batch {n}, "
          f"fp32; torch {torch.__version__}")
    print(f"after {args.warm_steps} untimed steps: L0 {metrics['l0']:.1f}, Grams from the non-zeros so far "
          f"{sae.counters().get('sparse_gram', 0):g}")
    native = sparse_gram.load_native
    at = args.warm_steps
    res: dict[str, list[float]] = {"dense": [], "kernel": []}
    for r in range(args.rounds):
        for arm in ("dense", "kernel"):
            sparse_gram.load_native = native if arm == "kernel" else (lambda: None)
            before = sae.counters().get("sparse_gram", 0)
            ms, l0 = _timed_steps(slot, batches, at, args.steps, False)
            at += args.steps
            res[arm].append(ms)
            print(f"  round {r + 1} {arm:6s}: {ms:6.1f} ms/step (L0 {l0:5.1f}, {sae.counters().get('sparse_gram', 0) - before:g} "
                  f"Grams from the non-zeros in {args.steps} steps)")
    sparse_gram.load_native = native
    dense, kernel = statistics.median(res["dense"]), statistics.median(res["kernel"])
    print(f"median step: dense Gram {dense:.1f} ms, from the non-zeros {kernel:.1f} ms -> {dense / kernel:.2f}x")


if __name__ == "__main__":
    main()
