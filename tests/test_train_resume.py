"""Checkpoint / resume (issue 4): an interrupted and resumed run equals an uninterrupted one, bit for bit.

Each group trains several SAEs for ``STEPS`` steps once uninterrupted (no checkpoints)
and once interrupted twice (``stop_after_step``) between checkpoints, so every resume
also has to cut log lines written after its checkpoint. The groups cover archs whose
training state lives in Python attributes (seed 001 ``_calls``, seed 002 update
counters, seed 003 curriculum progress), buffers (BatchTopK threshold, seed 002
masks, dead-latent counters), a generator (seed 001 contrastive view noise), a
failed SAE, and the sequence batch stream (seed 000 temporal SAE).
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from saestrata.cli import main
from saestrata.train.checkpoint import CHECKPOINT_FILE, CheckpointError
from saestrata.train.trainer import SAESpec, TrainConfig, train
from saestrata.train.sae_io import EXTRA_FILE

STEPS, BATCH, EVERY = 24, 256, 5
STOPS = (8, 17)  # interruptions: after checkpoints at 5 and 15 steps, with log lines after them
GROUPS = {
    "tokens": [
        SAESpec("topk", "topk", {"k": 8}),
        SAESpec("standard", "standard", {"l1_coeff": 1.0}),
        SAESpec("importance", "seed002-hierarchical", {"update_every": 4, "n_clusters": 8, "profile_tokens": 256}),
        SAESpec("contrastive", "seed001_contrastive_hier", {"update_every": 3, "n_coarse": 4, "n_fine": 4,
                                                            "d_key": 16}),
        SAESpec("tiered", "seed003-tiered", {}),
        SAESpec("batchtopk", "batchtopk", {"k": 8}),
        SAESpec("broken", "standard", {"l1_coeff": float("nan")}),
    ],
    "sequences": [
        SAESpec("topk", "topk", {"k": 8}),
        SAESpec("temporal", "seed000_temporal", {}),
    ],
}


def _cfg(store, out, specs, **kw) -> TrainConfig:
    settings = dict(store=store, layer=1, out=out, specs=specs, d_sae=128, batch_size=BATCH, tokens=STEPS * BATCH,
                    lr=1e-3, log_every=3, sparsity_warmup_frac=0.25, device="cpu",
                    sae_threads=0, autocast=True)  # side by side, bf16 casts: the harder case for bit-identity
    return TrainConfig(**{**settings, **kw})


def _log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def _untimed(row: dict) -> dict:
    """A log line or cfg block without wall-clock fields (they differ between any two runs)."""
    return {k: v for k, v in row.items() if k not in ("tokens_per_s", "train_tokens_per_s")}


@pytest.fixture(scope="module", params=list(GROUPS))
def pair(request, tiny_store, tmp_path_factory):
    """``(uninterrupted folders, resumed folders, interruption facts)`` for one group of SAEs."""
    specs = GROUPS[request.param]
    whole = train(_cfg(tiny_store, tmp_path_factory.mktemp("whole"), specs, checkpoint_every=0), progress=False)
    out = tmp_path_factory.mktemp("resumed")
    facts = []
    for i, stop in enumerate(STOPS):
        assert train(_cfg(tiny_store, out, specs, checkpoint_every=EVERY, stop_after_step=stop, resume=i > 0),
                     progress=False) == {}
        ckpt = torch.load(out / CHECKPOINT_FILE, weights_only=True)
        facts.append({"step": ckpt["step"], "log_steps": [r["step"] for r in _log(out / "topk")],
                      "saved": (out / "topk" / "sae_weights.safetensors").exists()})
    resumed = train(_cfg(tiny_store, out, specs, checkpoint_every=EVERY, resume=True), progress=False)
    return whole, resumed, facts


def test_interruptions_really_happened(pair):
    _, resumed, facts = pair
    assert [f["step"] for f in facts] == [5, 15]
    assert not any(f["saved"] for f in facts)
    # Lines of steps run after the checkpoint were written before the interruption (then cut on resume).
    assert facts[0]["log_steps"][-1] == 6 and facts[1]["log_steps"][-1] == 15
    assert not (next(iter(resumed.values())).parent / CHECKPOINT_FILE).exists()  # removed once finished


def test_resumed_tensors_are_bit_identical(pair):
    whole, resumed, _ = pair
    assert whole.keys() == resumed.keys()
    for name in whole:
        a = load_file(str(whole[name] / "sae_weights.safetensors"))
        b = load_file(str(resumed[name] / "sae_weights.safetensors"))
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after resume"


def test_resumed_logs_and_metadata_match(pair):
    whole, resumed, _ = pair
    for name in whole:
        a, b = _log(whole[name]), _log(resumed[name])
        assert [_untimed(r) for r in a] == [_untimed(r) for r in b], name
        meta_a = json.loads((whole[name] / "cfg.json").read_text())["saestrata"]
        meta_b = json.loads((resumed[name] / "cfg.json").read_text())["saestrata"]
        assert _untimed(meta_a) == _untimed(meta_b), name
    if "broken" in whole:  # a failed SAE stays failed, with its original message
        meta = json.loads((resumed["broken"] / "cfg.json").read_text())["saestrata"]
        assert meta["failed"].startswith("non-finite loss at step 0")
        assert _log(resumed["broken"]) == []
    if "importance" in whole:  # the Python-side schedule ran: bookkeeping updates happened
        # bookkeeping buffers SAELens would refuse live in the sidecar (train/sae_io.py)
        assert int(load_file(str(resumed["importance"] / EXTRA_FILE))["n_updates"]) == STEPS // 4


@pytest.fixture
def interrupted(tiny_store, tmp_path):
    """A topk run stopped after 3 of 8 steps, with a checkpoint after step 2."""
    specs = [SAESpec("topk", "topk", {"k": 8})]
    cfg = _cfg(tiny_store, tmp_path / "run", specs, tokens=8 * BATCH, checkpoint_every=2, stop_after_step=3)
    assert train(cfg, progress=False) == {}
    return cfg


def test_resume_with_other_settings_is_refused(interrupted):
    cfg = interrupted
    before = (cfg.out / "topk" / "train_log.jsonl").read_bytes()
    for change in ({"seed": 1}, {"batch_size": 128}, {"d_sae": 64}, {"layer": 2},
                   {"specs": [SAESpec("topk", "topk", {"k": 4})]}):
        with pytest.raises(CheckpointError) as err:
            kw = {"specs": cfg.specs, "tokens": cfg.tokens, **change}
            train(_cfg(cfg.store, cfg.out, checkpoint_every=2, resume=True, **kw), progress=False)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("cannot resume") and next(iter(change)) in msg, msg
    # Refusals touched nothing: the same run still resumes and finishes.
    assert (cfg.out / "topk" / "train_log.jsonl").read_bytes() == before
    done = train(_cfg(cfg.store, cfg.out, cfg.specs, tokens=cfg.tokens, checkpoint_every=2, resume=True),
                 progress=False)
    assert _log(done["topk"])[-1]["step"] == 7


def test_cli_refuses_mismatched_resume_in_one_line(interrupted):
    cfg = interrupted
    args = ["train", "--store", str(cfg.store), "--layer", "1", "--arch", "topk", "--d-sae", "128",
            "--batch-size", "128", "--tokens", str(cfg.tokens), "--device", "cpu", "--out", str(cfg.out), "--resume"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot resume") and "batch_size" in lines[0], result.output


def test_resume_without_checkpoint_is_refused(tiny_store, tmp_path):
    cfg = _cfg(tiny_store, tmp_path / "fresh", [SAESpec("topk", "topk", {"k": 8})], resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(cfg, progress=False)


def test_nan_hparams_do_not_break_identity(tiny_store, tmp_path):
    """NaN != NaN, but a checkpoint of a spec with a NaN hyperparameter must still resume."""
    specs = [SAESpec("broken", "standard", {"l1_coeff": float("nan")})]
    cfg = _cfg(tiny_store, tmp_path / "nan", specs, tokens=4 * BATCH, checkpoint_every=2, stop_after_step=3)
    train(cfg, progress=False)
    done = train(_cfg(tiny_store, cfg.out, specs, tokens=4 * BATCH, checkpoint_every=2, resume=True), progress=False)
    assert math.isnan(json.loads((done["broken"] / "cfg.json").read_text())["saestrata"]["hparams"]["l1_coeff"])


def _weights(folder) -> dict:
    return load_file(str(folder / "sae_weights.safetensors"))


def _autocast(folder) -> bool:
    return json.loads((folder / "cfg.json").read_text())["saestrata"]["autocast"]


def test_auto_autocast_follows_the_device_and_a_resume_keeps_the_runs_own(tiny_store, tmp_path, monkeypatch):
    """autocast=None (the default): bf16 autocast iff the device has native bf16 matmuls. A run interrupted
    on such a machine and resumed on one without keeps autocast, and ends bit for bit as if uninterrupted."""
    import saestrata.train.trainer as trainer_mod

    specs = [SAESpec("topk", "topk", {"k": 8})]
    native = lambda flag: monkeypatch.setattr(trainer_mod, "native_bf16", lambda device: flag)  # noqa: E731
    kw = dict(tokens=8 * BATCH, autocast=None)
    native(False)
    fp32 = train(_cfg(tiny_store, tmp_path / "fp32", specs, checkpoint_every=0, **kw), progress=False)["topk"]
    native(True)
    whole = train(_cfg(tiny_store, tmp_path / "whole", specs, checkpoint_every=0, **kw), progress=False)["topk"]
    assert _autocast(fp32) is False and _autocast(whole) is True
    assert not torch.equal(_weights(fp32)["W_enc"], _weights(whole)["W_enc"])  # the setting acted
    out = tmp_path / "run"
    assert train(_cfg(tiny_store, out, specs, checkpoint_every=2, stop_after_step=3, **kw), progress=False) == {}
    native(False)  # "another machine"
    with pytest.raises(CheckpointError, match="autocast"):  # an explicit other setting is still refused
        train(_cfg(tiny_store, out, specs, checkpoint_every=2, resume=True, tokens=8 * BATCH, autocast=False),
              progress=False)
    done = train(_cfg(tiny_store, out, specs, checkpoint_every=2, resume=True, **kw), progress=False)["topk"]
    assert _autocast(done) is True
    a, b = _weights(whole), _weights(done)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_leave_the_cuda_generators_alone(monkeypatch):
    """Training draws only from explicit CPU generators, so a checkpoint neither reads the CUDA generators
    (that creates a context on every visible GPU, even for a CPU run) nor restores them from an earlier
    version's checkpoint (that would raise IndexError on a machine with fewer GPUs). A GPU host is simulated."""
    from saestrata.train import checkpoint

    def touched(*args):
        raise AssertionError("the CUDA generators were touched")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", touched)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", touched)
    state = checkpoint.rng_state()
    assert set(state) == {"cpu"}
    torch.rand(3)  # move the CPU generator on, so that restoring it is seen
    checkpoint.set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8})
    assert torch.equal(torch.get_rng_state(), state["cpu"])
