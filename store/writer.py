"""Create, resume and extend an activation store, shard by shard, with a commit record.

Protocol (DESIGN.md, measured zarr 3.x facts): arrays are preallocated to the
planned token count; a writer writes only whole shards; a shard counts only once
its commit marker ``commits/<shard>.json`` (``{"shard": n, "record": {...}}``, the
optional per-shard record included) exists. The marker is written atomically
(local: temp + fsync + rename; object store: one PUT) after all the shard's arrays
are written, so a commit costs one small write whatever the store's size: the group
attributes (identity, plan, statistics) are not touched by a commit. Metadata is
re-consolidated whenever the group or array metadata changes (create, resize, finish).

Stores written before commit markers existed keep the record in the group attributes
(``committed_shards`` list + ``shard_records`` dict, rewritten whole at every commit):
readers accept them as they are; :meth:`StoreWriter.reopen` migrates them to markers
(markers first, then one attribute write that drops the old keys; a crash in between
leaves the old record authoritative and the next reopen migrates again).

Crash safety: zarr's local store writes every object to a ``*.partial`` temp file
and renames it, so a killed writer leaves whole old/new objects plus stray
``*.partial`` files (object stores never show a partial object). :meth:`StoreWriter.reopen`
deletes those and every file of an uncommitted shard, so a resumed harvest rewrites
exactly the uncommitted shards.

Arrays are opened with ``write_empty_chunks=True``: zarr's default silently skips
inner chunks (and whole shard files) equal to the fill value, which would make a
legitimately all-zero shard (e.g. ``doc_index`` of the first document) look missing.

Extension policy (:meth:`StoreWriter.extend`): growing the planned token count is
a metadata-only resize that adds new shards, and is allowed unless the last shard
of the current plan is partial *and* committed. Growing such a shard would have to
rewrite committed bytes (a crash there could lose data), so it is refused.

One writer per store at a time: a writer holds an exclusive ``flock`` on the store
directory itself (no extra file for zarr to trip over; released by the kernel even
on SIGKILL); a second harvest into the same store is refused instead of deleting the
first one's in-flight shards. Object stores have no locks: the writer keeps a lease
object ``commits/writer.lock`` (host, pid) that it deletes when done; a lease of a dead
process on the same host is taken over (SIGKILL), one held by a live process or by
another host is refused (delete it by hand if that harvest is known to be dead).

``SAESTRATA_FAULT`` (tests only) makes the writer SIGKILL itself at a named point,
see :func:`_fault`.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import uuid
import warnings
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from .format import (
    ALIGNED_ARRAYS, COMMIT_LAYOUT, FORMAT_NAME, FORMAT_VERSION, StoreError, array_names, check_identity, commit_key,
    commit_marker, create_commits_node, identity_key, n_shards, open_group, read_committed, read_records, shard_bounds, shard_key,
    stored_dtype, uses_markers,
)
from .location import Location, as_location

_ARRAY_CONFIG = {"write_empty_chunks": True}
FAULT_ENV = "SAESTRATA_FAULT"
FAULT_POINTS = (
    "after-create", "before-write", "mid-shard", "torn-write", "before-commit", "after-commit", "before-finish",
)


LOCK_KEY = "commits/writer.lock"
_LEGACY_KEYS = ("committed_shards", "shard_records")


def _consolidate(loc: Location) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(loc.zarr_store())


def _fault(point: str, shard: int | None = None) -> None:
    """Test-only crash injection: SIGKILL this process if ``$SAESTRATA_FAULT`` names this point.

    ``SAESTRATA_FAULT`` is ``"<point>"`` or ``"<point>:<shard>"`` with a point from
    :data:`FAULT_POINTS`; unset (the normal case) does nothing.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name == point and (not at or shard is None or int(at) == shard):
        os.kill(os.getpid(), signal.SIGKILL)


