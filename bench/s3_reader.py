"""Benchmark: shuffled-batch reader from an S3 server vs local memmap vs what one TopK step consumes (issue 12).

The same store is written twice through :class:`StoreWriter`, once to a local folder
and once to ``s3://bench/store.zarr`` on moto's standalone S3 server, started here
as a subprocess on 127.0.0.1 (``python -m moto.server``: its own process, so it
does not share this process' GIL). Arms, interleaved, best of ``--repeats``:

- ``shuffled_batches`` from the local store (memory-mapped shards);
- ``shuffled_batches`` from the S3 store (whole inner chunks by ranged GET,
  ``--prefetch`` chunks in flight on a thread pool; the same batches);
- one dense TopK SAE step (d_sae 4096, batch 1024, bf16 autocast, Adam): what
  training consumes (target: S3 reader >= 5x of it).

By default the store is synthetic (random bf16 activations, d_model 640 as Gemma 3
270M, 128-token rows starting with BOS, the harvest's default layout: 1,024-token
chunks, 8,192-token shards); ``--store PATH --layer L`` copies a real store's layer
instead. Reader throughput does not depend on the values. moto is a Python server,
so it is far slower than S3 or MinIO: the S3 figure is a lower bound.

    .venv/bin/python bench/s3_reader.py [--tokens 131072] [--prefetch 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import interleaved, rate, start_moto

from saestrata.allocator import tune_allocator
from saestrata.store import ActivationStore, StoreWriter, shuffled_batches
from saestrata.store.format import to_stored
from saestrata.store.location import Location
from saestrata.train.registry import build

CTX, CHUNK, SHARD, BOS = 128, 1024, 8192, 2


def synthetic(tokens: int, d_model: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(acts [tokens, d_model] bf16 bits as uint16, token_ids [tokens] int32 with BOS at each row start)``."""
    rng = np.random.default_rng(seed)
    acts = to_stored(torch.from_numpy(rng.standard_normal((tokens, d_model), dtype=np.float32)).bfloat16())
    ids = rng.integers(3, 50_000, tokens).astype(np.int32)
    ids[::CTX] = BOS
    return acts, ids


def write_store(where, hook: str, acts: np.ndarray, ids: np.ndarray, stats: dict) -> None:
    """Write ``acts``/``ids`` as a finished one-hook store at ``where`` (folder or Location), shard by shard."""
    n, d = acts.shape
    w = StoreWriter(where, [hook], d, n, shard_tokens=SHARD, chunk_tokens=CHUNK, dtype="bfloat16",
                    attrs={"context_length": CTX, "bos_token_id": BOS})
    for s in range(-(-n // SHARD)):
        lo, hi = s * SHARD, min((s + 1) * SHARD, n)
        pos = (np.arange(lo, hi) % CTX).astype(np.int32)
        w.write_shard(s, {hook: acts[lo:hi]}, {"token_ids": ids[lo:hi], "doc_index": np.zeros(hi - lo, np.int64),
                                               "position": pos})
    w.finish({"activation_stats": {hook: stats}})


def main() -> None:
    """Print tokens/s of each arm and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131_072, help="synthetic store size (tokens)")
    ap.add_argument("--d-model", type=int, default=640)
    ap.add_argument("--store", type=Path, help="copy this real store's --layer instead of synthetic data")
    ap.add_argument("--layer", type=int)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--prefetch", type=int, default=16, help="chunks fetched ahead from S3 (thread pool size)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    hook = "blocks.8.hook_resid_post"
    if args.store is not None:
        src = ActivationStore(args.store)
        real_hook = src.hook_for_layer(args.layer)
        acts, ids = src._read(real_hook, 0, src.n_tokens), src.aligned("token_ids")
        hook = real_hook
    else:
        acts, ids = synthetic(args.tokens, args.d_model)
    stats = {"n": len(acts), "mean_norm": 1.0, "rms_norm": 1.0, "max_abs": 1.0}
    proc, endpoint = start_moto()
    try:
        options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("bench")
        with tempfile.TemporaryDirectory(prefix="s3-reader-") as tmp:
            local_path = Path(tmp) / "store.zarr"
            write_store(local_path, hook, acts, ids, stats)
            t0 = time.perf_counter()
            write_store(Location("s3://bench/store.zarr", options), hook, acts, ids, stats)
            upload = time.perf_counter() - t0
            local = ActivationStore(local_path)
            remote = ActivationStore("s3://bench/store.zarr", storage_options=options, prefetch_chunks=args.prefetch)
            local_it = shuffled_batches(local, hook, args.batch, seed=0)
            remote_it = shuffled_batches(remote, hook, args.batch, seed=0)
            assert torch.equal(next(local_it), next(remote_it))  # same batches from both
            arms = {"local": lambda: next(local_it), "s3": lambda: next(remote_it)}
            rounds = interleaved({k: (lambda fn=fn: rate(fn, args.batches, args.batch)) for k, fn in arms.items()},
                                 args.repeats)
            rates = {k: max(v) for k, v in rounds.items()}
    finally:
        proc.kill()
        proc.wait()

    sae = build("topk", acts.shape[1], 4096)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(args.batch, acts.shape[1])

    def step():
        """One bf16-autocast TopK training step on a fixed batch."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sae(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    sae_rate = max(rate(step, 10, args.batch) for _ in range(args.repeats))
    mib = acts.nbytes / 2**20
    print(f"store: {len(acts):,} tokens x d_model {acts.shape[1]} bf16 ({mib:.0f} MiB), chunks {CHUNK} tokens "
          f"({CHUNK * acts.shape[1] * 2 / 2**20:.2f} MiB), shards {SHARD}; S3 = moto server subprocess on loopback "
          f"(upload {mib / upload:.0f} MiB/s); torch threads {torch.get_num_threads()}")
    print(f"local memmap reader     : {rates['local']:12,.0f} tokens/s")
    print(f"S3 reader (prefetch {args.prefetch:>2d}) : {rates['s3']:12,.0f} tokens/s   "
          f"({rates['s3'] * acts.shape[1] * 2 / 2**20:.0f} MiB/s)")
    print(f"TopK step consumes      : {sae_rate:12,.0f} tokens/s   (d_sae 4096, batch {args.batch}, bf16 autocast)")
    print(f"S3/local = {rates['s3'] / rates['local']:.3f}   S3/TopK = {rates['s3'] / sae_rate:.2f} (target >= 5)   "
          f"local/TopK = {rates['local'] / sae_rate:.2f}")


if __name__ == "__main__":
    tune_allocator()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    main()
