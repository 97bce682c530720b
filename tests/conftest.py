"""Shared fixtures: a tiny random Gemma3 (fast unit tests) and the real Gemma 3 270M (end to end).

The tiny model reuses the real Gemma tokenizer (so packing and special tokens are
real) with a 64-wide, 4-block random network saved as a local HF folder: it
exercises the same ``from_pretrained`` path as hub names.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from saestrata.harvest.harvester import HarvestConfig, harvest
from saestrata.harvest.model import EMBEDDED_MODEL, load_model, resolve_model_path

TINY_D_MODEL, TINY_LAYERS = 64, 4


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """Converted Gemma 3 270M folder (converted once into the user cache)."""
    return Path(resolve_model_path(EMBEDDED_MODEL))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A random 4-block Gemma3 (d_model 64) with the real tokenizer, as a local folder."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny-gemma3")
    cfg = Gemma3TextConfig(
        vocab_size=262144, hidden_size=TINY_D_MODEL, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=64,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=1024, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    """The tiny model loaded through the project's loader (bf16, CPU)."""
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def lm32(tiny_model_dir):
    """The tiny model in float32, its final norm scaled up (the evaluation parity tests' model).

    The random model's logits are ~0.1 wide, so its next-token distribution is nearly uniform and
    zero ablation moves CE by ~1e-3 of its value: CE differences (the ce_loss_score denominator)
    would be ill-conditioned. Scaling the final RMSNorm (Gemma: ``x * (1 + weight)``) by 40 only
    sharpens the output distribution; the residual stream is unchanged. Tests must not modify it.
    """
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    with torch.no_grad():
        lm.model.model.norm.weight.fill_(39.0)
    return lm


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_lm, tiny_model_dir) -> Path:
    """A finished store of the tiny model: layers 1 and 2, 4,096 wiki tokens, context 64."""
    out = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    harvest(HarvestConfig(layers=[1, 2], tokens=4096, out=out, model=str(tiny_model_dir), context_length=64,
                          rows_per_chunk=4, chunks_per_shard=4, device="cpu"), lm=tiny_lm, progress=False)
    return out


@pytest.fixture(scope="session")
def real_lm(embedded_dir):
    """The real Gemma 3 270M (bf16, CPU)."""
    return load_model(EMBEDDED_MODEL, device="cpu")


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, real_lm) -> Path:
    """Real Gemma 3 270M activations of real wiki text: layers 3 and 8, 16,384 tokens, context 128."""
    out = tmp_path_factory.mktemp("stores") / "real.zarr"
    harvest(HarvestConfig(layers=[3, 8], tokens=16384, out=out), lm=real_lm, progress=False)
    return out


@pytest.fixture
def scratch(tmp_path) -> Path:
    """An empty directory removed after the test."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _native_kernels_built():
    """Build train/native.py's CPU kernels before the first test (~1 min on a fresh machine), so no
    test's timing (hypothesis deadlines, CLI subprocess timeouts) pays for the build; later processes
    load the build from torch's extension cache. tests/test_native.py checks that it built."""
    from saestrata.train.native import load_native

    load_native()
