"""Memory-mapped reads of uncompressed local shards: random rows without going through zarr.

Random single rows through the zarr API are ~1000x slower than ``np.memmap``
(DESIGN.md). With the writer's codecs (no compression, ``bytes`` + ``crc32c``),
every inner chunk is its raw little-endian bytes at an offset given by the shard
index, followed by a 4-byte crc32c (store/shardfile.py). This module maps each
shard file once and returns numpy views of those bytes. Each inner chunk's crc32c
is checked the first time it is touched (``verify=True``), so the mmap path keeps
the store's integrity guarantee.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from .format import StoreError, from_stored, shard_key
from .shardfile import CRC_BYTES, ShardIndex, crc32c, read_index

_MAPPABLE_INNER = ["bytes", "crc32c"]


def _check_mappable(arr: zarr.Array, name: str) -> None:
    """Raise StoreError unless ``arr`` is sharded along tokens with uncompressed little-endian inner chunks."""
    codecs = arr.metadata.to_dict()["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        raise StoreError(f"{name} is not sharded: it cannot be memory-mapped, read it through ActivationStore")
    conf = codecs[0]["configuration"]
    inner = [c["name"] for c in conf["codecs"]]
    endian = conf["codecs"][0].get("configuration", {}).get("endian", "little")
    if inner != _MAPPABLE_INNER or endian != "little" or conf.get("index_location", "end") != "end":
        raise StoreError(f"{name} uses codecs {inner} ({endian}): only uncompressed bytes+crc32c shards can be mapped")


class ShardedChunks:
    """Geometry and bounds checks shared by the local (memmap) and remote (byte-range) chunk readers.

    Subclasses call :meth:`_set_geometry` once and implement ``_index(shard) -> ShardIndex``.
    """

    def _set_geometry(self, arr: zarr.Array, name: str) -> None:
        """Check ``arr`` is mappable (raises StoreError) and record its chunk/shard geometry."""
        _check_mappable(arr, name)
        self._arr = arr
        self.chunk_tokens = int(arr.chunks[0])
        self.shard_tokens = int(arr.shards[0])
        self.row_shape = tuple(arr.shape[1:])
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")
        self._chunk_bytes = self.chunk_tokens * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def n_chunks(self) -> int:
        """Inner chunks covering the readable tokens (the last may be partial)."""
        return -(-self.n_tokens // self.chunk_tokens)

    def _locate(self, i: int) -> tuple[int, int, int, int]:
        """``(shard, inner, byte offset, byte size incl. crc)`` of inner chunk ``i``.

        Raises:
            IndexError: ``i`` outside ``[0, n_chunks)``.
            StoreError: the shard index says the chunk is absent or has the wrong size.
        """
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} outside 0..{self.n_chunks - 1} of {self.name}")
        shard, inner = divmod(i, self.shard_tokens // self.chunk_tokens)
        index = self._index(shard)
        if not index.present(inner):
            raise StoreError(f"shard {shard} of {self.name} has no inner chunk {inner}: the store is damaged")
        start, size = int(index.offsets[inner]), int(index.nbytes[inner])
        if size != self._chunk_bytes + CRC_BYTES:
            raise StoreError(f"shard {shard} of {self.name}: inner chunk {inner} has {size} bytes, "
                             f"expected {self._chunk_bytes + CRC_BYTES}")
        return shard, inner, start, size


class MemmapArray(ShardedChunks):
    """Zero-copy access to one array of a local store through ``np.memmap`` of its shard files.

    Args:
        store_path: the store directory (a local folder).
        name: array name, a hook such as ``blocks.8.hook_resid_post`` or ``token_ids``.
        n_tokens: readable tokens (e.g. ``ActivationStore.n_tokens``: the committed prefix).
        verify: check each inner chunk's crc32c on first access.

    Raises:
        StoreError: the array is missing, compressed/not sharded, or a shard file is
            missing, truncated or has a corrupt index / chunk (on access).
    """

    def __init__(self, store_path: str | Path, name: str, n_tokens: int, verify: bool = True):
        self.path, self.name, self.n_tokens, self.verify = Path(store_path), name, int(n_tokens), verify
        try:
            arr = zarr.open_group(str(self.path), mode="r", use_consolidated=False)[name]
        except Exception as err:
            raise StoreError(f"{self.path} has no array {name!r}") from err
        self._set_geometry(arr, name)
        self._maps: dict[int, tuple[np.ndarray, ShardIndex]] = {}
        self._checked: set[int] = set()

    def _shard(self, shard: int) -> tuple[np.ndarray, ShardIndex]:
        if shard not in self._maps:
            file = self.path / self.name / shard_key(self._arr, shard)
            index = read_index(file, self.shard_tokens // self.chunk_tokens)
            # A plain ndarray view of the map: slicing an np.memmap subclass costs ~10x more per call.
            self._maps[shard] = (np.asarray(np.memmap(file, dtype=np.uint8, mode="r")), index)
        return self._maps[shard]

    def _index(self, shard: int) -> ShardIndex:
        return self._shard(shard)[1]

    def chunk(self, i: int) -> np.ndarray:
        """Inner chunk ``i`` as a read-only view ``[rows, *row_shape]`` in the stored dtype (rows <= chunk_tokens).

        Raises:
            IndexError: ``i`` outside ``[0, n_chunks)``.
            StoreError: missing/corrupt shard file, absent inner chunk or crc32c mismatch.
        """
        shard, inner, start, size = self._locate(i)
        data, expected = self._shard(shard)[0], self._chunk_bytes
        raw = data[start : start + expected]
        if self.verify and i not in self._checked:
            if crc32c(raw) != bytes(data[start + expected : start + size]):
                raise StoreError(f"shard {shard} of {self.name}: crc32c mismatch in inner chunk {inner}")
            self._checked.add(i)
        rows = min(self.chunk_tokens, self.n_tokens - i * self.chunk_tokens)
        return raw.view(self.dtype).reshape(self.chunk_tokens, *self.row_shape)[:rows]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Gather arbitrary token rows, ``[len(rows), *row_shape]`` in the stored dtype (a copy, input order kept).

        Raises:
            IndexError: a row outside ``[0, n_tokens)``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_tokens):
            raise IndexError(f"rows must lie in 0..{self.n_tokens - 1} of {self.name}")
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        chunk_of = rows // self.chunk_tokens
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = self.chunk(int(c))[rows[sel] - c * self.chunk_tokens]
        return out

    def close(self) -> None:
        """Drop the file mappings (views returned earlier stay valid until garbage-collected)."""
        self._maps.clear()


def memmap_activations(store, hook: str, rows: np.ndarray, verify: bool = True) -> torch.Tensor:
    """Random rows of ``hook`` from an open ``ActivationStore`` via memmap: ``[len(rows), d_model]``, logical dtype.

    Convenience for one-off gathers; keep a :class:`MemmapArray` for repeated access.

    Raises:
        StoreError / IndexError: as :meth:`MemmapArray.take`.
    """
    mapped = MemmapArray(store.path, hook, store.n_tokens, verify=verify)
    return from_stored(mapped.take(rows), store.dtype)
