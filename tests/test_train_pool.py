"""SAEs of one pass stepped side by side (trainer thread pool): each SAE's numbers must not depend on the others.

torch keeps one autocast weight-cast cache for all threads and empties it whenever any thread leaves its
outermost autocast region. Seed 001's contrastive SAE encodes a second view with the same ``W_enc`` in one
forward; with the cache on, that second use shared the first bf16 cast (gradients of both uses summed in
bf16) or, if another SAE's thread had just left autocast, made its own (summed in fp32). The trainer now
steps without the cache. The first test provokes the other thread's exit deterministically; the second
runs real side-by-side passes.
"""

import threading

import torch
from safetensors.torch import load_file

from saestrata.train import seed001_grouped
from saestrata.train.trainer import SAESpec, TrainConfig, train

CONTRASTIVE = SAESpec("contrastive", "seed001_contrastive_hier",
                      {"update_every": 3, "n_coarse": 4, "n_fine": 4, "d_key": 16})


def _weights(folders: dict, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folders[name] / "sae_weights.safetensors"))


def _train(store, out, specs, steps=6, **kw) -> dict:
    cfg = TrainConfig(store=store, layer=1, out=out, specs=specs, d_sae=128, batch_size=256, tokens=steps * 256,
                      lr=1e-3, log_every=3, sparsity_warmup_frac=0.25, device="cpu", autocast=True,
                      checkpoint_every=0, **kw)
    return train(cfg, progress=False)


def _leave_autocast_in_another_thread() -> None:
    """What a concurrent SAE's step does at the end of its forward (and kernels.py's backward, on entry/exit)."""
    def leave():
        with torch.autocast("cpu", enabled=False):
            pass
    t = threading.Thread(target=leave)
    t.start()
    t.join()


def test_a_weight_used_twice_trains_the_same_whatever_another_thread_does(tiny_store, tmp_path, monkeypatch):
    calm = _train(tiny_store, tmp_path / "calm", [CONTRASTIVE])
    original, calls = seed001_grouped.DynamicHierSAE.second_view, []

    def disturbed(self, x):
        calls.append(1)
        _leave_autocast_in_another_thread()  # between the first and the second use of W_enc in one forward
        return original(self, x)

    monkeypatch.setattr(seed001_grouped.DynamicHierSAE, "second_view", disturbed)
    busy = _train(tiny_store, tmp_path / "busy", [CONTRASTIVE])
    assert len(calls) == 6  # the second view was encoded at every step
    a, b = _weights(calm, "contrastive"), _weights(busy, "contrastive")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"contrastive.{key} depends on another thread's autocast exit"


def test_side_by_side_runs_repeat_bit_for_bit(tiny_store, tmp_path):
    specs = [SAESpec("topk", "topk", {"k": 8}), CONTRASTIVE, SAESpec("standard", "standard", {"l1_coeff": 1.0})]
    first = _train(tiny_store, tmp_path / "first", specs, steps=12, sae_threads=2)
    second = _train(tiny_store, tmp_path / "second", specs, steps=12, sae_threads=2)
    for spec in specs:
        a, b = _weights(first, spec.name), _weights(second, spec.name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{spec.name}.{key} differs between two identical side-by-side runs"
