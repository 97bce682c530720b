"""bench/scaling.py end to end on the tiny random Gemma3: two sizes, two layers, resume after a kill, rerun skips.

The script runs harvest / train / evaluate each in a child interpreter (peak memory per
measurement); the test spies on ``run_stage`` (the parent's only way to start one) to see
which measurements a rerun repeats. Layout: context 32, shards of 2 x 2 rows = 128 tokens,
sizes 256 and 512 tokens = 2 and 4 shards. The first run is SIGKILLed by the writer's
test-only fault hook after committing shard 2 (the first shard of the second size), so the
second run must resume the half-written store through the harvester.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from saestrata.store import store_info

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def scaling():
    """bench/scaling.py imported as a module (bench/ on sys.path for its ``_common`` sibling)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("scaling", BENCH / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


def _argv(tmp: Path, model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--layers", "1,2", "--sizes", "200,512", "--context-length", "32",
            "--rows-per-chunk", "2", "--chunks-per-shard", "2", "--batch-rows", "4", "--train-steps", "3",
            "--train-batch", "64", "--d-sae", "128", "--eval-tokens", "64", "--eval-batch-rows", "2",
            "--reader-batch", "64", "--reader-repeats", "1", "--no-progress",
            "--out", str(tmp / "out"), "--work", str(tmp / "work")]


def test_scaling_bench_resumes_and_reports(scaling, tiny_model_dir, tmp_path, monkeypatch):
    calls: list[str] = []
    real = scaling.run_stage

    def spy(stage, spec):
        calls.append(stage)
        return real(stage, spec)

    monkeypatch.setattr(scaling, "run_stage", spy)
    argv, out, store = _argv(tmp_path, tiny_model_dir), tmp_path / "out", tmp_path / "work" / "store.zarr"

    # 1. Killed in the second size's harvest, right after shard 2 (its first) is committed.
    monkeypatch.setenv("SAESTRATA_FAULT", "after-commit:2")
    assert scaling.main(argv) == 1
    monkeypatch.delenv("SAESTRATA_FAULT")
    assert calls == ["harvest", "train", "evaluate", "harvest"]
    assert [p.name for p in out.glob("size-*.json")] == ["size-000000256.json"]  # 200 rounded up to 2 shards
    half = store_info(store)
    assert (half["shards_committed"], half["n_shards"], half["complete"]) == (3, 4, False)

    # 2. Rerun: the first size is skipped, the second resumes the store (only shard 3 is new).
    calls.clear()
    assert scaling.main(argv) == 0
    assert calls == ["harvest", "train", "evaluate"]
    small, large = (json.loads((out / f"size-{n:09d}.json").read_text()) for n in (256, 512))
    assert (small["tokens"], small["shards"], large["tokens"], large["shards"]) == (256, 2, 512, 4)
    assert small["size_requested"] == 200
    assert (small["harvest"]["tokens"], small["harvest"]["resumed"]) == (256, False)
    assert (large["harvest"]["tokens"], large["harvest"]["shards_committed"], large["harvest"]["resumed"]) == (128, 1, True)
    assert small["harvest"]["commit"]["n"] == 2 and large["harvest"]["commit"]["n"] == 1
    assert large["store_bytes"] > small["store_bytes"] > 0
    for rec in (small, large):
        h = rec["harvest"]
        assert h["tokens_per_s"] > 0 and h["flop_per_s"] > 0 and h["params_run"] > 0
        assert 0 < h["commit"]["median_ms"] <= h["write_shard"]["median_ms"]
        assert rec["verify"]["seconds"] > 0 and rec["verify"]["shards_checked"] == rec["shards"]
        assert rec["reader"]["tokens_per_s"] > 0 and rec["reader"]["layer"] == 2
        assert rec["train"]["tokens_per_s"] > 0 and rec["evaluate"]["tokens_per_s"] > 0
        for stage in ("harvest", "train", "evaluate"):
            assert rec[stage]["peak_rss_mib"] > 50 and rec[stage]["peak_rss_anon_mib"] > 0  # torch alone is more
        assert rec["command"].startswith("python bench/scaling.py --model ")
    readme = (out / "README.md").read_text()
    assert "| 256 | 2 |" in readme and "| 512 | 4 |" in readme
    assert "EXTRAPOLATED, NOT MEASURED" in readme and "python bench/scaling.py --model" in readme
    for png in ("commit_time.png", "peak_memory.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 3. Rerun of a finished run: nothing is measured again, nothing is rewritten but the report.
    calls.clear()
    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("size-*.json"), *(store / "commits").glob("*.json")]}
    assert scaling.main(argv) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # 4. A crash after the last stage, before the size's JSON: the JSON is rebuilt from the finished stages.
    (out / "size-000000512.json").unlink()
    assert scaling.main(argv) == 0
    assert calls == []
    again = json.loads((out / "size-000000512.json").read_text())
    assert {k: again[k] for k in ("tokens", "harvest", "verify", "reader", "train", "evaluate")} == \
        {k: large[k] for k in ("tokens", "harvest", "verify", "reader", "train", "evaluate")}


def test_scaling_refuses_a_size_smaller_than_the_store(scaling, tmp_path, monkeypatch):
    """A store already planned beyond a size's token count cannot be measured at that size (it cannot shrink)."""
    from saestrata.store import StoreWriter

    calls = []
    monkeypatch.setattr(scaling, "run_stage", lambda stage, spec: calls.append(stage))
    StoreWriter(tmp_path / "work" / "store.zarr", ["blocks.1.hook_resid_post"], 4, 512, shard_tokens=128,
                chunk_tokens=64, dtype="float32", attrs={}).close()  # planned: 512 tokens, nothing committed
    argv = _argv(tmp_path, tmp_path / "no-model-needed")
    argv[argv.index("--sizes") + 1] = "256"
    assert scaling.main(argv) == 1  # refused in the parent, before any child starts
    assert calls == [] and not list((tmp_path / "out").glob("size-*.json"))
