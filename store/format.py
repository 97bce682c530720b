"""The activation store's on-disk layout (Zarr v3), shared by writer and readers.

One Zarr group per harvest (DESIGN.md, "Store format"):

- one array per hook point, e.g. ``blocks.8.hook_resid_post``, shape
  ``(n_tokens, d_model)``; bfloat16 is stored as its ``uint16`` bit pattern with
  ``attrs["logical_dtype"] = "bfloat16"`` (zarr has no bfloat16);
- aligned 1-D arrays ``token_ids`` (int32), ``doc_index`` (int64), ``position`` (int32);
- group attributes: everything needed to reproduce and verify the harvest (identity,
  plan, statistics); they do not change when a shard commits;
- the commit record: one small object ``commits/<shard>.json`` per committed shard
  (``{"shard": n, "record": {...}}``), written atomically after the shard's data; a
  shard counts only once its marker exists (``attrs["commit_record"] == "objects"``).
  ``commits`` itself is an empty zarr array, so zarr sees a node it knows there.
  Stores written before markers existed keep the whole record in the group attributes
  (``committed_shards`` list + ``shard_records`` dict); they are read as they are and
  migrated to markers when a harvest resumes or extends them.

Arrays are sharded along tokens; every shard holds whole context rows and every
inner chunk carries a crc32c checksum. Activations are not compressed (zstd/blosc
save 20-28% on bfloat16 and cost the memory-mapped path, README "Compression"), so
readers memory-map them; the aligned arrays are zstd-compressed (format version 2:
16 -> ~1.8 bytes/token, which keeps a one-layer bf16 store at <= 0.5x the bytes of a
float32 Arrow cache; they are only read in bulk or one shard at a time).

This module imports nothing else from saestrata (data flows one way).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import zarr

FORMAT_NAME = "saestrata-activations"
FORMAT_VERSION = 2  # 2: aligned arrays zstd-compressed (1: uncompressed)
ALIGNED_ARRAYS = {"token_ids": np.int32, "doc_index": np.int64, "position": np.int32}
_STORED_DTYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}


class StoreError(ValueError):
    """Raised for a missing, corrupt, half-written or mismatched store."""


class ActivationStats:
    """Running per-hook statistics of non-BOS activations (float64 accumulators).

    Each shard's state (:meth:`record`) is committed with the shard in its commit marker
    (``commits/<shard>.json``, ``["record"][hook]``); the harvest merges them into
    ``attrs["activation_stats"]`` when it finishes, and a reader of a half-written store
    merges the committed prefix's (:meth:`merged`). Units: activation units (``mean_norm``,
    ``rms_norm``: L2 norms over ``d_model``; ``max_abs``: largest ``|entry|``).
    """

    def __init__(self):
        self.n, self.norm_sum, self.sq_sum, self.max_abs = 0, 0.0, 0.0, 0.0

    def update(self, acts: torch.Tensor) -> None:
        """Add ``acts`` ``[n, d_model]`` (any float dtype) to the running sums."""
        acts = acts.float()
        norms = acts.norm(dim=-1)
        self.n += len(acts)
        self.norm_sum += float(norms.double().sum())
        self.sq_sum += float((norms.double() ** 2).sum())
        if len(acts):
            self.max_abs = max(self.max_abs, float(acts.abs().max()))

    def record(self) -> list:
        """``[n, norm_sum, sq_sum, max_abs]``: the JSON-exact state, committed with each shard."""
        return [self.n, self.norm_sum, self.sq_sum, self.max_abs]

    def merge(self, record: list) -> None:
        """Add the state of another :meth:`record` (e.g. one shard's)."""
        n, norm_sum, sq_sum, max_abs = record
        self.n += int(n)
        self.norm_sum += float(norm_sum)
        self.sq_sum += float(sq_sum)
        self.max_abs = max(self.max_abs, float(max_abs))

    @classmethod
    def merged(cls, records: dict, hook: str) -> "ActivationStats":
        """``hook``'s statistics over ``records`` (``{shard: {hook: record}}``), merged in shard order."""
        stats = cls()
        for shard in sorted(records, key=int):
            stats.merge(records[shard][hook])
        return stats

    def as_dict(self) -> dict:
        """``{"n", "mean_norm", "rms_norm", "max_abs"}`` in activation units."""
        n = max(self.n, 1)
        return {"n": self.n, "mean_norm": self.norm_sum / n, "rms_norm": math.sqrt(self.sq_sum / n), "max_abs": self.max_abs}


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


class IdentityMismatch(StoreError):
    """Raised when an existing store was harvested with a different identity than requested."""


def identity_key(identity: dict) -> str:
    """Content key of a harvest identity: sha256 (first 16 hex chars) of its canonical JSON.

    Args:
        identity: JSON-serialisable fields that determine the store's content (model,
            weights hash, hooks, dataset, split, order seed, context length, dtype, tokenizer ...).

    Returns:
        16 lowercase hex characters; equal identities give equal keys on every machine.
    """
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def identity_diff(stored: dict, wanted: dict) -> list[str]:
    """Fields whose values differ between two identities, as ``"name (stored != wanted)"`` strings, sorted."""
    names = sorted(set(stored) | set(wanted))
    missing = object()
    return [
        f"{n} ({stored.get(n, '<absent>')!r} != {wanted.get(n, '<absent>')!r})"
        for n in names
        if stored.get(n, missing) != wanted.get(n, missing)
    ]


def check_identity(path: Path, attrs: dict, wanted: dict) -> None:
    """Refuse a store whose recorded identity differs from ``wanted``.

    Raises:
        IdentityMismatch: one line naming the store and every differing field, or saying
            that the store has no identity record (written before identities existed).
    """
    stored = attrs.get("identity")
    if stored is None:
        raise IdentityMismatch(f"{path} has no identity record (older saestrata store): harvest into a new --out")
    diff = identity_diff(stored, wanted)
    if diff:
        raise IdentityMismatch(f"{path} holds a different harvest: {'; '.join(diff)}; choose a new --out or delete it")


def committed_tokens(attrs: dict, committed=None) -> int:
    """Tokens in committed shards of a store (0 if nothing is committed).

    Args:
        attrs: the group attributes (plan: ``n_tokens``, ``shard_tokens``).
        committed: the committed shard numbers (:func:`read_committed`); None reads the
            legacy in-attributes list ``committed_shards`` (stores without commit markers).
    """
    n_tok, shard_tok = int(attrs["n_tokens"]), int(attrs["shard_tokens"])
    if committed is None:
        committed = attrs.get("committed_shards", [])
    committed = {int(s) for s in committed}
    bounds = [shard_bounds(s, shard_tok, n_tok) for s in committed if s < n_shards(n_tok, shard_tok)]
    return sum(stop - start for start, stop in bounds)


def open_group(path, mode: str = "r") -> zarr.Group:
    """Open the Zarr v3 group of a saestrata store (``mode`` ``"r"`` or ``"r+"``), ignoring consolidated metadata.

    Args:
        path: a folder, an object-store URL (``s3://bucket/prefix``) or a ``location.Location``.

    Raises:
        StoreError: no ``zarr.json`` at ``path``, unreadable group metadata, not a saestrata
            store, or (URLs) a missing bucket / unreachable object store.
    """
    from .location import as_location

    loc = as_location(path)
    loc.check_reachable_bucket()
    if not loc.is_file("zarr.json"):
        raise StoreError(f"{loc} is not an activation store (no zarr.json): run 'saestrata harvest' first")
    try:
        group = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode, use_consolidated=False)
    except Exception as err:
        raise StoreError(f"{loc} cannot be opened as a Zarr v3 group ({_line(err)}): the store is corrupt") from err
    if group.attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{loc} is a Zarr group but not a saestrata activation store")
    return group


