"""Parallel harvest on dask.distributed: disjoint shard ownership loses nothing.

Every store written with workers (a LocalCluster via ``--workers``, or an existing
scheduler via ``--scheduler``), including one resumed after a SIGKILL and one whose
text source runs out, must equal the one-process harvest bit for bit.
Layout as in test_store_faults.py: 1,024 tokens, context 32, 4-row shards -> 8 shards.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from saestrata.harvest.harvester import HarvestConfig, harvest
from saestrata.store import ActivationStore, StoreError, StoreWriter
from saestrata.store.audit import verify_store

from test_store_faults import _assert_bit_identical, _cli_harvest, _committed

TOKENS, CTX = 1024, 32


def _cfg(out: Path, model_dir: Path, **kw) -> HarvestConfig:
    return HarvestConfig(layers=[1, 2], tokens=kw.pop("tokens", TOKENS), out=out, model=str(model_dir),
                         context_length=CTX, rows_per_chunk=2, chunks_per_shard=2, device="cpu", **kw)


@pytest.fixture(scope="module")
def serial(tmp_path_factory, tiny_lm, tiny_model_dir) -> Path:
    """The one-process harvest every parallel one must equal."""
    out = tmp_path_factory.mktemp("serial") / "serial.zarr"
    harvest(_cfg(out, tiny_model_dir), lm=tiny_lm, progress=False)
    return out


def test_cli_workers_2_is_bit_identical_to_one_process(scratch, serial, tiny_model_dir):
    out = scratch / "w2.zarr"
    res = _cli_harvest(tiny_model_dir, out, None, "--workers", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    _assert_bit_identical(out, serial)
    report = verify_store(out)
    assert report.ok and report.shards_checked == 8


def test_resume_with_workers_after_sigkill(scratch, serial, tiny_model_dir):
    out = scratch / "killed.zarr"
    res = _cli_harvest(tiny_model_dir, out, "before-commit:3")
    assert res.returncode == -signal.SIGKILL
    assert _committed(out) == [0, 1, 2]
    res = _cli_harvest(tiny_model_dir, out, None, "--workers", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming {out} at shard 3 of 8" in res.stdout
    _assert_bit_identical(out, serial)


def test_existing_scheduler_and_a_source_that_runs_out(scratch, tiny_lm, tiny_model_dir):
    from distributed import LocalCluster

    text = scratch / "small.txt"
    text.write_text("\n".join(f"Line {i} of a small corpus about rivers, hills and towns." for i in range(60)))
    ref, par = scratch / "ref.zarr", scratch / "par.zarr"
    harvest(_cfg(ref, tiny_model_dir, dataset=str(text), tokens=4096), lm=tiny_lm, progress=False)
    n = ActivationStore(ref).n_tokens
    assert 0 < n < 4096 and n % CTX == 0  # the source ran out mid-plan: truncation is exercised
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        harvest(_cfg(par, tiny_model_dir, dataset=str(text), tokens=4096, scheduler=cluster.scheduler_address),
                lm=tiny_lm, progress=False)
    _assert_bit_identical(par, ref)


def test_commit_refuses_a_shard_whose_files_are_missing(scratch):
    writer = StoreWriter(scratch / "s.zarr", ["blocks.0.hook_resid_post"], 4, 64, shard_tokens=32, chunk_tokens=16,
                         dtype="float32", attrs={})
    with pytest.raises(StoreError, match="same filesystem"):
        writer.commit_shard(0, None)
    assert writer.committed == set()
    aligned = {"token_ids": np.zeros(32, np.int32), "doc_index": np.zeros(32, np.int64),
               "position": np.arange(32, dtype=np.int32)}
    writer.write_shard(0, {"blocks.0.hook_resid_post": np.ones((32, 4), np.float32)}, aligned)
    with pytest.raises(StoreError, match="already committed"):
        writer.commit_shard(0, None)
    writer.close()
