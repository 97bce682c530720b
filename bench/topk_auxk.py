"""A TopK training step once latents die: the AuxK term's cost, against one encoder matmul.

``bench/topk_profile.py`` times steps before any latent has been dead for a window, when
AuxK (Gao et al. 2024, app. A.2) does nothing. In real runs latents die within the first
fifth of the budget (the benchmark's TopK-family SAEs: from step 150-175 of 1,024, 385-733 of
2,048 dead at the end), so most steps pay for AuxK. This script trains one ``topk`` SAE (sparse
kernels) on the store's shuffled stream, as ``saestrata train`` feeds it, with the dead window of a
1M-token run (a tenth of the budget, ``trainer.dead_window``; ``--arch batchtopk`` / ``matryoshka`` for
the other two), and prints the median step over
steps with no dead latent and over the last ``--timed`` steps (dead latents present), with the
AuxK counters and the bf16 encoder matmul timed in the same run.

    .venv/bin/python bench/topk_auxk.py --store /work/bench-data/store-train --layer 8 [--arch batchtopk] [--profile 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import machine, median_ms
from saestrata.allocator import tune_allocator
from topk_profile import _slot


def main() -> None:
    """Print the step time before and after latents die, and the AuxK counters."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--arch", choices=("topk", "batchtopk", "matryoshka"), default="topk",
                    help="the TopK-family SAE to train (all three carry AuxK)")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=720, help="steps in all (latents die after ~500 at d_sae 4096)")
    ap.add_argument("--timed", type=int, default=100, help="last steps timed with dead latents present")
    ap.add_argument("--dead-window", type=int, default=1_048_576 // 10, help="tokens (trainer.dead_window of 1M)")
    ap.add_argument("--profile", type=int, default=0,
                    help="then profile this many more steps (torch.profiler) and print the top ops by self CPU time")
    args = ap.parse_args()
    print(machine(), flush=True)
    tune_allocator()
    import torch

    from saestrata.store import ActivationStore
    from saestrata.store.reader import shuffled_batches

    store = ActivationStore(args.store)
    hook = f"blocks.{args.layer}.hook_resid_post"
    scale = store.d_model ** 0.5 / store.stats(hook)["mean_norm"]  # the trainer's scaling
    stream = (b.float() * scale for b in shuffled_batches(store, hook, args.batch_size, seed=0))
    slot = _slot(args.arch, store.d_model, args.d_sae, args.k, next(stream))
    sae = slot.sae
    sae.dead_window_tokens = args.dead_window
    alive, dead = [], []
    for step in range(args.steps):
        x = next(stream)
        t0 = time.perf_counter()
        slot.step(x, step, True)
        dt = 1e3 * (time.perf_counter() - t0)
        if step >= args.steps - args.timed:
            dead.append(dt)
        elif step >= 20 and sae.counters()["auxk_dead"] == 0:  # after the warm-up, before any latent died
            alive.append(dt)
    counters = sae.counters()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        xs = [next(stream) for _ in range(args.profile)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i, xp in enumerate(xs):
                slot.step(xp, args.steps + i, True)
        print(f"profile of {args.profile} steps with {sae.counters()['auxk_dead']} dead latents:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    x16, w16 = x.bfloat16(), sae.W_enc.detach().bfloat16()
    mm_ms = min(median_ms(lambda: x16 @ w16, 5) for _ in range(4))
    print(f"{torch.get_num_threads()} thread(s); {args.arch} d_in {store.d_model}, d_sae {args.d_sae}, k {args.k}, batch "
          f"{args.batch_size}, dead window {args.dead_window} tokens; torch {torch.__version__}")
    print(f"bf16 encoder matmul {mm_ms:.1f} ms (same run)")
    if alive:
        print(f"step, no dead latent: median {statistics.median(alive):.1f} ms over {len(alive)} steps "
              f"= {statistics.median(alive) / mm_ms:.2f}x matmul")
    if counters["auxk_dead"] == 0:
        print("no latent died: raise --steps")
        return
    print(f"step, last {len(dead)} steps (AuxK acting): median {statistics.median(dead):.1f} ms "
          f"= {statistics.median(dead) / mm_ms:.2f}x matmul; at the end auxk_dead {counters['auxk_dead']}, "
          f"auxk_pairs {counters.get('auxk_pairs', 'n/a')} of {args.batch_size * counters['auxk_dead']} "
          f"(token, dead latent) pairs")


if __name__ == "__main__":
    main()
