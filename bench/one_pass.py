"""Benchmark: 4 SAEs trained in ONE pass over a store vs 4 separate runs (issue 4, target >= 1.5x).

Both arms train the same four SAEs (standard, topk, batchtopk, matryoshka) for the
same steps on the same store; the ratio is measured in one run on the same machine.
The one-pass arm runs twice: SAEs stepped one after another (the default) and side by
side in threads (``--sae-threads 0``), to show what the shared read and the threads buy.
Run on an idle machine:

    .venv/bin/python bench/one_pass.py --store demo-out/store-train --layer 8 --steps 100

``--kernels`` instead times one topk SAE on the dense and on the sparse training kernels
(train/kernels.py), both trained in the same pass on the same batches, each timed by
the trainer's own per-SAE step clock (forward, backward, clip, Adam; data loading and
metrics excluded), and prints each mean step against the 5-matmul roofline:

    .venv/bin/python bench/one_pass.py --store demo-out/store-train --layer 8 --steps 100 --kernels
    .venv/bin/python bench/one_pass.py ... --kernels --dead-window-tokens 20480   # AuxK on from step 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from saestrata.allocator import tune_allocator
from saestrata.train.trainer import SAESpec, TrainConfig, train

ARCHS = ["standard", "topk", "batchtopk", "matryoshka"]


def _run(store: Path, layer: int, specs: list[SAESpec], steps: int, d_sae: int, out: Path, **cfg) -> float:
    t0 = time.perf_counter()
    train(TrainConfig(store=store, layer=layer, out=out, specs=specs, d_sae=d_sae, tokens=steps * 1024,
                      log_every=10**9, **cfg), progress=False)
    return time.perf_counter() - t0


def _matmul_seconds(batch: int, d_in: int, d_sae: int, reps: int = 10) -> float:
    """Best time of one bf16 ``[batch, d_in] @ [d_in, d_sae]`` matmul on this machine (the roofline unit)."""
    import torch

    a, b = torch.randn(batch, d_in).bfloat16(), torch.randn(d_in, d_sae).bfloat16()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def _kernels(args) -> None:
    """Mean step of one topk SAE, dense vs sparse kernels, and each against the 5-matmul roofline."""
    specs = [SAESpec(f"topk-{kernels}", "topk", {"kernels": kernels}) for kernels in ("dense", "sparse")]
    with tempfile.TemporaryDirectory() as tmp:
        _run(args.store, args.layer, specs, args.steps, args.d_sae, Path(tmp),
             dead_window_tokens=args.dead_window_tokens, checkpoint_every=0, sae_threads=1)
        steps_ms, final = {}, {}
        for spec in specs:
            meta = json.loads((Path(tmp) / spec.name / "cfg.json").read_text())["saestrata"]
            steps_ms[spec.name] = 1024 / meta["train_tokens_per_s"] * 1e3
            final[spec.name] = meta["final_train_metrics"]
            dead = final[spec.name]["dead_frac"]
    mm = _matmul_seconds(1024, 640, args.d_sae) * 1e3
    import torch

    print(f"{torch.get_num_threads()} thread(s); bf16 matmul 1024x640x{args.d_sae}: {mm:.1f} ms; "
          f"5-matmul roofline {5 * mm:.1f} ms "
          f"(final dead fraction {dead:.3f}, AuxK {'on' if dead > 0 else 'off'})")
    for name, ms in steps_ms.items():
        print(f"{name:12s} mean step {ms:7.1f} ms = {ms / (5 * mm):.2f}x the 5-matmul roofline "
              f"(last batch: fvu {final[name]['fvu']:.4f}, auxk {final[name].get('auxk', 0.0):.4f})")
    print(f"sparse / dense step time: {steps_ms['topk-sparse'] / steps_ms['topk-dense']:.2f}")


def main() -> None:
    """Print seconds for both arms and their ratio (``--kernels``: dense vs sparse topk steps)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--kernels", action="store_true", help="time one topk SAE on dense vs sparse kernels")
    ap.add_argument("--dead-window-tokens", type=int, default=250_000,
                    help="with --kernels: tokens without firing before AuxK trains a latent")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # 1 thread is far less noisy on a shared machine
    if args.kernels:
        _kernels(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        specs = [SAESpec(a, a) for a in ARCHS]
        one = _run(args.store, args.layer, specs, args.steps, args.d_sae, tmp / "one")
        one_thr = _run(args.store, args.layer, specs, args.steps, args.d_sae, tmp / "one-thr", sae_threads=0)
        separate = sum(_run(args.store, args.layer, [SAESpec(a, a)], args.steps, args.d_sae, tmp / f"sep-{a}")
                       for a in ARCHS)
    tokens = len(ARCHS) * args.steps * 1024
    print(f"one pass, 4 SAEs, one after another (default): {one:8.1f} s  ({tokens / one:,.0f} SAE-tokens/s)")
    print(f"one pass, 4 SAEs, side by side (threads)     : {one_thr:8.1f} s  ({tokens / one_thr:,.0f} SAE-tokens/s)")
    print(f"4 separate runs                              : {separate:8.1f} s  ({tokens / separate:,.0f} SAE-tokens/s)")
    print(f"speed-up ratio separate / one pass           : {separate / one:.2f}x  (target >= 1.5x; "
          f"{separate / one_thr:.2f}x with side-by-side stepping)")
    # A dense SAE step is ~5 matmuls of this shape (enc fwd, dec fwd, 3 for the two backward passes).
    mm = _matmul_seconds(1024, 640, args.d_sae)
    step = one / (len(ARCHS) * args.steps)
    print(f"bf16 matmul 1024x640x{args.d_sae}: {mm * 1e3:.1f} ms ({2 * 1024 * 640 * args.d_sae / mm / 1e9:.0f} GFLOP/s)")
    print(f"mean SAE step    : {step * 1e3:.1f} ms = {step / (5 * mm):.1f}x the 5-matmul roofline")


if __name__ == "__main__":
    tune_allocator()  # as the CLI does: the benches measure what users run
    main()
