"""Benchmark: shuffled-batch reader vs a plain np.memmap random-row gather and vs an SAE step (issue 3).

Same real activations in every arm, measured in one run:
- ``shuffled_batches`` (chunk shuffle buffer, prefetch thread, BOS excluded) from the store;
- a baseline that gathers random rows of the same activations from one flat ``.npy``
  through ``np.memmap`` (target: reader >= 0.5x of it);
- what one dense TopK SAE step (d_sae 4096, batch 1024, bf16 autocast, Adam) consumes
  (target: reader >= 5x, so training never waits on I/O).

    .venv/bin/python bench/reader.py --store demo-out/store-train --layer 8
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saestrata.store import ActivationStore, shuffled_batches
from saestrata.train.registry import build


def _rate(fn, batches: int, batch: int) -> float:
    fn()  # warm-up (maps, threads, page cache)
    t0 = time.perf_counter()
    for _ in range(batches):
        fn()
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    """Print tokens/s of each arm and the two ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args()
    store = ActivationStore(args.store)
    hook = store.hook_for_layer(args.layer)
    it = shuffled_batches(store, hook, args.batch, seed=0)
    reader = _rate(lambda: next(it), args.batches, args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "acts.npy"
        np.save(flat, store._read(hook, 0, store.n_tokens))
        mm = np.load(flat, mmap_mode="r")
        rng = np.random.default_rng(0)
        gather = _rate(lambda: torch.from_numpy(mm[np.sort(rng.integers(0, len(mm), args.batch))].view(np.int16))
                       .view(torch.bfloat16), args.batches, args.batch)

    sae = build("topk", store.d_model, 4096)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = next(it).float() * (math.sqrt(store.d_model) / store.stats(hook)["mean_norm"])

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sae(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    sae_rate = _rate(step, 10, args.batch)
    print(f"shuffled_batches reader : {reader:12,.0f} tokens/s")
    print(f"np.memmap random gather : {gather:12,.0f} tokens/s   reader/gather = {reader / gather:.2f}  (target >= 0.5)")
    print(f"TopK SAE step consumes  : {sae_rate:12,.0f} tokens/s   reader/SAE    = {reader / sae_rate:.1f}  (target >= 5)")


if __name__ == "__main__":
    main()
