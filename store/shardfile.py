"""The bytes of one shard file, read without zarr (for verification and memory-mapping).

Layout written by :class:`~saestrata.store.writer.StoreWriter` (zarr v3 ``sharding_indexed``,
index at the end, inner codecs ``bytes`` + ``crc32c``, no compression):

- each inner chunk is stored as its raw little-endian bytes followed by a 4-byte crc32c
  of those bytes, at an offset given by the index (zarr orders chunks in the file by
  Morton order, so always go through the index);
- the index is the last ``16 * n_inner + 4`` bytes: ``n_inner`` pairs of little-endian
  uint64 ``(offset, nbytes)`` in inner-chunk order along tokens (``nbytes`` includes the
  4 crc bytes; both are ``2**64 - 1`` for a chunk that was never written), then the
  crc32c of those ``16 * n_inner`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from .format import StoreError

EMPTY = np.uint64(2**64 - 1)
CRC_BYTES = 4


@dataclass(frozen=True)
class ShardIndex:
    """Parsed index of one shard file.

    Attributes:
        offsets: ``[n_inner]`` uint64 byte offsets of each inner chunk (``EMPTY`` if absent).
        nbytes: ``[n_inner]`` uint64 stored sizes, crc included (``EMPTY`` if absent).
        file_size: size of the shard file in bytes.
    """

    offsets: np.ndarray
    nbytes: np.ndarray
    file_size: int

    def present(self, inner: int) -> bool:
        """True if inner chunk ``inner`` was written."""
        return self.offsets[inner] != EMPTY


def crc32c(data: bytes | memoryview) -> bytes:
    """crc32c of ``data`` as the 4 little-endian bytes zarr's crc32c codec appends."""
    return int(google_crc32c.value(bytes(data))).to_bytes(4, "little")


def read_index(path: str | Path, n_inner: int) -> ShardIndex:
    """Parse and checksum the index at the end of a local shard file.

    Args:
        path: the shard file.
        n_inner: inner chunks per shard (``shard_tokens // chunk_tokens``).

    Raises:
        StoreError: file missing or too short, index crc mismatch, or an entry pointing outside the file.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"shard file {path} is missing")
    size = path.stat().st_size
    index_bytes = 16 * n_inner + CRC_BYTES
    if size < index_bytes:
        raise StoreError(f"shard file {path} is truncated ({size} bytes, index alone needs {index_bytes})")
    with open(path, "rb") as fh:
        fh.seek(size - index_bytes)
        raw = fh.read(index_bytes)
    return parse_index(raw, n_inner, size, path)


def read_index_at(loc, key: str, n_inner: int) -> ShardIndex:
    """:func:`read_index` for any store location (local folder or object store): one size lookup + one ranged read.

    Args:
        loc: the store's ``location.Location``.
        key: the shard object's key relative to the store root, e.g. ``token_ids/c/3``.
        n_inner: inner chunks per shard.

    Raises:
        StoreError: as :func:`read_index` (object missing, truncated, corrupt index).
    """
    if not loc.remote:
        return read_index(loc.file(key), n_inner)
    where = f"{loc}/{key}"
    try:
        size = loc.size(key)
    except FileNotFoundError:
        raise StoreError(f"shard file {where} is missing") from None
    index_bytes = 16 * n_inner + CRC_BYTES
    if size < index_bytes:
        raise StoreError(f"shard file {where} is truncated ({size} bytes, index alone needs {index_bytes})")
    return parse_index(loc.read_bytes(key, size - index_bytes, size), n_inner, size, where)


def parse_index(raw: bytes, n_inner: int, size: int, where) -> ShardIndex:
    """Check and decode the ``16 * n_inner + 4`` index bytes of a shard file of ``size`` bytes (``where``: for messages).

    Raises:
        StoreError: wrong length, index crc mismatch, or an entry pointing outside the data.
    """
    index_bytes = 16 * n_inner + CRC_BYTES
    if len(raw) != index_bytes:
        raise StoreError(f"shard file {where} is truncated (index read gave {len(raw)} of {index_bytes} bytes)")
    body, stored_crc = raw[:-CRC_BYTES], raw[-CRC_BYTES:]
    if crc32c(body) != stored_crc:
        raise StoreError(f"shard file {where} has a corrupt index (crc32c mismatch)")
    pairs = np.frombuffer(body, dtype="<u8").reshape(n_inner, 2)
    offsets, nbytes = pairs[:, 0].copy(), pairs[:, 1].copy()
    present = offsets != EMPTY
    if np.any(offsets[present] + nbytes[present] > size - index_bytes):
        raise StoreError(f"shard file {where} has index entries pointing past its data")
    return ShardIndex(offsets=offsets, nbytes=nbytes, file_size=size)
