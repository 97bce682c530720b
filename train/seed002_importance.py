"""``importance_tracking``: ReLU+L1 SAE with latent clusters, importance tracking, pruning and a KL unlearning term.

Source: seed 002, "The Unlearning Bottleneck: Limitations of Feature Selection
in Sparse Autoencoder Knowledge Modification"
(``shared/seeds/002_157d3ce170b2a951.txt``).

What the paper states:

- Sec. 3.1 eq. (1): ``L = ||h - D(E(h))||^2 + lambda ||E(h)||_1 + alpha L_contrast
  + beta L_unlearn``, beta = 0.3; sec. 6: sparsity penalty 0.04, dictionary size
  2304 = d_model (``--expansion 1``), Adam lr 3e-4, weight decay 0.01.
- Sec. 4 eq. (2): latents are partitioned into K = 32 clusters by their
  "temporal profiles" ``p_i`` (within-cluster variance minimised).
- Sec. 4 eq. (3): importance ``s_i(t) = gamma s_i(t-1) + (1-gamma)[w_a a_i + w_g g_i
  + w_m m_i]``, gamma = 0.9 (memory), ``w = (0.35, 0.5, 0.15)``: ``a_i`` feature
  utilisation, ``g_i`` gradient-based importance, ``m_i`` mutual information
  with the cluster assignments; updated every 50 steps (sec. 5.2).
- Sec. 4 eq. (4): latents with ``s_i < tau`` (tau = 0.01) are candidates for
  ``L_unlearn = KL(p(f_i) || p_target) + beta ||f_pruned||_2^2``; pruning rate 5%
  (10% in run 3).
- Sec. 6.2: four sequential variants, each a preset here:
  ``seed002-contrastive`` (run 1: correlation-based grouping every 100 steps,
  contrastive weight 0.1), ``seed002-selection`` (run 2: weight 0.2, minimum
  group size 5), ``seed002-pruning`` (run 3: 10% pruning, 50-step updates, KL
  unlearning), ``seed002-hierarchical`` (run 4: 32 clusters, 5% pruning,
  unlearning weight 0.3, MI; the arch's defaults).

Interpretation choices (the paper does not define most terms; the trainer feeds
activations only, so everything must be computable from the SAE and its batch):

- Profiles and clusters: ``p_i`` is latent i's activation over (up to
  ``profile_tokens``) tokens of the update batch, centred and unit-normalised,
  so squared distances are ``2 (1 - correlation)`` and k-means on them is the
  "correlation-based grouping" of run 1. Spherical k-means runs a few
  iterations warm-started from the previous assignment ("adjust cluster
  centroids to maintain representation structure", sec. 4 step 4): that is the
  temporal part. The first update seeds the centroids by farthest-point
  selection (warm-starting from an arbitrary assignment is a fixed point).
  Eq. (2)'s between-centroid separation term is not optimised (k-means
  minimises only the within-cluster term). Clusters smaller than
  ``min_cluster_size`` are dissolved into their members' nearest larger cluster.
  Runs 1-3 give no cluster count; 32 is used throughout. "Hierarchical" is not
  defined further; the clustering is flat.
- ``L_contrast`` (weight alpha; run 1: 0.1, later 0.2) "weights feature
  differentiation across clusters": the mean squared Pearson correlation, over
  the batch, between the summed activities of different clusters.
- ``a_i``: firing rate of latent i in the batch (the paper reports "mean
  activation rate 0.12"). ``g_i``: first-order (Taylor) importance
  ``mean_b |f_bi * dL_rec/df_bi|``, the estimated rise of the per-token
  reconstruction loss if latent i is ablated, divided by its maximum over
  latents so it lies in [0, 1] like ``a_i`` and ``m_i`` (the weights assume
  comparable scales; raw values depend on the input scale). ``m_i``: mutual
  information between "latent i fires" and the token's cluster (the cluster
  with the largest summed activation), divided by ln 2 (its upper bound) so it
  lies in [0, 1].
- Start of eq. (3), which gives no ``s_i(0)``: bookkeeping round 0 (the first
  training step) only forms the clusters, and importance is observed from
  round 1 (step ``update_every``) on. The recursion starts from 0 and the
  score compared with tau is its bias-corrected value ``s_n / (1 - gamma^n)``
  (Kingma & Ba 2014, sec. 3; the paper trains with their Adam), the weighted
  mean of the observations so far: from 0 uncorrected, one observation below
  ``10 tau`` would make a latent a candidate. Two earlier readings made
  pruning impossible within the paper's 1,000 steps (20 rounds at every 50),
  because observations are >= 0 and a score that keeps a weight ``w`` on an
  early observation ``c_1`` stays >= ``w c_1``: (a) observing at
  initialisation, where every latent of the tied init fires on ~half the
  tokens (every score >= 0.18 on layer 8 of Gemma 3 270M) and (b) setting
  ``s`` to the first observation, which keeps weight ``0.9^(n-1)`` (0.15 at
  round 19) on it; at step 50 the SAE is still dense (L0 ~940 on layer 8,
  every observation >= 0.10), so no score could fall below 0.01. Corrected,
  that weight is ``0.1 * 0.9^(n-1) / (1 - 0.9^n)`` (0.017 at round 19).
- Pruning: at each update the lowest-scoring latents with ``s_i < tau`` are
  pruned, at most ``prune_rate * d_sae`` new ones per update; a pruned latent is
  masked to 0 in :meth:`encode` (train and eval) and stays pruned (its score can
  only decay). The mask is saved with the weights. "Consistently low
  importance" (sec. 4) makes a latent first a candidate for the KL term of
  eq. (4) and only then prunable: a latent is pruned at a round only if it
  was a candidate before that round's score update too, so it has spent one
  interval under the KL term before the L2 term on pruned latents takes over.
  (Pruning every candidate at once left the KL term no latent whenever a
  round's candidates fit the 5% budget; issue 10.)
- ``L_unlearn`` (eq. 4, computable without the LM): ``p(f_i)`` is latent i's
  Bernoulli firing distribution with soft rate ``rho_i = mean_b tanh(f_bi)``
  (differentiable, 0 exactly when it never fires), ``p_target`` is
  Bernoulli(``target_rate`` = 1e-4, the project's "feature utilisation"
  threshold), summed over unpruned candidates (``s_i < tau``): the classic
  sparse-autoencoder KL sparsity term applied to the low-importance latents,
  pushing them towards silence. ``||f_pruned||_2^2`` is taken on the pruned
  latents' pre-mask ReLU activations (mean over batch), so the encoder learns to
  keep them off. Eq. (1) and eq. (4) both call their weight beta = 0.3; here
  ``unlearn_coeff`` (eq. 1) and ``prune_coeff`` (eq. 4) are separate, both 0.3.
- "Normalized gradients" (sec. 4 step 3) is read as the project's unit-norm
  decoder constraint. Layer normalisation is replaced by the trainer's
  dataset-level normalisation to mean norm ``sqrt(d_in)`` (a per-token
  LayerNorm would stop a linear decoder from reconstructing raw inputs), so
  lambda = 0.04 acts on normalised inputs. Weight decay is not reproduced.
- Bookkeeping (importance, clusters, pruning) runs inside a training-mode
  forward when the step counter (advanced by :meth:`after_step`) is a multiple
  of ``update_every``, i.e. before the losses of that step, matching sec. 4's
  order "update importance and clusters, apply unlearning, update weights".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .arch_info import ArchError, ArchInfo
from .base import SAE, groups_from_ids
from .kernels import check_kernels
from .relu_pairs import DenseCodePairsMixin

_EPS = 1e-8


# -- pure functions (each testable on its own) ---------------------------------------------
def standardized_profiles(f: torch.Tensor) -> torch.Tensor:
    """Per-latent activation profiles: ``f [tokens, d_sae]`` -> ``[d_sae, tokens]`` rows centred, unit L2 norm.

    Rows of latents that never vary stay 0. Seed 002 sec. 4 (profiles ``p_i``), interpretation in module doc.
    """
    p = f.float().T
    p = p - p.mean(1, keepdim=True)
    return p / p.norm(dim=1, keepdim=True).clamp_min(_EPS)


def farthest_point_centroids(profiles: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic k-means seeding: ``k`` rows of unit rows ``profiles [n, t]``, each least similar to those before.

    Starts from the first non-zero row; all-zero rows (latents that never vary) are never
    chosen. Returns float ``[k, t]``; rows beyond the number of non-zero profiles are 0.
    """
    live = profiles.norm(dim=1) > 0.5
    centroids = profiles.new_zeros(k, profiles.shape[1])
    if not live.any():
        return centroids
    best_sim = torch.full((profiles.shape[0],), -math.inf, device=profiles.device)
    idx = int(live.nonzero()[0])
    for j in range(min(k, int(live.sum()))):
        centroids[j] = profiles[idx]
        best_sim = torch.maximum(best_sim, profiles @ profiles[idx])
        idx = int(best_sim.masked_fill(~live, math.inf).argmin())
    return centroids


