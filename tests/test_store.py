"""The store on its own and through the harvester: bit-exact round trip, partial stores,
identity/resume/reuse/extension decisions, and the ``saestrata store`` commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from saestrata.harvest.harvester import HarvestConfig, harvest
from saestrata.store import ActivationStore, StoreError, StoreWriter
from saestrata.store.audit import verify_store
from saestrata.store.cli import store as store_cli
from saestrata.store.format import IdentityMismatch, committed_tokens, to_stored

HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
D = 16


def _aligned(start: int, stop: int) -> dict[str, np.ndarray]:
    n = stop - start
    return {"token_ids": np.arange(start, stop, dtype=np.int32), "doc_index": np.zeros(n, np.int64),
            "position": (np.arange(start, stop) % 8).astype(np.int32)}


def _write(path, dtype: str, n_tokens: int = 88, shards=None, identity=None) -> dict[str, torch.Tensor]:
    """A store of random activations (extreme values included) with shards of 32 tokens, chunks of 8."""
    gen = torch.Generator().manual_seed(1)
    torch_dtype = getattr(torch, dtype)
    acts = {h: (torch.randn(n_tokens, D, generator=gen) * 1e4).to(torch_dtype) for h in HOOKS}
    for a in acts.values():
        a[0, :3] = torch.tensor([torch.finfo(torch_dtype).max, torch.finfo(torch_dtype).tiny, -0.0])
    writer = StoreWriter(path, HOOKS, D, n_tokens, shard_tokens=32, chunk_tokens=8, dtype=dtype,
                         attrs={"bos_token_id": 2}, identity=identity or {"name": "unit"})
    for shard in (range(writer.n_shards) if shards is None else shards):
        lo, hi = shard * 32, min(shard * 32 + 32, n_tokens)
        writer.write_shard(shard, {h: to_stored(a[lo:hi]) for h, a in acts.items()}, _aligned(lo, hi))
    if shards is None:
        writer.finish({})
    return acts


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_roundtrip_bit_exact(scratch, dtype):
    acts = _write(scratch / "s.zarr", dtype)
    store = ActivationStore(scratch / "s.zarr")
    assert store.n_tokens == 88 and store.dtype == dtype
    for hook, expected in acts.items():
        got = store.activations(hook)
        assert got.dtype == expected.dtype
        int_view = {2: torch.int16, 4: torch.int32}[expected.element_size()]
        assert torch.equal(got.view(int_view), expected.view(int_view))  # bits, not values (-0.0, NaN-safe)
    assert np.array_equal(store.aligned("token_ids"), np.arange(88, dtype=np.int32))
    raw = zarr.open_group(str(scratch / "s.zarr"), mode="r")[HOOKS[0]]
    if dtype == "bfloat16":
        assert raw.dtype == np.uint16 and raw.attrs["logical_dtype"] == "bfloat16"


def test_half_written_store_needs_allow_partial(scratch):
    acts = _write(scratch / "s.zarr", "bfloat16", shards=[0, 1])
    with pytest.raises(StoreError, match="half-written"):
        ActivationStore(scratch / "s.zarr")
    store = ActivationStore(scratch / "s.zarr", allow_partial=True)
    assert store.n_tokens == 64
    assert torch.equal(store.activations(HOOKS[1]).view(torch.int16), acts[HOOKS[1]][:64].view(torch.int16))


def test_half_written_store_gives_statistics_of_its_committed_prefix(scratch, tiny_store):
    """``--allow-partial`` training needs ``mean_norm``: merged from the shard records of the readable prefix."""
    from saestrata.store.format import ActivationStats

    gen = torch.Generator().manual_seed(3)
    acts = (torch.randn(96, D, generator=gen) * 7).to(torch.bfloat16)
    writer = StoreWriter(scratch / "p.zarr", HOOKS[:1], D, 96, shard_tokens=32, chunk_tokens=8, dtype="bfloat16",
                         attrs={"bos_token_id": 2}, identity={"name": "unit"})
    for shard in (0, 1, 2):
        if shard == 1:
            continue  # shard 2 is committed but not readable: the prefix stops at the gap
        part = acts[shard * 32 : shard * 32 + 32]
        stats = ActivationStats()
        stats.update(part)
        writer.write_shard(shard, {HOOKS[0]: to_stored(part)}, _aligned(shard * 32, shard * 32 + 32),
                           record={HOOKS[0]: stats.record()})
    with pytest.raises(StoreError, match="--allow-partial"):
        ActivationStore(scratch / "p.zarr", allow_partial=True).stats("no.such.hook")
    got = ActivationStore(scratch / "p.zarr", allow_partial=True).stats(HOOKS[0])
    norms = acts[:32].double().norm(dim=-1)  # the readable prefix, computed here independently (float64)
    assert got["partial"] is True and got["n"] == 32
    assert got["mean_norm"] == pytest.approx(float(norms.mean()), rel=1e-6)  # the records hold fp32 norms
    assert got["max_abs"] == float(acts[:32].float().abs().max())
    finished = ActivationStore(tiny_store)  # a finished store keeps the harvest's own record
    assert "partial" not in finished.stats(finished.hooks[0])


def test_all_zero_shard_is_written_not_skipped(scratch):
    """zarr skips fill-valued chunks by default; the writer must not, or verify would see a missing shard."""
    _write(scratch / "s.zarr", "float32")  # doc_index is all zeros == fill value
    assert (scratch / "s.zarr" / "doc_index" / "c" / "0").is_file()
    report = verify_store(scratch / "s.zarr")
    assert report.ok, report.problems
    assert report.shards_checked == 3 and report.nonfinite == {h: 0 for h in HOOKS}


def test_writer_refuses_double_commit_and_bad_rows(scratch):
    _write(scratch / "s.zarr", "bfloat16", shards=[0])
    writer = StoreWriter.reopen(scratch / "s.zarr", {"name": "unit"})
    rows = {h: np.zeros((32, D), np.uint16) for h in HOOKS}
    with pytest.raises(StoreError, match="already committed"):
        writer.write_shard(0, rows, _aligned(0, 32))
    with pytest.raises(StoreError, match="needs 32 rows"):
        writer.write_shard(1, {h: r[:5] for h, r in rows.items()}, _aligned(32, 64))


def test_reopen_refuses_other_identity(scratch):
    _write(scratch / "s.zarr", "bfloat16", identity={"model": "a", "seed": 0})
    with pytest.raises(IdentityMismatch, match=r"seed \(0 != 1\)"):
        StoreWriter.reopen(scratch / "s.zarr", {"model": "a", "seed": 1})


def test_extension_refused_when_last_shard_partial_and_committed(scratch):
    _write(scratch / "s.zarr", "bfloat16")  # 88 tokens: shard 2 holds 24 of 32
    writer = StoreWriter.reopen(scratch / "s.zarr", {"name": "unit"})
    with pytest.raises(StoreError, match="last shard 2 is partial"):
        writer.extend(200)
    assert ActivationStore(scratch / "s.zarr").n_tokens == 88


# ---- through the harvester (tiny random Gemma3, in process) ----

def _cfg(out, tiny_model_dir, tokens: int, **kw) -> HarvestConfig:
    return HarvestConfig(layers=[1, 2], tokens=tokens, out=out, model=str(tiny_model_dir), context_length=32,
                         rows_per_chunk=2, chunks_per_shard=2, device="cpu", **kw)


def _arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def _assert_same_store(a, b):
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype and np.array_equal(arrays_a[name], arrays_b[name]), name
    attrs_a = dict(zarr.open_group(str(a), mode="r").attrs)
    attrs_b = dict(zarr.open_group(str(b), mode="r").attrs)
    assert attrs_a == attrs_b


def test_complete_store_is_reused(scratch, tiny_lm, tiny_model_dir, capsys):
    out = scratch / "s.zarr"
    harvest(_cfg(out, tiny_model_dir, 256), lm=tiny_lm, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    harvest(_cfg(out, tiny_model_dir, 200), lm=tiny_lm, progress=False)
    assert "reusing" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_extension_equals_fresh_harvest(scratch, tiny_lm, tiny_model_dir, capsys):
    """512 tokens (4 whole shards of 128) extended to 1024 == a fresh 1024-token harvest, bit for bit."""
    grown, fresh = scratch / "grown.zarr", scratch / "fresh.zarr"
    harvest(_cfg(grown, tiny_model_dir, 512), lm=tiny_lm, progress=False)
    first_shard = (grown / "token_ids" / "c" / "0").read_bytes()
    harvest(_cfg(grown, tiny_model_dir, 1024), lm=tiny_lm, progress=False)
    assert "extending" in capsys.readouterr().out
    assert (grown / "token_ids" / "c" / "0").read_bytes() == first_shard
    harvest(_cfg(fresh, tiny_model_dir, 1024), lm=tiny_lm, progress=False)
    _assert_same_store(grown, fresh)
    assert verify_store(grown).ok


def test_extension_of_unaligned_store_is_refused(scratch, tiny_lm, tiny_model_dir):
    out = scratch / "s.zarr"
    harvest(_cfg(out, tiny_model_dir, 160), lm=tiny_lm, progress=False)  # shard 1 holds 32 of 128 tokens
    with pytest.raises(StoreError, match="cannot extend"):
        harvest(_cfg(out, tiny_model_dir, 1024), lm=tiny_lm, progress=False)
    assert ActivationStore(out).n_tokens == 160 and verify_store(out).ok


def test_harvest_identity_mismatch_names_fields(scratch, tiny_lm, tiny_model_dir):
    out = scratch / "s.zarr"
    harvest(_cfg(out, tiny_model_dir, 128), lm=tiny_lm, progress=False)
    before = _arrays(out)
    with pytest.raises(IdentityMismatch) as err:
        harvest(HarvestConfig(layers=[1], tokens=128, out=out, model=str(tiny_model_dir), context_length=32, seed=3,
                              rows_per_chunk=2, chunks_per_shard=2, device="cpu"), lm=tiny_lm, progress=False)
    message = str(err.value)
    assert "\n" not in message
    for field in ("layers", "hooks", "order_seed"):
        assert field in message
    assert "context_length" not in message and "model_id" not in message
    after = _arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_non_store_directory_is_refused(scratch, tiny_lm, tiny_model_dir):
    (scratch / "s.zarr").mkdir()
    (scratch / "s.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        harvest(_cfg(scratch / "s.zarr", tiny_model_dir, 128), lm=tiny_lm, progress=False)
    assert (scratch / "s.zarr" / "notes.txt").read_text() == "mine"


def test_source_exhausted_is_truncated_then_reused(scratch, tiny_lm, tiny_model_dir, capsys):
    text = scratch / "small.txt"
    text.write_text("\n\n".join(f"Paragraph {i} about cells, rivers and engines. " * 6 for i in range(40)))
    out = scratch / "s.zarr"
    harvest(_cfg(out, tiny_model_dir, 100_000, dataset=str(text)), lm=tiny_lm, progress=False)
    store = ActivationStore(out)
    assert store.attrs["complete"] and store.attrs["source_exhausted"]
    assert 0 < store.n_tokens < 100_000 and store.n_tokens == committed_tokens(store.attrs, store.committed)
    assert verify_store(out).ok
    harvest(_cfg(out, tiny_model_dir, 200_000, dataset=str(text)), lm=tiny_lm, progress=False)
    assert "reusing" in capsys.readouterr().out


def test_store_cli_ls_info_verify(tiny_store, scratch):
    runner = CliRunner()
    res = runner.invoke(store_cli, ["ls", str(tiny_store.parent)])
    assert res.exit_code == 0 and "4096/4096 tok  complete" in res.output
    res = runner.invoke(store_cli, ["info", str(tiny_store), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["tokens_committed"] == info["tokens_planned"] == 4096 and info["layers"] == [1, 2]
    assert info["bytes_per_token"] > 2 * 2 * 64  # two bf16 hooks of width 64 plus aligned arrays
    assert set(info["activation_stats"]) == {"blocks.1.hook_resid_post", "blocks.2.hook_resid_post"}
    res = runner.invoke(store_cli, ["info", str(tiny_store)])
    assert res.exit_code == 0 and "mean_norm" in res.output and "4096 committed of 4096" in res.output
    res = runner.invoke(store_cli, ["verify", str(tiny_store)])
    assert res.exit_code == 0 and "OK" in res.output
    res = runner.invoke(store_cli, ["info", str(scratch)])
    assert res.exit_code == 1 and "not an activation store" in res.output


def test_store_group_registered_in_main_cli():
    from saestrata.cli import main

    res = CliRunner().invoke(main, ["store", "--help"])
    assert res.exit_code == 0 and "verify" in res.output


def test_verify_reports_nonfinite(scratch):
    acts = _write(scratch / "s.zarr", "bfloat16", shards=[0, 1, 2])
    group = zarr.open_group(str(scratch / "s.zarr"), mode="r+")
    values = acts[HOOKS[0]][32:64].clone()
    values[3, 4], values[5, 6] = float("nan"), float("inf")
    shutil.rmtree(scratch / "s.zarr" / HOOKS[0] / "c" / "1")
    group[HOOKS[0]].with_config({"write_empty_chunks": True})[32:64] = to_stored(values)
    report = verify_store(scratch / "s.zarr")
    assert report.nonfinite[HOOKS[0]] == 2
    assert report.problems == [f"shard 1 of {HOOKS[0]}: 2 NaN/Inf values"]


# ---- memory-mapped reads of uncompressed shards ----

def test_memmap_matches_zarr_reads(scratch):
    from saestrata.store.memmap import MemmapArray, memmap_activations

    _write(scratch / "s.zarr", "bfloat16")  # 88 tokens: the last shard and last chunk are partial
    store = ActivationStore(scratch / "s.zarr")
    for name in HOOKS:
        mapped = MemmapArray(store.path, name, store.n_tokens)
        assert mapped.n_chunks == 11
        whole = np.concatenate([mapped.chunk(i) for i in range(mapped.n_chunks)])
        assert whole.dtype == store.group[name].dtype and np.array_equal(whole, store.group[name][:])
    for name in ["token_ids", "doc_index", "position"]:  # zstd-compressed (format 2): never mapped
        with pytest.raises(StoreError, match="only uncompressed"):
            MemmapArray(store.path, name, store.n_tokens)
    rows = np.random.default_rng(0).integers(0, 88, size=200)
    got = memmap_activations(store, HOOKS[0], rows)
    assert torch.equal(got.view(torch.int16), store.activations(HOOKS[0])[torch.from_numpy(rows)].view(torch.int16))
    with pytest.raises(IndexError):
        MemmapArray(store.path, HOOKS[0], store.n_tokens).take(np.array([88]))


def test_memmap_reads_only_committed_prefix_and_checks_crc(scratch):
    from saestrata.store.memmap import MemmapArray

    _write(scratch / "s.zarr", "float32", shards=[0, 1])
    store = ActivationStore(scratch / "s.zarr", allow_partial=True)
    mapped = MemmapArray(store.path, HOOKS[1], store.n_tokens)
    assert mapped.n_chunks == 8
    shard_file = scratch / "s.zarr" / HOOKS[1] / "c" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    data[10] ^= 0x01  # inner chunk data of shard 1 (chunk 4 overall; Morton order puts inner 0 first)
    shard_file.write_bytes(bytes(data))
    fresh = MemmapArray(store.path, HOOKS[1], store.n_tokens)
    assert np.array_equal(fresh.chunk(0), store.group[HOOKS[1]][0:8])
    with pytest.raises(StoreError, match="crc32c mismatch"):
        for i in range(4, 8):
            fresh.chunk(i)


def test_memmap_refuses_compressed_arrays(scratch):
    from saestrata.store.memmap import MemmapArray

    group = zarr.open_group(str(scratch / "z.zarr"), mode="w")
    group.create_array("x", shape=(64, 4), chunks=(8, 4), shards=(32, 4), dtype=np.float32,
                       compressors=[zarr.codecs.ZstdCodec(level=1)])
    with pytest.raises(StoreError, match="only uncompressed"):
        MemmapArray(scratch / "z.zarr", "x", 64)


def test_second_writer_is_refused_while_first_holds_the_store(scratch):
    _write(scratch / "s.zarr", "bfloat16", shards=[0])
    first = StoreWriter.reopen(scratch / "s.zarr", {"name": "unit"})
    with pytest.raises(StoreError, match="being written by another harvest"):
        StoreWriter.reopen(scratch / "s.zarr", {"name": "unit"})
    assert (scratch / "s.zarr" / HOOKS[0] / "c" / "0" / "0").is_file()
    first.close()
    StoreWriter.reopen(scratch / "s.zarr", {"name": "unit"}).close()


def test_compute_dtype_float32_is_stored_rounded_and_part_of_the_identity(scratch, tiny_model_dir, tiny_lm):
    """--compute-dtype float32 (CPUs without native bf16): the LM runs in fp32, its residuals are
    rounded to the store's bf16; the identity says so, and a bf16-computed resume is refused."""
    from saestrata.harvest.hooks import residuals
    from saestrata.harvest.model import load_model
    from saestrata.store.format import from_stored

    out, ref = scratch / "f32.zarr", scratch / "bf16.zarr"
    harvest(_cfg(out, tiny_model_dir, 128, compute_dtype="float32"), progress=False)
    harvest(_cfg(ref, tiny_model_dir, 128), lm=tiny_lm, progress=False)
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["compute_dtype"] == "float32" and group.attrs["dtype"] == "bfloat16"
    assert "compute_dtype" not in zarr.open_group(str(ref), mode="r").attrs  # old identities unchanged
    stored = from_stored(group["blocks.1.hook_resid_post"][:], "bfloat16")
    ids = torch.from_numpy(group["token_ids"][:].astype(np.int64)).reshape(-1, 32)
    fp32 = residuals(load_model(str(tiny_model_dir), "cpu", "float32"), ids, [1])[1].reshape(-1, stored.shape[-1])
    assert torch.equal(stored, fp32.to(torch.bfloat16))
    assert not torch.equal(stored, from_stored(zarr.open_group(str(ref), mode="r")["blocks.1.hook_resid_post"][:],
                                               "bfloat16"))
    with pytest.raises(IdentityMismatch, match="compute_dtype"):
        harvest(_cfg(out, tiny_model_dir, 256), lm=tiny_lm, progress=False)