def is_empty_store_dir(path, storage_options: dict | None = None) -> bool:
    """True if ``path`` does not exist or is an empty directory (a new store may be created there).

    ``path`` may be an object-store URL or a ``Location``: then True if no object lies under the
    prefix (a stale writer lease alone counts as empty).

    Raises:
        StoreError: (URLs) missing bucket or unreachable object store.
    """
    loc = as_location(path, storage_options)
    if not loc.remote:
        return loc.is_empty()
    loc.check_reachable_bucket()
    return not (set(loc.find()) - {LOCK_KEY})


class _DirLock:
    """Exclusive ``flock`` on a directory's file descriptor; :meth:`close` (or process exit) releases it."""

    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise StoreError(
                f"{path} is being written by another harvest (it is locked): wait for it or stop it"
            ) from None

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class _LeaseLock:
    """Writer lease of an object-store store: the object ``commits/writer.lock`` naming this host and pid.

    Acquired if absent, or if it names a process of this host that no longer runs (a
    SIGKILLed harvest); refused if it names a live process or another host. Not atomic
    against two writers starting in the same instant (object stores have no locks);
    :meth:`close` deletes the lease if it is still ours.

    Raises:
        StoreError: the lease is held (one line saying by whom and what to do).
    """

    def __init__(self, loc: Location):
        self.loc, self.token = loc, uuid.uuid4().hex
        held = self._holder()
        if held is not None and not self._stale(held):
            raise StoreError(
                f"{loc} is being written by another harvest (lease {LOCK_KEY}: host {held.get('host')} pid "
                f"{held.get('pid')}): wait for it, or delete {loc}/{LOCK_KEY} if that harvest is dead"
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        loc.write_atomic(LOCK_KEY, json.dumps(me).encode())
        if (self._holder() or {}).get("token") != self.token:
            raise StoreError(f"{loc} is being written by another harvest (it took the lease meanwhile): wait for it")
        self._held = True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.loc.read_bytes(LOCK_KEY))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable lease: treat as stale

    @staticmethod
    def _stale(held: dict) -> bool:
        if held.get("host") != socket.gethostname():
            return not held
        pid = int(held.get("pid") or 0)
        if pid <= 0 or pid == os.getpid():
            return pid <= 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def close(self) -> None:
        """Delete the lease if it is still ours (idempotent)."""
        if getattr(self, "_held", False):
            self._held = False
            if (self._holder() or {}).get("token") == self.token:
                self.loc.delete(LOCK_KEY)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _lock(loc: Location):
    """The writer lock of a store: ``flock`` on a local folder, a lease object on an object store."""
    return _LeaseLock(loc) if loc.remote else _DirLock(loc.path)


