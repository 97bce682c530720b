"""ActivationStore reads chunk-aligned ranges through np.memmap, bit-identical to zarr reads."""

import numpy as np
import pytest
import torch

from saestrata.store import ActivationStore, StoreError, shuffled_batches


def test_mapped_reads_equal_zarr_reads(tiny_store):
    store = ActivationStore(tiny_store)
    hook = "blocks.2.hook_resid_post"
    assert store._mapped(hook) is not None  # uncompressed local shards are memory-mapped
    chunk = int(store.attrs["chunk_tokens"])
    for lo, hi in [(0, chunk), (chunk, 3 * chunk + 5), (7, chunk + 3), (store.n_tokens - chunk, store.n_tokens)]:
        assert np.array_equal(store._read(hook, lo, hi), store.group[hook][lo:hi]), (lo, hi)
        assert np.array_equal(store.aligned("token_ids", lo, hi), store.group["token_ids"][lo:hi])


def test_shuffled_batches_same_with_and_without_memmap(tiny_store):
    hook = "blocks.1.hook_resid_post"
    mapped, plain = ActivationStore(tiny_store), ActivationStore(tiny_store)
    plain._maps = {hook: None, "token_ids": None}  # force the zarr path
    a, b = shuffled_batches(mapped, hook, 128, seed=5), shuffled_batches(plain, hook, 128, seed=5)
    assert all(torch.equal(next(a), next(b)) for _ in range(20))


def test_mapped_read_detects_a_flipped_byte(tiny_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    shard_file = sorted((copy / "blocks.1.hook_resid_post" / "c").rglob("*"))[-1]
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0xFF  # inside the first inner chunk's data
    shard_file.write_bytes(bytes(data))
    store = ActivationStore(copy)
    chunk = int(store.attrs["chunk_tokens"])
    shard_tokens = int(store.attrs["shard_tokens"])
    first_row = (int(store.attrs["n_shards"]) - 1) * shard_tokens
    with pytest.raises(StoreError, match="crc32c"):
        store.activations("blocks.1.hook_resid_post", first_row, first_row + chunk)
