"""Each latent's place in a structured SAE: its level / group / tier, and parent or children where defined.

Groups come from the SAEs' ``latent_groups()`` protocol (evaluate/diagnostics.py
``latent_groups_of``; kind from ``latent_group_kind``: ``level`` for seed 000, ``group`` /
``coarse group`` for seeds 001 and 004, ``tier`` for seed 003, ``prefix`` for Matryoshka).

Parents and children, only where the arch defines a latent-to-latent map:

- seed 000's two-level HSAE (``hsae_skip``): a level-2 latent ``j`` decodes into the level-1
  code through ``W_dec2[j]`` (seed 000 eq. 3, ``x_hat = (z2 Wd2 + bd2) Wd1 + z1 Ws + bd1``), so
  its children are the ``n_children`` level-1 latents with the largest ``W_dec2[j, i]`` and a
  level-1 latent's parent is ``argmax_j W_dec2[j, i]``;
- any SAE with a ``latent_hierarchy() -> {"parent": long [d_sae] (-1 = none)}`` method.
"""

from __future__ import annotations

import torch

from ..evaluate.diagnostics import latent_groups_of


def latent_structure(sae, n_children: int = 3) -> dict:
    """Per-latent structure, JSON-ready.

    Returns:
        ``{"kind": str | None, "groups": [names], "group": [d_sae] int (index into groups, -1 =
        none), "parent": [d_sae] int (-1 = none), "children": [d_sae] lists of ints}``.

    Raises:
        ValueError: ``latent_groups()`` indexes outside ``[0, d_sae)``.
    """
    d = sae.d_sae
    groups = latent_groups_of(sae)
    group = torch.full((d,), -1, dtype=torch.long)
    for j, (_, idx) in enumerate(groups):
        group[idx] = j
    parent = _parents(sae, n_children)
    children: list[list[int]] = [[] for _ in range(d)]
    for child, par in enumerate(parent.tolist()):
        if par >= 0:
            children[par].append(child)
    if getattr(sae, "arch", None) == "hsae_skip":
        children = _hsae_children(sae, n_children)
    return {"kind": getattr(sae, "latent_group_kind", "group") if groups else None,
            "groups": [name for name, _ in groups], "group": group.tolist(), "parent": parent.tolist(),
            "children": children}


def _parents(sae, n_children: int) -> torch.Tensor:
    """long ``[d_sae]`` parent latent of each latent (-1 = none), from the arch's own map."""
    fn = getattr(sae, "latent_hierarchy", None)
    if fn is not None:
        return torch.as_tensor(fn()["parent"], dtype=torch.long).cpu()
    parent = torch.full((sae.d_sae,), -1, dtype=torch.long)
    if getattr(sae, "arch", None) == "hsae_skip":
        half = sae.d_sae // 2
        parent[:half] = half + sae.W_dec2.detach().float().cpu().argmax(0)  # level-1 i -> argmax_j Wd2[j, i]
    return parent


def _hsae_children(sae, n: int) -> list[list[int]]:
    """Children of seed 000's level-2 latents (largest ``W_dec2[j]`` entries); level-1 latents have none."""
    half = sae.d_sae // 2
    top = sae.W_dec2.detach().float().cpu().topk(min(n, half), dim=1).indices  # [half, n] level-1 indices
    return [[] for _ in range(half)] + [row.tolist() for row in top]
