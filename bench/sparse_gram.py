"""Seed 000 / 001 training steps with the code's Gram from its non-zeros vs the dense ``f^T f`` (issue 14).

Seed 001's orthogonality (Eq. 4) and seed 000's disentanglement (eq. 4) need ``f^T f`` of each batch's code;
``train/sparse_gram.py`` forms it (and its backward) from the code's non-zeros with the compiled kernels. This
script trains one ``--arch`` SAE with the trainer's own step and L0 controller on a store's batches, untimed for
``--warm-steps``, then times ``--steps`` steps per round with the kernel and with the dense matmul (the module's
``load_native`` hidden) alternately on the same SAE, ``--rounds`` times, fresh batches throughout, and prints the
medians, their ratio, and how many timed steps the counter ``sparse_gram`` says took the kernel (fp32).

    .venv/bin/python bench/sparse_gram.py --store /work/bench-data/store-train --layer 8 --arch seed001_static_hier
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import machine
from relu_sparse import _slot, _timed_steps
from saestrata.allocator import tune_allocator

ARCHS = ("seed001_fixed_ortho", "seed001_adaptive_ortho32", "seed001_adaptive_ortho64", "seed001_static_hier",
         "seed001_dynamic_hier", "seed001_contrastive_hier", "seed000_hsae", "seed000_hsae_no_separation")


def main() -> None:
    """Print each round's kernel and dense medians, their ratio and the counter's share of kernel steps."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--arch", choices=ARCHS, default="seed001_static_hier")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--target-l0", type=float, default=32.0)
    ap.add_argument("--run-steps", type=int, default=1024, help="the schedule's length (lr, L1 warm-up, controller)")
    ap.add_argument("--warm-steps", type=int, default=150, help="untimed steps first (L0 falls towards the target)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(machine(), flush=True)
    tune_allocator()  # as the CLI does
    import torch

    import saestrata.train.sparse_gram as sparse_gram
    from saestrata.store import ActivationStore

    store = ActivationStore(args.store)
    hook = f"blocks.{args.layer}.hook_resid_post"
    n, need = args.batch_size, args.warm_steps + 2 * args.rounds * args.steps
    acts = store.activations(hook, 0, need * n)
    if acts.shape[0] < need * n:
        raise SystemExit(f"the store holds {acts.shape[0]} tokens; {need * n} are needed (fewer --steps / --rounds)")
    scale = acts.shape[1] ** 0.5 / store.stats(hook)["mean_norm"]  # the trainer's scaling (mean norm sqrt(d_in))
    batches = [acts[i * n:(i + 1) * n].float() * scale for i in range(need)]
    slot = _slot(args.arch, acts.shape[1], args.d_sae, args.target_l0, args.run_steps, batches[0])
    sae = slot.sae
    for i in range(args.warm_steps):
        metrics = slot.step(batches[i], i, False)
    print(f"{torch.get_num_threads()} thread(s); {args.arch} SAE d_in {acts.shape[1]}, d_sae {args.d_sae}, batch {n}, "
          f"fp32; torch {torch.__version__}")
    print(f"after {args.warm_steps} untimed steps: L0 {metrics['l0']:.1f}, Grams from the non-zeros so far "
          f"{sae.counters()['sparse_gram']:g}")
    native = sparse_gram.load_native
    at = args.warm_steps
    res: dict[str, list[float]] = {"dense": [], "kernel": []}
    for r in range(args.rounds):
        for arm in ("dense", "kernel"):
            sparse_gram.load_native = native if arm == "kernel" else (lambda: None)
            before = sae.counters()["sparse_gram"]
            ms, l0 = _timed_steps(slot, batches, at, args.steps, False)
            at += args.steps
            res[arm].append(ms)
            print(f"  round {r + 1} {arm:6s}: {ms:6.1f} ms/step (L0 {l0:5.1f}, {sae.counters()['sparse_gram'] - before:g} "
                  f"Grams from the non-zeros in {args.steps} steps)")
    sparse_gram.load_native = native
    dense, kernel = statistics.median(res["dense"]), statistics.median(res["kernel"])
    print(f"median step: dense Gram {dense:.1f} ms, from the non-zeros {kernel:.1f} ms -> {dense / kernel:.2f}x")


if __name__ == "__main__":
    main()
