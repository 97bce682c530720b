"""Structured SAEs expose their latent groups so diagnostics can report per level/tier/group."""

import pytest
import torch

from saestrata.evaluate.diagnostics import latent_groups_of
from saestrata.train.registry import build

STRUCTURED = {
    "seed000_hsae": ("level", 2),
    "seed001_fixed_ortho": ("group", None),
    "seed001_static_hier": ("coarse group", 8),
    "seed001_dynamic_hier": ("coarse group", None),
    "seed002-hierarchical": ("cluster", None),
    "seed003-tiered": ("tier", 3),
    "seed004-groups": ("group", 5),
    "matryoshka": ("prefix", 5),
}


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_groups_partition_the_latents(name):
    sae = build(name, 32, 640)
    kind, n_groups = STRUCTURED[name]
    groups = latent_groups_of(sae)
    assert sae.latent_group_kind == kind
    if n_groups is not None:
        assert len(groups) == n_groups
    everything = torch.cat([idx for _, idx in groups])
    assert torch.equal(everything.sort().values, torch.arange(640)), "groups must cover every latent exactly once"


def test_tier_groups_follow_the_1_2_3_widths():
    sae = build("seed003-tiered", 32, 600)
    sizes = [len(idx) for _, idx in latent_groups_of(sae)]
    assert sizes == [100, 200, 300]


def test_unstructured_sae_has_no_groups():
    assert latent_groups_of(build("topk", 32, 64)) == []
