"""Benchmark: compression codecs and float16 vs bfloat16 storage on real activations (issue 3).

Loads one layer of a real store and rewrites it into a temporary Zarr v3 group with the
store's own layout (shards of ``shard_tokens`` rows, inner chunks of ``chunk_tokens``
rows, crc32c on every inner chunk, see store/writer.py), once per storage dtype
(bfloat16 bit patterns as stored; float16 converted from those values) and codec (none;
zarr's ZstdCodec; zarr's BloscCodec with lz4 / zstd and byte- or bit-shuffle). For each
it measures bytes on disk, write speed, a full sequential read and a read of every inner
chunk in random order (what training does); uncompressed arrays are also read through
``np.memmap`` (store/memmap.py), the path the reader takes. Then it answers whether
float16 can hold the data: max |x| with and without BOS rows, values beyond float16's
range, values that become subnormal or zero, and the relative error of float16 vs the
bfloat16 source. Prints markdown tables.

    .venv/bin/python bench/compression.py --store demo-out/store-train --layer 8

Sizes and the float16 figures are exact for the store given; speeds are best-of-N wall
times on a warm page cache (the files were just written), so they measure encode /
decode cost, not the disk, and vary with machine load.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.codecs

from _common import best_time, dir_bytes

from saestrata.allocator import tune_allocator
from saestrata.store import ActivationStore
from saestrata.store.memmap import MemmapArray

F16_MAX = 65504.0
F16_MIN_NORMAL = 2.0**-14  # 6.1e-5; smaller nonzero magnitudes are subnormal in float16


def codec_table() -> dict[str, list]:
    """Bytes-to-bytes codec chains to compare, by display name; crc32c always last, as in the store.

    Blosc's block size is its automatic choice unless named (one variant with 256 KiB
    blocks, because the automatic blocks are small and compress these data worse).
    """
    crc = zarr.codecs.Crc32cCodec
    blosc = zarr.codecs.BloscCodec
    return {
        "none": [crc()],
        "zstd 1": [zarr.codecs.ZstdCodec(level=1), crc()],
        "zstd 3": [zarr.codecs.ZstdCodec(level=3), crc()],
        "blosc lz4 5 shuffle": [blosc(cname="lz4", clevel=5, shuffle="shuffle", typesize=2), crc()],
        "blosc zstd 3 shuffle": [blosc(cname="zstd", clevel=3, shuffle="shuffle", typesize=2), crc()],
        "blosc zstd 3 shuffle 256 KiB blocks": [
            blosc(cname="zstd", clevel=3, shuffle="shuffle", typesize=2, blocksize=2**18), crc()],
        "blosc zstd 3 bitshuffle": [blosc(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=2), crc()],
    }


def write_array(group: zarr.Group, name: str, data: np.ndarray, compressors: list, chunk: int, shard: int) -> None:
    """(Re)create array ``name`` with the store's sharded layout and write ``data`` shard by shard, as the writer does."""
    arr = group.create_array(
        name, shape=data.shape, chunks=(chunk, data.shape[1]), shards=(shard, data.shape[1]), dtype=data.dtype,
        compressors=compressors, fill_value=0, config={"write_empty_chunks": True}, overwrite=True,
    )
    for lo in range(0, len(data), shard):
        arr[lo : lo + shard] = data[lo : lo + shard]


def chunk_bounds(n: int, chunk: int, seed: int) -> list[tuple[int, int]]:
    """Token ranges of all inner chunks in a seeded random order."""
    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    return [bounds[i] for i in np.random.default_rng(seed).permutation(len(bounds))]


