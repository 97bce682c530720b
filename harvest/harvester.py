"""``saestrata harvest``: text -> packed rows -> residual stream -> Zarr store.

One forward pass per batch of rows, stopped after the deepest requested block;
activations are buffered until a whole shard is full, then the shard is written
and committed (store/writer.py). Activation statistics over non-BOS tokens are
recorded in the store metadata at the end (trainers normalise with them).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..device import fast_dtype, resolve_device
from ..store import ActivationStore, StoreError, StoreWriter
from ..store.format import FORMAT_VERSION, ActivationStats, committed_tokens, shard_bounds, to_stored
from ..store.reader import prefetch
from ..store.location import Location, as_location
from ..store.writer import is_empty_store_dir
from .hooks import residuals
from .model import EMBEDDED_MODEL, LoadedModel, ModelError, check_layers, hook_name, load_model
from .packing import Row, pack_documents
from .text import EMBEDDED_DATASET, SPLIT_RULE, DatasetError, iter_documents, source_files


@dataclass
class HarvestConfig:
    """What to harvest. ``tokens`` is rounded up to whole context rows."""

    layers: list[int]
    tokens: int
    out: Path  # a folder, or an object-store URL string such as "s3://bucket/prefix/store.zarr"
    model: str = EMBEDDED_MODEL
    dataset: str = EMBEDDED_DATASET
    split: str = "train"
    context_length: int = 128
    batch_rows: int = 16
    seed: int = 0
    text_field: str = "text"
    device: str = "auto"
    dtype: str = "bfloat16"
    # dtype the LM computes in (None: ``dtype``); activations are rounded to ``dtype`` to be stored.
    # "auto" (the CLI's default): see :func:`resolve_compute_dtype` (float32 where bf16 is emulated, ~5x slower).
    compute_dtype: str | None = None
    rows_per_chunk: int = 8
    chunks_per_shard: int = 8
    extra_attrs: dict = field(default_factory=dict)
    workers: int = 0  # >0: shard writers on a dask LocalCluster of this many processes (harvest/parallel.py)
    scheduler: str | None = None  # address of an existing dask scheduler (workers must see ``out``)
    storage_options: dict | None = None  # fsspec/s3fs options when ``out`` is a URL (credentials, endpoint_url)


def harvest(cfg: HarvestConfig, lm: LoadedModel | None = None, progress: bool = True) -> Path:
    """Write activations of ``cfg.layers`` for ``cfg.tokens`` tokens into the store at ``cfg.out``.

    A new or empty ``cfg.out`` gets a new store. An existing store with the same
    identity (:func:`harvest_identity`) is resumed from its uncommitted shards (the
    text order is deterministic, so the result is bit-identical to an uninterrupted
    run), reused as is when complete and large enough, or extended when ``cfg.tokens``
    asks for more (see ``StoreWriter.extend`` for when that is refused). On resume
    the store's own layout (shard/chunk sizes, batch rows) wins over ``cfg``'s.

    Args:
        cfg: what to harvest.
        lm: an already loaded model (else loaded from ``cfg.model``).
        progress: show a tqdm bar.

    Returns:
        the store path (``Path``), or the URL (``str``) for an object store.

    Raises:
        ModelError: layer out of range / model not loadable / context length beyond the model's positions.
        DatasetError: the source yields no full context row.
        StoreError: ``cfg.out`` is not empty and not a store, or an extension is unsafe.
        IdentityMismatch: ``cfg.out`` holds a store with a different identity (names the fields).
        FloatingPointError: the model produced NaN/Inf activations (nothing of that shard is written).
    """
    if cfg.compute_dtype == "auto":  # resolved once, so dask workers load the same dtype
        cfg = replace(cfg, compute_dtype=lm.dtype if lm is not None else resolve_compute_dtype(cfg))
    lm = lm or load_model(cfg.model, cfg.device, cfg.compute_dtype or cfg.dtype)
    layers = check_layers(cfg.layers, lm.n_layers, cfg.model)
    _check_context_length(cfg, lm)
    hooks = [hook_name(layer) for layer in layers]
    identity = harvest_identity(cfg, lm, layers, hooks)
    n_rows = max(1, -(-cfg.tokens // cfg.context_length))
    writer = _open_writer(cfg, lm, layers, hooks, identity, n_rows)
    if writer is None:
        return _out_location(cfg).path
    try:
        if cfg.workers or cfg.scheduler:
            from .parallel import write_pending_parallel

            write_pending_parallel(writer, cfg, lm, layers, hooks, progress)
        else:
            _write_pending(writer, cfg, lm, layers, hooks, progress)
        stats = _merge_stats(writer.records(), hooks)
        writer.finish({"activation_stats": {h: s.as_dict() for h, s in stats.items()}})
    finally:
        # An error or Ctrl-C keeps every committed shard; the lock is released at once, so a
        # rerun (also in this process, e.g. a notebook) can resume instead of being refused.
        writer.close()
    return _out_location(cfg).path


def resolve_compute_dtype(cfg: HarvestConfig) -> str:
    """The dtype the LM computes in for ``cfg``: ``cfg.compute_dtype``, ``cfg.dtype`` when that is None, and
    for ``"auto"`` the compute dtype of the store already at ``cfg.out`` (so a resumed or extended store
    stays bit for bit one harvest, on any machine), else :func:`~saestrata.device.fast_dtype` of
    ``cfg.dtype`` on ``cfg.device`` (float32 in place of bfloat16 where the device has no native bf16).

    An unreadable store at ``cfg.out`` counts as none here; :func:`harvest` reports it when it opens it.
    """
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype or cfg.dtype
    try:
        attrs = ActivationStore(cfg.out, allow_partial=True, storage_options=cfg.storage_options).attrs
        return attrs.get("compute_dtype", attrs["dtype"])
    except (StoreError, KeyError):
        return fast_dtype(cfg.dtype, resolve_device(cfg.device))


def _check_context_length(cfg: HarvestConfig, lm: LoadedModel) -> None:
    """Refuse rows longer than the model's position range (``max_position_embeddings``), or shorter than 2.

    Raises:
        ModelError: one line naming ``--context-length`` and the allowed range.
    """
    text_cfg = getattr(lm.model.config, "text_config", lm.model.config)
    limit = getattr(text_cfg, "max_position_embeddings", None)
    if cfg.context_length < 2 or (limit is not None and cfg.context_length > limit):
        raise ModelError(f"--context-length {cfg.context_length} does not fit {cfg.model}: use 2..{limit} "
                         "(BOS plus at least one token, at most max_position_embeddings)")


def _out_location(cfg: HarvestConfig) -> Location:
    """``cfg.out`` (folder or URL) with ``cfg.storage_options``."""
    return as_location(cfg.out, cfg.storage_options)


def _rows(cfg: HarvestConfig, lm: LoadedModel, start: dict | None = None) -> Iterator[Row]:
    """Packed rows of the configured source in their deterministic order (from a row's ``end`` cursor ``start``)."""
    docs = iter_documents(cfg.dataset, cfg.split, cfg.seed, cfg.text_field, start["source"] if start else None)
    return pack_documents(docs, lm.tokenizer, cfg.context_length, start=start)


def _open_writer(
    cfg: HarvestConfig, lm: LoadedModel, layers: list[int], hooks: list[str], identity: dict, n_rows: int
) -> StoreWriter | None:
    """A writer for a new, resumed or extended store, or None when a complete store is reused."""
    ctx, out = cfg.context_length, _out_location(cfg)
    if is_empty_store_dir(out):
        if next(_rows(cfg, lm), None) is None:
            raise DatasetError(
                f"dataset {cfg.dataset!r} split {cfg.split!r} gave no full row of {ctx} tokens: it is empty"
            )
        shard_rows = cfg.rows_per_chunk * cfg.chunks_per_shard
        attrs = {**_identity_attrs(cfg, lm, layers, hooks), "batch_rows": cfg.batch_rows}
        return StoreWriter(out, hooks, lm.d_model, n_rows * ctx, shard_tokens=shard_rows * ctx,
                           chunk_tokens=cfg.rows_per_chunk * ctx, dtype=cfg.dtype, attrs=attrs, identity=identity)
    writer = StoreWriter.reopen(out, identity)
    wanted = n_rows * ctx
    if writer.complete and (wanted <= writer.n_tokens or writer.source_exhausted):
        why = "its text source ran out" if wanted > writer.n_tokens else f"{wanted} tokens requested"
        print(f"reusing {out}: complete store with {writer.n_tokens} tokens ({why})")
        writer.close()
        return None
    if wanted > writer.n_tokens and not writer.source_exhausted:
        print(f"extending {out} from {writer.n_tokens} to {wanted} planned tokens")
        writer.extend(wanted, {"tokens_requested": cfg.tokens})
    pending = writer.pending_shards()
    if pending and writer.committed:
        print(f"resuming {out} at shard {pending[0]} of {writer.n_shards} ({len(writer.committed)} committed)")
    return writer


@dataclass
class ShardJob:
    """One uncommitted shard to harvest: its number and its packed rows (in text order).

    ``truncate_to`` is set on the last job when the text source ran out: the plan
    must shrink to that many tokens before this shard is written (``rows`` may be empty).
    """

    shard: int
    rows: list[Row]
    truncate_to: int | None = None


def pending_jobs(writer: StoreWriter, cfg: HarvestConfig, lm: LoadedModel) -> Iterator[ShardJob]:
    """Jobs for every uncommitted shard, in shard order, for this process or for workers (:mod:`.parallel`).

    The text restarts where the committed prefix of shards ends (the ``source_end`` cursor in
    the last prefix shard's record, :func:`resume_cursor`): a resumed harvest of a streamed
    source neither downloads nor tokenises that part again. Stores written before cursors were
    recorded re-read the text from the start. Rows of committed shards past the prefix are
    skipped (and counted, to keep every shard's rows in text order), so resuming sees the same rows.

    Raises:
        StoreError: the text source gives fewer rows than an already committed shard holds.
        DatasetError: the recorded cursor does not fit the source any more.
    """
    ctx = cfg.context_length
    shard_rows = writer.shard_tokens // ctx
    first, start = resume_cursor(writer, shard_rows)
    if first:
        print(f"text source: restarting at document {start['doc_index']}, token {start['offset']} (the end of shard "
              f"{first - 1})" if start else "text source: re-read from its start (this store records no resume cursor)")
    # Tokenising and packing run a shard ahead in a thread, beside the forward pass.
    rows_iter = prefetch(_rows(cfg, lm, start), depth=2 * shard_rows)
    for shard in range(first if start else 0, writer.n_shards):
        lo, hi = shard_bounds(shard, shard_rows, writer.n_tokens // ctx)
        rows = list(itertools.islice(rows_iter, hi - lo))
        if shard in writer.committed:
            if len(rows) < hi - lo:
                raise StoreError(f"the text source now gives fewer rows than committed shard {shard} holds: it changed")
        elif len(rows) < hi - lo:
            yield ShardJob(shard, rows, truncate_to=(lo + len(rows)) * ctx)
            return
        else:
            yield ShardJob(shard, rows)


def resume_cursor(writer: StoreWriter, shard_rows: int) -> tuple[int, dict | None]:
    """``(p, cursor)``: shards ``0..p-1`` are committed and the text after them restarts at ``cursor``.

    ``cursor`` is shard ``p-1``'s recorded ``source_end`` (a packed row's ``end``, see
    :func:`~saestrata.harvest.packing.pack_documents`), None when ``p == 0`` or when the store
    has no usable cursor (written before cursors, or a count of rows that does not match the
    plan): then the text is re-read from its start.
    """
    first = 0
    while first < writer.n_shards and first in writer.committed:
        first += 1
    if first == 0:
        return 0, None
    record = writer.record(first - 1) or {}
    cursor = record.get("source_end")
    if not cursor or cursor.get("rows") != first * shard_rows:
        return first, None
    return first, cursor


def truncate_plan(writer: StoreWriter, cfg: HarvestConfig, n_tokens: int) -> None:
    """Shrink the store's plan to ``n_tokens`` because the text source ran out, and say so.

    Single writer only: in a parallel harvest, in-flight shards are drained first.
    """
    writer.truncate(n_tokens)
    print(f"note: {cfg.dataset} {cfg.split} ran out after {writer.n_tokens} tokens")


def _write_pending(
    writer: StoreWriter, cfg: HarvestConfig, lm: LoadedModel, layers: list[int], hooks: list[str], progress: bool
) -> None:
    """Forward and write every uncommitted shard in this process, in shard order."""
    batch_rows = int(writer.group.attrs.get("batch_rows", cfg.batch_rows))
    bos = lm.tokenizer.bos_token_id
    bar = tqdm(total=writer.n_tokens, unit="tok", desc=f"harvest {cfg.split}", disable=not progress)
    bar.update(committed_tokens(dict(writer.group.attrs), writer.committed))
    for job in pending_jobs(writer, cfg, lm):
        if job.truncate_to is not None:
            truncate_plan(writer, cfg, job.truncate_to)
            if not job.rows:
                break
        acts, aligned, record = shard_payload(lm, job.rows, layers, hooks, batch_rows, bos, job.shard, cfg.dtype)
        writer.write_shard(job.shard, acts, aligned, record=record)
        bar.update(len(job.rows) * cfg.context_length)
    bar.close()


def shard_payload(
    lm: LoadedModel, rows: list[Row], layers: list[int], hooks: list[str], batch_rows: int, bos: int, shard: int,
    dtype: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Forward one shard's rows: what ``StoreWriter.write_shard`` takes.

    ``dtype``: the store's dtype; activations computed in another (``compute_dtype``) are
    rounded to it first, so the statistics describe what is stored. None: the model's dtype.

    Returns:
        ``(acts, aligned, record)``: ``acts`` ``{hook: [n, d_model]}`` in the stored dtype,
        ``aligned`` ``{"token_ids", "doc_index", "position"}`` each ``[n]``, and ``record``
        ``{hook: ActivationStats.record()}`` over the shard's non-BOS tokens (``n = len(rows) * ctx``)
        plus ``"source_end"``, the last row's resume cursor (:func:`resume_cursor`).

    Raises:
        FloatingPointError: NaN/Inf activations (nothing of the shard is written).
    """
    acts = _forward_rows(lm, rows, layers, batch_rows)
    if dtype is not None:
        acts = {layer: a.to(getattr(torch, dtype)) for layer, a in acts.items()}
    token_ids = np.concatenate([r.token_ids for r in rows])
    not_bos = torch.from_numpy(token_ids != bos)
    record = {}
    for layer, hook in zip(layers, hooks):
        if not torch.isfinite(acts[layer]).all():
            raise FloatingPointError(f"non-finite activations at {hook} in shard {shard}: check --dtype / the model")
        stats = ActivationStats()
        stats.update(acts[layer][not_bos])
        record[hook] = stats.record()
    if rows and rows[-1].end is not None:
        record["source_end"] = rows[-1].end
    stored = {hook: to_stored(acts[layer]) for layer, hook in zip(layers, hooks)}
    aligned = {"token_ids": token_ids, "doc_index": np.concatenate([r.doc_index for r in rows]),
               "position": np.concatenate([r.position for r in rows])}
    return stored, aligned, record


def _merge_stats(records: dict[int, dict], hooks: list[str]) -> dict[str, ActivationStats]:
    """Per-hook statistics over all shards, merged in shard order (same result however the run was split)."""
    return {h: ActivationStats.merged(records, h) for h in hooks}


def _forward_rows(lm: LoadedModel, rows: list[Row], layers: list[int], batch_rows: int) -> dict[int, torch.Tensor]:
    """Residuals ``{layer: [len(rows) * ctx, d_model]}`` (CPU, model dtype) for packed rows."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for b in range(0, len(rows), batch_rows):
        ids = torch.from_numpy(np.stack([r.token_ids for r in rows[b : b + batch_rows]])).long()
        for layer, acts in residuals(lm, ids, layers).items():
            out[layer].append(acts.reshape(-1, acts.shape[-1]).cpu())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex chars) of a tokenizer's vocabulary (token -> id), special ids and BOS id.

    Independent of where the tokenizer was loaded from, so team members with different
    cache paths get the same store identity. Costs ~1-3 s for Gemma's 262k vocabulary,
    so it is cached per tokenizer object (and vocabulary size).
    """
    return _fingerprint(tokenizer, len(tokenizer))


@functools.lru_cache(maxsize=4)
def _fingerprint(tokenizer, _vocab_size: int) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    payload = json.dumps([vocab, sorted(set(tokenizer.all_special_ids)), tokenizer.bos_token_id], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def harvest_identity(cfg: HarvestConfig, lm: LoadedModel, layers: list[int], hooks: list[str]) -> dict:
    """Fields that determine a store's content; equal identities mean equal stores (bit for bit on one
    machine class: another CPU instruction set or a GPU sums the LM's matmuls in another order, which can
    move a stored bf16 value by one rounding step, and a resumed or extended store does not check that).

    Model (name + weights hash), layers and hook names, dataset + split + split rule +
    text field + order seed, context length, BOS handling, dtype (and the LM's compute dtype
    when it differs: taken from the loaded model, so a caller's ``lm`` cannot mislabel a store),
    tokenizer fingerprint and store format version, and for a glob ``dataset`` the matched files and
    their sizes. Not included: the token count (a store can grow), the
    shard layout and batch size (a resumed store keeps its own), the device.
    """
    return {
        "model_id": cfg.model,
        "weights_hash": lm.weights_hash,
        "layers": list(layers),
        "hooks": list(hooks),
        "dataset": cfg.dataset,
        "split": cfg.split,
        "split_rule": SPLIT_RULE,
        "text_field": cfg.text_field,
        "order_seed": cfg.seed,
        "context_length": cfg.context_length,
        "bos_handling": _BOS_HANDLING,
        "dtype": cfg.dtype,
        "tokenizer": tokenizer_fingerprint(lm.tokenizer),
        "format_version": FORMAT_VERSION,
        # Only when it differs from ``dtype``, so stores computed in their own dtype keep their identity.
        **({"compute_dtype": lm.dtype} if lm.dtype != cfg.dtype else {}),
        # A local source's files (names and sizes): a file added, removed or resized since is refused on resume.
        **({"dataset_files": [[str(f), f.stat().st_size] for f in files]}
           if (files := source_files(cfg.dataset)) is not None else {}),
    }


_BOS_HANDLING = "every row and every document starts with BOS"


def _identity_attrs(cfg: HarvestConfig, lm: LoadedModel, layers: list[int], hooks: list[str]) -> dict:
    """Metadata that makes the store self-describing (DESIGN.md, "Store format"): the identity plus descriptive fields."""
    tok = lm.tokenizer
    identity = harvest_identity(cfg, lm, layers, hooks)
    return {
        **cfg.extra_attrs,
        **identity,
        "tokenizer_fingerprint": identity["tokenizer"],
        "tokenizer": getattr(tok, "name_or_path", type(tok).__name__),
        "model_class": type(lm.model).__name__,
        "n_layers": lm.n_layers,
        "bos_token_id": tok.bos_token_id,
        "special_token_ids": sorted(set(tok.all_special_ids)),
        "tokenizer_vocab_size": len(tok),
        "tokens_requested": cfg.tokens,
        "software": f"saestrata {__version__}",
    }
