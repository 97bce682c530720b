"""Saved SAEs load in SAELens (sae_lens 6) when SAELens can represent the arch, and encode/decode as ours.

Every variant of ``every_variant()`` is trained for a few steps on scaled inputs (as the
trainer does), perturbed, folded with ``fold_input_scale`` and saved through ``save_sae``.
``EXPECTED`` is the spec: which SAELens architecture each variant must export as, or None
where SAELens has no equivalent (then ``cfg.json`` must say so). saestrata's ``load_sae``
must reload every variant bit-identically.
"""

from __future__ import annotations

import json

import pytest
import torch

try:
    import sae_lens
except ModuleNotFoundError as err:  # only a missing sae_lens skips; a broken install fails
    if err.name != "sae_lens":
        raise
    pytest.skip("sae_lens is not installed: `pip install -e '.[test]'` brings it", allow_module_level=True)

from saestrata.train.registry import build, every_variant
from saestrata.train.sae_io import CFG_FILE, load_sae, save_sae

D_IN, D_SAE, SCALE = 16, 64, 0.05
META = {"hook_name": "blocks.3.hook_resid_post", "layer": 3, "model_id": "tiny"}

# What SAELens can load each variant as (None: no SAELens arch computes it). ReLU archs whose
# extra parameters only shape training, or gate latents by a non-negative factor, are "standard".
EXPECTED = {
    "standard": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
    "matryoshka": "jumprelu",
    "seed000_hsae": None, "seed000_hsae_no_separation": None,  # two-level encoder
    "seed000_temporal": None, "seed000_temporal_single_scale": None,  # reads earlier tokens
    "seed000_adaptive": "standard",  # sigmoid mask folded into the encoder
    "seed001_fixed_ortho": "standard", "seed001_adaptive_ortho32": "standard",
    "seed001_adaptive_ortho64": "standard", "seed001_static_hier": "standard",
    "seed001_dynamic_hier": "standard", "seed001_contrastive_hier": "standard",
    "seed002-contrastive": "standard", "seed002-selection": "standard",  # keep mask folded
    "seed002-pruning": "standard", "seed002-hierarchical": "standard",
    "seed003-tiered": None,  # chained tiers
    "seed004-groups": "standard", "seed004-uniform": "standard",
    # sec. 6.2 ablations of seed 004: the same arch with other group sizes / gamma / lambda
    "seed004-k3": "standard", "seed004-k7": "standard", "seed004-gamma1.25": "standard",
    "seed004-gamma2": "standard", "seed004-lambda0.06": "standard",
}
LOADABLE = [v for v, a in EXPECTED.items() if a is not None]
UNLOADABLE = [v for v, a in EXPECTED.items() if a is None]


def _raw(gen: torch.Generator, rows: int) -> torch.Tensor:
    """Residual-like raw activations ``[rows, D_IN]``: an offset mean and a large norm."""
    offset = torch.linspace(-20, 20, D_IN)
    return offset + 30 * torch.randn(rows, D_IN, generator=gen)


