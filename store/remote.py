"""Whole-chunk reads of uncompressed shards in an object store: the remote counterpart of store/memmap.py.

Reading through zarr would fetch the shard index again for every read (one extra
round trip per chunk). Here each shard's index is fetched once (one size lookup and
one ranged GET of its tail, then cached) and each inner chunk is one ranged GET of
exactly its bytes plus its crc32c, which is checked on every fetch. The training
reader calls :meth:`RemoteChunks.chunk` from a thread pool, several chunks ahead of
the consumer (store/reader.py), so requests overlap.
"""

from __future__ import annotations

import threading

import numpy as np
import zarr

from .format import StoreError, shard_key
from .memmap import ShardedChunks
from .shardfile import ShardIndex, crc32c, read_index_at


class RemoteChunks(ShardedChunks):
    """Inner chunks of one uncompressed array of a store at a ``Location`` (object store), fetched whole.

    Same reading interface as :class:`~saestrata.store.memmap.MemmapArray` (``chunk``,
    ``chunk_tokens``, ``n_chunks``), so the reader treats both alike.

    Args:
        loc: the store's ``location.Location``.
        group: its open zarr group (for the array's layout).
        name: array name, e.g. ``blocks.1.hook_resid_post``.
        n_tokens: readable tokens (the committed prefix).

    Raises:
        StoreError: the array is missing or compressed / not sharded (then read it through zarr).
    """

    def __init__(self, loc, group: zarr.Group, name: str, n_tokens: int):
        self.loc, self.name, self.n_tokens = loc, name, int(n_tokens)
        try:
            arr = group[name]
        except Exception as err:
            raise StoreError(f"{loc} has no array {name!r}") from err
        self._set_geometry(arr, name)
        self._indexes: dict[int, ShardIndex] = {}
        self._lock = threading.Lock()

    def _key(self, shard: int) -> str:
        return f"{self.name}/{shard_key(self._arr, shard)}"

    def _index(self, shard: int) -> ShardIndex:
        index = self._indexes.get(shard)
        if index is None:
            index = read_index_at(self.loc, self._key(shard), self.shard_tokens // self.chunk_tokens)
            with self._lock:
                self._indexes[shard] = index
        return index

    def chunk(self, i: int) -> np.ndarray:
        """Inner chunk ``i`` as a fresh read-only array ``[rows, *row_shape]`` in the stored dtype, crc32c checked.

        Thread-safe (called from the reader's prefetch pool).

        Raises:
            IndexError: ``i`` outside ``[0, n_chunks)``.
            StoreError: missing/corrupt shard object, absent inner chunk, short read or crc32c mismatch.
        """
        shard, inner, start, size = self._locate(i)
        try:
            raw = self.loc.read_bytes(self._key(shard), start, start + size)
        except FileNotFoundError:
            raise StoreError(f"shard {shard} of {self.name}: its object vanished from {self.loc}") from None
        if len(raw) != size:
            raise StoreError(f"shard {shard} of {self.name}: short read of inner chunk {inner} ({len(raw)} of {size})")
        data = memoryview(raw)[: self._chunk_bytes]
        if crc32c(data) != bytes(raw[self._chunk_bytes :]):
            raise StoreError(f"shard {shard} of {self.name}: crc32c mismatch in inner chunk {inner}")
        rows = min(self.chunk_tokens, self.n_tokens - i * self.chunk_tokens)
        out = np.frombuffer(raw, dtype=self.dtype, count=self._chunk_bytes // self.dtype.itemsize)
        return out.reshape(self.chunk_tokens, *self.row_shape)[:rows]

    def close(self) -> None:
        """Forget the cached shard indexes."""
        self._indexes.clear()
