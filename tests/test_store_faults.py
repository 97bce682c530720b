"""Crash safety of the store: SIGKILLed harvests resume to a bit-identical store; verify catches damage.

The harvest runs as ``saestrata harvest`` in a subprocess. Kills are deterministic:
the writer's test-only hook (``SAESTRATA_FAULT=<point>[:<shard>]``, store/writer.py)
SIGKILLs the process at a named point. Each run resumes the store the previous kill
left behind, so one chain exercises every crash point followed by a resume.
Layout: 1,024 tokens, context 32, shards of 4 rows (128 tokens) -> 8 shards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from saestrata.harvest.harvester import HarvestConfig, harvest
from saestrata.store import ActivationStore, StoreError
from saestrata.store.audit import verify_store
from saestrata.store.cli import store as store_cli
from saestrata.store.format import commit_key, read_committed
from saestrata.store.location import Location

SAESTRATA = str(Path(sys.executable).with_name("saestrata"))
TOKENS, CTX = 1024, 32

# (fault, committed shards the kill must leave behind, what the kill leaves on disk)
KILLS = [
    ("after-create", [], "arrays created, nothing written"),
    ("mid-shard:1", [0], "shard 1 written for its first array only"),
    ("torn-write:3", [0, 1, 2], "shard 3: a torn shard file and a stray *.partial temp file"),
    ("before-commit:4", [0, 1, 2, 3], "shard 4 fully written but not committed"),
    ("after-commit:5", [0, 1, 2, 3, 4, 5], "shard 5's commit marker written, nothing after it"),
    ("before-write:6", [0, 1, 2, 3, 4, 5], "nothing of shard 6 written"),
    ("before-finish", list(range(8)), "every shard committed, statistics and 'complete' not written"),
]


def _cli_harvest(model_dir: Path, out: Path, fault: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SAESTRATA_FAULT"}
    env["PYTHONUNBUFFERED"] = "1"  # keep what a killed run printed
    if fault:
        env["SAESTRATA_FAULT"] = fault
    cmd = [SAESTRATA, "harvest", "--model", str(model_dir), "--layers", "1,2", "--tokens", str(TOKENS),
           "--context-length", str(CTX), "--rows-per-chunk", "2", "--chunks-per-shard", "2", "--device", "cpu",
           "--compute-dtype", "bfloat16",  # as the in-process references (tiny_lm); auto: test_store.py
           "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm, tiny_model_dir) -> Path:
    """The same harvest, uninterrupted (in process: same code, same model folder, same options)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    harvest(HarvestConfig(layers=[1, 2], tokens=TOKENS, out=out, model=str(tiny_model_dir), context_length=CTX,
                          rows_per_chunk=2, chunks_per_shard=2, device="cpu"), lm=tiny_lm, progress=False)
    return out


def _committed(path: Path) -> list[int]:
    attrs = dict(zarr.open_group(str(path), mode="r", use_consolidated=False).attrs)
    assert "committed_shards" not in attrs and "shard_records" not in attrs  # the record is in markers only
    return sorted(read_committed(Location(path), attrs))