def _prepared(variant: str):
    """A few trainer-like steps on ``x * SCALE``, random perturbations, eval mode, folded to raw inputs."""
    seed = every_variant().index(variant)
    gen = torch.Generator().manual_seed(100 + seed)
    sae = build(variant, D_IN, D_SAE, seed=seed).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    docs = torch.arange(4).repeat_interleave(8).reshape(4, 8)  # two documents per row of 8 tokens
    for step in range(3):
        x = _raw(gen, 32) * SCALE
        if step == 0:
            sae.init_b_dec(x)
        out = sae.forward_seq(x.reshape(4, 8, D_IN), docs, None) if sae.needs_sequences else sae(x)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
        sae.after_step(step, 3)
        sae.update_firing(out)
    with torch.no_grad():
        for p in sae.parameters():  # weights away from their tied / zero initialisation
            p.add_(0.1 * p.abs().mean().clamp_min(1.0) * torch.randn(p.shape, generator=gen))
        pre = sae.pre_acts(_raw(gen, 64) * SCALE) if hasattr(sae, "log_threshold") or hasattr(
            sae, "threshold") else None
        if hasattr(sae, "log_threshold"):  # JumpReLU: thresholds near each latent's median, so gating bites
            sae.log_threshold.copy_(pre.relu().median(0).values.clamp_min(1e-3).log())
        elif isinstance(getattr(sae, "threshold", None), torch.Tensor):  # BatchTopK family: a global value
            sae.threshold.fill_(float(pre.relu().median()) + 1e-3)
        if isinstance(getattr(sae, "importance", None), torch.nn.Parameter):  # seed 000 mask logits, spread out
            sae.importance.copy_(3 * torch.randn(D_SAE, generator=gen))
        if hasattr(sae, "keep_mask"):  # seed 002: some latents pruned
            sae.keep_mask[torch.randperm(D_SAE, generator=gen)[:10]] = 0
    sae.eval()
    sae.fold_input_scale(SCALE)
    return sae


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(variant) -> (prepared SAE, its saved folder)``, each variant prepared and saved once."""
    root, cache = tmp_path_factory.mktemp("saelens_compat"), {}

    def get(variant: str):
        if variant not in cache:
            sae = _prepared(variant)
            cache[variant] = sae, save_sae(sae, root / variant, META)
        return cache[variant]
    return get


def test_expected_covers_every_variant():
    assert sorted(EXPECTED) == sorted(every_variant())


@pytest.mark.parametrize("variant", LOADABLE)
def test_saelens_loads_and_matches_ours(variant, saved):
    _, folder = saved(variant)
    sl = sae_lens.SAE.load_from_disk(folder)
    ours, _ = load_sae(folder)
    x = _raw(torch.Generator().manual_seed(7), 256)
    with torch.no_grad():
        f = ours.encode(x)
        active = float((f > 0).float().mean())
        assert 0.02 < active < 0.98, f"test inputs leave {active:.2f} of latents active: nothing is compared"
        f_sl = sl.encode(x)
        torch.testing.assert_close(f_sl, f, rtol=1e-5, atol=1e-5 * float(f.abs().max()))
        x_hat = ours.decode(f)
        torch.testing.assert_close(sl.decode(f), x_hat, rtol=1e-5, atol=1e-5 * float(x_hat.abs().max()))
        torch.testing.assert_close(sl(x), x_hat, rtol=1e-5, atol=1e-5 * float(x_hat.abs().max()))
    cfg = json.loads((folder / CFG_FILE).read_text())
    assert cfg["architecture"] == EXPECTED[variant] == sl.cfg.architecture()
    assert cfg["saestrata"]["saelens_loadable"] is True and cfg["saestrata"]["arch"] == ours.arch


@pytest.mark.parametrize("variant", UNLOADABLE)
def test_unrepresentable_archs_say_so(variant, saved):
    sae, folder = saved(variant)
    cfg = json.loads((folder / CFG_FILE).read_text())
    assert cfg["architecture"] == sae.arch == cfg["saestrata"]["arch"]
    assert cfg["saestrata"]["saelens_loadable"] is False and cfg["saestrata"]["saelens_reason"]
    with pytest.raises(KeyError, match=sae.arch):  # SAELens has no class registered under that name
        sae_lens.SAE.load_from_disk(folder)


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_saestrata_reloads_every_arch_identically(variant, saved):
    sae, folder = saved(variant)
    loaded, cfg = load_sae(folder)
    assert type(loaded) is type(sae) and cfg["saestrata"]["arch"] == sae.arch
    want = {k: v for k, v in sae.state_dict().items() if k != "tokens_since_fired"}
    got = loaded.state_dict()
    assert set(got) - {"tokens_since_fired"} == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    x = _raw(torch.Generator().manual_seed(8), 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded.decode(sae.encode(x)), sae.decode(sae.encode(x)))
        if sae.needs_sequences:
            rows, docs = x.reshape(4, 8, D_IN), torch.arange(4).repeat_interleave(8).reshape(4, 8)
            assert torch.equal(loaded.encode_seq(rows, docs), sae.encode_seq(rows, docs))
