"""Benchmark: harvest tokens/s vs a bare forward pass, and ``--workers 2`` vs 1 (issue 3).

Arms, all on the same rows of the embedded corpus with the real Gemma 3 270M, in one run:
- bare forward: the packed rows in batches of ``--batch-rows``, stopped after the deepest
  requested block (the harvester's own hooks), activations moved to CPU and dropped;
- ``harvest`` in this process (text packing, forward, bf16 conversion, statistics, Zarr
  writes, crc32c, commits) into a fresh store: target >= 0.9x the bare forward;
- ``harvest --workers 1`` and ``--workers 2`` on a dask LocalCluster, wall time including
  the cluster start and each worker's model load (a real user pays both).

    .venv/bin/python bench/harvest.py --layers 4,8 --tokens 65536

The LM computes in the dtype ``harvest --compute-dtype auto`` picks on this machine (bf16 only where it
is native: device.fast_dtype), as users run it; it is printed.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import auto_dtype, machine
from saestrata.allocator import tune_allocator
from saestrata.harvest.harvester import HarvestConfig, _rows, harvest, tokenizer_fingerprint
from saestrata.harvest.hooks import residuals
from saestrata.harvest.model import load_model


def _bare_forward(lm, cfg: HarvestConfig) -> float:
    """Seconds to forward the rows ``cfg`` would harvest (packing done beforehand, not timed)."""
    rows = list(itertools.islice(_rows(cfg, lm), cfg.tokens // cfg.context_length))
    t0 = time.perf_counter()
    for b in range(0, len(rows), cfg.batch_rows):
        ids = torch.from_numpy(np.stack([r.token_ids for r in rows[b : b + cfg.batch_rows]])).long()
        for acts in residuals(lm, ids, cfg.layers).values():
            acts.cpu()
    return time.perf_counter() - t0


def _harvest(lm, cfg: HarvestConfig) -> float:
    """Seconds for a complete harvest of ``cfg`` into a new store."""
    t0 = time.perf_counter()
    harvest(cfg, lm=lm, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    """Print tokens/s of every arm and the two ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,8")
    ap.add_argument("--tokens", type=int, default=65536, help="multiple of 8192 (whole shards)")
    ap.add_argument("--batch-rows", type=int, default=16)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    dtype = auto_dtype()  # what `harvest` computes in by default here
    print(machine(), f"; LM computes in {dtype}", sep="", flush=True)
    lm = load_model(device="cpu", dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        def cfg(name: str, workers: int = 0) -> HarvestConfig:
            """A harvest of the benchmark's rows into ``tmp/name`` (``workers`` > 0: dask)."""
            return HarvestConfig(layers=layers, tokens=args.tokens, out=Path(tmp) / name, device="cpu",
                                 batch_rows=args.batch_rows, workers=workers, compute_dtype=dtype)

        _bare_forward(lm, cfg("warm"))  # warm-up: oneDNN kernels, page cache of the weights
        t0 = time.perf_counter()
        tokenizer_fingerprint(lm.tokenizer)  # once per process and tokenizer (cached), not per token
        fingerprint = time.perf_counter() - t0
        bare = _bare_forward(lm, cfg("bare"))
        one = _harvest(lm, cfg("one"))
        w1 = _harvest(lm, cfg("w1", workers=1))
        w2 = _harvest(lm, cfg("w2", workers=2))
    n = args.tokens
    print(f"one-time tokenizer fingerprint for the store identity: {fingerprint:.1f} s (excluded from the arms)")
    print(f"bare forward (layers {args.layers}) : {n / bare:8,.0f} tokens/s")
    print(f"harvest, one process            : {n / one:8,.0f} tokens/s   harvest/bare = {bare / one:.2f}  (target >= 0.9)")
    print(f"harvest --workers 1 (dask)      : {n / w1:8,.0f} tokens/s   (incl. cluster start + model load)")
    print(f"harvest --workers 2 (dask)      : {n / w2:8,.0f} tokens/s   workers2/workers1 = {w1 / w2:.2f}")


if __name__ == "__main__":
    tune_allocator()  # as the CLI does: the benches measure what users run
    main()
