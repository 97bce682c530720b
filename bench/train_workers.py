"""Benchmark: a 4-SAE sweep with ``train --workers 2`` vs the one-process pass (issue 12).

Both arms train the same SAEs (topk at k = 16, 24, 32, 48 by default) on the same store, with the
same budget; wall time covers the whole call (the dask arm includes starting its LocalCluster).
The one-process arm reads each batch once for all SAEs and uses every core for each step; the
dask arm gives each worker ``cores // workers`` torch threads and one SAE at a time, each worker
reading the store itself. On a 2-core CPU the two can only tie at best: what ``--workers`` buys
is a sweep spread over N GPUs or machines (each SAE's step time is then divided by N).

    python bench/train_workers.py --store STORE --layer 8 [--tokens 131072 --workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    """Time both arms once each (one-process first) and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--ks", default="16,24,32,48")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=131_072)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    from saestrata.train.distributed import train_distributed
    from saestrata.train.trainer import SAESpec, TrainConfig, train

    specs = [SAESpec(f"topk-k{k}", "topk", {"k": int(k)}) for k in a.ks.split(",")]
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        def cfg(name):
            """The sweep's TrainConfig writing into ``tmp/name`` (same SAEs, budget and store for both arms)."""
            return TrainConfig(store=a.store, layer=a.layer, out=Path(tmp) / name, specs=specs, d_sae=a.d_sae,
                               tokens=a.tokens, device="cpu", autocast=False, checkpoint_every=0)

        t0 = time.perf_counter()
        train(cfg("one"), progress=False)
        times["one process"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_distributed(cfg("dask"), workers=a.workers, progress=False)
        times[f"--workers {a.workers}"] = time.perf_counter() - t0
    print(f"{len(specs)} topk SAEs x {a.tokens:,} tokens, d_sae {a.d_sae}, torch threads here {torch.get_num_threads()}")
    for arm, s in times.items():
        print(f"  {arm:12s} {s:7.1f} s  ({len(specs) * a.tokens / s:,.0f} SAE-tokens/s)")
    one, dask = times["one process"], times[f"--workers {a.workers}"]
    print(f"  speed-up of --workers {a.workers}: {one / dask:.2f}x")


if __name__ == "__main__":
    main()
