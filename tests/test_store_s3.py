"""Stores in object storage (issue 12): harvest to S3, SIGKILL and resume, verify, train; bit-identical to local.

The S3 server is real: moto's standalone server (``moto[server]``), started on
127.0.0.1 by this module, reached through s3fs exactly as AWS or MinIO would be
(credentials and endpoint from the ``AWS_*`` environment variables). Harvest
subprocesses are SIGKILLed by the writer's test-only fault hook
(``SAESTRATA_FAULT``, store/writer.py) at deterministic points.
Layout: 1,024 tokens, context 32, shards of 4 rows (128 tokens) -> 8 shards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file

moto_server = pytest.importorskip(
    "moto.server", reason="moto[server] is not installed: pip install 'moto[server]' s3fs to run the S3 store tests"
)
pytest.importorskip("s3fs", reason="s3fs is not installed: pip install s3fs to run the S3 store tests")

from saestrata.cli import main  # noqa: E402
from saestrata.harvest.harvester import HarvestConfig, harvest  # noqa: E402
from saestrata.store import ActivationStore, StoreError  # noqa: E402
from saestrata.store.audit import verify_store  # noqa: E402
from saestrata.store.format import read_committed  # noqa: E402
from saestrata.store.location import Location  # noqa: E402
from saestrata.train.trainer import SAESpec, TrainConfig, train  # noqa: E402

SAESTRATA = str(Path(sys.executable).with_name("saestrata"))
TOKENS, CTX, N_SHARDS = 1024, 32, 8
# Its own bucket: moto keeps one in-process backend for every server a pytest process starts, and
# tests/test_bad_inputs.py makes bucket "stores" earlier in a full run.
BUCKET = "store-s3-tests"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 (random port) with bucket :data:`BUCKET`; the AWS_* variables point at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _cfg(out, model_dir: Path) -> HarvestConfig:
    return HarvestConfig(layers=[1, 2], tokens=TOKENS, out=out, model=str(model_dir), context_length=CTX,
                         rows_per_chunk=2, chunks_per_shard=2, device="cpu")


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, tiny_lm, tiny_model_dir) -> Path:
    """The same harvest into a local folder (in process), the reference for every S3 store."""
    out = tmp_path_factory.mktemp("s3ref") / "ref.zarr"
    harvest(_cfg(out, tiny_model_dir), lm=tiny_lm, progress=False)
    return out


@pytest.fixture(scope="module")
def s3_store(s3_env, tiny_lm, tiny_model_dir) -> str:
    """The same harvest written to s3://<BUCKET>/api/tiny.zarr through the API."""
    url = f"s3://{BUCKET}/api/tiny.zarr"
    assert harvest(_cfg(url, tiny_model_dir), lm=tiny_lm, progress=False) == url
    return url


def _group(path) -> zarr.Group:
    loc = Location(path)
    return zarr.open_group(loc.zarr_store(read_only=True), mode="r", use_consolidated=False)