def _line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


COMMITS_DIR = "commits"
COMMIT_LAYOUT = "objects"  # attrs["commit_record"]: one marker object per committed shard


def create_commits_node(group: zarr.Group) -> None:
    """Create ``commits``, the node under which commit markers live: an empty (shape ``(0,)``) uint8 array.

    Being a zarr array, it is a node zarr recognises (its member listing never looks inside an
    array), so the marker objects below it do not show up as unknown objects of the hierarchy.
    Idempotent.
    """
    if COMMITS_DIR not in group:
        group.create_array(COMMITS_DIR, shape=(0,), chunks=(1,), dtype="uint8", fill_value=0)


def uses_markers(attrs: dict) -> bool:
    """True if the store keeps its commit record as marker objects (else: legacy attribute list)."""
    return attrs.get("commit_record") == COMMIT_LAYOUT


def commit_key(shard: int) -> str:
    """Key of shard ``shard``'s commit marker, relative to the store root (``commits/<shard>.json``)."""
    return f"{COMMITS_DIR}/{int(shard)}.json"


def commit_marker(shard: int, record: dict | None) -> bytes:
    """The bytes of a commit marker: canonical JSON ``{"shard": n, "record": record}``."""
    return json.dumps({"shard": int(shard), "record": record}, sort_keys=True, separators=(",", ":")).encode()