class StoreWriter:
    """Writes one harvest into a Zarr v3 group: create new (this constructor) or :meth:`reopen` to resume.

    Args:
        path: directory to create (must not exist, or be empty), or an object-store URL
            (``s3://bucket/prefix``, no object under it yet) or a ``location.Location``.
        hooks: hook names, e.g. ``["blocks.8.hook_resid_post"]``.
        d_model: activation width.
        n_tokens: planned tokens (> 0).
        shard_tokens: tokens per shard; must be a multiple of ``chunk_tokens``.
        chunk_tokens: tokens per inner chunk (the unit of reading and checksumming).
        dtype: logical activation dtype (``bfloat16``, ``float16``, ``float32``).
        attrs: metadata stored in the group attributes (JSON-serialisable).
        identity: fields that determine the content (see ``format.identity_key``); stored as
            ``attrs["identity"]`` and ``attrs["identity_key"]`` so a later run can resume or refuse.
        storage_options: fsspec/s3fs options for a URL (credentials, ``endpoint_url`` ...).

    Raises:
        StoreError: if ``path`` holds anything, shapes are inconsistent, or (URLs) the bucket
            is missing / the object store unreachable.
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
        identity: dict | None = None,
        storage_options: dict | None = None,
    ):
        loc = as_location(path, storage_options)
        if n_tokens <= 0:
            raise StoreError("nothing to write: the planned token count is 0 (is the dataset empty?)")
        if shard_tokens % chunk_tokens:
            raise StoreError(f"shard_tokens {shard_tokens} must be a multiple of chunk_tokens {chunk_tokens}")
        if not is_empty_store_dir(loc):
            raise StoreError(f"{loc} already exists and is not empty: choose a new --out or delete it")
        lock = _lock(loc)
        if not is_empty_store_dir(loc):  # another process created it between the check and the lock
            lock.close()
            raise StoreError(f"{loc} already exists and is not empty: choose a new --out or delete it")
        group = zarr.open_group(loc.zarr_store(), mode="a")
        crc = [zarr.codecs.Crc32cCodec()]
        # Aligned arrays: zstd first (token ids 4 -> ~1.7 B/token, doc_index/position ~0), crc32c over the
        # compressed bytes. They are read in bulk or per shard, never memory-mapped (store/reader.py).
        zstd_crc = [zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()]
        for hook in hooks:
            arr = group.create_array(
                hook, shape=(n_tokens, d_model), chunks=(chunk_tokens, d_model), shards=(shard_tokens, d_model),
                dtype=stored_dtype(dtype), compressors=crc, fill_value=0, config=_ARRAY_CONFIG,
            )
            arr.attrs.update({"logical_dtype": dtype, "hook_name": hook})
        for name, np_dtype in ALIGNED_ARRAYS.items():
            group.create_array(
                name, shape=(n_tokens,), chunks=(chunk_tokens,), shards=(shard_tokens,),
                dtype=np_dtype, compressors=zstd_crc, fill_value=0, config=_ARRAY_CONFIG,
            )
        ident = {} if identity is None else {"identity": identity, "identity_key": identity_key(identity)}
        group.attrs.update({
            **attrs, **ident,
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "hooks": list(hooks), "d_model": d_model,
            "dtype": dtype, "n_tokens": n_tokens, "shard_tokens": shard_tokens, "chunk_tokens": chunk_tokens,
            "n_shards": n_shards(n_tokens, shard_tokens), "commit_record": COMMIT_LAYOUT,
            "complete": False, "source_exhausted": False,
        })
        create_commits_node(group)
        _consolidate(loc)
        self._bind(loc, group, lock)
        _fault("after-create")

    @classmethod
    def reopen(cls, path, identity: dict, storage_options: dict | None = None) -> "StoreWriter":
        """Open an existing store to resume or extend it, after checking its identity.

        Removes leftover ``*.partial`` temp files and every file of uncommitted shards
        (they may be torn or half of a shard), and resets array shapes to the recorded
        plan if a crash interrupted a resize. Committed shards are never touched. A store
        whose commit record is still in its attributes (written before commit markers) is
        migrated to markers first (module docstring).

        Args:
            path: an existing store directory, object-store URL or ``location.Location``.
            identity: the identity the caller would write (compared field by field).
            storage_options: fsspec/s3fs options for a URL.

        Raises:
            StoreError: not a saestrata store / unreadable, or another writer holds the store's lock.
            IdentityMismatch: the store records a different identity (names the differing fields).
        """
        loc = as_location(path, storage_options)
        group = open_group(loc, mode="r+")
        check_identity(loc.path, dict(group.attrs), identity)
        lock = _lock(loc)
        try:
            group = open_group(loc, mode="r+")  # re-read: the previous writer may have committed meanwhile
            if not uses_markers(group.attrs):
                _migrate_commit_record(loc, group)
        except BaseException:
            lock.close()
            raise
        writer = cls.__new__(cls)
        writer._bind(loc, group, lock)
        writer._reconcile_shapes()
        writer._remove_uncommitted_files()
        return writer

    def _bind(self, loc: Location, group: zarr.Group, lock) -> None:
        self.loc, self.path, self.group, self._lock = loc, loc.path, group, lock
        attrs = group.attrs
        self.hooks = list(attrs["hooks"])
        self.n_tokens, self.shard_tokens = int(attrs["n_tokens"]), int(attrs["shard_tokens"])
        self.chunk_tokens = int(attrs["chunk_tokens"])
        self.committed = read_committed(loc, dict(attrs))
        self._records: dict[int, dict] = {}  # records committed by this writer (the rest are read at the end)

    @property
    def n_shards(self) -> int:
        """Shards in the current plan (the last may be partial)."""
        return n_shards(self.n_tokens, self.shard_tokens)

    @property
    def complete(self) -> bool:
        """True once :meth:`finish` ran (every shard committed, final metadata written)."""
        return bool(self.group.attrs.get("complete", False))

    @property
    def source_exhausted(self) -> bool:
        """True if the text source ran out and the plan was truncated (the store cannot grow)."""
        return bool(self.group.attrs.get("source_exhausted", False))

    def pending_shards(self) -> list[int]:
        """Shard numbers of the current plan not yet committed, ascending."""
        return [s for s in range(self.n_shards) if s not in self.committed]

    def records(self) -> dict[int, dict]:
        """Per-shard records committed with :meth:`write_shard` / :meth:`commit_shard`, ``{shard: record}`` in shard order.

        Records of shards committed by earlier runs are read from their markers (one
        concurrent batch of small reads on an object store).
        """
        others = read_records(self.loc, dict(self.group.attrs), sorted(self.committed - set(self._records)))
        merged = {**others, **{s: r for s, r in self._records.items() if r is not None}}
        return {s: merged[s] for s in sorted(merged)}

    def record(self, shard: int) -> dict | None:
        """The record committed with ``shard`` (one small read), or None when it is not committed or has none."""
        if shard not in self.committed:
            return None
        if shard in self._records:
            return self._records[shard]
        return read_records(self.loc, dict(self.group.attrs), [shard]).get(shard)

    def _reconcile_shapes(self) -> None:
        """Resize arrays back to the recorded plan after a crash between a resize and its attrs update."""
        for name in array_names(self.group.attrs):
            arr = self.group[name]
            if arr.shape[0] != self.n_tokens:
                arr.resize((self.n_tokens, *arr.shape[1:]))

    def _remove_uncommitted_files(self) -> None:
        """Delete ``*.partial`` temp files and the shard files of every uncommitted shard."""
        if not self.loc.remote:  # object stores never show a partial object
            for leftover in self.path.rglob("*.partial"):
                leftover.unlink(missing_ok=True)
        for name in array_names(self.group.attrs):
            arr = self.group[name]
            for folder in self.loc.list_names(f"{name}/c"):
                if folder.isdigit() and int(folder) not in self.committed:
                    self._remove_shard_file(arr, name, int(folder))

    def _remove_shard_file(self, arr: zarr.Array, name: str, shard: int) -> None:
        key = f"{name}/{shard_key(arr, shard)}"
        self.loc.delete(key)
        if self.loc.remote:
            return
        parent = self.loc.file(key).parent
        if parent != self.path / name / "c" and parent.exists() and not any(parent.iterdir()):
            parent.rmdir()

    def write_shard(
        self, shard: int, acts: dict[str, np.ndarray], aligned: dict[str, np.ndarray], record: dict | None = None
    ) -> None:
        """Write all arrays of one whole shard and commit it.

        Cost: the shard's bytes plus one small marker write, independent of how many shards
        the store holds.

        Args:
            shard: shard number (``0 <= shard < n_shards``).
            acts: ``{hook: [rows, d_model]}`` in the stored dtype (see ``format.to_stored``).
            aligned: ``{"token_ids", "doc_index", "position"}`` each ``[rows]``.
            record: optional JSON-serialisable per-shard record (e.g. statistics), committed
                atomically with the shard in its marker ``commits/<shard>.json``.

        Raises:
            StoreError: shard out of range or already committed, wrong row count, or a missing array.
        """
        if shard in self.committed:
            raise StoreError(f"shard {shard} of {self.loc} is already committed")
        _write_arrays(self.loc, self.group, shard, acts, aligned, torn_write=self._torn_write_fault)
        _fault("before-commit", shard)
        self._commit(shard, record)
        _fault("after-commit", shard)

    def commit_shard(self, shard: int, record: dict | None = None) -> None:
        """Commit a shard whose arrays another process wrote with :func:`write_uncommitted_shard`.

        Checks that every array's shard file exists first: a worker on a machine that
        does not share this store's filesystem would otherwise commit a shard whose
        bytes are elsewhere (reads would silently return fill values).

        Raises:
            StoreError: already committed, or a shard file is missing.
        """
        if shard in self.committed:
            raise StoreError(f"shard {shard} of {self.loc} is already committed")
        for name in array_names(self.group.attrs):
            if not self.loc.is_file(f"{name}/{shard_key(self.group[name], shard)}"):
                raise StoreError(
                    f"shard {shard} of {name} was reported written but {self.loc} has no file for it: "
                    "do the workers see the same filesystem path as this process?"
                )
        self._commit(shard, record)

    def _torn_write_fault(self, name: str, shard: int) -> None:
        """Test-only: emulate a store without atomic writes, killed halfway through one shard file."""
        spec = os.environ.get(FAULT_ENV, "")
        if spec not in ("torn-write", f"torn-write:{shard}") or self.loc.remote:
            return
        target = self.path / name / shard_key(self.group[name], shard)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\x7f" * 100)
        target.with_suffix(".deadbeef.partial").write_bytes(b"\x00" * 10)
        _fault("torn-write", shard)

    def _commit(self, shard: int, record: dict | None) -> None:
        """Write ``shard``'s commit marker (with its record): the commit point, one small atomic write."""
        self.loc.write_atomic(commit_key(shard), commit_marker(shard, record))
        self.committed.add(shard)
        self._records[shard] = record

    def truncate(self, n_tokens: int) -> None:
        """Shrink the plan to ``n_tokens`` because the text source ran out; marks ``source_exhausted``.

        Only valid for a single writer and only before the shard containing token
        ``n_tokens - 1`` is written (resize from several processes loses rows, DESIGN.md).

        Raises:
            StoreError: ``n_tokens`` is 0, or a committed shard would be cut.
        """
        if n_tokens <= 0:
            raise StoreError("the text source gave no tokens: the dataset is empty")
        cut = n_shards(n_tokens, self.shard_tokens) - (1 if n_tokens % self.shard_tokens else 0)
        if any(s >= cut for s in self.committed):
            raise StoreError(f"cannot truncate {self.loc} to {n_tokens} tokens: it would cut committed shards")
        self._resize(n_tokens, {"source_exhausted": True})

    def extend(self, n_tokens: int, attrs: dict | None = None) -> None:
        """Grow the plan to ``n_tokens`` (no-op if not larger), adding uncommitted shards; clears ``complete``.

        Args:
            n_tokens: new planned token count.
            attrs: extra group attributes to record with the new plan (e.g. the tokens requested).

        Raises:
            StoreError: the source was exhausted, or the last shard of the current plan is
                partial and committed (growing it would rewrite committed data).
        """
        if n_tokens <= self.n_tokens:
            return
        if self.source_exhausted:
            raise StoreError(f"cannot extend {self.loc}: its text source ran out at {self.n_tokens} tokens")
        last, tail = self.n_shards - 1, self.n_tokens % self.shard_tokens
        if tail and last in self.committed:
            raise StoreError(
                f"cannot extend {self.loc} to {n_tokens} tokens: its last shard {last} is partial "
                f"({tail} of {self.shard_tokens} tokens) and committed, and growing it would rewrite committed "
                f"data; harvest into a new --out (plan --tokens as a multiple of {self.shard_tokens} to allow "
                "extension)"
            )
        self._resize(n_tokens, {**(attrs or {}), "complete": False})

    def _resize(self, n_tokens: int, attrs: dict) -> None:
        """Resize every array, then record the plan (a crash in between is undone by :meth:`reopen`)."""
        for name in array_names(self.group.attrs):
            arr = self.group[name]
            arr.resize((n_tokens, *arr.shape[1:]))
        self.n_tokens = n_tokens
        self.group.attrs.update({**attrs, "n_tokens": n_tokens, "n_shards": self.n_shards})
        _consolidate(self.loc)

    def finish(self, extra_attrs: dict) -> None:
        """Record final metadata (e.g. activation statistics) and mark the store complete.

        Raises:
            StoreError: some shard of the plan is not committed.
        """
        if self.pending_shards():
            raise StoreError(f"cannot finish {self.loc}: shards {self.pending_shards()[:5]} are not committed")
        _fault("before-finish")
        self.group.attrs.update({**extra_attrs, "complete": True})
        _consolidate(self.loc)
        self.close()

    def close(self) -> None:
        """Release the writer lock (also released when the process exits or the writer is garbage-collected)."""
        self._lock.close()


