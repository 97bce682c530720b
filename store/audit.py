"""Describe and verify activation stores: what ``saestrata store ls/info/verify`` print.

Verification reads every committed shard of every array through zarr (the crc32c
codec raises on any flipped byte, in data or index), and also checks what zarr
would silently paper over: a committed shard whose file is missing reads back as
fill values, so files, shard indexes (every inner chunk present) and array shapes
are checked against the commit record; activations are scanned for NaN/Inf.
Stores in an object store (``s3://...``) are checked the same way through their
``location.Location`` (listings and ranged reads instead of files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from .format import (
    ALIGNED_ARRAYS, StoreError, array_names, commit_key, committed_tokens, n_shards, open_group,
    parse_marker, read_committed, shard_bounds, shard_key, stored_dtype, uses_markers,
)
from .location import as_location
from .shardfile import read_index_at

# Bit masks of an all-ones exponent (NaN or Inf) for integer views of float formats.
_NONFINITE_MASK = {"bfloat16": 0x7F80, "float16": 0x7C00}


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`.

    Attributes:
        path: the store (folder ``Path`` or URL).
        problems: one line per defect, each naming the array and shard (non-empty = failed).
        warnings: harmless findings (leftover files of uncommitted shards, temp files).
        shards_checked: committed shards read in full.
        nonfinite: ``{hook: count of NaN/Inf values}`` over committed shards.
    """

    path: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards_checked: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True if no problem was found."""
        return not self.problems


def _disk_bytes(loc) -> int:
    return sum(loc.find().values())


def store_info(path, storage_options: dict | None = None) -> dict:
    """Summary of one store: model, layers, tokens committed/planned, dataset, bytes, statistics.

    Returns:
        dict with ``path, model, weights_hash, identity_key, layers, hooks, d_model, dtype,
        context_length, dataset, split, order_seed, tokens_committed, tokens_planned,
        shards_committed, n_shards, complete, bytes_on_disk, bytes_per_token`` (per committed
        token, all arrays, 0.0 if none) and ``activation_stats`` (``{hook: {...}}``, empty until finished).
        ``path`` may be a folder, an object-store URL (with ``storage_options``) or a ``Location``.

    Raises:
        StoreError: not a readable saestrata store (or, for URLs, missing bucket / unreachable server).
    """
    loc = as_location(path, storage_options)
    attrs = dict(open_group(loc).attrs)
    shards = read_committed(loc, attrs)
    committed = committed_tokens(attrs, shards)
    size = _disk_bytes(loc)
    return {
        "path": str(loc), "model": attrs.get("model_id"), "weights_hash": attrs.get("weights_hash"),
        "identity_key": attrs.get("identity_key"), "layers": attrs.get("layers"), "hooks": attrs["hooks"],
        "d_model": attrs["d_model"], "dtype": attrs["dtype"], "context_length": attrs.get("context_length"),
        "dataset": attrs.get("dataset"), "split": attrs.get("split"), "order_seed": attrs.get("order_seed"),
        "tokens_committed": committed, "tokens_planned": int(attrs["n_tokens"]),
        "shards_committed": len(shards), "n_shards": int(attrs["n_shards"]),
        "complete": bool(attrs.get("complete")), "bytes_on_disk": size,
        "bytes_per_token": size / committed if committed else 0.0,
        "activation_stats": attrs.get("activation_stats", {}),
    }


def list_stores(root: str | Path) -> list[dict]:
    """:func:`store_info` of every store directly in ``root`` (or ``root`` itself), sorted by path.

    Folders that are not saestrata stores are skipped.

    Raises:
        StoreError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root} is not a directory")
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    infos = []
    for folder in candidates:
        if (folder / "zarr.json").exists():
            try:
                infos.append(store_info(folder))
            except StoreError:
                continue
    return infos


def verify_store(path, storage_options: dict | None = None) -> VerifyReport:
    """Check a store completely: commit record, shapes, shard files and indexes, crc32c of every chunk, NaN/Inf.

    Args:
        path: store directory, object-store URL or ``location.Location``.
        storage_options: fsspec/s3fs options for a URL.

    Returns:
        a :class:`VerifyReport`; ``report.ok`` is False if anything is wrong.

    Raises:
        StoreError: the store cannot be opened at all (no/corrupt group metadata, unreachable).
    """
    loc = as_location(path, storage_options)
    group = open_group(loc)
    attrs = dict(group.attrs)
    report = VerifyReport(path=loc.path)
    committed = _check_commit_record(loc, attrs, report)
    for name in array_names(attrs):
        arr = _checked_array(group, name, attrs, report)
        if arr is not None:
            _check_shards(loc, arr, name, committed, attrs, report)
    report.shards_checked = len(committed)
    _check_leftovers(loc, attrs, set(committed), report)
    return report


