"""Diagnostics (evaluate/diagnostics.py): group protocol, entropy, correlation, silhouette, core hook."""

from __future__ import annotations

import json

import pytest
import torch

from saestrata.evaluate.core import EvalConfig, evaluate_sae
from saestrata.evaluate.diagnostics import Diagnostics, latent_groups_of, silhouette, spherical_kmeans
from saestrata.train.sae_io import save_sae
from saestrata.train.standard import StandardSAE

from conftest import TINY_D_MODEL


class TwoGroupSAE(StandardSAE):
    """8 latents in two groups of 4 (the optional group protocol)."""

    latent_group_kind = "tier"

    def latent_groups(self):
        return {"low": torch.arange(0, 4), "high": torch.arange(4, 8)}


def test_group_stats_entropy_and_correlation():
    sae = TwoGroupSAE(16, 8)
    f = torch.zeros(10, 8)
    f[:5, 0] = 1.0  # tokens 0-4: only group "low" (one latent)
    f[5:, 4:6] = 2.0  # tokens 5-9: only group "high" (two latents)
    diag = Diagnostics(sae)
    diag.update(f[:3])
    diag.update(f[3:])
    out = diag.result()
    low, high = out["groups"]
    assert out["group_kind"] == "tier"
    assert low["activity"] == pytest.approx(0.5) and high["activity"] == pytest.approx(0.5)
    assert low["l0"] == pytest.approx(0.5) and high["l0"] == pytest.approx(1.0)
    assert low["l1_share"] == pytest.approx(5 / 25) and high["l1_share"] == pytest.approx(20 / 25)
    assert low["frac_alive"] == pytest.approx(0.25)
    assert out["group_entropy"]["nats"] == pytest.approx(0.0)  # each token uses one group
    assert out["inter_group_correlation"]["mean_abs"] == pytest.approx(1.0)  # perfectly anti-correlated
    assert out["log10_feature_density_histogram"]["n_dead"] == 5
    json.dumps(out)


def test_even_split_has_full_entropy():
    diag = Diagnostics(TwoGroupSAE(16, 8))
    f = torch.zeros(4, 8)
    f[:, 0] = 1.0
    f[:, 4] = 1.0
    diag.update(f)
    assert diag.result()["group_entropy"]["normalised"] == pytest.approx(1.0)


def test_sae_without_groups_falls_back():
    sae = StandardSAE(16, 64)
    assert latent_groups_of(sae) == []
    diag = Diagnostics(sae, n_clusters=4)
    diag.update(torch.relu(torch.randn(50, 64, generator=torch.Generator().manual_seed(0))))
    out = diag.result()
    assert out["groups"] is None and out["group_entropy"] is None and out["inter_group_correlation"] is None
    assert out["silhouette"]["labels"].startswith("spherical k-means") and -1 <= out["silhouette"]["value"] <= 1


def test_silhouette_separates_clusters():
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0, 0]) + 0.01 * torch.randn(20, 3, generator=gen)
    b = torch.tensor([0, 1.0, 0]) + 0.01 * torch.randn(20, 3, generator=gen)
    points = torch.cat([a, b])
    truth = torch.tensor([0] * 20 + [1] * 20)
    assert silhouette(points, truth) > 0.9
    assert silhouette(points, torch.tensor([0, 1] * 20)) < 0.1
    found = spherical_kmeans(points, 2)
    assert silhouette(points, found) > 0.9


def test_bad_group_indices_raise():
    class Bad(StandardSAE):
        def latent_groups(self):
            return [torch.tensor([0, 99])]

    with pytest.raises(ValueError, match="outside"):
        latent_groups_of(Bad(8, 16))


def test_core_eval_carries_diagnostics(tiny_lm, tiny_model_dir, scratch):
    sae = StandardSAE(TINY_D_MODEL, 32)
    folder = save_sae(sae, scratch / "sae", {"model_id": str(tiny_model_dir), "hook_name": "blocks.1.hook_resid_post",
                                             "layer": 1, "context_length": 64})
    result = evaluate_sae(EvalConfig(sae=folder, tokens=128, batch_rows=2, device="cpu"), lm=tiny_lm, progress=False)
    diag = result["eval_result_unstructured"]["diagnostics"]
    assert diag["groups"] is None and "value" in diag["silhouette"]
    assert sum(diag["log10_feature_density_histogram"]["counts"]) + diag["log10_feature_density_histogram"]["n_dead"] == 32