def _assert_same_store(a, b) -> None:
    ga, gb = _group(a), _group(b)
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = ga[name][:], gb[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f"{name} differs"
    assert dict(ga.attrs) == dict(gb.attrs)
    ca, cb = ActivationStore(a), ActivationStore(b)
    assert ca.committed == cb.committed == set(range(N_SHARDS))


def test_harvest_to_s3_matches_local_and_verifies(s3_store, local_ref):
    _assert_same_store(s3_store, local_ref)
    keys = Location(s3_store).find()
    assert {f"commits/{s}.json" for s in range(N_SHARDS)} <= set(keys)  # one marker object per shard
    assert "commits/writer.lock" not in keys  # the lease is released
    report = verify_store(s3_store)
    assert report.ok and report.shards_checked == N_SHARDS and report.warnings == [], report.problems
    res = CliRunner().invoke(main, ["store", "verify", s3_store])
    assert res.exit_code == 0 and f"OK, {N_SHARDS} committed shards verified" in res.output, res.output
    res = CliRunner().invoke(main, ["store", "info", s3_store, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["tokens_committed"] == TOKENS and info["shards_committed"] == N_SHARDS and info["complete"]


def test_s3_reader_yields_the_local_batches(s3_store, local_ref):
    from saestrata.store import shuffled_batches

    remote, local = ActivationStore(s3_store, prefetch_chunks=4), ActivationStore(local_ref)
    assert remote.remote and not local.remote
    hook = local.hook_for_layer(2)
    got = shuffled_batches(remote, hook, batch_size=96, seed=3, buffer_chunks=3)
    want = shuffled_batches(local, hook, batch_size=96, seed=3, buffer_chunks=3)
    for _ in range(25):  # > 2 epochs of 32 chunks
        x, y = next(got), next(want)
        assert x.dtype == y.dtype and np.array_equal(x.float().numpy(), y.float().numpy())
    assert np.array_equal(remote.activations(hook, 64, 900).float().numpy(),
                          local.activations(hook, 64, 900).float().numpy())
    assert remote.stats(hook) == local.stats(hook)


def test_train_from_s3_is_bit_identical_to_local(s3_store, local_ref, scratch):
    specs = [SAESpec("topk", "topk", {"k": 8})]
    outs = {}
    for name, store in (("local", local_ref), ("s3", s3_store)):
        cfg = TrainConfig(store=store, layer=1, out=scratch / name, specs=specs, d_sae=128, batch_size=128,
                          tokens=12 * 128, lr=1e-3, device="cpu", checkpoint_every=0)
        outs[name] = train(cfg, progress=False)["topk"]
    a, b = load_file(outs["local"] / "sae_weights.safetensors"), load_file(outs["s3"] / "sae_weights.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and bool((a[key] == b[key]).all()), key
    cfg_s3 = json.loads((outs["s3"] / "cfg.json").read_text())
    assert s3_store in json.dumps(cfg_s3)  # provenance names the URL


def _cli_harvest(env: dict, url: str, model_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "SAESTRATA_FAULT"}
    full.update(env, PYTHONUNBUFFERED="1")
    if fault:
        full["SAESTRATA_FAULT"] = fault
    cmd = [SAESTRATA, "harvest", "--model", str(model_dir), "--layers", "1,2", "--tokens", str(TOKENS),
           "--context-length", str(CTX), "--rows-per-chunk", "2", "--chunks-per-shard", "2", "--device", "cpu",
           "--compute-dtype", "bfloat16",  # as local_ref (tiny_lm); auto: test_store.py
           "--out", url]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=600)


def test_sigkill_mid_harvest_to_s3_then_resume(s3_env, local_ref, tiny_model_dir, scratch):
    url = f"s3://{BUCKET}/killed/tiny.zarr"
    loc = Location(url)
    # (SIGKILL point, shards committed after it)
    for fault, committed in (("mid-shard:2", [0, 1]), ("before-commit:4", [0, 1, 2, 3]),
                             ("after-commit:5", [0, 1, 2, 3, 4, 5])):
        res = _cli_harvest(s3_env, url, tiny_model_dir, fault)
        assert res.returncode == -signal.SIGKILL, f"{fault}: {res.returncode} {res.stderr[-800:]}"
        attrs = dict(_group(url).attrs)
        assert sorted(read_committed(loc, attrs)) == committed, fault
        assert loc.is_file("commits/writer.lock")  # the dead writer's lease stays behind ...
        with pytest.raises(StoreError, match="half-written"):
            ActivationStore(url)
        part = ActivationStore(url, allow_partial=True)
        assert part.n_tokens == 128 * len(committed)
        ref = ActivationStore(local_ref)
        for hook in ref.hooks:
            assert np.array_equal(part.activations(hook).float().numpy(),
                                  ref.activations(hook, 0, part.n_tokens).float().numpy())
    # A half-written S3 store is refused by train in one line.
    res = CliRunner().invoke(main, ["train", "--store", url, "--layer", "1", "--out", str(scratch / "run"),
                                    "--tokens", "256", "--batch-size", "128", "--device", "cpu"])
    assert res.exit_code == 1 and "half-written" in res.output and "--allow-partial" in res.output, res.output
    # ... and is taken over by the resuming harvest (same host, dead pid).
    res = _cli_harvest(s3_env, url, tiny_model_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout and "at shard 6 of 8" in res.stdout, res.stdout
    _assert_same_store(url, local_ref)
    report = verify_store(url)
    assert report.ok and report.warnings == [] and report.shards_checked == N_SHARDS
    assert not loc.exists("commits/writer.lock")


def test_lease_of_a_live_writer_is_refused(s3_env, tiny_lm, tiny_model_dir):
    url = f"s3://{BUCKET}/leased/tiny.zarr"
    loc = Location(url)
    # A live process of this host (the test runner's parent) holds the lease.
    loc.write_atomic("commits/writer.lock", json.dumps({"host": os.uname().nodename, "pid": os.getppid(),
                                                        "token": "x"}).encode())
    import socket

    if socket.gethostname() != os.uname().nodename:
        pytest.skip("hostname and nodename differ on this machine")
    with pytest.raises(StoreError, match="being written by another harvest"):
        harvest(_cfg(url, tiny_model_dir), lm=tiny_lm, progress=False)
    assert not loc.exists("zarr.json")


def test_legacy_commit_record_store_opens_and_migrates_on_s3(s3_env, local_ref, tiny_lm, tiny_model_dir):
    """A store whose commit record is in the group attributes (the layout before markers) still reads and resumes."""
    url = f"s3://{BUCKET}/legacy/tiny.zarr"
    loc, src = Location(url), Location(local_ref)
    for key in src.find():
        if not key.startswith("commits/"):
            loc.write_atomic(key, src.read_bytes(key))
    records = {str(s): json.loads(src.read_bytes(f"commits/{s}.json"))["record"] for s in range(5)}
    group = zarr.open_group(loc.zarr_store(), mode="r+", use_consolidated=False)
    attrs = {k: v for k, v in dict(group.attrs).items() if k not in ("commit_record", "activation_stats")}
    group.attrs.put({**attrs, "committed_shards": list(range(5)), "shard_records": records, "complete": False})
    part = ActivationStore(url, allow_partial=True)
    assert part.committed == set(range(5)) and part.n_tokens == 5 * 128
    hook = part.hook_for_layer(1)
    assert part.stats(hook)["partial"] and part.stats(hook)["n"] > 0
    assert verify_store(url).ok
    harvest(_cfg(url, tiny_model_dir), lm=tiny_lm, progress=False)  # resumes shards 5..7, migrating the record
    _assert_same_store(url, local_ref)
    assert "committed_shards" not in dict(_group(url).attrs)


def test_inspect_from_s3_gives_the_local_dashboards(s3_store, local_ref, tiny_model_dir, scratch):
    """``saestrata inspect --store s3://...`` reads the store through the remote reader: same files as from the folder."""
    from safetensors.numpy import load_file as load_np

    cfg = TrainConfig(store=local_ref, layer=1, out=scratch / "sae", specs=[SAESpec("topk", "topk", {"k": 4})],
                      d_sae=64, batch_size=128, tokens=4 * 128, lr=1e-3, device="cpu", checkpoint_every=0)
    sae = train(cfg, progress=False)["topk"]
    outs = {}
    for name, store in (("local", str(local_ref)), ("s3", s3_store)):
        outs[name] = scratch / f"dash-{name}"
        res = CliRunner().invoke(main, ["inspect", "--sae", str(sae), "--store", store, "--out", str(outs[name]),
                                        "--model", str(tiny_model_dir)])
        assert res.exit_code == 0, res.output
    a, b = (json.loads((outs[n] / "index.json").read_text()) for n in ("local", "s3"))
    assert b["store"] == s3_store and a["tokens"] == b["tokens"] == TOKENS
    assert a["latents"] == b["latents"]
    blocks = sorted(p.name for p in (outs["local"] / "blocks").iterdir())
    assert blocks and blocks == sorted(p.name for p in (outs["s3"] / "blocks").iterdir())
    for name in blocks:
        if name.endswith(".safetensors"):
            x, y = load_np(outs["local"] / "blocks" / name), load_np(outs["s3"] / "blocks" / name)
            assert sorted(x) == sorted(y), name
            for k in x:
                assert np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f"), (name, k)
        else:
            assert (outs["local"] / "blocks" / name).read_bytes() == (outs["s3"] / "blocks" / name).read_bytes(), name


def test_harvest_with_workers_into_s3_matches_local(s3_env, local_ref, tiny_model_dir):
    """``--workers 2 --out s3://...``: dask worker processes write the shards' objects, the harvester commits them."""
    url = f"s3://{BUCKET}/workers/tiny.zarr"
    cfg = _cfg(url, tiny_model_dir)
    cfg.workers = 2
    assert harvest(cfg, progress=False) == url
    _assert_same_store(url, local_ref)
    assert verify_store(url).ok
