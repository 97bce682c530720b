"""Saved SAEs: SAELens layout, and normalisation folding keeps latents and reconstructions."""

import json

import torch

from saestrata.train.sae_io import load_sae, save_sae
from saestrata.train.standard import StandardSAE
from saestrata.train.topk import TopKSAE


def test_fold_input_scale_is_exact_and_roundtrips(tmp_path):
    torch.manual_seed(0)
    for sae in (TopKSAE(16, 64, k=5), StandardSAE(16, 64)):
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x = 300 * torch.randn(32, 16)
        scale = 0.01
        f_train = sae.encode(x * scale)
        x_hat_train = sae.decode(f_train) / scale
        sae.fold_input_scale(scale)
        folder = save_sae(sae, tmp_path / sae.arch, {"hook_name": "blocks.3.hook_resid_post", "layer": 3})
        loaded, cfg = load_sae(folder)
        torch.testing.assert_close(loaded.encode(x), f_train, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), x_hat_train, rtol=1e-4, atol=1e-2)
        assert cfg["architecture"] == sae.arch and cfg["hook_name"] == "blocks.3.hook_resid_post"


def test_saelens_tensor_names_and_shapes(tmp_path):
    from safetensors.torch import load_file

    folder = save_sae(TopKSAE(16, 64, k=5), tmp_path / "t", {"hook_name": "blocks.1.hook_resid_post"})
    tensors = load_file(folder / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (16, 64) and tensors["W_dec"].shape == (64, 16)
    assert tensors["b_enc"].shape == (64,) and tensors["b_dec"].shape == (16,)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["activation_fn_kwargs"] == {"k": 5} and cfg["d_in"] == 16 and cfg["d_sae"] == 64
    assert cfg["normalize_activations"] == "none"
