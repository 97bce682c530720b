"""Seed 003 (tiered HSAE): the mechanisms act in training and the sparsity knob reaches low L0.

Expected values are recomputed here (explicit counts, the paper's formulas), never read
back from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from saestrata.train.seed003_tiered import TieredHSAE, curriculum_gates

D_IN = 16


def _x(n=256, d=D_IN, seed=0, scale=1.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


def _step(sae, opt, x):
    """One trainer-like step (trainer.py _Slot.step order): forward, backward, projection + per-tier
    clipping, Adam, decoder renormalisation, curriculum, firing."""
    out = sae(x)
    opt.zero_grad()
    out.loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.normalize_decoder()
    return out


def test_counters_report_every_tier_mechanism():
    sae = TieredHSAE(D_IN, 60, tier_clip=(1e-3, 1e9, 1e-3), curriculum_frac=0.5).train()
    sae.dead_window_tokens = 64
    with torch.no_grad():
        sae.b_enc[:3] = -1e3  # three tier-1 latents that can never fire
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = _x(64, seed=1, scale=3.0)
    steps = 10
    for step in range(steps):
        out = _step(sae, opt, x)
        sae.after_step(step, 80)
        sae.update_firing(out)
    c = sae.counters()
    sl = sae.tier_slices()
    f = out.f.detach()
    for i in range(3):
        n = i + 1
        assert c[f"l0_tier{n}"] == pytest.approx(float((f[:, sl[i]] > 0).sum(1).float().mean()))
        assert c[f"dead_frac_tier{n}"] == pytest.approx(1 - float((f[:, sl[i]] > 0).any(0).float().mean()))
        logits = sae.tier_logits.detach().double()
        assert c[f"tier_weight{n}"] == pytest.approx(float(logits.exp()[i] / logits.exp().sum()), abs=1e-6)
        assert c[f"gate_tier{n}"] == pytest.approx(curriculum_gates((steps - 1) / 80, 3, 0.5)[i])  # last forward
    assert c["dead_frac_tier1"] >= 3 / sae.widths[0]
    assert c["curriculum_progress"] == pytest.approx(steps / 80)
    assert 0 < c["gate_tier2"] < 1 and c["gate_tier3"] == 0.0  # progress 9/80 of a 0.5 curriculum: tier 2 at 0.45
    # Tiny bounds on tiers 1 and 3: tier 1 clipped at every step; tier 3 never, its gate stayed
    # shut (zero gradient); tier 2's bound is never reached.
    assert c["clipped_tier1"] == steps and c["clipped_tier2"] == c["clipped_tier3"] == 0
    assert c["grad_norm_tier1"] > 1e-3 and c["grad_norm_tier2"] > 0 and c["grad_norm_tier3"] == 0
    assert sae.tier_weights().tolist() != pytest.approx([0.1, 0.3, 0.6], abs=1e-6)  # the weights were learned


def test_clip_counts_survive_a_checkpoint():
    sae = TieredHSAE(D_IN, 60, tier_clip=(1e-3, 1e-3, 1e-3), curriculum_frac=0.0).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(3):
        _step(sae, opt, _x(32, scale=3.0))
    other = TieredHSAE(D_IN, 60)
    other.load_extra_state(sae.extra_state())
    assert other.counters()["clipped_tier1"] == 3 and other.clip_counts == sae.clip_counts