def test_auto_compute_dtype_follows_the_device_then_the_store(scratch, tiny_model_dir, monkeypatch):
    """compute_dtype "auto" (the CLI's default): float32 for a new bf16 store where bf16 is emulated, bf16 where
    native; an existing store's own compute dtype when extending it on any machine (same store, bit for bit)."""
    import saestrata.device as device_mod
    from saestrata.harvest.harvester import resolve_compute_dtype
    from saestrata.harvest.model import load_model

    grown, fresh = scratch / "grown.zarr", scratch / "fresh.zarr"
    for flag, want in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(device_mod, "native_bf16", lambda device, flag=flag: flag)
        assert resolve_compute_dtype(_cfg(grown, tiny_model_dir, 128, compute_dtype="auto")) == want
        assert resolve_compute_dtype(_cfg(grown, tiny_model_dir, 128)) == "bfloat16"  # None: the store's dtype
    lm32 = load_model(str(tiny_model_dir), "cpu", "float32")
    harvest(_cfg(grown, tiny_model_dir, 128, compute_dtype="float32"), lm=lm32, progress=False)
    # "Another machine", with native bf16: extending without an LM must load the store's float32, not bf16.
    harvest(_cfg(grown, tiny_model_dir, 256, compute_dtype="auto"), progress=False)  # no IdentityMismatch
    harvest(_cfg(fresh, tiny_model_dir, 256, compute_dtype="float32"), lm=lm32, progress=False)
    _assert_same_store(grown, fresh)


