"""The activation store's on-disk layout (Zarr v3), shared by writer and readers.

One Zarr group per harvest (DESIGN.md, "Store format"):

- one array per hook point, e.g. ``blocks.8.hook_resid_post``, shape
  ``(n_tokens, d_model)``; bfloat16 is stored as its ``uint16`` bit pattern with
  ``attrs["logical_dtype"] = "bfloat16"`` (zarr has no bfloat16);
- aligned 1-D arrays ``token_ids`` (int32), ``doc_index`` (int64), ``position`` (int32);
- group attributes: everything needed to reproduce and verify the harvest, plus the
  commit record ``committed_shards`` (shards are counted only once recorded).

Arrays are sharded along tokens; every shard holds whole context rows, inner chunks
carry a crc32c checksum and no compression (DESIGN.md measured ~7-25% savings at
2-4x lower write speed).

This module imports nothing else from saestrata (data flows one way).
"""

from __future__ import annotations

import numpy as np
import torch

FORMAT_NAME = "saestrata-activations"
FORMAT_VERSION = 1
ALIGNED_ARRAYS = {"token_ids": np.int32, "doc_index": np.int64, "position": np.int32}
_STORED_DTYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}


class StoreError(ValueError):
    """Raised for a missing, corrupt, half-written or mismatched store."""


def stored_dtype(logical: str) -> np.dtype:
    """numpy dtype used on disk for a logical activation dtype (bfloat16 -> uint16 bits)."""
    if logical not in _STORED_DTYPE:
        raise StoreError(f"unsupported activation dtype {logical!r}: use bfloat16, float16 or float32")
    return np.dtype(_STORED_DTYPE[logical])


def to_stored(acts: torch.Tensor) -> np.ndarray:
    """``[n, d]`` activations (bf16/f16/f32, any device) -> numpy array in the stored dtype, bit-exact."""
    acts = acts.detach().cpu().contiguous()
    if acts.dtype == torch.bfloat16:
        return acts.view(torch.int16).numpy().view(np.uint16)
    return acts.numpy()


def from_stored(array: np.ndarray, logical: str) -> torch.Tensor:
    """Inverse of :func:`to_stored`: numpy ``[n, d]`` -> torch tensor of the logical dtype (no copy when possible)."""
    if logical == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def shard_bounds(shard: int, shard_tokens: int, n_tokens: int) -> tuple[int, int]:
    """Token range ``[start, stop)`` of shard number ``shard``."""
    start = shard * shard_tokens
    return start, min(start + shard_tokens, n_tokens)


def n_shards(n_tokens: int, shard_tokens: int) -> int:
    """Number of shards covering ``n_tokens`` (the last may be partial)."""
    return -(-n_tokens // shard_tokens)
