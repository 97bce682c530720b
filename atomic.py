"""Atomic file writes: a temp file in the target's folder, fsync, then ``os.replace``.

A crash, a full disk or Ctrl-C mid-write leaves the previous file intact (or no file);
readers never see a half-written result JSON, ``cfg.json`` or report page. The temp
file is removed when the write fails; one killed by SIGKILL stays behind as
``.<name>.<pid>.tmp`` (hidden, never read as a result).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends normally it replaces ``path`` in one rename.

    The caller writes the complete file to the yielded path (any writer: ``save_file``,
    ``torch.save`` ...). On any exception (``KeyboardInterrupt`` included) the temp file
    is deleted and ``path`` is untouched. The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # the bytes must be on disk before the rename makes them visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_json_atomic(path: str | Path, data, indent: int = 2) -> Path:
    """Write ``data`` as JSON (``indent`` spaces) to ``path`` atomically; returns ``path``.

    The JSON text is built before the temp file is opened, so an unserialisable
    object raises ``TypeError`` without touching the disk.
    """
    return write_text_atomic(path, json.dumps(data, indent=indent))
