"""Where any arch's training step spends its time, at the settings the benchmark trains it with (issue 14).

The speed stage times each SAE at its benchmark learning rate, deep into the run; some costs appear only there
(seed 001's attention turns sharp and its memberships fall into subnormal floats, on which x86 matmuls take a
microcode path ~10x slower: docs/results/bench/README.md, thirtieth and thirty-first sessions). This script trains
one ``--arch`` SAE with the trainer's own step, optimiser and L0 controller at ``--lr`` / ``--l0-start`` (take them
from docs/results/benchmark/lr_sweep.json) for ``--warm-steps`` untimed steps on a store's batches, times
``--steps`` more (median), then profiles 5 steps and prints the ops by self CPU time with their input shapes.
``--scan`` also counts the subnormal entries entering or leaving every matmul and element-wise op of one more
step (a dispatch mode; slow).

    .venv/bin/python bench/step_profile.py --store /work/bench-data/store-train --layer 8 \\
        --arch seed001_contrastive_hier --lr 0.004525 --l0-start 0.0144 --warm-steps 600

Token SAEs only (seed 000's temporal SAEs need sequence batches; the speed stage times them).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

from _common import machine, median_ms
from saestrata.allocator import tune_allocator

SCANNED = {"aten.mm", "aten.bmm", "aten.addmm", "aten.mul", "aten.div", "aten.add", "aten.sub", "aten.pow",
           "aten.mul_", "aten.add_", "aten._softmax", "aten.exp", "aten.sigmoid"}


def _subnormal_scan(step) -> collections.Counter:
    """``{(op, input shapes): subnormal entries in its float inputs and outputs}`` over one call of ``step``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    tiny = torch.finfo(torch.float32).tiny
    hits: collections.Counter = collections.Counter()

    def count(t) -> int:
        """Subnormal entries of ``t`` if it is a float tensor, else 0."""
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return 0
        return int(((t != 0) & (t.abs() < tiny)).sum())

    class Scan(TorchDispatchMode):
        """Runs every op as usual and adds the subnormal entries of a scanned op's inputs and outputs to ``hits``."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            """The op's result, after counting."""
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket)
            if name in SCANNED:
                outs = out if isinstance(out, (tuple, list)) else [out]
                n = sum(count(a) for a in args) + sum(count(o) for o in outs)
                if n:
                    hits[(name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))] += n
            return out

    with Scan():
        step()
    return hits


def main() -> None:
    """Train, time, profile (and optionally scan) one SAE's step; print everything with the machine line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--arch", required=True, help="an arch or preset name (saestrata archs)")
    ap.add_argument("--lr", type=float, required=True, help="the benchmark's learning rate for the arch")
    ap.add_argument("--l0-start", type=float, default=1.0, help="the L0 controller's starting multiplier")
    ap.add_argument("--target-l0", type=float, default=32.0)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--run-steps", type=int, default=4000, help="the schedule's length (lr decay, warm-ups)")
    ap.add_argument("--warm-steps", type=int, default=600, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    ap.add_argument("--top", type=int, default=20, help="ops listed")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (the CLI's default on devices with native bf16; the benchmark's is fp32)")
    ap.add_argument("--scan", action="store_true", help="count subnormal floats in one more step's ops")
    args = ap.parse_args()
    print(machine(), flush=True)
    tune_allocator()  # as the CLI does
    import torch
    from torch.profiler import ProfilerActivity, profile

    from saestrata.store import ActivationStore
    from saestrata.train.registry import build
    from saestrata.train.trainer import SAESpec, TrainConfig, _Slot

    store = ActivationStore(args.store)
    hook = f"blocks.{args.layer}.hook_resid_post"
    n, need = args.batch_size, args.warm_steps + args.steps + 6
    acts = store.activations(hook, 0, need * n)
    if acts.shape[0] < need * n:
        raise SystemExit(f"the store holds {acts.shape[0]} tokens; {need * n} are needed (fewer --warm-steps)")
    acts = acts.float() * (acts.shape[1] ** 0.5 / store.stats(hook)["mean_norm"])  # the trainer's scaling
    spec = SAESpec(args.arch, args.arch, {}, lr=args.lr, target_l0=args.target_l0, l0_start=args.l0_start)
    cfg = TrainConfig(store=Path("."), layer=0, out=Path(tempfile.mkdtemp()), specs=[spec], d_sae=args.d_sae)
    sae = build(args.arch, acts.shape[1], args.d_sae)
    if sae.needs_sequences:
        raise SystemExit(f"{args.arch} trains on sequence batches; time it with `saestrata benchmark --stages speed`")
    slot = _Slot(spec, sae, cfg, steps=args.run_steps)
    sae.init_from_batch(acts[:n])
    done, last = [0], [{}]

    def step() -> None:
        """One trainer step on the next batch (no batch is seen twice)."""
        last[0] = slot.step(acts[done[0] * n:(done[0] + 1) * n], done[0], args.autocast)
        done[0] += 1

    for _ in range(args.warm_steps):
        step()
    ms = median_ms(step, args.steps)
    m = last[0]
    print(f"{args.arch}: d_sae {args.d_sae}, batch {n}, lr {args.lr:g}, {'bf16 autocast' if args.autocast else 'fp32'}; "
          f"after {args.warm_steps} steps L0 {m['l0']:.1f}, FVU {m['fvu']:.4f}"
          + (f", L0 multiplier {slot.l0_control.multiplier:.4g}" if slot.l0_control else ""))
    print(f"step (median of {args.steps}): {ms:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(5):
            step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.top,
                                                             max_name_column_width=40, max_shapes_column_width=70))
    if args.scan:
        hits = _subnormal_scan(step)
        print(f"subnormal floats in one step's ops: {sum(hits.values())} entries")
        for (name, shapes), k in hits.most_common(args.top):
            print(f"  {k:8d}  {name} {shapes}")
    counters = {k: v for k, v in sae.counters().items() if k in ("sparse_steps", "sparse_views", "sparse_gram")}
    print("counters:", counters)


if __name__ == "__main__":
    main()
