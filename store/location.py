"""Where a store lives: a local folder or an object-store URL (``s3://bucket/prefix``), behind one small interface.

The commit protocol needs only a few operations on the objects of a store (keys are
``/``-separated and relative to the store root): atomic small writes (the commit
markers), existence checks, listings, ranged reads (shard indexes, inner chunks) and
deletes. :class:`Location` gives them for both kinds of storage:

- a local folder: plain files; an atomic write is temp file + ``fsync`` + ``os.replace``;
- a URL (``s3://...``, any fsspec protocol): an fsspec filesystem (``s3fs`` for S3);
  one ``PUT`` is atomic (an object is visible whole or not at all), so a small object
  is written in one request.

Zarr reads and writes the arrays through :meth:`Location.zarr_store` (zarr's own
``LocalStore`` for folders, ``zarr.storage.FsspecStore`` for URLs).

Credentials and endpoint of an object store come from the usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``~/.aws``) as botocore resolves them,
and/or from ``storage_options`` (s3fs keyword arguments, e.g. ``{"key": ..., "secret":
..., "endpoint_url": ...}``; they take precedence).

This module imports nothing else of saestrata but ``format.StoreError``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .format import StoreError

# Fail fast on an unreachable endpoint (botocore's defaults retry for minutes); a caller's
# ``config_kwargs`` in storage options replace these.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}


def is_url(path) -> bool:
    """True if ``path`` is an object-store URL (``scheme://...`` other than ``file://``)."""
    if isinstance(path, Location):
        return path.remote
    text = str(path)
    return "://" in text and not text.startswith("file://")


def parse_storage_options(text: str | None) -> dict:
    """``--storage-options`` JSON -> dict (``{}`` for None/empty).

    Raises:
        StoreError: not valid JSON or not a JSON object (one line saying what to pass).
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise StoreError(f"--storage-options is not valid JSON ({err}): pass an object such as "
                         "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'") from None
    if not isinstance(value, dict):
        raise StoreError("--storage-options must be a JSON object such as '{\"endpoint_url\": \"http://host:9000\"}'")
    return value


class Location:
    """A store's root: a local folder or an object-store URL, with the object operations the store needs.

    Args:
        path: a folder (``str``/``Path``), a URL such as ``s3://bucket/prefix/store.zarr``, or a Location (copied).
        storage_options: fsspec/s3fs keyword arguments for URLs (ignored for folders).

    Attributes:
        remote: True for URLs.
        url: the URL, or the folder as given (for messages).
        path: the folder as a ``Path`` (local), else the URL string.

    Raises:
        StoreError: a URL whose protocol has no fsspec implementation installed (e.g. ``s3fs`` missing).
    """

    def __init__(self, path, storage_options: dict | None = None):
        if isinstance(path, Location):
            storage_options = path.storage_options if storage_options is None else storage_options
            path = path.url if path.remote else path.path
        self.storage_options = dict(storage_options or {})
        self.remote = is_url(path)
        if not self.remote:
            self.path = Path(path)
            self.url = str(self.path)
            self.fs, self.root = None, str(self.path)
            return
        self.url = str(path).rstrip("/")
        self.path = self.url
        import fsspec

        options = dict(self.storage_options)
        protocol = self.url.split("://", 1)[0]
        if protocol in ("s3", "s3a"):
            options.setdefault("config_kwargs", _S3_CONFIG)
            # Listings must see objects other processes wrote (markers, shards): no stale cache.
            options.setdefault("use_listings_cache", False)
            options.setdefault("skip_instance_cache", True)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as err:
            raise StoreError(f"{self.url}: {protocol}:// stores need an extra package ({err}); "
                             "install it, e.g. pip install 'saestrata[s3]'") from None
        self.root = self.root.rstrip("/")
        self._zarr_options = options

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def name(self) -> str:
        """Last component of the folder or URL (e.g. ``tiny.zarr``)."""
        return self.path.name if not self.remote else self.url.rsplit("/", 1)[-1]

    def identity(self) -> str:
        """Stable text naming this store (absolute folder or URL), e.g. for a run's provenance."""
        return self.url if self.remote else str(self.path.resolve())

    # ------------------------------------------------------------------ keys
    def _full(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def file(self, key: str) -> Path:
        """Local path of ``key`` (local stores only)."""
        return self.path / key if key else self.path

    def check_reachable(self) -> None:
        """For URLs: raise a one-line StoreError unless the bucket exists and can be listed. No-op locally.

        Raises:
            StoreError: missing bucket, no credentials, access denied or unreachable endpoint,
                each saying what to do.
        """
        if not self.remote:
            return
        bucket = self.root.split("/", 1)[0]
        self._call(lambda: self.fs.ls(bucket, detail=False), what=f"list bucket {bucket!r}")

    def _call(self, fn, what: str):
        """Run one remote operation, translating transport and permission errors into one-line StoreErrors."""
        try:
            return fn()
        except FileNotFoundError:
            raise
        except PermissionError as err:
            raise StoreError(f"access denied to {self.url} ({what}: {_first_line(err)}): check the credentials "
                             "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --storage-options)") from None
        except OSError as err:
            raise StoreError(f"cannot {what} at {self.url} ({_first_line(err)}): check AWS_ENDPOINT_URL / "
                             "--storage-options and that the server runs") from None
        except Exception as err:  # botocore/aiohttp errors that are not OSErrors
            name = type(err).__name__
            if "Credential" in name:
                raise StoreError(f"no credentials for {self.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                 "or pass --storage-options '{\"key\": ..., \"secret\": ...}'") from None
            if "Connect" in name or "Endpoint" in name or "Timeout" in name:
                raise StoreError(f"cannot reach the object store for {self.url} ({name}): check AWS_ENDPOINT_URL "
                                 "/ --storage-options endpoint_url and that the server runs") from None
            raise

    def _bucket_missing(self, err: FileNotFoundError) -> StoreError:
        bucket = self.root.split("/", 1)[0]
        return StoreError(f"bucket {bucket!r} of {self.url} does not exist ({_first_line(err)}): create it first "
                          "or check the URL")

    def exists(self, key: str = "") -> bool:
        """True if the object (or local file/folder) ``key`` exists."""
        if not self.remote:
            return self.file(key).exists()
        try:
            return bool(self._call(lambda: self.fs.exists(self._full(key)), what=f"look up {key or 'the store'}"))
        except FileNotFoundError:
            return False

    def is_file(self, key: str) -> bool:
        """True if ``key`` is a file/object (not a folder/prefix)."""
        if not self.remote:
            return self.file(key).is_file()
        try:
            return bool(self._call(lambda: self.fs.isfile(self._full(key)), what=f"look up {key}"))
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes.

        Raises:
            FileNotFoundError: no such object.
        """
        if not self.remote:
            return self.file(key).stat().st_size
        return int(self._call(lambda: self.fs.size(self._full(key)), what=f"stat {key}"))

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key`` (whole object by default; ``start`` may be negative: from the end).

        Raises:
            FileNotFoundError: no such object.
        """
        if not self.remote:
            with open(self.file(key), "rb") as fh:
                if start is not None:
                    fh.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
                    pos = fh.tell()
                    return fh.read() if end is None else fh.read(max(0, end - pos))
                return fh.read()
        return self._call(lambda: self.fs.cat_file(self._full(key), start=start, end=end), what=f"read {key}")

    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        """Whole contents of several small objects ``{key: bytes}`` (concurrent requests for URLs).

        Raises:
            FileNotFoundError: one of them is missing.
        """
        if not self.remote:
            return {k: self.file(k).read_bytes() for k in keys}
        if not keys:
            return {}
        full = {self._full(k): k for k in keys}
        got = self._call(lambda: self.fs.cat(list(full), on_error="raise"), what="read commit markers")
        return {full[k]: v for k, v in got.items()}

    def write_atomic(self, key: str, data: bytes) -> None:
        """Write ``key`` so that readers see either nothing or all of ``data``, durable when this returns.

        Local: temp file in the same folder, ``fsync``, ``os.replace``, ``fsync`` of the folder.
        URL: one ``PUT`` (object stores never expose a partial object).
        """
        if self.remote:
            self._call(lambda: self.fs.pipe_file(self._full(key), data), what=f"write {key}")
            return
        target = self.file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def delete(self, key: str) -> None:
        """Remove the object/file ``key`` (no error if it is absent)."""
        if not self.remote:
            self.file(key).unlink(missing_ok=True)
            return
        try:
            self._call(lambda: self.fs.rm_file(self._full(key)), what=f"delete {key}")
        except FileNotFoundError:
            pass

    def list_names(self, prefix: str) -> list[str]:
        """Names directly under the folder/prefix ``prefix`` (files and sub-folders; [] if absent)."""
        if not self.remote:
            folder = self.file(prefix)
            return [p.name for p in folder.iterdir()] if folder.is_dir() else []
        try:
            entries = self._call(lambda: self.fs.ls(self._full(prefix), detail=False), what=f"list {prefix}")
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def find(self, prefix: str = "") -> dict[str, int]:
        """Every file/object below ``prefix`` (recursively): ``{key relative to the store root: size in bytes}``."""
        if not self.remote:
            base = self.file(prefix)
            if not base.is_dir():
                return {}
            return {str(p.relative_to(self.path)): p.stat().st_size for p in base.rglob("*") if p.is_file()}
        try:
            found = self._call(lambda: self.fs.find(self._full(prefix), detail=True), what=f"list {prefix or 'store'}")
        except FileNotFoundError as err:
            if prefix:
                return {}
            raise self._bucket_missing(err) from None
        cut = len(self.root) + 1
        return {name[cut:]: int(info.get("size") or 0) for name, info in found.items() if info.get("type") != "directory"}

    def is_empty(self) -> bool:
        """True if nothing is stored here yet (missing or empty folder; no object under the URL prefix).

        Raises:
            StoreError: (URLs) the bucket does not exist, or the object store cannot be reached.
        """
        if not self.remote:
            return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        self.check_reachable_bucket()
        return not self.find()

    def check_reachable_bucket(self) -> None:
        """For URLs: one-line StoreError if the bucket is missing or the server unreachable; no-op locally."""
        if not self.remote:
            return
        try:
            self.check_reachable()
        except FileNotFoundError as err:
            raise self._bucket_missing(err) from None

    def zarr_store(self, read_only: bool = False):
        """What to hand ``zarr.open_group``: the folder as ``str`` (zarr's LocalStore), or a ``FsspecStore``."""
        if not self.remote:
            return str(self.path)
        import zarr.storage

        options = {k: v for k, v in self._zarr_options.items() if k != "skip_instance_cache"}
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=options, read_only=read_only)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def as_location(path, storage_options: dict | None = None) -> Location:
    """``path`` as a :class:`Location` (a Location is returned as is unless new ``storage_options`` are given)."""
    if isinstance(path, Location) and storage_options is None:
        return path
    return Location(path, storage_options)
