"""The ReLU-type SAEs' training step (standard, jumprelu, seeds 000-004), dense vs on their active pairs (issue 14).

A ReLU SAE trained to L0 ~30 of thousands of latents spends four of the dense step's five
``[batch, d_in] x [d_in, d_sae]``-sized matmuls on zeros. ``train/standard.py`` runs such steps on the
pairs with ``pre > 0`` (the TopK family's fused op, :func:`saestrata.train.fused.fused_pairs_l1`), and
``train/jumprelu.py`` on the pairs above its thresholds plus its straight-through window. This
script trains one ``--arch`` SAE with the trainer's own step and L0 controller (``--target-l0``) on a
store's batches, untimed for ``--warm-steps`` (the L1 warms up, L0 falls from ~d_sae / 2), then times
``--steps`` steps per round with ``kernels="dense"`` and ``"sparse"`` alternately on the same SAE,
``--rounds`` times, fresh batches throughout (no batch is seen twice), and prints the medians and
their ratio beside the encoder matmul alone in the same run (fp32 unless ``--autocast``: the
benchmark trains in fp32, the CLI in bf16).

``--crossover`` also times one arm against the other on a fresh SAE whose ``b_enc`` is shifted to
reach a list of L0s, with the density cap lifted: where the pairs step stops paying
(``relu_pairs.SPARSE_MAX_DENSITY``).

    .venv/bin/python bench/relu_sparse.py --store /work/bench-data/store-train --layer 8 [--d-sae 2048]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine, median_ms
from saestrata.allocator import tune_allocator


ARCHS = ("standard", "jumprelu", "seed004-groups", "seed000_adaptive",
         # the pairs step with penalties on the dense code (relu_pairs.DenseCodePairsMixin)
         "seed001_fixed_ortho", "seed001_adaptive_ortho32", "seed001_adaptive_ortho64", "seed001_static_hier",
         "seed001_dynamic_hier", "seed001_contrastive_hier", "seed002-contrastive", "seed002-selection",
         "seed002-pruning", "seed002-hierarchical",
         # dense encoders, the sparse codes' products from their non-zeros (kernels.code_nonzeros)
         "seed003-tiered", "seed000_hsae", "seed000_hsae_no_separation")


def _slot(arch: str, d_in: int, d_sae: int, target_l0: float, steps: int, first):
    """A trainer slot with one ``arch`` SAE (the trainer's step, optimiser, clip and L0 controller)."""
    from saestrata.train.registry import build
    from saestrata.train.trainer import SAESpec, TrainConfig, _Slot

    spec = SAESpec(arch, arch, {}, target_l0=target_l0)
    cfg = TrainConfig(store=Path("."), layer=0, out=Path(tempfile.mkdtemp()), specs=[spec], d_sae=d_sae)
    sae = build(arch, d_in, d_sae, **({"target_l0": target_l0} if arch == "jumprelu" else {}))
    slot = _Slot(spec, sae, cfg, steps=steps)
    sae.init_from_batch(first)
    return slot


def warmed_slot(args, need: int, autocast: bool):
    """``(batches, slot, metrics)``: ``need`` fp32 batches of ``args.batch_size`` tokens from ``args.store``'s layer
    ``args.layer`` (scaled as the trainer scales them), a :func:`_slot` of ``args.arch`` and the metrics of its last
    of ``args.warm_steps`` untimed steps. Exits with a message when the store is too small."""
    from saestrata.store import ActivationStore

    store = ActivationStore(args.store)
    hook = f"blocks.{args.layer}.hook_resid_post"
    n = args.batch_size
    acts = store.activations(hook, 0, need * n)
    if acts.shape[0] < need * n:
        raise SystemExit(f"the store holds {acts.shape[0]} tokens; {need * n} are needed (fewer --steps / --rounds)")
    scale = acts.shape[1] ** 0.5 / store.stats(hook)["mean_norm"]  # the trainer's scaling (mean norm sqrt(d_in))
    batches = [acts[i * n:(i + 1) * n].float() * scale for i in range(need)]
    slot = _slot(args.arch, acts.shape[1], args.d_sae, args.target_l0, args.run_steps, batches[0])
    metrics = {}
    for i in range(args.warm_steps):
        metrics = slot.step(batches[i], i, autocast)
    return batches, slot, metrics


def _timed_steps(slot, batches, start: int, n: int, autocast: bool) -> tuple[float, float]:
    """Median step ms of ``n`` trainer steps on ``batches[start:start + n]`` and the steps' mean L0."""
    times, l0 = [], []
    for i in range(start, start + n):
        t0 = time.perf_counter()
        metrics = slot.step(batches[i], i, autocast)
        times.append(time.perf_counter() - t0)
        l0.append(metrics["l0"])
    return 1e3 * statistics.median(times), statistics.mean(l0)


def _crossover(arch: str, d_in: int, d_sae: int, batch, l0s: list[int], autocast: bool) -> None:
    """One step of each arm on a fresh SAE per L0 (``b_enc`` shifted by the mean row-wise quantile), cap lifted."""
    import torch

    from saestrata.train import relu_pairs
    from saestrata.train.registry import build

    relu_pairs.SPARSE_MAX_DENSITY = 1.0
    print("\ncrossover (fresh SAE, b_enc shifted, density cap lifted; median of 5 steps, forward + backward):")
    for l0 in l0s:
        row, measured = [], 0.0
        for kernels in ("dense", "sparse"):
            sae = build(arch, d_in, d_sae, kernels=kernels).train()
            sae.init_from_batch(batch)
            with torch.no_grad():
                sae.b_enc -= sae.pre_acts(batch).float().quantile(1 - l0 / d_sae, dim=1).mean()

            def step() -> float:
                """One forward + backward of ``sae`` on ``batch``; returns its L0 (latents per token)."""
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = sae(batch)
                sae.zero_grad(set_to_none=True)
                out.loss.backward()
                return out.l0()
            measured = step()
            row.append(median_ms(step, 5))
        print(f"  L0 {measured:7.1f} ({measured / d_sae:6.2%} of latents): dense {row[0]:6.1f} ms, pairs {row[1]:6.1f} "
              f"ms -> {row[0] / row[1]:.2f}x")


def main() -> None:
    """Print the dense and the pairs step's medians per round, their ratio, and the encoder matmul alone."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--arch", choices=ARCHS, default="standard")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--target-l0", type=float, default=32.0)
    ap.add_argument("--run-steps", type=int, default=1024, help="the schedule's length (lr, L1 warm-up, controller)")
    ap.add_argument("--warm-steps", type=int, default=200, help="untimed steps first (L0 falls towards the target)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (the CLI's default on devices with native bf16; the benchmark's is fp32)")
    ap.add_argument("--crossover", default="", help="comma-separated L0s to time both arms at (e.g. 32,64,128,256)")
    args = ap.parse_args()
    print(machine(), flush=True)
    tune_allocator()  # as the CLI does
    import torch

    n = args.batch_size
    batches, slot, metrics = warmed_slot(args, args.warm_steps + 2 * args.rounds * args.steps, args.autocast)
    sae = slot.sae
    print(f"{torch.get_num_threads()} thread(s); {args.arch} SAE d_in {batches[0].shape[1]}, d_sae {args.d_sae}, batch {n}, "
          f"{'bf16 autocast' if args.autocast else 'fp32'}; torch {torch.__version__}")
    print(f"after {args.warm_steps} untimed steps: L0 {metrics['l0']:.1f}, {sae.sparse_steps} of them on the pairs")
    at = args.warm_steps
    res: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(args.rounds):
        for kernels in ("dense", "sparse"):
            sae.kernels = kernels
            before = sae.sparse_steps
            ms, l0 = _timed_steps(slot, batches, at, args.steps, args.autocast)
            at += args.steps
            res[kernels].append(ms)
            print(f"  round {r + 1} {kernels:6s}: {ms:6.1f} ms/step (L0 {l0:5.1f}, {sae.sparse_steps - before} of "
                  f"{args.steps} steps on the pairs)")
    x = batches[0]
    w = sae.W_enc.detach()
    if args.autocast:
        x, w = x.bfloat16(), w.bfloat16()
    mm_ms = min(median_ms(lambda: x @ w, 5) for _ in range(4))
    dense, sparse = statistics.median(res["dense"]), statistics.median(res["sparse"])
    print(f"median step: dense {dense:.1f} ms, pairs {sparse:.1f} ms -> {dense / sparse:.2f}x; encoder matmul alone "
          f"{mm_ms:.1f} ms (dense {dense / mm_ms:.2f}x, pairs {sparse / mm_ms:.2f}x of it)")
    if args.crossover:
        _crossover(args.arch, batches[0].shape[1], args.d_sae, batches[-1], [int(v) for v in args.crossover.split(",")], args.autocast)


if __name__ == "__main__":
    main()
