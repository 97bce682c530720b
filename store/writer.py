"""Create an activation store and write it shard by shard with a commit record.

Protocol (DESIGN.md, measured zarr 3.x facts): arrays are preallocated to the
planned token count; a writer writes only whole shards; a shard counts only once
its index is appended to the group attribute ``committed_shards`` after all its
arrays are written; metadata is re-consolidated at every commit so readers never
see stale consolidated metadata.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from .format import ALIGNED_ARRAYS, FORMAT_NAME, FORMAT_VERSION, StoreError, n_shards, shard_bounds, stored_dtype


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(str(path))


class StoreWriter:
    """Writes one harvest into a new Zarr v3 group.

    Args:
        path: directory to create (must not exist, or be empty).
        hooks: hook names, e.g. ``["blocks.8.hook_resid_post"]``.
        d_model: activation width.
        n_tokens: planned tokens (a multiple of ``shard_tokens``' row size is not required).
        shard_tokens: tokens per shard; must be a multiple of ``chunk_tokens``.
        chunk_tokens: tokens per inner chunk (the unit of reading and checksumming).
        dtype: logical activation dtype (``bfloat16``, ``float16``, ``float32``).
        attrs: metadata stored in the group attributes (JSON-serialisable).

    Raises:
        StoreError: if ``path`` holds anything, or shapes are inconsistent.
    """

    def __init__(
        self,
        path: str | Path,
        hooks: list[str],
        d_model: int,
        n_tokens: int,
        shard_tokens: int,
        chunk_tokens: int,
        dtype: str,
        attrs: dict,
    ):
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()):
            raise StoreError(f"{self.path} already exists and is not empty: choose a new --out or delete it")
        if n_tokens <= 0:
            raise StoreError("nothing to write: the planned token count is 0 (is the dataset empty?)")
        if shard_tokens % chunk_tokens:
            raise StoreError(f"shard_tokens {shard_tokens} must be a multiple of chunk_tokens {chunk_tokens}")
        self.hooks, self.n_tokens, self.shard_tokens = list(hooks), n_tokens, shard_tokens
        self.group = zarr.open_group(str(self.path), mode="w")
        crc = [zarr.codecs.Crc32cCodec()]
        for hook in self.hooks:
            arr = self.group.create_array(
                hook, shape=(n_tokens, d_model), chunks=(chunk_tokens, d_model), shards=(shard_tokens, d_model),
                dtype=stored_dtype(dtype), compressors=crc, fill_value=0,
            )
            arr.attrs.update({"logical_dtype": dtype, "hook_name": hook})
        for name, np_dtype in ALIGNED_ARRAYS.items():
            self.group.create_array(
                name, shape=(n_tokens,), chunks=(chunk_tokens,), shards=(shard_tokens,),
                dtype=np_dtype, compressors=crc, fill_value=0,
            )
        self.group.attrs.update({
            **attrs,
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "hooks": self.hooks, "d_model": d_model,
            "dtype": dtype, "n_tokens": n_tokens, "shard_tokens": shard_tokens, "chunk_tokens": chunk_tokens,
            "n_shards": n_shards(n_tokens, shard_tokens), "committed_shards": [], "complete": False,
        })
        _consolidate(self.path)

    def write_shard(self, shard: int, acts: dict[str, np.ndarray], aligned: dict[str, np.ndarray]) -> None:
        """Write all arrays of one whole shard and commit it.

        Args:
            shard: shard number.
            acts: ``{hook: [rows, d_model]}`` in the stored dtype (see ``format.to_stored``).
            aligned: ``{"token_ids", "doc_index", "position"}`` each ``[rows]``.

        Raises:
            StoreError: wrong row count for the shard or a missing array.
        """
        start, stop = shard_bounds(shard, self.shard_tokens, self.n_tokens)
        for name, values in {**acts, **aligned}.items():
            if len(values) != stop - start:
                raise StoreError(f"shard {shard} of {name} needs {stop - start} rows, got {len(values)}")
        missing = set(self.hooks) - set(acts) | set(ALIGNED_ARRAYS) - set(aligned)
        if missing:
            raise StoreError(f"shard {shard} misses arrays {sorted(missing)}")
        for name, values in {**acts, **aligned}.items():
            self.group[name][start:stop] = values
        committed = list(self.group.attrs["committed_shards"]) + [shard]
        self.group.attrs["committed_shards"] = sorted(committed)
        _consolidate(self.path)

    def truncate(self, n_tokens: int) -> None:
        """Shrink every array to ``n_tokens`` when the text source ran out early.

        Only valid for a single writer after its last shard (resize from several
        processes loses rows, DESIGN.md). Raises StoreError if ``n_tokens`` is 0.
        """
        if n_tokens <= 0:
            raise StoreError("the text source gave no tokens: the dataset is empty")
        for name in [*self.hooks, *ALIGNED_ARRAYS]:
            arr = self.group[name]
            arr.resize((n_tokens, *arr.shape[1:]))
        self.n_tokens = n_tokens
        self.group.attrs.update({"n_tokens": n_tokens, "n_shards": n_shards(n_tokens, self.shard_tokens)})

    def finish(self, extra_attrs: dict) -> None:
        """Record final metadata (e.g. activation statistics) and mark the store complete."""
        self.group.attrs.update({**extra_attrs, "complete": True})
        _consolidate(self.path)
