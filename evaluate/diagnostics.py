"""Per-SAE diagnostics from latents on eval tokens (DESIGN.md, "Metrics": seed-specific diagnostics).

Group protocol: an SAE that has latent structure (levels of seed 000, groups of seeds
001/004, tiers of seed 003) may define

    latent_groups() -> list[LongTensor] | dict[str, LongTensor]   # latent indices per group
    latent_group_kind: str = "group"                               # "level", "tier", ...

Every other SAE gets the structure-free diagnostics only (density histogram and a
silhouette of decoder directions under spherical k-means); group entries are ``None``.

Definitions (per non-special eval token; ``f`` latents ``[N, d_sae]``, group total
``g_k = sum_{i in k} f_i``):

- ``l0`` per group: mean number of active latents of the group per token;
- ``activity`` per group (tier activity, seed 003): fraction of tokens with any active latent;
- ``l1_share`` per group: ``sum g_k / sum_k sum g_k`` over all tokens;
- ``group_entropy``: mean over tokens with ``sum_k g_k > 0`` of ``-sum_k p_k log p_k`` with
  ``p_k = g_k / sum_k g_k`` (nats), and divided by ``log K`` (``normalised``);
- ``inter_group_correlation``: mean absolute off-diagonal Pearson correlation of the
  ``g_k`` across tokens (groups that never fire are left out);
- ``silhouette``: mean silhouette (Rousseeuw 1987, ``(b - a) / max(a, b)``) of the unit
  decoder rows of alive latents under cosine distance, labelled by group, or by
  spherical k-means (32 clusters, as seed 002's clustering) for SAEs without groups.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def latent_groups_of(sae) -> list[tuple[str, torch.Tensor]]:
    """``[(name, int64 indices)]`` from ``sae.latent_groups()``; ``[]`` if the SAE has none.

    Raises:
        ValueError: an index is outside ``[0, d_sae)``.
    """
    fn = getattr(sae, "latent_groups", None)
    if fn is None:
        return []
    groups = fn()
    items = list(groups.items()) if isinstance(groups, dict) else [(str(i), g) for i, g in enumerate(groups)]
    out = []
    for name, idx in items:
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= sae.d_sae):
            raise ValueError(f"latent_groups() of {type(sae).__name__}: group {name} indexes outside 0..{sae.d_sae - 1}")
        out.append((str(name), idx))
    return out


def silhouette(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette of ``points`` ``[n, d]`` (cosine distance) under int ``labels`` ``[n]``.

    Points alone in their cluster score 0 (Rousseeuw 1987). Returns NaN for fewer than 2 clusters.
    """
    uniq, lab = torch.unique(labels, return_inverse=True)
    if len(uniq) < 2:
        return float("nan")
    x = torch.nn.functional.normalize(points.double(), dim=1)
    dist = (1 - x @ x.T).clamp_min(0)
    onehot = torch.nn.functional.one_hot(lab, len(uniq)).double()  # [n, K]
    sizes = onehot.sum(0)
    sums = dist @ onehot  # [n, K]: total distance to each cluster
    own = sizes[lab]
    a = sums.gather(1, lab[:, None])[:, 0] / (own - 1).clamp_min(1)
    other = (sums / sizes).scatter(1, lab[:, None], float("inf"))
    b = other.min(1).values
    s = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-12), torch.zeros_like(a))
    return float(s.mean())