def _migrate_commit_record(loc: Location, group: zarr.Group) -> None:
    """Move a legacy in-attributes commit record (``committed_shards`` + ``shard_records``) to marker objects.

    Markers first, then one atomic attribute write that switches the layout and drops the
    old keys: a crash in between leaves the old record authoritative (markers are ignored
    until the switch), and the next :meth:`StoreWriter.reopen` migrates again.
    """
    attrs = dict(group.attrs)
    records = attrs.get("shard_records", {})
    create_commits_node(group)
    for shard in sorted({int(s) for s in attrs.get("committed_shards", [])}):
        loc.write_atomic(commit_key(shard), commit_marker(shard, records.get(str(shard))))
    new = {k: v for k, v in attrs.items() if k not in _LEGACY_KEYS}
    group.attrs.put({**new, "commit_record": COMMIT_LAYOUT})
    _consolidate(loc)


def write_uncommitted_shard(path, shard: int, acts: dict[str, np.ndarray], aligned: dict[str, np.ndarray],
                            storage_options: dict | None = None) -> None:
    """Write one whole shard's arrays WITHOUT committing it (worker side of a parallel harvest).

    The process that holds the store's :class:`StoreWriter` (and its lock) assigns
    each shard to exactly one worker and commits it with :meth:`StoreWriter.commit_shard`
    once this returns; until then the shard does not count and a resume rewrites it.
    Workers never touch group metadata: concurrent metadata writes lose updates
    (DESIGN.md, measured zarr 3.x facts), whole-shard files from distinct writers do not.

    Args and Raises: as :meth:`StoreWriter.write_shard` (no record; the committer stores it);
    ``path`` may be a folder, an object-store URL (with ``storage_options``) or a ``Location``.
    """
    loc = as_location(path, storage_options)
    group = open_group(loc, mode="r+")
    attrs = dict(group.attrs)
    done = loc.is_file(commit_key(shard)) if uses_markers(attrs) else shard in read_committed(loc, attrs)
    if done:
        raise StoreError(f"shard {shard} of {loc} is already committed")
    _write_arrays(loc, group, shard, acts, aligned)


