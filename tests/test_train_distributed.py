"""``train --workers``: SAEs spread over dask workers are bit-identical to a one-process pass; failures are never lost."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from saestrata.cli import main
from saestrata.train.distributed import FAULT_ENV, DistributedTrainingError, train_distributed
from saestrata.train.trainer import SAESpec, TrainConfig, train

SPECS = [SAESpec("topk", "topk", {"k": 4}), SAESpec("standard", "standard", target_l0=6.0)]


def _cfg(store, out, specs=SPECS):
    return TrainConfig(store=store, layer=1, out=out, specs=list(specs), d_sae=64, batch_size=128, tokens=20 * 128,
                       device="cpu", autocast=False, checkpoint_every=5, log_every=5)


def _weights(folder):
    return {k: v for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}


def _metrics(folder):
    lines = [json.loads(l) for l in (folder / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in l.items() if k != "tokens_per_s"} for l in lines]


@pytest.fixture(scope="module")
def reference(tiny_store, tmp_path_factory):
    """The same SAEs in one process, one pass, at the workers' thread count (1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(_cfg(tiny_store, tmp_path_factory.mktemp("ref")), progress=False)
    finally:
        torch.set_num_threads(threads)


def test_two_workers_give_the_one_process_saes_bit_for_bit(tiny_store, tmp_path, reference):
    got = train_distributed(_cfg(tiny_store, tmp_path / "run"), workers=2, threads=1, progress=False)
    assert set(got) == {"topk", "standard"} and not (tmp_path / "run" / ".tasks").exists()
    for name, folder in got.items():
        assert folder == tmp_path / "run" / name
        want, have = _weights(reference[name]), _weights(folder)
        assert want.keys() == have.keys()
        # Failed once in a full suite on a loaded 2-core VM (thirty-second session), never alone: say where.
        differ = {k: float((want[k] - have[k]).abs().max()) for k in want if not torch.equal(want[k], have[k])}
        first = next((i for i, (a, b) in enumerate(zip(_metrics(folder), _metrics(reference[name]))) if a != b), None)
        assert not differ, f"{name}: tensors differ {differ}; first differing log line {first}"
        assert _metrics(folder) == _metrics(reference[name])


def test_a_worker_that_dies_is_replaced_and_its_sae_retrained(tiny_store, tmp_path, reference, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "train-worker-exit:standard")  # the first attempt's process exits mid-task
    got = train_distributed(_cfg(tiny_store, tmp_path / "run"), workers=2, threads=1, progress=False)
    want, have = _weights(reference["standard"]), _weights(got["standard"])
    assert all(torch.equal(want[k], have[k]) for k in want)


def test_an_sae_failing_on_every_worker_is_reported_and_the_others_saved(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "train-worker-exit-always:standard")
    with pytest.raises(DistributedTrainingError, match=r"1 of 2 SAEs failed on the workers \(standard"):
        train_distributed(_cfg(tiny_store, tmp_path / "run"), workers=2, threads=1, progress=False)
    assert (tmp_path / "run" / "topk" / "cfg.json").is_file()  # the healthy SAE was not lost
    assert not (tmp_path / "run" / "standard").exists()


def test_cli_workers_then_resume_skips_saved_saes(tiny_store, tmp_path):
    args = ["train", "--store", str(tiny_store), "--layer", "1", "--arch", "topk,standard", "--d-sae", "64",
            "--tokens", "1280", "--batch-size", "128", "--device", "cpu", "--no-autocast", "--workers", "2",
            "--out", str(tmp_path / "run")]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "saved topk" in done.output and "saved standard" in done.output
    again = CliRunner().invoke(main, args + ["--resume"])
    assert again.exit_code == 0 and "saved" not in again.output  # nothing left to train