def spherical_kmeans(profiles: torch.Tensor, k: int, iters: int, min_size: int = 1,
                     assign: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical k-means of unit rows ``profiles [n, t]`` into ``k`` clusters; returns long ``[n]`` in ``0..k-1``.

    Seed 002 eq. (2) (within-cluster term). ``assign`` (long ``[n]``) warm-starts from a
    previous assignment; ``None`` seeds with :func:`farthest_point_centroids` (an arbitrary
    start such as ``i % k`` is a fixed point: each latent pulls its own centroid).
    Clusters with fewer than ``min_size`` members are then dissolved into each member's
    most similar remaining cluster (seed 002 sec. 6.2, run 2: "5-feature minimum group size").
    """
    if assign is None:
        assign = (profiles @ farthest_point_centroids(profiles, k).T).argmax(1)
    sim = None
    for _ in range(max(iters, 1)):
        centroids = F.normalize(F.one_hot(assign, k).float().T @ profiles, dim=1)  # empty cluster -> 0 row
        sim = profiles @ centroids.T
        assign = sim.argmax(1)
    counts = torch.bincount(assign, minlength=k)
    small = counts < min_size
    if small.any() and not small.all():
        assign = sim.masked_fill(small, -math.inf).argmax(1)
    return assign


def centroid_silhouette(profiles: torch.Tensor, assign: torch.Tensor, k: int) -> float:
    """Mean simplified silhouette of a clustering of unit rows ``profiles [n, t]`` (``assign`` long ``[n]``).

    Per row ``(b - a) / max(a, b)`` with cosine distances ``a`` to its own cluster's centroid and
    ``b`` to the nearest other centroid (the centroid form of the silhouette, Hruschka et al. 2004,
    cheap at ``n x k``); rows that are 0 (latents that never vary) are skipped. In ``[-1, 1]``;
    NaN when fewer than two clusters are used. Seed 002 sec. 6.4 reports "silhouette score 0.72".
    """
    live = profiles.norm(dim=1) > 0.5
    used = torch.unique(assign[live]) if live.any() else assign[:0]
    if len(used) < 2:
        return float("nan")
    centroids = F.normalize(F.one_hot(assign[live], k).float().T @ profiles[live], dim=1)[used]  # [k_used, t]
    dist = 1 - profiles[live] @ centroids.T                                                     # [n_live, k_used]
    own = (assign[live][:, None] == used[None, :])
    a = dist[own]
    b = dist.masked_fill(own, math.inf).min(1).values
    return float(((b - a) / torch.maximum(a, b).clamp_min(_EPS)).mean())


def cluster_activity(f: torch.Tensor, clusters: torch.Tensor, k: int) -> torch.Tensor:
    """Summed activation of each cluster per token: ``f [batch, d_sae]`` -> float ``[batch, k]``."""
    return f.float() @ F.one_hot(clusters, k).float()


def cluster_decorrelation(f: torch.Tensor, clusters: torch.Tensor, k: int) -> torch.Tensor:
    """``L_contrast``: mean squared Pearson correlation between different clusters' activities (scalar in [0, 1]).

    Seed 002 eq. (1) alpha term, interpretation in the module doc. Clusters that are
    constant over the batch contribute 0.
    """
    a = cluster_activity(f, clusters, k)
    a = a - a.mean(0)
    a = a / a.norm(dim=0).clamp_min(_EPS)
    corr = a.T @ a
    off = corr - torch.diag(torch.diagonal(corr))
    return off.pow(2).sum() / max(k * (k - 1), 1)


def firing_cluster_mi(fire: torch.Tensor, token_cluster: torch.Tensor, k: int) -> torch.Tensor:
    """Mutual information (nats) between each latent's firing and the token's cluster.

    ``fire``: ``[batch, d_sae]`` 0/1 float; ``token_cluster``: long ``[batch]`` in ``0..k-1``.
    Returns float ``[d_sae]`` in ``[0, ln 2]``, from the batch's joint frequencies
    (seed 002 eq. (3), ``m_i``).
    """
    pc = F.one_hot(token_cluster, k).float()
    n = fire.shape[0]
    p1k = fire.float().T @ pc / n                     # P(fire, cluster k)
    pk = pc.mean(0)
    p0k = (pk - p1k).clamp_min(0)                     # P(silent, cluster k)
    p1 = fire.float().mean(0, keepdim=True).T
    total = torch.zeros(fire.shape[1], device=fire.device)
    for joint, marg in ((p1k, p1), (p0k, 1 - p1)):
        total += torch.xlogy(joint, joint / (marg * pk).clamp_min(1e-30)).sum(1)
    return total.clamp_min(0)


def taylor_importance(x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """``g_i = mean_b |f_bi * dL_b/df_bi|`` with ``L_b = ||x_b - x_hat_b||^2`` (seed 002 eq. (3), ``g_i``).

    ``dL_b/df_b = 2 (x_hat_b - x_b) W_dec^T``. Shapes: ``x, x_hat [batch, d_in]``,
    ``f [batch, d_sae]``, ``w_dec [d_sae, d_in]``; returns float ``[d_sae]`` in squared input units.
    """
    grad_f = 2 * (x_hat.float() - x.float()) @ w_dec.float().T
    return (f.float() * grad_f).abs().mean(0)


def bernoulli_kl(rate: torch.Tensor, target: float) -> torch.Tensor:
    """``KL(Bern(rate) || Bern(target))`` elementwise, nats; ``rate`` is clamped to ``[1e-6, 1 - 1e-6]``.

    Seed 002 eq. (4) KL term (Bernoulli reading, see module doc).

    Raises:
        ArchError: ``target`` not in (0, 1).
    """
    if not 0 < target < 1:
        raise ArchError(f"target_rate must be in (0, 1), got {target}")
    r = rate.clamp(1e-6, 1 - 1e-6)
    return r * torch.log(r / target) + (1 - r) * torch.log((1 - r) / (1 - target))


class ImportanceSAE(DenseCodePairsMixin, SAE):
    """ReLU+L1 SAE with clusters, importance scores, adaptive pruning and KL unlearning.

    ``[batch, d_in] -> [batch, d_sae]``; pruned latents are always 0.

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        l1_coeff: lambda (seed 002 sec. 6: 0.04), on inputs normalised to mean norm ``sqrt(d_in)``.
        n_clusters: K (32). min_cluster_size: run 2's minimum group size (5).
        contrast_coeff: alpha of ``L_contrast`` (run 1: 0.1, runs 2+: 0.2).
        importance_weights: ``(w_a, w_g, w_m)`` = (0.35, 0.5, 0.15). memory: gamma (0.9).
        update_every: steps between importance / cluster / pruning updates (50; run 1: 100).
        threshold: tau (0.01). prune_rate: max fraction of d_sae pruned per update (0.05; run 3: 0.10).
        unlearn_coeff: beta of eq. (1) (0.3). prune_coeff: beta of eq. (4) (0.3).
        target_rate: firing rate of ``p_target`` (1e-4). profile_tokens: tokens per profile (512).
        kmeans_iters: k-means iterations per update (5).
        kernels: ``"sparse"`` (default: on the CPU, once a batch is sparse enough, the reconstruction on the pairs
            with ``pre > 0`` of the kept latents and the penalties on their dense code,
            :class:`.relu_pairs.DenseCodePairsMixin`; counted in ``sparse_steps``) or ``"dense"``; same maths.

    Raises:
        ArchError: a hyperparameter out of range.
    """

    arch = "importance_tracking"
    unit_norm_decoder = True

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, l1_coeff: float = 0.04, n_clusters: int = 32,
                 min_cluster_size: int = 5, contrast_coeff: float = 0.2, importance_weights=(0.35, 0.5, 0.15),
                 memory: float = 0.9, update_every: int = 50, threshold: float = 0.01, prune_rate: float = 0.05,
                 unlearn_coeff: float = 0.3, prune_coeff: float = 0.3, target_rate: float = 1e-4,
                 profile_tokens: int = 512, kmeans_iters: int = 5, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        self.kernels = check_kernels(kernels)
        if not 1 <= n_clusters <= d_sae or update_every < 1 or not 0 <= memory < 1 or len(importance_weights) != 3:
            raise ArchError("need 1 <= n_clusters <= d_sae, update_every >= 1, 0 <= memory < 1, 3 importance weights")
        bernoulli_kl(torch.zeros(1), target_rate)  # validates target_rate
        self.l1_coeff, self.n_clusters, self.min_cluster_size = float(l1_coeff), int(n_clusters), int(min_cluster_size)
        self.contrast_coeff, self.importance_weights = float(contrast_coeff), [float(w) for w in importance_weights]
        self.memory, self.update_every, self.threshold = float(memory), int(update_every), float(threshold)
        self.prune_rate, self.unlearn_coeff = float(prune_rate), float(unlearn_coeff)
        self.prune_coeff, self.target_rate = float(prune_coeff), float(target_rate)
        self.profile_tokens, self.kmeans_iters = int(profile_tokens), int(kmeans_iters)
        # Saved state (extra tensors): scores, keep mask (1 = kept), cluster of each latent, number of updates.
        self.register_buffer("importance", torch.zeros(d_sae))
        self.register_buffer("keep_mask", torch.ones(d_sae))
        self.register_buffer("clusters", torch.arange(d_sae) % self.n_clusters)
        self.register_buffer("n_updates", torch.zeros(1, dtype=torch.long))
        self._step, self._last_update_step = 0, -1
        # Mechanism counters (plain floats, see counters()); saved in extra_state so a resumed run logs the same.
        self._stats: dict[str, float] = {}

    latent_group_kind = "cluster"

    def latent_groups(self) -> dict[str, torch.Tensor]:
        """Current k-means clusters of latents (seed 002 sec. 4) for diagnostics."""
        return groups_from_ids(self.clusters, "cluster")

    def hparams(self) -> dict:
        """Every constructor argument except the sizes and seed."""
        keys = ["l1_coeff", "n_clusters", "min_cluster_size", "contrast_coeff", "importance_weights", "memory",
                "update_every", "threshold", "prune_rate", "unlearn_coeff", "prune_coeff", "target_rate",
                "profile_tokens", "kmeans_iters"]
        return {k: getattr(self, k) for k in keys}

    # -- forward ------------------------------------------------------------------------
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU, with pruned latents masked to 0.

        The mask is copied: autograd keeps it for the backward pass, and pruning later in the
        same forward (:meth:`update_state`, called from :meth:`penalties`) edits the buffer in
        place, which would make that backward raise.
        """
        return torch.relu(pre) * self.keep_mask.to(pre.dtype, copy=True)

    def pair_shift(self) -> torch.Tensor:
        """``inf`` for pruned latents, 0 for kept ones (fp32 ``[d_sae]``): the pairs step leaves the pruned out, as
        :meth:`activation`'s mask does."""
        return torch.where(self.keep_mask > 0, 0.0, math.inf)

    def scored(self) -> bool:
        """True once the importance has an observation: bookkeeping round 1 or later (round 0 only clusters)."""
        return int(self.n_updates) >= 2

    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor]]:
        """``("standard", ...)`` with ``keep_mask`` folded into the encoder: pruned latents get zero columns.

        ``ReLU(pre) * m = ReLU(pre * m)`` for ``m`` in {0, 1}, so a pruned latent's encoder
        column and bias are zeroed (``pre = 0``, always silent). Importance scores and
        clusters only drive training (sec. 4) and stay in saestrata's tensors.
        """
        return "standard", self.linear_tensors(self.keep_mask)

    def candidates(self) -> torch.Tensor:
        """Bool ``[d_sae]``: unpruned latents with ``s_i < tau`` (none before :meth:`scored`). Seed 002 sec. 4."""
        if not self.scored():
            return torch.zeros_like(self.keep_mask, dtype=torch.bool)
        return (self.importance < self.threshold) & (self.keep_mask > 0)

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``l1``, ``contrast`` (alpha L_contrast), ``unlearn`` (beta L_unlearn, eq. 4); bookkeeping first when due."""
        if self.training and self._step % self.update_every == 0 and self._last_update_step != self._step:
            self._last_update_step = self._step
            self.update_state(x.detach(), f.detach(), x_hat.detach())
        out = {"l1": self.l1_coeff * self.sparsity_scale * f.float().abs().sum(-1).mean()}
        if self.contrast_coeff > 0:
            out["contrast"] = self.contrast_coeff * cluster_decorrelation(f, self.clusters, self.n_clusters)
        if self.unlearn_coeff > 0:
            kl, l2 = self.unlearn_terms(pre, f, x)
            out["unlearn"] = self.unlearn_coeff * (kl + self.prune_coeff * l2)
            if self.training:
                self._count_unlearn(kl, l2)
        return out

    def unlearn_terms(self, pre: torch.Tensor | None, f: torch.Tensor,
                      x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Seed 002 eq. (4)'s two parts, unweighted float scalars:
        ``(sum_{i cand} KL(Bern(mean_b tanh f_bi) || Bern(target_rate))`` [nats],
        ``E_b ||relu(pre)_pruned||^2`` [squared input units]); each 0 when its latent set is empty.

        ``pre`` ``[batch, d_sae]``, or None (the pairs step): the pruned latents' columns are then formed from ``x``
        ``[batch, d_in]`` alone, a ``[d_in, n_pruned]`` matmul with autograd.

        Raises:
            ValueError: ``pre`` and ``x`` both None while latents are pruned.
        """
        kl = l2 = f.new_zeros((), dtype=torch.float32)
        cand = self.candidates()
        if cand.any():
            rate = torch.tanh(f.float()[:, cand]).mean(0)
            kl = bernoulli_kl(rate, self.target_rate).sum()
        pruned = self.keep_mask == 0
        if pruned.any():
            if pre is not None:
                cols = pre.float()[:, pruned]
            elif x is not None:
                idx = pruned.nonzero().flatten()
                cols = ((x - self.b_dec) @ self.W_enc.index_select(1, idx) + self.b_enc.index_select(0, idx)).float()
            else:
                raise ValueError("unlearn_terms needs pre or x once latents are pruned")
            l2 = torch.relu(cols).pow(2).sum(-1).mean()
        return kl, l2

    def unlearn_loss(self, pre: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Seed 002 eq. (4): ``KL part + prune_coeff * L2 part`` of :meth:`unlearn_terms` (float scalar)."""
        kl, l2 = self.unlearn_terms(pre, f)
        return kl + self.prune_coeff * l2

    @torch.no_grad()
    def _count_unlearn(self, kl: torch.Tensor, l2: torch.Tensor) -> None:
        """Counters of eq. (4): last values and the number of training steps each part was non-zero."""
        st = self._stats
        st["unlearn_kl"], st["prune_l2"] = float(kl), float(l2)
        st["unlearn_kl_steps"] = st.get("unlearn_kl_steps", 0) + int(float(kl) > 0)
        st["prune_l2_steps"] = st.get("prune_l2_steps", 0) + int(float(l2) > 0)

    def counters(self) -> dict[str, float]:
        """Mechanism counters (seed 002 sec. 4, 6.3-6.4), plain numbers at log time.

        ``importance_updates`` (bookkeeping rounds; round 0 clusters only); ``latents_pruned`` (masked
        so far), ``pruned_last_update``; ``observation_min`` / ``observation_below_tau`` (the newest
        observation ``w . (a, g, m)`` of the kept latents: its minimum, how many are below tau);
        ``candidates`` (unpruned latents with ``s_i < tau``); over unpruned latents the importance
        ``importance_min`` / ``importance_p05`` / ``importance_median`` / ``importance_mean``;
        the last update's signal means ``signal_a`` / ``signal_g`` / ``signal_m``;
        ``cluster_reassignments`` (latents that changed cluster, summed over updates),
        ``cluster_reassigned_last``, ``clusters_used``, ``silhouette`` (:func:`centroid_silhouette`
        of the last update's profiles); ``unlearn_kl`` / ``prune_l2`` (eq. 4's parts, unweighted, last
        training step) and ``unlearn_kl_steps`` / ``prune_l2_steps`` (training steps they were non-zero).
        """
        out = {**super().counters(), "importance_updates": int(self.n_updates),
               "latents_pruned": int((self.keep_mask == 0).sum()), "candidates": int(self.candidates().sum())}
        kept = self.importance[self.keep_mask > 0].float().cpu()
        if self.scored() and kept.numel():
            q = torch.quantile(kept, torch.tensor([0.05, 0.5]))
            out.update(importance_min=float(kept.min()), importance_p05=float(q[0]),
                       importance_median=float(q[1]), importance_mean=float(kept.mean()))
        return {**out, **self._stats}

    # -- bookkeeping --------------------------------------------------------------------
    def after_step(self, step: int, steps: int) -> None:
        """Advance the step counter that schedules :meth:`update_state`."""
        self._step = step + 1

    def extra_state(self) -> dict:
        """``{"step", "last_update_step", "stats"}``: the counters that schedule :meth:`update_state`
        and those of :meth:`counters`."""
        return {**super().extra_state(), "step": self._step, "last_update_step": self._last_update_step,
                "stats": dict(self._stats)}

    def load_extra_state(self, state: dict) -> None:
        """Restore the update schedule from :meth:`extra_state`. Raises ``KeyError`` if a key is missing."""
        super().load_extra_state(state)
        self._step, self._last_update_step = int(state["step"]), int(state["last_update_step"])
        self._stats = dict(state["stats"])

    @torch.no_grad()
    def update_state(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Seed 002 sec. 4 steps 1 and 4, one bookkeeping round: re-cluster, update importance, prune.

        Round 0 (the first training step, at initialisation) only forms the clusters: there every
        latent of the tied init fires on about half the tokens, and that observation would hold
        every score above tau for ~28 rounds (module docstring). Shapes as in :meth:`forward`.
        """
        with torch.autocast(x.device.type, enabled=False):  # bf16 would round counts and similarities
            x, f, x_hat = x.float(), f.float(), x_hat.float()
            profiles = standardized_profiles(f[: self.profile_tokens])
            first = int(self.n_updates) == 0
            warm = None if first else self.clusters  # first update: seeded, not i % K
            new = spherical_kmeans(profiles, self.n_clusters, self.kmeans_iters, self.min_cluster_size, warm)
            moved = 0 if first else int((new != self.clusters).sum())  # the first replaces the i % K placeholder
            self.clusters.copy_(new)
            was = self.candidates()  # candidates since the last round (under the KL term since then)
            self.n_updates += 1
            st = self._stats
            if not first:
                a, g, m = self.importance_signals(x, f, x_hat)
                combined = self.update_importance(a, g, m, n=int(self.n_updates) - 1)
                pruned = self.prune(eligible=was)
                st["pruned_last_update"] = int(pruned.numel())
                kept = self.keep_mask > 0
                if kept.any():  # signal means and the newest observation over the latents still kept
                    st["signal_a"], st["signal_g"], st["signal_m"] = (float(v[kept].mean()) for v in (a, g, m))
                    st["observation_min"] = float(combined[kept].min())
                    st["observation_below_tau"] = int((combined[kept] < self.threshold).sum())
            st["cluster_reassignments"] = st.get("cluster_reassignments", 0) + moved
            st["cluster_reassigned_last"] = moved
            st["clusters_used"] = int(torch.unique(new).numel())
            sil = centroid_silhouette(profiles, new, self.n_clusters)
            if math.isfinite(sil):  # NaN (one cluster) would not be valid JSON in the log
                st["silhouette"] = sil

    @torch.no_grad()
    def importance_signals(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor):
        """``(a, g, m)``, each float ``[d_sae]`` in [0, 1]: firing rate, max-normalised Taylor importance, MI / ln 2."""
        a = (f > 0).float().mean(0)
        g = taylor_importance(x, f, x_hat, self.W_dec)
        g = g / g.max().clamp_min(_EPS)
        token_cluster = cluster_activity(f, self.clusters, self.n_clusters).argmax(1)
        m = firing_cluster_mi((f > 0).float(), token_cluster, self.n_clusters) / math.log(2)
        return a, g, m

    @torch.no_grad()
    def update_importance(self, a: torch.Tensor, g: torch.Tensor, m: torch.Tensor, n: int) -> torch.Tensor:
        """Seed 002 eq. (3) with Adam's bias correction; ``n`` is this observation's 1-based index.

        ``s_n = gamma s_{n-1} + (1 - gamma) c_n`` from ``s_0 = 0``, ``c = w_a a + w_g g + w_m m``;
        the buffer holds the corrected score ``s_n / (1 - gamma^n)`` (Kingma & Ba 2014, sec. 3),
        i.e. the weighted mean ``sum_k (1 - gamma) gamma^(n-k) c_k / (1 - gamma^n)``, updated as
        ``s_hat += rate (c - s_hat)`` with ``rate = (1 - gamma) / (1 - gamma^n)`` (1 at ``n = 1``).
        Returns the observation ``c`` (float ``[d_sae]``).

        Raises:
            ValueError: ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"observation index n must be >= 1, got {n}")
        w_a, w_g, w_m = self.importance_weights
        combined = w_a * a + w_g * g + w_m * m
        rate = (1 - self.memory) / (1 - self.memory ** n)
        self.importance.mul_(1 - rate).add_(rate * combined)
        return combined

    @torch.no_grad()
    def prune(self, eligible: torch.Tensor | None = None) -> torch.Tensor:
        """Mask the lowest-scoring candidates, at most ``floor(prune_rate * d_sae)``; returns their indices (long).

        ``eligible`` (bool ``[d_sae]``) narrows the candidates further; :meth:`update_state` passes
        the latents that were candidates before this round's score update too (module docstring).
        """
        cand = self.candidates() if eligible is None else self.candidates() & eligible
        budget = min(int(self.prune_rate * self.d_sae), int(cand.sum()))
        if budget == 0:
            return torch.zeros(0, dtype=torch.long, device=cand.device)
        scores = self.importance.masked_fill(~cand, math.inf)
        idx = scores.topk(budget, largest=False).indices
        self.keep_mask[idx] = 0
        return idx


# Sec. 5: Adam, learning rate 3e-4, decoupled weight decay 0.01 (= AdamW).
_RUN2 = {"lr": 3e-4, "weight_decay": 0.01, "contrast_coeff": 0.2, "min_cluster_size": 5, "update_every": 100, "prune_rate": 0.0, "unlearn_coeff": 0.0}
ARCHS = {
    "importance_tracking": ArchInfo(
        ImportanceSAE,
        "seed 002 (shared/seeds/002_157d3ce170b2a951.txt), sec. 3.1 eq. (1), sec. 4 eq. (2)-(4), sec. 5-6",
        presets={
            # Sec. 6.2 sequential variants; each builds on the previous one. d_sae = d_model in the paper.
            "seed002-contrastive": {**_RUN2, "contrast_coeff": 0.1, "min_cluster_size": 1},
            "seed002-selection": dict(_RUN2),
            "seed002-pruning": {**_RUN2, "update_every": 50, "prune_rate": 0.10, "unlearn_coeff": 0.3,
                                "importance_weights": [0.35, 0.5, 0.0]},  # MI arrives in run 4
            "seed002-hierarchical": {**_RUN2, "n_clusters": 32, "update_every": 50, "prune_rate": 0.05,
                                     "unlearn_coeff": 0.3, "importance_weights": [0.35, 0.5, 0.15]},
        },
    ),
}