def _check_commit_record(loc, attrs: dict, report: VerifyReport) -> list[int]:
    """Validate the commit record against the plan; returns the committed shards that exist in the plan.

    Marker layout: every marker must parse and name its own shard. Legacy layout: the
    attribute list must not repeat a shard.
    """
    n_tok, shard_tok = int(attrs["n_tokens"]), int(attrs["shard_tokens"])
    planned = n_shards(n_tok, shard_tok)
    if int(attrs["n_shards"]) != planned:
        report.problems.append(f"n_shards {attrs['n_shards']} does not match {n_tok} tokens / {shard_tok} per shard")
    if uses_markers(attrs):
        raw = sorted(read_committed(loc, attrs))
        blobs = loc.read_many([commit_key(s) for s in raw])
        for shard in raw:
            try:
                parse_marker(blobs[commit_key(shard)], shard, loc)
            except StoreError as err:
                report.problems.append(str(err).replace(f"{loc}: ", ""))
    else:
        raw = [int(s) for s in attrs.get("committed_shards", [])]
        if len(set(raw)) != len(raw):
            report.problems.append("commit record lists a shard twice")
    outside = sorted(s for s in set(raw) if not 0 <= s < planned)
    if outside:
        report.problems.append(f"commit record names shards {outside} outside the plan of {planned} shards")
    committed = sorted(s for s in set(raw) if 0 <= s < planned)
    if attrs.get("complete") and len(committed) != planned:
        missing = sorted(set(range(planned)) - set(committed))
        report.problems.append(f"store is marked complete but shards {missing[:5]} are not committed")
    return committed


def _checked_array(group: zarr.Group, name: str, attrs: dict, report: VerifyReport) -> zarr.Array | None:
    """The array ``name`` if its metadata matches the store's plan, else None (problem recorded)."""
    try:
        arr = group[name]
    except Exception as err:
        report.problems.append(f"array {name} is missing or unreadable ({type(err).__name__})")
        return None
    n_tok = int(attrs["n_tokens"])
    is_hook = name not in ALIGNED_ARRAYS
    shape = (n_tok, int(attrs["d_model"])) if is_hook else (n_tok,)
    dtype = stored_dtype(attrs["dtype"]) if is_hook else np.dtype(ALIGNED_ARRAYS[name])
    if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
        report.problems.append(f"array {name} has shape {tuple(arr.shape)} {arr.dtype}, expected {shape} {dtype}")
        return None
    if arr.shards is None or arr.shards[0] != int(attrs["shard_tokens"]) or arr.chunks[0] != int(attrs["chunk_tokens"]):
        report.problems.append(f"array {name} has shards {arr.shards} / chunks {arr.chunks}, not the recorded layout")
        return None
    return arr


def _check_shards(
    loc, arr: zarr.Array, name: str, committed: list[int], attrs: dict, report: VerifyReport
) -> None:
    """File + index + full zarr read (crc32c) of every committed shard of one array; counts NaN/Inf."""
    n_tok, shard_tok, chunk_tok = int(attrs["n_tokens"]), int(attrs["shard_tokens"]), int(attrs["chunk_tokens"])
    logical = attrs["dtype"]
    for shard in committed:
        where = f"shard {shard} of {name}"
        start, stop = shard_bounds(shard, shard_tok, n_tok)
        try:
            index = read_index_at(loc, f"{name}/{shard_key(arr, shard)}", shard_tok // chunk_tok)
        except StoreError as err:
            report.problems.append(f"{where}: {err}")
            continue
        absent = [i for i in range(-(-(stop - start) // chunk_tok)) if not index.present(i)]
        if absent:
            report.problems.append(f"{where}: inner chunks {absent} are missing from the shard")
            continue
        try:
            values = arr[start:stop]
        except Exception as err:
            report.problems.append(f"{where}: {_read_error(err)}")
            continue
        if name not in ALIGNED_ARRAYS:
            bad = _count_nonfinite(values, logical)
            report.nonfinite[name] = report.nonfinite.get(name, 0) + bad
            if bad:
                report.problems.append(f"{where}: {bad} NaN/Inf values")


def _read_error(err: Exception) -> str:
    """One-line description of a failed zarr read (checksum mismatches named as such)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "checksum" in text.lower():
        return "crc32c mismatch: the shard's bytes are corrupt"
    return f"unreadable ({text})"


def _count_nonfinite(values: np.ndarray, logical: str) -> int:
    """NaN/Inf count of stored activations (bf16 as uint16 bits, f16, f32)."""
    mask = _NONFINITE_MASK.get(logical)
    if mask is None:
        return int((~np.isfinite(values)).sum())
    bits = values.view(np.uint16)
    return int(((bits & mask) == mask).sum())


def _check_leftovers(loc, attrs: dict, committed: set[int], report: VerifyReport) -> None:
    """Warn about temp files and shard files outside the commit record (a resume deletes them)."""
    temps = sorted(k for k in loc.find() if k.endswith(".partial")) if not loc.remote else []
    if temps:
        report.warnings.append(f"{len(temps)} leftover temp files (*.partial), e.g. {temps[0]}")
    for name in array_names(attrs):
        names = loc.list_names(f"{name}/c")
        stray = sorted(int(n) for n in names if n.isdigit() and int(n) not in committed)
        if stray:
            report.warnings.append(f"{name}: files of uncommitted shards {stray[:5]} (rewritten on resume)")