def test_cli_harvest_defaults_to_auto_compute_dtype(scratch, tiny_model_dir, monkeypatch):
    """`saestrata harvest` without --compute-dtype, where bf16 is emulated: a bf16 store computed in float32."""
    from click.testing import CliRunner

    import saestrata.device as device_mod
    from saestrata.cli import main

    monkeypatch.setattr(device_mod, "native_bf16", lambda device: False)
    out = scratch / "emulated.zarr"
    res = CliRunner().invoke(main, ["harvest", "--model", str(tiny_model_dir), "--layers", "1", "--tokens", "128",
                                    "--context-length", "32", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["dtype"] == "bfloat16" and attrs["compute_dtype"] == "float32"


def _to_legacy(path) -> None:
    """Rewrite a marker-layout store as a store of before commit markers: the record back in the attributes."""
    from saestrata.store.format import read_records
    from saestrata.store.location import Location

    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    attrs = dict(group.attrs)
    loc = Location(path)
    committed = sorted(ActivationStore(path, allow_partial=True).committed)
    records = read_records(loc, attrs, committed)
    shutil.rmtree(path / "commits")
    legacy = {k: v for k, v in attrs.items() if k != "commit_record"}
    group.attrs.put({**legacy, "committed_shards": committed, "shard_records": {str(s): r for s, r in records.items()}})


def test_store_of_before_commit_markers_opens_and_is_migrated_on_reopen(scratch):
    acts = _write(scratch / "old.zarr", "bfloat16", shards=[0, 1])  # 88 tokens, shards 0 and 1 of 3
    _to_legacy(scratch / "old.zarr")
    assert not (scratch / "old.zarr" / "commits").exists()
    store = ActivationStore(scratch / "old.zarr", allow_partial=True)
    assert store.committed == {0, 1} and store.n_tokens == 64
    assert torch.equal(store.activations(HOOKS[0]), acts[HOOKS[0]][:64])
    with pytest.raises(StoreError, match="half-written"):
        ActivationStore(scratch / "old.zarr")
    report = verify_store(scratch / "old.zarr")
    assert report.ok and report.shards_checked == 2, report.problems
    writer = StoreWriter.reopen(scratch / "old.zarr", {"name": "unit"})  # migrates the record to markers
    assert writer.committed == {0, 1} and writer.pending_shards() == [2]
    writer.write_shard(2, {h: to_stored(a[64:]) for h, a in acts.items()}, _aligned(64, 88))
    writer.finish({})
    attrs = dict(zarr.open_group(str(scratch / "old.zarr"), mode="r", use_consolidated=False).attrs)
    assert "committed_shards" not in attrs and "shard_records" not in attrs and attrs["commit_record"] == "objects"
    names = sorted(p.name for p in (scratch / "old.zarr" / "commits").iterdir())
    assert names == ["0.json", "1.json", "2.json", "zarr.json"]  # three markers + the empty commits array's metadata
    store = ActivationStore(scratch / "old.zarr")
    assert store.committed == {0, 1, 2} and torch.equal(store.activations(HOOKS[1]), acts[HOOKS[1]])
    assert verify_store(scratch / "old.zarr").ok


def test_commit_writes_one_marker_and_leaves_group_metadata_alone(scratch):
    """A commit is one small object: the group's zarr.json is not rewritten (O(1) per shard)."""
    _write(scratch / "m.zarr", "float32", shards=[0])
    meta = scratch / "m.zarr" / "zarr.json"
    before = (meta.read_bytes(), meta.stat().st_mtime_ns)
    writer = StoreWriter.reopen(scratch / "m.zarr", {"name": "unit"})
    zeros = np.zeros((32, D), np.float32)
    writer.write_shard(1, {h: zeros for h in HOOKS}, _aligned(32, 64), record={"x": [1, 2.5]})
    writer.close()
    assert (meta.read_bytes(), meta.stat().st_mtime_ns) == before
    marker = json.loads((scratch / "m.zarr" / "commits" / "1.json").read_text())
    assert marker == {"shard": 1, "record": {"x": [1, 2.5]}}


def test_complete_store_opens_without_listing_commit_markers(scratch, monkeypatch):
    """Issue 12: opening a finished store costs no O(shards) listing of commits/; half-written stores still list."""
    from saestrata.store.location import Location

    _write(scratch / "done.zarr", "float32")
    _write(scratch / "half.zarr", "float32", shards=[0])
    listed = []
    real = Location.list_names
    monkeypatch.setattr(Location, "list_names", lambda self, prefix: listed.append(prefix) or real(self, prefix))
    store = ActivationStore(scratch / "done.zarr")
    assert store.committed == {0, 1, 2} and store.n_tokens == 88
    assert not [p for p in listed if p.startswith("commits")]
    ActivationStore(scratch / "half.zarr", allow_partial=True)
    assert [p for p in listed if p.startswith("commits")]
    # verify keeps checking the markers themselves: a lost marker of a complete store is reported
    (scratch / "done.zarr" / "commits" / "1.json").unlink()
    report = verify_store(scratch / "done.zarr")
    assert not report.ok and any("1" in p for p in report.problems)