def _write_arrays(loc: Location, group: zarr.Group, shard: int, acts: dict[str, np.ndarray],
                  aligned: dict[str, np.ndarray], torn_write=None) -> None:
    """Check and write every array of one shard (activations first); fault points for the tests."""
    path = loc
    attrs = group.attrs
    n_tok, shard_tok = int(attrs["n_tokens"]), int(attrs["shard_tokens"])
    if not 0 <= shard < n_shards(n_tok, shard_tok):
        raise StoreError(f"shard {shard} of {path} is out of range")
    start, stop = shard_bounds(shard, shard_tok, n_tok)
    for name, values in {**acts, **aligned}.items():
        if len(values) != stop - start:
            raise StoreError(f"shard {shard} of {name} needs {stop - start} rows, got {len(values)}")
    missing = set(attrs["hooks"]) - set(acts) | set(ALIGNED_ARRAYS) - set(aligned)
    if missing:
        raise StoreError(f"shard {shard} misses arrays {sorted(missing)}")
    _fault("before-write", shard)
    for i, (name, values) in enumerate({**acts, **aligned}.items()):
        if i == 1:
            _fault("mid-shard", shard)
            if torn_write is not None:
                torn_write(name, shard)
        group[name].with_config(_ARRAY_CONFIG)[start:stop] = values
