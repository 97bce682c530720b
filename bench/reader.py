"""Benchmark: shuffled-batch reader vs a memmap gather, a SAELens-style Arrow cache and an SAE step (issue 3).

Same real activations in every arm, measured in one run:
- ``shuffled_batches`` (chunk shuffle buffer, batches gathered in a background
  thread, BOS excluded) from the store;
- a baseline that gathers random rows of the same activations from one flat ``.npy``
  through ``np.memmap`` (target: reader >= 0.5x of it);
- the same activations cached the way SAELens' ``CacheActivationsRunner`` writes them
  (HF ``datasets`` Arrow files: one row per context, ``Array2D((ctx, d_in), float32)``
  plus ``token_ids`` ``Sequence(int32, ctx)``, ``save_to_disk``) and read the way its
  ``ActivationsStore`` reads a cache (``load_from_disk``, ``set_format("torch",
  dtype=float32)``, sequential slices of ``32 * 20 // 2`` contexts, special tokens
  filtered, its keep-half ``mixing_buffer``). Targets: reader >= 2x its tokens/s at
  <= 0.5x its bytes per token;
- what one dense TopK SAE step (d_sae 4096, batch 1024, bf16 autocast, Adam) consumes
  (target: reader >= 5x, so training never waits on I/O).

Each arm is timed ``--repeats`` times, interleaved, and the best rate is kept (the
machine may be shared; the reader's thread may have its 8-batch queue full when its
timing starts, <3% of 300 batches). Batches are ``[batch, d_model]``: bf16 from our store, float32
from the Arrow cache (its stored dtype).

    .venv/bin/python bench/reader.py --store demo-out/store-train --layer 8
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from _common import dir_bytes, interleaved, rate

from saestrata.allocator import tune_allocator
from saestrata.store import ActivationStore, shuffled_batches
from saestrata.store.format import ALIGNED_ARRAYS, stored_dtype
from saestrata.train.registry import build


def write_arrow_cache(store: ActivationStore, hook: str, out: Path) -> None:
    """Write ``hook`` of ``store`` as a SAELens-layout activation cache (float32, one row per context).

    Layout learnt from SAELens ``cache_activations_runner.py``: features
    ``{hook: Array2D((ctx, d_in), "float32"), "token_ids": Sequence(Value("int32"), length=ctx)}``,
    ``Dataset.from_dict(...).save_to_disk(num_shards=1)`` per 2 GB buffer (our ~100k
    tokens fit in one), rows in harvest order (its optional shuffle is not saved to disk).
    """
    from datasets import Array2D, Dataset, Features, Sequence, Value, disable_progress_bars

    disable_progress_bars()

    ctx, d = int(store.attrs["context_length"]), store.d_model
    n = store.n_tokens // ctx * ctx
    features = Features({hook: Array2D(shape=(ctx, d), dtype="float32"),
                         "token_ids": Sequence(Value("int32"), length=ctx)})
    acts = store.activations(hook, 0, n).float().reshape(-1, ctx, d).numpy()
    toks = store.aligned("token_ids", 0, n).astype(np.int32).reshape(-1, ctx)
    Dataset.from_dict({hook: acts, "token_ids": toks}, features=features).save_to_disk(str(out), num_shards=1)


def arrow_cache_batches(path: Path, hook: str, batch: int, exclude: list[int], seed: int = 0,
                        prompts_per_load: int = 32, batches_in_buffer: int = 20) -> Iterator[torch.Tensor]:
    """Endless ``[batch, d_in]`` float32 batches read the way SAELens' ``ActivationsStore`` reads a cache.

    Per refill: the next ``prompts_per_load * batches_in_buffer // 2`` contexts as one
    slice of the torch-formatted dataset (wrapping to the start when fewer remain),
    flattened to tokens, tokens in ``exclude`` dropped; then its mixing buffer: append
    to the kept tokens, permute all, serve half of them as batches, keep the rest.
    SAELens defaults: ``store_batch_size_prompts`` 32, ``n_batches_in_buffer`` 20, mixing
    threshold ``n_batches_in_buffer * context_size`` tokens.
    """
    import datasets

    ds = datasets.load_from_disk(str(path))
    ds.set_format(type="torch", columns=[hook, "token_ids"], device="cpu", dtype=torch.float32)
    ctx = ds.features[hook].shape[0]
    per_load = prompts_per_load * (batches_in_buffer // 2)
    threshold = batches_in_buffer * ctx
    drop = torch.tensor(exclude)
    gen = torch.Generator().manual_seed(seed)
    kept, pos = None, 0
    while True:
        if pos > len(ds) - per_load:
            pos = 0
        part = ds[pos : pos + per_load]  # slice rows first, then pick columns (as SAELens does)
        pos += per_load
        acts = part[hook].reshape(-1, part[hook].shape[-1])
        acts = acts[~torch.isin(part["token_ids"].reshape(-1), drop)]
        kept = acts if kept is None else torch.cat([kept, acts])
        if len(kept) < threshold:
            continue
        kept = kept[torch.randperm(len(kept), generator=gen)]
        n_serve = max(1, len(kept) // (2 * batch))
        serve, kept = kept[: n_serve * batch], kept[n_serve * batch :]
        for b in range(n_serve):
            yield serve[b * batch : (b + 1) * batch]


def main() -> None:
    """Print bytes/token and tokens/s of each arm and the ratios with their targets."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timings per arm; the best is kept")
    args = ap.parse_args()
    store = ActivationStore(args.store)
    hook = store.hook_for_layer(args.layer)
    bos = store.attrs.get("bos_token_id")
    # Bytes per token of our store: the layer's shard files (crc32c and shard indexes
    # included), the aligned arrays counted whole (what a one-layer store holds; a store
    # of L layers shares them), and the group metadata.
    n_tok = store.n_tokens
    layer_b = dir_bytes(args.store / hook) / n_tok
    aligned_b = {name: dir_bytes(args.store / name) / n_tok for name in ALIGNED_ARRAYS}
    meta_b = dir_bytes(args.store / "zarr.json") / n_tok
    ours_b = layer_b + sum(aligned_b.values()) + meta_b
    chunk = int(store.attrs["chunk_tokens"])
    row_bytes = store.d_model * stored_dtype(store.dtype).itemsize
    pad_b = (-n_tok % chunk) * row_bytes / n_tok  # the last inner chunk is written whole

    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "acts.npy"
        np.save(flat, store._read(hook, 0, n_tok))
        mm = np.load(flat, mmap_mode="r")
        rng = np.random.default_rng(0)

        def gather():
            """One random-row gather of a batch from the flat memmap, as a bf16 tensor."""
            rows = mm[np.sort(rng.integers(0, len(mm), args.batch))]
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)

        cache = Path(tmp) / "saelens-cache"
        write_arrow_cache(store, hook, cache)
        ctx = int(store.attrs["context_length"])
        arrow_b = dir_bytes(cache) / (n_tok // ctx * ctx)  # whole contexts only
        ours_it = shuffled_batches(store, hook, args.batch, seed=0)
        arrow_it = arrow_cache_batches(cache, hook, args.batch, exclude=[bos] if bos is not None else [])
        arms = {"reader": lambda: next(ours_it), "gather": gather, "arrow": lambda: next(arrow_it)}
        rounds = interleaved({name: (lambda fn=fn: rate(fn, args.batches, args.batch)) for name, fn in arms.items()},
                             args.repeats)
        rates = {name: max(r) for name, r in rounds.items()}  # the best tokens/s of each arm

    sae = build("topk", store.d_model, 4096)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = next(ours_it).float() * (math.sqrt(store.d_model) / store.stats(hook)["mean_norm"])

    def step():
        """One bf16-autocast TopK training step on the fixed batch."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sae(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    sae_rate = rate(step, 10, args.batch)
    reader = rates["reader"]
    aligned_txt = ", ".join(f"{k} {v:.2f}" for k, v in aligned_b.items())
    print(f"store {args.store} layer {args.layer}: {n_tok:,} tokens, d_model {store.d_model}, {store.dtype}")
    print(f"bytes/token  ours        : {ours_b:9.2f}  = layer {layer_b:.2f} (of which {pad_b:.2f} padding of the "
          f"last chunk) + aligned ({aligned_txt}) + group metadata {meta_b:.2f}")
    print(f"bytes/token  SAELens Arrow: {arrow_b:9.2f}  (float32 Array2D + int32 token_ids, all .arrow/.json files)")
    print(f"             ours/Arrow  = {ours_b / arrow_b:.4f}  (target <= 0.5); layer array alone "
          f"{layer_b / arrow_b:.4f}; {0.5 * arrow_b - layer_b - meta_b:.2f} B/token left for aligned arrays under 0.5")
    arms = [("np.memmap random gather", rates["gather"], "reader/gather", 0.5),
            ("SAELens Arrow cache read", rates["arrow"], "reader/Arrow ", 2),
            ("TopK SAE step consumes", sae_rate, "reader/SAE   ", 5)]
    print(f"shuffled_batches reader : {reader:12,.0f} tokens/s  (bf16 batches, best of {args.repeats})")
    for name, rate, label, target in arms:
        print(f"{name:<24s}: {rate:12,.0f} tokens/s   {label} = {reader / rate:.2f}  (target >= {target})")

if __name__ == "__main__":
    tune_allocator()  # as the CLI does: the benches measure what users run
    main()