def read_committed(loc, attrs: dict) -> set[int]:
    """Committed shard numbers of a store: one listing of ``commits/`` (legacy stores: ``attrs["committed_shards"]``).

    Args:
        loc: the store's ``location.Location``.
        attrs: its group attributes.

    Returns:
        the set of shard numbers whose marker exists (temp files of an interrupted marker
        write are not markers and are ignored).
    """
    if not uses_markers(attrs):
        return {int(s) for s in attrs.get("committed_shards", [])}
    out = set()
    for name in loc.list_names(COMMITS_DIR):
        stem = name[:-5] if name.endswith(".json") else ""
        if stem.isdigit():
            out.add(int(stem))
    return out


def committed_for_reading(loc, attrs: dict) -> set[int]:
    """Committed shards as a reader needs them: every shard of the plan for a complete store, else a listing.

    A store is marked ``complete`` only by ``StoreWriter.finish``, which refuses while any
    shard of the plan is uncommitted, and an extension clears the flag in the same
    attribute write that records the larger plan: so ``complete`` implies that every
    shard in ``range(attrs["n_shards"])`` is committed, and readers of the shared,
    finished stores they open most skip the listing of ``commits/`` (one object per shard:
    O(shards) list requests per open on S3, ~122 at 1B tokens). ``store verify``
    (:mod:`.audit`) still lists and checks every marker.
    """
    if attrs.get("complete"):
        return set(range(int(attrs["n_shards"])))
    return read_committed(loc, attrs)


def read_records(loc, attrs: dict, shards) -> dict[int, dict]:
    """Per-shard records ``{shard: record}`` of committed ``shards``, in shard order (shards without one skipped).

    Raises:
        StoreError: a marker is missing or is not the JSON this module writes.
    """
    if not uses_markers(attrs):
        raw = attrs.get("shard_records", {})
        return {int(k): raw[k] for k in sorted(raw, key=int) if int(k) in set(shards)}
    shards = sorted(int(s) for s in shards)
    try:
        blobs = loc.read_many([commit_key(s) for s in shards])
    except FileNotFoundError as err:
        raise StoreError(f"{loc}: a commit marker vanished while reading ({_line(err)}): is another process "
                         "rewriting the store?") from None
    out = {}
    for shard in shards:
        marker = parse_marker(blobs[commit_key(shard)], shard, loc)
        if marker.get("record") is not None:
            out[shard] = marker["record"]
    return out


def parse_marker(data: bytes, shard: int, where) -> dict:
    """Decode and check one commit marker.

    Raises:
        StoreError: not JSON, or it names another shard.
    """
    try:
        marker = json.loads(data)
    except ValueError:
        raise StoreError(f"{where}: commit marker of shard {shard} is not valid JSON") from None
    if not isinstance(marker, dict) or marker.get("shard") != shard:
        raise StoreError(f"{where}: commit marker {commit_key(shard)} does not describe shard {shard}")
    return marker


def enclosing_store(path: str | Path) -> Path | None:
    """The saestrata store that ``path`` is or lies inside (nearest such folder at or above it), else None.

    ``path`` need not exist. A folder counts as a store when its ``zarr.json`` is a group
    whose attributes carry ``format == FORMAT_NAME`` (array ``zarr.json`` files inside a store
    are skipped on the way up). Used to refuse outputs that would be written into a store.
    """
    here = Path(path).expanduser().resolve()
    for folder in (here, *here.parents):
        meta = folder / "zarr.json"
        if not meta.is_file():
            continue
        try:
            attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(attrs, dict) and attrs.get("format") == FORMAT_NAME:
            return folder
    return None


def shard_key(array: zarr.Array, shard: int) -> str:
    """Store key (relative to the array folder) of shard number ``shard`` along tokens, e.g. ``c/3/0``."""
    return array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))


def array_names(attrs: dict) -> list[str]:
    """Every array of a store: the hook arrays, then the aligned 1-D arrays."""
    return [*attrs["hooks"], *ALIGNED_ARRAYS]
