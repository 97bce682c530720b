"""ActivationStore reads chunk-aligned ranges through np.memmap, bit-identical to zarr reads."""

from collections import Counter

import numpy as np
import pytest
import torch

from saestrata.store import ActivationStore, StoreError, sequence_batches, shuffled_batches


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
    # Unaligned range edges (partial chunks), BOS kept, odd batch size.
    kw = dict(batch_size=77, seed=2, token_range=(100, 3000), exclude_bos=False, buffer_chunks=3)
    a, b = shuffled_batches(mapped, hook, **kw), shuffled_batches(plain, hook, **kw)
    assert all(torch.equal(next(a), next(b)) for _ in range(60))


def test_sequence_batches_same_with_and_without_memmap(tiny_store):
    hook = "blocks.2.hook_resid_post"
    mapped, plain = ActivationStore(tiny_store), ActivationStore(tiny_store)
    plain._maps = {hook: None, "token_ids": None, "doc_index": None}  # force the zarr path
    a, b = sequence_batches(mapped, hook, 5, seed=4, buffer_chunks=3), sequence_batches(plain, hook, 5, seed=4,
                                                                                        buffer_chunks=3)
    for _ in range(30):
        assert all(torch.equal(x, y) for x, y in zip(next(a), next(b)))


def test_mapped_chunk_rows_are_views(tiny_store):
    store = ActivationStore(tiny_store)
    chunk = int(store.attrs["chunk_tokens"])
    rows = store._chunk_rows("blocks.1.hook_resid_post", chunk + 3, 2 * chunk)
    assert not rows.flags.owndata and not rows.flags.writeable  # no copy out of the map
    assert np.array_equal(rows, store.group["blocks.1.hook_resid_post"][chunk + 3 : 2 * chunk])


def test_one_buffer_epoch_holds_every_usable_row_of_the_range_once(tiny_store):
    store = ActivationStore(tiny_store)
    hook, (lo, hi), batch = "blocks.1.hook_resid_post", (100, 3000), 64
    acts = store.activations(hook, lo, hi).view(torch.int16).numpy()
    usable = np.flatnonzero(store.aligned("token_ids", lo, hi) != store.attrs["bos_token_id"])
    bytes_index = {acts[i].tobytes(): i for i in usable}
    n_chunks = len(range(0, hi, int(store.attrs["chunk_tokens"])))  # the range touches chunks 0..11
    it = shuffled_batches(store, hook, batch, seed=9, token_range=(lo, hi), buffer_chunks=n_chunks)
    seen = [r.tobytes() for _ in range(len(usable) // batch) for r in next(it).view(torch.int16).numpy()]
    # Some rows repeat by value (same token right after BOS), so compare multisets.
    left = Counter(acts[i].tobytes() for i in usable)
    left.subtract(seen)
    assert min(left.values()) >= 0 and sum(left.values()) == len(usable) % batch  # no repeats, no BOS, nothing else
    order = [bytes_index[b] for b in seen[:200]]
    assert order != sorted(order)


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


def test_prefetch_stops_its_producer_when_the_consumer_leaves():
    """An abandoned prefetch must not leave its producer running (a thread inside a torch op at interpreter exit aborts
    the process: docs/examples/inspect_latents.py takes one batch and exits)."""
    import threading
    import time

    from saestrata.store.reader import prefetch

    produced = []

    def slow():
        for i in range(1000):
            time.sleep(0.01)
            produced.append(i)
            yield i

    before = set(threading.enumerate())
    gen = prefetch(slow(), depth=2)
    assert next(gen) == 0
    workers = set(threading.enumerate()) - before
    assert len(workers) == 1
    gen.close()
    assert not any(t.is_alive() for t in workers)
    n = len(produced)
    time.sleep(0.1)
    assert len(produced) == n < 10  # nothing more is read once the consumer has gone
    assert list(prefetch(iter(range(5)), depth=2)) == [0, 1, 2, 3, 4]  # a full pass still ends normally
