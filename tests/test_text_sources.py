"""Local files and folders go through the same `datasets` path as hub names."""

import dataclasses
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


def test_resumed_harvest_of_a_dataset_restarts_at_its_cursor(tmp_path, tiny_lm, tiny_model_dir, monkeypatch):
    """A stopped harvest of a streamed source resumes where its last committed shard ended (no re-read of the
    part before it) and gives the store an unbroken harvest gives, bit for bit."""
    import numpy as np
    import zarr

    import saestrata.harvest.harvester as harvester
    from saestrata.harvest.harvester import HarvestConfig, harvest

    path = tmp_path / "docs.jsonl"
    words = [f"Entry {i} says {'more ' * (3 + (i * 7) % 23)}about item {i % 11}." for i in range(400)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in words))

    def run(out):
        cfg = HarvestConfig(layers=[1], tokens=1024, out=out, model=str(tiny_model_dir), context_length=32,
                            rows_per_chunk=2, chunks_per_shard=2, device="cpu", dataset=str(path))
        return harvest(cfg, lm=tiny_lm, progress=False)

    ref = run(tmp_path / "ref.zarr")
    real_payload, real_docs = harvester.shard_payload, harvester.iter_documents
    calls = {"n": 0}

    def stop_at_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_payload(*args, **kwargs)

    monkeypatch.setattr(harvester, "shard_payload", stop_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed.zarr")
    monkeypatch.setattr(harvester, "shard_payload", real_payload)
    seen = {"start": [], "docs": 0}

    def spy(dataset, split, seed=0, text_field="text", start=None):
        seen["start"].append(start)
        for doc in real_docs(dataset, split, seed, text_field, start):
            seen["docs"] += 1
            yield doc

    monkeypatch.setattr(harvester, "iter_documents", spy)
    run(tmp_path / "resumed.zarr")
    assert seen["start"] and seen["start"][-1] is not None and seen["start"][-1]["row"] > 0
    first_resumed_doc = seen["start"][-1]["row"]
    assert seen["docs"] < len([t for t in words if split_of(t) == "train"]) - first_resumed_doc // 2
    a = zarr.open_group(str(ref), mode="r", use_consolidated=False)
    b = zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r", use_consolidated=False)
    for name in a.array_keys():
        assert np.array_equal(a[name][:], b[name][:]), name
    assert dict(a.attrs) == dict(b.attrs)


def test_cursor_of_another_source_is_refused_in_one_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    with pytest.raises(DatasetError, match="changed since the store was written"):
        list(iter_documents(str(path), "train", start={"row": 3, "state": {"no": "such layout"}}))


def test_glob_reads_files_in_sorted_order(tmp_path):
    for i, part in enumerate([TEXTS[100:], TEXTS[:50], TEXTS[50:100]]):
        (tmp_path / f"part-{[2, 0, 1][i]}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in part))
    got = [d.text for d in iter_documents(str(tmp_path / "part-*.jsonl"), "train")]
    assert got == _expected("train")


@pytest.mark.parametrize("files, message", [([], "no file matches"), (["a.jsonl", "b.txt"], "match one type"),
                                            (["a.csv"], "match one type"), (["a.jsonl", "empty.jsonl"], "is empty")])
def test_bad_globs_are_refused_in_one_line(tmp_path, files, message):
    for name in files:
        (tmp_path / name).write_text("" if name.startswith("empty") else json.dumps({"text": "x"}))
    with pytest.raises(DatasetError, match=message):
        list(iter_documents(str(tmp_path / "*.*"), "train"))


@pytest.mark.parametrize("source", ["glob", "file", "folder"])
def test_a_local_store_refuses_to_resume_over_changed_files(tmp_path, tiny_lm, tiny_model_dir, source):
    """Growing the source between harvests (a file appended to, a file added) is refused, not mixed into one store."""
    from saestrata.harvest.harvester import HarvestConfig, harvest
    from saestrata.store import IdentityMismatch

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("\n".join(json.dumps({"text": t * 3}) for t in TEXTS))
    dataset = {"glob": str(data / "*.jsonl"), "file": str(data / "a.jsonl"), "folder": str(data)}[source]
    cfg = HarvestConfig(layers=[1], tokens=256, out=tmp_path / "s.zarr", model=str(tiny_model_dir), context_length=32,
                        rows_per_chunk=2, chunks_per_shard=2, device="cpu", dataset=dataset)
    harvest(cfg, lm=tiny_lm, progress=False)
    if source == "file":
        with open(data / "a.jsonl", "a") as f:
            f.write("\n" + json.dumps({"text": "a new line"}))
    else:
        (data / "b.jsonl").write_text(json.dumps({"text": "a new file"}))
    with pytest.raises(IdentityMismatch, match="dataset_files"):
        harvest(dataclasses.replace(cfg, tokens=512), lm=tiny_lm, progress=False)