def measure(group: zarr.Group, path: Path, name: str, data: np.ndarray, compressors: list, chunk: int, shard: int,
            repeats: int) -> dict:
    """Write ``data`` with one codec chain and time the write, a sequential read and random-order chunk reads.

    Returns:
        dict with ``bytes``, ``write_s``, ``seq_s``, ``rand_s`` (seconds, best of ``repeats``);
        reads are checked bit-exact against ``data``.
    """
    write_s = best_time(lambda: write_array(group, name, data, compressors, chunk, shard), repeats)
    arr = zarr.open_group(str(path), mode="r")[name]
    if not np.array_equal(arr[:], data):
        raise RuntimeError(f"{name}: read-back differs from what was written")
    order = chunk_bounds(len(data), chunk, seed=0)
    seq_s = best_time(lambda: arr[:], repeats)
    rand_s = best_time(lambda: [arr[lo:hi] for lo, hi in order], repeats)
    return {"bytes": dir_bytes(path / name), "write_s": write_s, "seq_s": seq_s, "rand_s": rand_s}


def measure_memmap(path: Path, name: str, data: np.ndarray, repeats: int) -> dict:
    """Sequential and random-order chunk reads of an uncompressed array through :class:`MemmapArray`.

    Each repeat opens a fresh map, so every chunk's crc32c is verified once per pass,
    and copies each chunk (as ``ActivationStore`` does) so the bytes are really read.
    """
    n = len(data)
    probe = MemmapArray(path, name, n)
    order = [lo // probe.chunk_tokens for lo, _ in chunk_bounds(n, probe.chunk_tokens, seed=0)]
    if not np.array_equal(np.concatenate([probe.chunk(i) for i in range(probe.n_chunks)]), data):
        raise RuntimeError(f"{name}: memmap read differs from what was written")

    def read(chunks):
        """Copy the given inner chunks out of a freshly opened map."""
        mapped = MemmapArray(path, name, n)
        return [np.array(mapped.chunk(i)) for i in chunks]

    return {"seq_s": best_time(lambda: read(range(probe.n_chunks)), repeats),
            "rand_s": best_time(lambda: read(order), repeats)}


def float16_report(acts: torch.Tensor, keep: np.ndarray) -> dict:
    """What converting the bfloat16 activations to float16 does, over all rows and over non-BOS rows (``keep``).

    Returns:
        dict of exact counts and fractions: ``max_abs`` / ``max_abs_no_bos``; values that
        overflow float16 (|x| > 65504 -> inf) with and without BOS rows; nonzero values that
        become subnormal (|x| < 6.1e-5) or zero; max / mean relative error of the finite
        float16 values vs the bfloat16 source (nonzero source values only).
    """
    x = acts.float()
    h = acts.to(torch.float16).float()
    ax = x.abs()
    nonzero = ax > 0
    finite = torch.isfinite(h)
    rel = ((h - x).abs() / ax)[nonzero & finite]
    no_bos = torch.from_numpy(keep)
    return {
        "n_values": x.numel(),
        "n_values_no_bos": int(no_bos.sum()) * x.shape[1],
        "max_abs": float(ax.max()),
        "max_abs_no_bos": float(ax[no_bos].max()),
        "overflow": int((~finite).sum()),
        "overflow_no_bos": int((~finite[no_bos]).sum()),
        "over_f16_max": int((ax > F16_MAX).sum()),
        "overflow_rows": int((~finite).any(dim=1).sum()),
        "overflow_rows_no_bos": int((~finite[no_bos]).any(dim=1).sum()),
        "zero_in_source": int((~nonzero).sum()),
        "min_nonzero_abs": float(ax[nonzero].min()),
        "subnormal": int((nonzero & (ax < F16_MIN_NORMAL)).sum()),
        "flushed_to_zero": int((nonzero & (h == 0)).sum()),
        "rel_err_max": float(rel.max()) if rel.numel() else 0.0,
        "rel_err_mean": float(rel.double().mean()) if rel.numel() else 0.0,
        "inexact": int(((h != x) & finite).sum()),
    }


def main() -> None:
    """Run every dtype x codec on one layer and print the size/speed table and the float16 table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the temporary arrays (default: system temp)")
    args = ap.parse_args()

    store = ActivationStore(args.store)
    hook = store.hook_for_layer(args.layer)
    acts = store.activations(hook)
    token_ids = store.aligned("token_ids")
    bos = store.attrs.get("bos_token_id")
    keep = token_ids != bos if bos is not None else np.ones(len(token_ids), dtype=bool)
    n, d = acts.shape
    chunk, shard = int(store.attrs["chunk_tokens"]), int(store.attrs["shard_tokens"])
    sources = {
        "bfloat16": acts.view(torch.int16).numpy().view(np.uint16),  # the stored bit patterns
        "float16": acts.to(torch.float16).numpy(),
    }
    raw = n * d * 2
    print(f"store {args.store}, {hook}: {n:,} tokens x {d} ({n - int(keep.sum()):,} BOS rows), "
          f"shards {shard} tokens, inner chunks {chunk} tokens, raw {raw / 2**20:.1f} MiB; "
          f"best of {args.repeats}, warm page cache\n")

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="saestrata-compression-", dir=args.tmp))
    try:
        group = zarr.open_group(str(tmp), mode="w")
        baseline = None
        for dtype, data in sources.items():
            for codec, compressors in codec_table().items():
                name = f"{dtype}-{codec.replace(' ', '-')}"
                r = measure(group, tmp, name, data, compressors, chunk, shard, args.repeats)
                baseline = baseline or r["bytes"]
                rows.append((dtype, codec, r))
                if codec == "none":
                    rows.append((dtype, "none, read via np.memmap", {**r, **measure_memmap(tmp, name, data, args.repeats),
                                                                    "memmap": True}))
                shutil.rmtree(tmp / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("| dtype | codec | bytes on disk | bytes/token | vs none | write MB/s | write tok/s "
          "| sequential read tok/s | random-chunk read tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, codec, r in rows:
        write = "- | -" if r.get("memmap") else f"{raw / r['write_s'] / 1e6:,.0f} | {n / r['write_s']:,.0f}"
        print(f"| {dtype} | {codec} | {r['bytes']:,} | {r['bytes'] / n:,.0f} | {r['bytes'] / baseline:.3f} "
              f"| {write} | {n / r['seq_s']:,.0f} | {n / r['rand_s']:,.0f} |")

    f = float16_report(acts, keep)
    frac = lambda k, total="n_values": f"{f[k]:,} ({f[k] / f[total]:.2e})"  # noqa: E731
    print(f"\nfloat16 vs bfloat16 on {hook} ({f['n_values']:,} values, {f['n_values_no_bos']:,} without BOS rows):\n")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| max abs x, all rows | {f['max_abs']:,.1f} |")
    print(f"| max abs x, BOS rows excluded | {f['max_abs_no_bos']:,.1f} |")
    print(f"| values > 65504 (inf in float16), all rows | {frac('overflow')}, in {f['overflow_rows']:,} rows |")
    print(f"| values > 65504, BOS rows excluded | {frac('overflow_no_bos', 'n_values_no_bos')}, "
          f"in {f['overflow_rows_no_bos']:,} rows |")
    print(f"| smallest nonzero abs x / exact zeros | {f['min_nonzero_abs']:.3g} / {f['zero_in_source']:,} |")
    print(f"| nonzero values below 6.1e-5 (subnormal in float16) | {frac('subnormal')} |")
    print(f"| nonzero values that become 0 in float16 | {frac('flushed_to_zero')} |")
    print(f"| finite values changed by the conversion | {frac('inexact')} |")
    print(f"| relative error of float16 vs bfloat16, max / mean (finite, nonzero) | "
          f"{f['rel_err_max']:.2e} / {f['rel_err_mean']:.2e} |")
    if f["over_f16_max"] != f["overflow"]:
        print(f"\n(note: {f['over_f16_max']:,} values exceed 65504 but {f['overflow']:,} became inf)")


if __name__ == "__main__":
    tune_allocator()  # as the CLI does: the benches measure what users run
    main()
