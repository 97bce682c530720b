"""Open an activation store and read it: whole ranges, or shuffled training batches.

Random single rows through the zarr API are ~1000x slower than a memmap
(DESIGN.md), so training reads whole inner chunks in a random order into a
shuffle buffer, with the next chunk prefetched in a background thread.
"""

from __future__ import annotations

import threading
import queue
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import zarr

from .format import FORMAT_NAME, StoreError, from_stored
from .memmap import MemmapArray


class ActivationStore:
    """Read-only view of a store written by :class:`saestrata.store.writer.StoreWriter`.

    Args:
        path: store directory.
        allow_partial: accept a store whose shards are not all committed (reads
            only the committed prefix).

    Raises:
        StoreError: not a saestrata store, or uncommitted shards without ``allow_partial``.
    """

    def __init__(self, path: str | Path, allow_partial: bool = False):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path} is not an activation store (no zarr.json): run 'saestrata harvest' first")
        try:
            self.group = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        except Exception as err:
            raise StoreError(f"{self.path} cannot be opened as a Zarr v3 group ({err}): the store is corrupt") from err
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path} is a Zarr group but not a saestrata activation store")
        committed = set(self.attrs.get("committed_shards", []))
        missing = [s for s in range(self.attrs["n_shards"]) if s not in committed]
        if missing and not allow_partial:
            raise StoreError(
                f"{self.path} is half-written: shards {missing[:5]}{'...' if len(missing) > 5 else ''} are not "
                "committed; resume the harvest or pass --allow-partial"
            )
        # Readable tokens: the committed prefix of whole shards.
        first_missing = missing[0] if missing else self.attrs["n_shards"]
        self.n_tokens = min(self.attrs["n_tokens"], first_missing * self.attrs["shard_tokens"])

    @property
    def hooks(self) -> list[str]:
        """Hook names stored, e.g. ``["blocks.4.hook_resid_post", ...]``."""
        return list(self.attrs["hooks"])

    @property
    def d_model(self) -> int:
        """Activation width."""
        return int(self.attrs["d_model"])

    @property
    def dtype(self) -> str:
        """Logical activation dtype (``bfloat16`` ...)."""
        return self.attrs["dtype"]

    def hook_for_layer(self, layer: int) -> str:
        """Hook name of block ``layer``; raises StoreError naming the layers the store has."""
        name = f"blocks.{layer}.hook_resid_post"
        if name not in self.hooks:
            have = ", ".join(str(h.split(".")[1]) for h in self.hooks)
            raise StoreError(f"store {self.path.name} has no layer {layer}: it holds layers {have}")
        return name

    def activations(self, hook: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``hook`` as a ``[n, d_model]`` tensor in the logical dtype (CPU)."""
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        return from_stored(self._read(hook, start, stop), self.dtype)

    def aligned(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of ``token_ids``, ``doc_index`` or ``position``."""
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        return self._read(name, start, stop)

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of array ``name`` in the stored dtype.

        Chunk-aligned reads of uncompressed local shards come from ``np.memmap`` views
        (crc32c checked on first touch, store/memmap.py); everything else goes through
        the zarr API (random access through zarr is ~1000x slower, DESIGN.md).
        """
        mapped = self._mapped(name)
        if mapped is None or start % mapped.chunk_tokens or start >= stop:
            return self.group[name][start:stop]
        first, last = start // mapped.chunk_tokens, (stop - 1) // mapped.chunk_tokens
        parts = [mapped.chunk(c) for c in range(first, last + 1)]
        return np.concatenate(parts)[: stop - start]  # a copy: callers may keep it after the map closes

    def _mapped(self, name: str):
        """A cached :class:`MemmapArray` for ``name``, or None when the array cannot be mapped."""
        if not hasattr(self, "_maps"):
            self._maps = {}
        if name not in self._maps:
            try:
                self._maps[name] = MemmapArray(self.path, name, self.n_tokens)
            except StoreError:
                self._maps[name] = None
        return self._maps[name]

    def stats(self, hook: str) -> dict:
        """Per-hook activation statistics recorded at harvest (``mean_norm``, ``max_abs``, ...)."""
        stats = self.attrs.get("activation_stats", {}).get(hook)
        if stats is None:
            raise StoreError(f"{self.path} has no activation statistics for {hook}: the harvest did not finish")
        return stats


def shuffled_batches(
    store: ActivationStore,
    hook: str,
    batch_size: int,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
    exclude_bos: bool = True,
    buffer_chunks: int = 16,
) -> Iterator[torch.Tensor]:
    """Endless shuffled batches ``[batch_size, d_model]`` (logical dtype, CPU) from one hook.

    Each epoch visits every inner chunk of ``token_range`` once in a seeded random
    order; ``buffer_chunks`` chunks are mixed and row-shuffled before batches are cut.
    Deterministic given ``seed``. BOS rows (``token_ids == bos_token_id``) are skipped
    when ``exclude_bos``: their norms are orders of magnitude above other tokens.

    Raises:
        StoreError: the range holds no usable rows.
    """
    start, stop = token_range or (0, store.n_tokens)
    chunk = int(store.attrs["chunk_tokens"])
    bounds = [(s, min(s + chunk, stop)) for s in range(start, stop, chunk)]
    bos = store.attrs.get("bos_token_id")
    if not bounds:
        raise StoreError(f"no tokens in range {start}..{stop} of {store.path}: the store or range is empty")
    # Separate generators: chunk order is drawn in the prefetch thread, row order here.
    chunk_rng, row_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])

    def chunks() -> Iterator[torch.Tensor]:
        while True:
            for i in chunk_rng.permutation(len(bounds)):
                lo, hi = bounds[i]
                acts = store.activations(hook, lo, hi)
                if exclude_bos and bos is not None:
                    keep = store.aligned("token_ids", lo, hi) != bos
                    acts = acts[torch.from_numpy(keep)]
                yield acts

    pending = torch.empty(0, store.d_model, dtype=store.activations(hook, start, start + 1).dtype)
    source = _prefetch(chunks())
    while True:
        parts = [pending] + [next(source) for _ in range(buffer_chunks)]
        buf = torch.cat(parts)
        if len(buf) == 0:
            raise StoreError(f"no usable (non-BOS) rows in {store.path}")
        buf = buf[torch.from_numpy(row_rng.permutation(len(buf)))]
        n_full = len(buf) // batch_size
        for b in range(n_full):
            yield buf[b * batch_size : (b + 1) * batch_size]
        pending = buf[n_full * batch_size :]



def sequence_batches(
    store: ActivationStore,
    hook: str,
    rows_per_batch: int,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
    buffer_chunks: int = 16,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless batches of whole context rows, for SAEs that model the token sequence.

    Yields CPU tuples ``(acts, doc_index, token_ids)``: ``acts [R, T, d_model]`` in the
    logical dtype, ``doc_index [R, T]`` int64, ``token_ids [R, T]`` int32, with ``R =
    rows_per_batch`` and ``T = attrs["context_length"]``. Rows never straddle a chunk
    (chunks hold whole rows). Rows are kept whole and in token order; the row order
    is seeded-random: each epoch visits the inner chunks of ``token_range`` in a random
    order and shuffles the rows of ``buffer_chunks`` chunks at a time (as
    :func:`shuffled_batches` does for tokens). BOS rows are included; callers mask
    them with ``token_ids``. ``token_range`` is shrunk to whole rows.

    Raises:
        StoreError: the chunk size is not a multiple of the context length, or the
            range holds no whole row.
        ValueError: ``rows_per_batch < 1``.
    """
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    ctx, chunk = int(store.attrs["context_length"]), int(store.attrs["chunk_tokens"])
    if chunk % ctx:
        raise StoreError(f"{store.path}: chunk_tokens {chunk} is not a multiple of context length {ctx}")
    start, stop = token_range or (0, store.n_tokens)
    start, stop = -(-start // ctx) * ctx, stop // ctx * ctx  # whole rows only
    if stop <= start:
        raise StoreError(f"no whole context row in range {start}..{stop} of {store.path}")
    bounds = [(s, min(s + chunk, stop)) for s in range(start, stop, chunk)]
    chunk_rng, row_rng = np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3])

    def chunks() -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            for i in chunk_rng.permutation(len(bounds)):
                lo, hi = bounds[i]
                yield (store.activations(hook, lo, hi).reshape(-1, ctx, store.d_model),
                       torch.from_numpy(store.aligned("doc_index", lo, hi).astype(np.int64)).reshape(-1, ctx),
                       torch.from_numpy(store.aligned("token_ids", lo, hi).astype(np.int32)).reshape(-1, ctx))

    source = _prefetch(chunks())
    pending: list[tuple[torch.Tensor, ...]] = []
    while True:
        parts = pending + [next(source) for _ in range(buffer_chunks)]
        buf = [torch.cat(column) for column in zip(*parts)]
        order = torch.from_numpy(row_rng.permutation(len(buf[0])))
        buf = [column[order] for column in buf]
        n_full = len(order) // rows_per_batch
        for b in range(n_full):
            yield tuple(column[b * rows_per_batch : (b + 1) * rows_per_batch] for column in buf)
        pending = [tuple(column[n_full * rows_per_batch :] for column in buf)]

def _prefetch(it: Iterator, depth: int = 4) -> Iterator:
    """Run ``it`` in a daemon thread, ``depth`` items ahead (zarr reads release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()

    def work():
        try:
            for item in it:
                q.put(item)
        except BaseException as err:  # hand the error to the consumer
            q.put(err)
        q.put(sentinel)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is sentinel:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
