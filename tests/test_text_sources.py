"""Local files and folders go through the same `datasets` path as hub names."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saestrata.harvest.text import DatasetError, iter_documents, split_of

TEXTS = [f"Document number {i} talks about topic {i % 7} at some length." for i in range(200)]


def _expected(split):
    return [t for t in TEXTS if split_of(t) == split]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "folder"])
def test_local_sources_split_by_hash(tmp_path, kind):
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    elif kind == "parquet":
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"text": TEXTS}), path)
    elif kind == "txt":
        path = tmp_path / "docs.txt"
        path.write_text("\n\n".join(TEXTS))
    else:
        path = tmp_path / "corpus"
        path.mkdir()
        (path / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    for split in ("train", "eval"):
        got = [d.text for d in iter_documents(str(path), split)]
        assert got == _expected(split), (kind, split)
    assert _expected("eval") and _expected("train")


def test_missing_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}))
    with pytest.raises(DatasetError, match="--text-field"):
        list(iter_documents(str(path), "train"))


def test_unsupported_file(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("a,b")
    with pytest.raises(DatasetError, match="use .txt, .jsonl or .parquet"):
        list(iter_documents(str(path), "train"))