def _assert_bit_identical(a: Path, b: Path) -> None:
    ga = zarr.open_group(str(a), mode="r", use_consolidated=False)
    gb = zarr.open_group(str(b), mode="r", use_consolidated=False)
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = ga[name][:], gb[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f"{name} differs"
        assert dict(ga[name].attrs) == dict(gb[name].attrs)
    assert dict(ga.attrs) == dict(gb.attrs)


def test_sigkill_at_every_point_then_resume_is_bit_identical(scratch, reference, tiny_model_dir):
    out = scratch / "killed.zarr"
    previous: list[int] = []
    for fault, committed, what in KILLS:
        res = _cli_harvest(tiny_model_dir, out, fault)
        assert res.returncode == -signal.SIGKILL, f"{fault} ({what}) did not kill: {res.returncode} {res.stderr[-500:]}"
        if 0 < len(previous) < 8:
            assert f"resuming {out} at shard {len(previous)} of 8" in res.stdout, res.stdout
        assert _committed(out) == committed, fault
        if fault.startswith("torn-write"):
            assert list(out.rglob("*.partial")), "the torn write should leave a temp file behind"
            report = verify_store(out)  # committed shards intact; the debris is only a warning
            assert report.ok and len(report.warnings) == 3, report.warnings
        previous = committed
        if len(committed) < 8:
            with pytest.raises(StoreError, match="half-written"):
                ActivationStore(out)
        if committed:  # whatever is committed already equals the reference, bit for bit
            part, ref = ActivationStore(out, allow_partial=True), ActivationStore(reference)
            n = part.n_tokens
            assert n == 128 * len(committed)
            for hook in ref.hooks:
                assert np.array_equal(part.group[hook][:n], ref.group[hook][:n])
    # Last resume: a different chunk layout and batch size on the command line must not change the result.
    res = _cli_harvest(tiny_model_dir, out, None, "--batch-rows", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(out.rglob("*.partial"))
    _assert_bit_identical(out, reference)
    report = verify_store(out)
    assert report.ok and report.warnings == [] and report.shards_checked == 8


def test_identity_mismatch_is_refused_in_one_line(scratch, reference, tiny_model_dir):
    out = scratch / "copy.zarr"
    shutil.copytree(reference, out)
    res = _cli_harvest(tiny_model_dir, out, None, "--seed", "7")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "order_seed (0 != 7)" in lines[0], res.stderr[-1000:]
    _assert_bit_identical(out, reference)


def _shard_file(store: Path, array: str, shard: int) -> Path:
    folder = store / array / "c"
    return next(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).parts[0] == str(shard))


@pytest.mark.parametrize("offset", [0, 1000, -10, -1])  # inside the data, deeper in, in the index, the index crc
def test_verify_detects_one_flipped_byte(scratch, reference, offset):
    out = scratch / "flip.zarr"
    shutil.copytree(reference, out)
    target = _shard_file(out, "blocks.2.hook_resid_post", 5)
    data = bytearray(target.read_bytes())
    data[offset] ^= 0x04
    target.write_bytes(bytes(data))
    res = CliRunner().invoke(store_cli, ["verify", str(out)])
    assert res.exit_code == 1
    assert "shard 5 of blocks.2.hook_resid_post" in res.output
    assert verify_store(out).problems[0].startswith("shard 5 of blocks.2.hook_resid_post")


def test_verify_detects_missing_shard_file(scratch, reference):
    out = scratch / "missing.zarr"
    shutil.copytree(reference, out)
    _shard_file(out, "doc_index", 3).unlink()
    # zarr alone would silently read fill values for the lost shard ...
    group = zarr.open_group(str(out), mode="r", use_consolidated=False)
    assert group["doc_index"][:].shape == (TOKENS,)
    # ... while the memory-mapped reader behind ActivationStore refuses it:
    with pytest.raises(StoreError, match="shard file .* is missing"):
        ActivationStore(out).aligned("doc_index")
    res = CliRunner().invoke(store_cli, ["verify", str(out)])
    assert res.exit_code == 1 and "shard 3 of doc_index" in res.output and "missing" in res.output


def test_verify_detects_truncated_shard_and_bad_commit_record(scratch, reference):
    out = scratch / "trunc.zarr"
    shutil.copytree(reference, out)
    target = _shard_file(out, "token_ids", 7)
    target.write_bytes(target.read_bytes()[:50])
    Location(out).write_atomic(commit_key(9), b'{"record":null,"shard":9}')  # a marker beyond the plan
    Location(out).write_atomic(commit_key(2), b'{"record":null,"shard":3}')  # a marker naming another shard
    problems = verify_store(out).problems
    assert any("shard 7 of token_ids" in p for p in problems)
    assert any("outside the plan" in p for p in problems)
    assert any("commit marker commits/2.json does not describe shard 2" in p for p in problems)