def spherical_kmeans(points: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster labels ``[n]`` int64 of ``points`` ``[n, d]`` by cosine k-means (seeded init, ``iters`` rounds)."""
    x = torch.nn.functional.normalize(points.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        labels = (x @ centres.T).argmax(1)
        for c in range(len(centres)):
            members = x[labels == c]
            if len(members):
                centres[c] = torch.nn.functional.normalize(members.sum(0), dim=0)
    return labels


class Diagnostics:
    """Streaming diagnostics of one SAE: call :meth:`update` per batch of latents, then :meth:`result`.

    Args:
        sae: the SAE (reads ``d_sae``, optional ``latent_groups()``, ``W_dec [d_sae, d_in]``).
        n_clusters: k-means clusters for the silhouette of SAEs without groups.
        max_silhouette_latents: alive latents sampled for the silhouette (cost ``n^2``).
        seed: sampling and k-means seed.
    """

    def __init__(self, sae, n_clusters: int = 32, max_silhouette_latents: int = 2048, seed: int = 0):
        self.sae, self.n_clusters, self.max_sil, self.seed = sae, n_clusters, max_silhouette_latents, seed
        self.groups = latent_groups_of(sae)
        self.kind = getattr(sae, "latent_group_kind", "group")
        self.n_tok = 0
        self.fire_count = torch.zeros(sae.d_sae, dtype=torch.float64)
        k = len(self.groups)
        self.member = torch.zeros(sae.d_sae, k, dtype=torch.float64)
        for j, (_, idx) in enumerate(self.groups):
            self.member[idx, j] = 1.0
        self.g_sum, self.g_l0, self.g_active = (torch.zeros(k, dtype=torch.float64) for _ in range(3))
        self.g_outer = torch.zeros(k, k, dtype=torch.float64)
        self.entropy_sum, self.entropy_n = 0.0, 0

    def update(self, f: torch.Tensor) -> None:
        """Accumulate latents ``f`` ``[N, d_sae]`` (any float dtype/device) of N non-special tokens."""
        f = f.detach().double().cpu()
        fired = (f > 0).double()
        self.n_tok += len(f)
        self.fire_count += fired.sum(0)
        if not self.groups:
            return
        totals = f.clamp_min(0) @ self.member  # [N, K]
        self.g_sum += totals.sum(0)
        self.g_outer += totals.T @ totals
        active = fired @ self.member
        self.g_l0 += active.sum(0)
        self.g_active += (active > 0).double().sum(0)
        mass = totals.sum(1)
        p = totals[mass > 0] / mass[mass > 0, None]
        self.entropy_sum += float(-(p * torch.log(p.clamp_min(1e-300))).sum())
        self.entropy_n += int((mass > 0).sum())

    def result(self) -> dict:
        """JSON-ready dict (see module docstring); raises ValueError if no token was seen."""
        if self.n_tok == 0:
            raise ValueError("diagnostics saw no tokens")
        freq = (self.fire_count / self.n_tok).numpy()
        alive = freq > 0
        hist, edges = np.histogram(np.log10(freq[alive]), bins=40, range=(-6, 0)) if alive.any() else ([], [])
        return {
            "log10_feature_density_histogram": {"counts": [int(c) for c in hist], "edges": [float(e) for e in edges],
                                                "n_dead": int((~alive).sum())},
            "group_kind": self.kind if self.groups else None,
            "groups": self._group_stats() if self.groups else None,
            "group_entropy": self._entropy() if self.groups else None,
            "inter_group_correlation": self._correlation() if self.groups else None,
            "silhouette": self._silhouette(alive),
        }

    def _group_stats(self) -> list[dict]:
        total = float(self.g_sum.sum()) or 1.0
        return [{"name": name, "size": len(idx),
                 "frac_alive": float((self.fire_count[idx] > 0).double().mean()) if len(idx) else float("nan"),
                 "l0": float(self.g_l0[j] / self.n_tok), "activity": float(self.g_active[j] / self.n_tok),
                 "l1_share": float(self.g_sum[j]) / total}
                for j, (name, idx) in enumerate(self.groups)]

    def _entropy(self) -> dict:
        mean = self.entropy_sum / self.entropy_n if self.entropy_n else float("nan")
        k = len(self.groups)
        return {"nats": mean, "normalised": mean / math.log(k) if k > 1 else float("nan")}

    def _correlation(self) -> dict:
        n = self.n_tok
        mean = self.g_sum / n
        cov = self.g_outer / n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        live = std > 0
        corr = cov[live][:, live] / torch.outer(std[live], std[live])
        k = int(live.sum())
        off = corr[~torch.eye(k, dtype=torch.bool)].abs()
        return {"mean_abs": float(off.mean()) if k > 1 else float("nan"), "n_groups_used": k,
                "matrix": corr.tolist() if k <= 16 else None}

    def _silhouette(self, alive: np.ndarray) -> dict:
        w = getattr(self.sae, "W_dec", None)
        if w is None or tuple(w.shape) != (self.sae.d_sae, getattr(self.sae, "d_in", w.shape[1])):
            return {"value": None, "labels": None, "reason": "no [d_sae, d_in] decoder"}
        idx = np.flatnonzero(alive)
        rng = np.random.default_rng(self.seed)
        if len(idx) > self.max_sil:
            idx = np.sort(rng.choice(idx, self.max_sil, replace=False))
        points = w.detach().double().cpu()[torch.as_tensor(idx)]
        if self.groups:
            labels = torch.full((self.sae.d_sae,), -1, dtype=torch.long)
            for j, (_, g) in enumerate(self.groups):
                labels[g] = j
            labels = labels[torch.as_tensor(idx)]
            points, labels, source = points[labels >= 0], labels[labels >= 0], self.kind
        else:
            k = min(self.n_clusters, max(len(idx) // 2, 1))
            labels, source = spherical_kmeans(points, k, seed=self.seed), f"spherical k-means, k={k}"
        value = silhouette(points, labels) if len(points) > 2 else float("nan")
        return {"value": value, "labels": source, "n_latents": int(len(points))}
