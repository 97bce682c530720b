"""Seed 001: grouped-orthogonality, hierarchical, attention-grouped and contrastive SAEs.

Source: ``shared/seeds/001_0012a683e3519a7f.txt`` ("The limits of structural
approaches to knowledge separation"), sec. 3.1 (ReLU encoder, linear decoder),
4.1 (8x8 hierarchy, Eq. 1), 4.2 (attention group assignment, Eq. 2), 4.3 (loss,
Eqs. 3-4), 5.2 (training protocol) and 6.1 (the six variants and their settings).

All variants share Eq. 3, ``||x - x_hat||^2 + l1 ||f||_1 + l2 L_ortho + l3 L_contrast``
on the trainer's normalised inputs, with Eq. 4's orthogonality between groups of
latents. Presets (``ARCHS[...].presets``; sizes are fractions of ``d_sae``, so
they fit d_model 640 and 2304 alike):

- ``seed001_fixed_ortho``: 32 static groups, alpha 0.1 (sec. 6.1 "Fixed Orthogonal").
- ``seed001_adaptive_ortho32``: 32 groups re-formed every 100 steps, alpha in [0.05, 0.15].
- ``seed001_adaptive_ortho64``: 64 groups re-formed every 50 steps, alpha in [0.2, 0.4].
- ``seed001_static_hier``: 8x8 static hierarchy, alpha_L1 0.4, alpha_L2 0.2 (sec. 4.1, 6.1).
- ``seed001_dynamic_hier``: 8x8 attention-assigned groups (Eq. 2, temperature init 1.0,
  refreshed every 50 steps), entropy weight 0.01 (sec. 4.2, 6.1).
- ``seed001_contrastive_hier``: the above + InfoNCE, temperature 0.1, weight 0.1 (sec. 4.3, 6.1).

Readings of ambiguous or missing details (seed section in brackets):

* Eq. 4's ``h_g`` [4.3] is the ``[batch, |g|]`` block of latent activations, so
  ``h_gi^T h_gj`` is the cross-group co-activation (Gram) block. We divide it by
  the batch size (a batch mean) so the penalty does not grow with batch size;
  the paper's sum over ordered pairs ``i != j`` is kept as written (each unordered
  pair counts twice), as is the unsquared Frobenius norm.
* ``lambda_2`` of Eq. 3 is not given [4.3]; the alphas are the paper's only
  orthogonality weights [6.1], so ``lambda_2 = 1``. ``lambda_1`` (L1) is not given
  either; we use 5.0, the project's calibration for an L1 penalty with unit-norm
  decoder rows on inputs of mean norm ``sqrt(d_in)`` (see standard.py), warmed up
  by the trainer's ``sparsity_scale``. Decoder rows are kept at unit norm so
  plain L1 cannot be gamed by shrinking latents.
* "Fixed Orthogonal" [1, 6.1] gives no group count; we use 32 static contiguous
  groups, the count of the next variant, so the two differ only in adaptivity.
* "Adaptive" [6.1] says only that alpha moves in a range and groups are updated
  every 100 (32 groups) or 50 (64 groups) steps. At each update we (a) set
  ``alpha = lo + (hi - lo) * c``, ``c`` the mean absolute correlation between the
  groups' summed activations in the batch (the "feature correlation" of sec. 6.2),
  so correlated groups are pushed harder; (b) re-form equal-size groups by one
  balanced k-means step on the latents' co-activation profiles, so latents that
  fire together share a group ("dynamic feature grouping", sec. 1).
* The 8x8 hierarchy [4.1]: fine group ``(i, j)`` lies inside coarse group ``i``;
  the level-2 term of Eq. 4 (``sum_{i, j != k}``) pairs only fine groups of the
  same coarse parent. Static groups are contiguous latent ranges.
* Eq. 2 [4.2] assigns *latents* to groups (assignments are "updated every 50
  steps", so they are a per-latent state, not a per-token routing). A latent's
  key is a learned projection of its layer-normalised decoder direction (sec. 4.3
  mentions layer normalisation; it also makes keys invariant to the input-scale
  fold). The decoder direction is detached there so the assignment loss moves the
  attention, not the dictionary. Fine groups are nested by construction:
  ``p(i, j) = p(i) p(j | i)`` with a softmax over ``j`` inside each coarse ``i``.
  Soft assignments enter Eq. 4 by weighting each latent's activation by its
  membership probability (hard one-hot assignments give back the static form).
  Every ``update_every`` steps the live assignment is cached (a buffer, saved
  with the SAE); the loss always sees the cached values, so the groups change
  only at those refreshes, as the paper says. The attention's parameters are
  still learned on every step, by a straight-through estimator (the loss takes
  ``cache + (live - live.detach())``: the cache's value, the live attention's
  gradient). Without that term the attention would get a gradient only on
  refresh steps (6 of 300 at every 50).
* Entropy regularisation [4.3, 6.1, weight 0.01] is read as keeping group *usage*
  balanced (the stated purpose, "prevent degenerate solutions", i.e. every latent
  in one group, which zeroes Eq. 4): loss ``w * sum_levels (log n - H(mean p))``,
  non-negative and zero at uniform usage.
* InfoNCE [4.3, 6.1, 6.2]: "inter-group contrastive loss", "separated feature
  groups in embedding space (mean cosine similarity ...)" and a reported mean NCE
  of 4.2 ~ ln 64 all point to contrast between the 64 fine groups. A group's
  embedding is its activation pattern over the batch tokens (``f @ P_fine``,
  column g); the positive pair is the same group's pattern on a second view of
  the batch (inputs plus Gaussian noise of ``view_noise`` times each token's RMS,
  since a flat token batch offers no natural pairs), negatives are the other
  groups. ``contrast_over="tokens"`` instead contrasts tokens (rows) of the same
  two views. The loss is symmetrised over the two views.
* Training protocol [5.2]: AdamW, lr 3e-4, weight decay 0.01, batch 2048, 1000
  steps belong to the trainer (which uses Adam, no weight decay); the template
  the paper's numbers suggest used ``d_sae = d_model``, which is a trainer
  setting (``--d-sae``), not a preset.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arch_info import ArchError, ArchInfo
from .base import SAE, groups_from_ids
from .fused import fused_available
from .kernels import ActiveSet, check_kernels, gather_pre_acts, pairs_code
from .relu_pairs import DenseCodePairsMixin, positive_pairs
from .sparse_gram import coactivation_gram, coactivation_gram_sq

SEED = "shared/seeds/001_0012a683e3519a7f.txt"


# --------------------------------------------------------------------------------------
# Group structure helpers
# --------------------------------------------------------------------------------------
def static_group_ids(d_sae: int, n_groups: int) -> torch.Tensor:
    """Contiguous, near-equal groups: latent ``n`` -> ``n * n_groups // d_sae``.

    Returns a ``[d_sae]`` int64 tensor with values in ``[0, n_groups)``.

    Raises:
        ArchError: ``n_groups < 1`` or more groups than latents.
    """
    if not 1 <= n_groups <= d_sae:
        raise ArchError(f"need 1 <= n_groups <= d_sae, got n_groups={n_groups}, d_sae={d_sae}")
    return torch.arange(d_sae) * n_groups // d_sae


def one_hot(ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[d_sae]`` int group ids -> ``[d_sae, n_groups]`` float32 hard assignment matrix."""
    return F.one_hot(ids.long(), n_groups).float()


def latent_gram(f: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """Batch-mean co-activation ``f^T f / batch``: ``[batch, d_sae] -> [d_sae, d_sae]`` float32.

    Eq. 4's ``h^T h`` of seed 001 sec. 4.3, divided by the batch size (module docstring). ``f`` is a ReLU code;
    the product comes from its non-zeros when sparse enough (:func:`.sparse_gram.coactivation_gram`, which
    counts those in ``stats["sparse_gram"]``).
    """
    return coactivation_gram(f, stats) / f.shape[0]


def latent_gram_sq(f: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """``latent_gram(f) ** 2`` elementwise, fp32 ``[d_sae, d_sae]``: what Eq. 4's block norms read, the square fused into
    the non-zeros kernel when it runs (:func:`.sparse_gram.coactivation_gram_sq`; same values and gradients)."""
    return coactivation_gram_sq(f, f.shape[0], stats)


def block_frobenius(gram: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Frobenius norms of the group blocks of ``gram``, soft or hard groups.

    With membership ``A [d_sae, n]`` each latent's activation is weighted by ``A``, so
    block ``(i, j)`` is ``diag(A_i) G diag(A_j)`` and its squared norm is
    ``((A*A)^T (G*G) (A*A))_ij``; for one-hot ``A`` this is ``||h_gi^T h_gj||_F`` of
    seed 001 Eq. 4. Returns ``[n, n]`` float32. The clamp keeps the gradient finite
    (zero) for all-zero blocks, where the square root's derivative is undefined.
    """
    return _blocks_from_sq_gram(gram.float().pow(2), assign)


# Squared soft memberships below this are set to 0 before they enter a product (see _without_denormals).
MEMBERSHIP_SQ_FLOOR = 1e-18


def _without_denormals(w: torch.Tensor, floor: float) -> torch.Tensor:
    """``w`` (fp32, >= 0) with entries below ``floor`` set to 0 (their gradient too).

    Sharp soft assignments (seed 001 sec. 4.2's attention once InfoNCE makes it decide) hold probabilities down
    to ~1e-38 and their squares underflow to subnormal floats, on which x86 matmuls run on a slow microcode path:
    one ``[2048, 64] x [64, 2048]`` product of Eq. 4's backward took 100 ms instead of ~2 ms, and a
    seed001_contrastive_hier step 216 instead of 94 ms (found 2026-12-06 by the speed stage; the same run with
    flush-to-zero set was 94 ms). A membership of ``sqrt(floor)`` = 1e-9 adds under 1e-9 of a latent's weight to
    any sum, below fp32's resolution next to the members' weights, so the penalties' values do not change; the
    gradients they lose are of that order too after the softmax (its Jacobian scales them by the probability).
    Thread-local flush-to-zero (``torch.set_flush_denormal``) would not reach every worker thread reliably. Not
    applied to InfoNCE's ``f @ P_fine``: its cosine normalisation gives a group of only tiny memberships a full
    direction, so zeroing them at this floor would change its gradient (measured: 0.5% on some entries). The
    memberships themselves are flushed far lower, below 1e-30, where Eq. 2 forms them (:func:`_flush_tiny`).
    """
    return w.masked_fill(w < floor, 0.0)


# Soft memberships below this are 0 in value where Eq. 2 forms them (see _flush_tiny).
MEMBERSHIP_FLOOR = 1e-30


def _flush_tiny(p: torch.Tensor, floor: float) -> torch.Tensor:
    """``p`` (fp32 probabilities) with entries below ``floor`` set to 0 in value; the gradient passes through
    unchanged (straight-through), so the softmax receives the unflushed memberships' gradient (the tiny logit
    gradients it makes of it are dropped by :func:`_flush_tiny_grad`).

    Why: once InfoNCE sharpens seed 001 sec. 4.2's attention, memberships fall to ~1e-38 and below, into subnormal
    floats, and every matmul reading them (InfoNCE's ``f @ P_fine`` and its backward ``dz @ P_fine^T``, Eq. 4's
    ``gram_sq @ a2``) takes x86's slow subnormal path: the ``[1024, 64] x [64, 2048]`` backward product cost 11 ms
    instead of 0.8 ms at step 600 of seed001_contrastive_hier's benchmark run (2026-12-06, 31st session;
    :func:`_without_denormals` covered the squares only). At 1e-30 a row (summing to 1) changes by under 1e-28,
    below fp32's resolution, and ``f p`` stays a normal float for codes above 1e-8. InfoNCE's cosine normalisation
    (``eps`` 1e-12) maps a group column of norm under ~1e-26 to a vector of norm under 1e-14 with or without the
    flush, so its value and gradient do not move either (a floor of 1e-9 did move them: 0.5%).
    """
    return p + (p.masked_fill(p < floor, 0.0) - p).detach()


class _FlushTinyGrad(torch.autograd.Function):
    """Identity whose backward sets gradient entries of magnitude below ``floor`` to 0 (:func:`_flush_tiny_grad`)."""

    @staticmethod
    def forward(ctx, t, floor):
        """Autograd forward: ``t`` itself (a view)."""
        ctx.floor = floor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        """The gradient with its tiny entries 0; None for ``floor``."""
        return grad.masked_fill(grad.abs() < ctx.floor, 0.0), None


def _flush_tiny_grad(logits: torch.Tensor, floor: float) -> torch.Tensor:
    """``logits`` unchanged; in the backward, gradient entries below ``floor`` in magnitude become 0.

    For Eq. 2's softmax logits: a softmax's backward scales each entry's gradient by its probability, so a sharp
    attention's ~1e-38 probabilities give subnormal logit gradients, and the products reading them (``W_key``'s
    gradient ``LN(W_dec)^T dkeys``, ``[640, 2048] x [2048, 64]``; ``q_fine``'s batched one) ran 11.5 ms instead of
    ~0.5 (seed001_dynamic_hier, step 600 of its benchmark run, 31st session). An entry below 1e-30 adds under
    ``d_sae * 1e-30`` to any of those sums, below fp32's resolution next to the other entries, and under 1e-22 of an
    Adam step (eps 1e-8) if every entry is that small.
    """
    return _FlushTinyGrad.apply(logits, floor)


def _blocks_from_sq_gram(gram_sq: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """:func:`block_frobenius` from ``gram_sq = gram.float() ** 2`` (one squaring shared by several groupings)."""
    a2 = _without_denormals(assign.float().pow(2), MEMBERSHIP_SQ_FLOOR)
    return (a2.T @ (gram_sq @ a2)).clamp_min(1e-30).sqrt()


def ortho_penalty(f: torch.Tensor, assign: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """Unweighted single-level Eq. 4: ``sum_{i != j} ||h_gi^T h_gj||_F / batch`` (scalar float32).

    Args:
        f: ``[batch, d_sae]`` latents.
        assign: ``[d_sae, n_groups]`` membership (one-hot or soft rows summing to 1).
        stats: counters dict for :func:`latent_gram`.
    Source: seed 001 sec. 4.3, Eq. 4 (first term), sec. 6.1 (grouped variants).
    """
    blocks = _blocks_from_sq_gram(latent_gram_sq(f, stats), assign)
    off = ~torch.eye(blocks.shape[0], dtype=torch.bool, device=blocks.device)
    return blocks[off].sum()


def sibling_mask(n_coarse: int, n_fine: int, device=None) -> torch.Tensor:
    """``[n_coarse*n_fine]^2`` bool: fine groups ``(i, j), (i, k)`` with ``j != k`` (Eq. 4's level-2 pairs)."""
    parent = torch.arange(n_coarse * n_fine, device=device) // n_fine
    same = parent[:, None] == parent[None, :]
    return same & ~torch.eye(len(parent), dtype=torch.bool, device=device)


def hier_ortho_terms(f: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor,
                     n_fine: int, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted level-1 and level-2 sums of seed 001 Eq. 4 (sec. 4.1, 4.3).

    Args:
        f: ``[batch, d_sae]`` latents.
        coarse: ``[d_sae, n_coarse]`` coarse membership.
        fine: ``[d_sae, n_coarse * n_fine]`` fine membership; fine group ``k`` lies in coarse ``k // n_fine``.
        stats: counters dict for :func:`latent_gram`.
    Returns:
        ``(sum_{i != j} ||h_g1i^T h_g1j||_F, sum_{i, j != k} ||h_g2ij^T h_g2ik||_F)``, both ``/ batch``, float32.
    """
    return _ortho_terms(latent_gram_sq(f, stats), coarse, fine, n_fine)


def _ortho_terms(gram_sq: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor,
                 n_fine: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hier_ortho_terms` from ``gram_sq`` ``[d_sae, d_sae]`` float32, the elementwise square of
    :func:`latent_gram`, so that one squaring serves the cached and the live assignments.

    Both levels' squared memberships go through ``gram_sq`` in one product (``[d_sae, n_coarse + n_coarse n_fine]``):
    one read of ``gram_sq`` and, backward, one ``[d_sae, d_sae]`` gradient instead of two summed (the blocks of
    :func:`_blocks_from_sq_gram`, level by level)."""
    n_coarse = coarse.shape[1]
    a2 = _without_denormals(torch.cat([coarse.float(), fine.float()], 1).pow(2), MEMBERSHIP_SQ_FLOOR)
    m = gram_sq @ a2
    b1 = (a2[:, :n_coarse].T @ m[:, :n_coarse]).clamp_min(1e-30).sqrt()
    b2 = (a2[:, n_coarse:].T @ m[:, n_coarse:]).clamp_min(1e-30).sqrt()
    off = ~torch.eye(b1.shape[0], dtype=torch.bool, device=b1.device)
    return b1[off].sum(), b2[sibling_mask(n_coarse, n_fine, b2.device)].sum()


def usage_entropy(assign: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of the mean group usage ``mean_n assign[n]``: ``[d_sae, n] -> []`` float32.

    ``log n`` for balanced usage, 0 when every latent sits in one group (seed 001 sec. 4.3
    "entropy regularization on group assignments"). With ``weight [d_sae]`` (>= 0, not all 0) the
    usage is the ``weight``-weighted mean of the rows instead.
    """
    a = assign.float()
    usage = a.mean(0) if weight is None else (weight.float()[:, None] * a).sum(0) / weight.float().sum().clamp_min(1e-30)
    return -(usage * usage.clamp_min(1e-12).log()).sum()


def inter_group_correlation(f: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Mean absolute Pearson correlation between groups' summed activations over the batch.

    ``f [batch, d_sae]``, ``assign [d_sae, n]`` -> scalar float32 in ``[0, 1]``; groups that
    never fire in the batch contribute 0. The "feature correlation" of seed 001 sec. 6.2.
    """
    act = f.float() @ assign.float()
    act = act - act.mean(0)
    act = act / act.norm(dim=0).clamp_min(1e-12)
    corr = act.T @ act
    off = ~torch.eye(corr.shape[0], dtype=torch.bool, device=corr.device)
    return corr[off].abs().mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views; row ``i`` of ``a`` and of ``b`` are a positive pair.

    Args:
        a, b: ``[n, e]`` embeddings (any float dtype); compared by cosine similarity.
        temperature: softmax temperature (seed 001 sec. 4.3 / 6.1 use 0.1).
    Returns:
        Scalar float32: mean over both directions of ``-log softmax_j(cos(a_i, b_j) / T)[i]``
        (van den Oord et al. 2018, "CPC", sec. 2.3; seed 001 sec. 4.3). ``ln n`` at chance.
    Raises:
        ValueError: shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"views must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    logits = F.normalize(a.float(), dim=-1, eps=1e-12) @ F.normalize(b.float(), dim=-1, eps=1e-12).T
    logits = logits / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def balanced_assign(affinity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row (latent) to a column (group) by affinity, at most ``capacity`` rows per group.

    Rounds: every free latent proposes its best group that still has room; each group accepts
    its highest-affinity proposers up to its remaining room. ``affinity [d, n]`` -> ``[d]`` int64.

    Raises:
        ValueError: ``capacity * n < d`` (not every latent would fit).
    """
    d, n = affinity.shape
    if capacity * n < d:
        raise ValueError(f"capacity {capacity} x {n} groups cannot hold {d} latents")
    # NaN would stall the rounds (argmax may pick a full group); rank it last instead, above full groups.
    affinity = torch.nan_to_num(affinity.float(), nan=-1e30, posinf=1e30, neginf=-1e30)
    ids = torch.full((d,), -1, dtype=torch.long, device=affinity.device)
    room = torch.full((n,), capacity, dtype=torch.long, device=affinity.device)
    while (ids < 0).any():
        free = (ids < 0).nonzero().squeeze(1)
        scores = affinity[free].masked_fill(room[None, :] == 0, -math.inf)
        best, choice = scores.max(1)
        for g in choice.unique().tolist():
            mine = free[choice == g]
            take = mine[best[choice == g].argsort(descending=True)[: int(room[g])]]
            ids[take] = g
            room[g] -= len(take)
    return ids


@torch.no_grad()
def coactivation_groups(f: torch.Tensor, ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """One balanced k-means step on latents' co-activation profiles (our reading of sec. 6.1 "Adaptive").

    A latent's profile is its unit-normalised activation column over the batch; a group's
    centroid is the normalised mean profile of its current members; latents move to their
    most similar centroid under equal capacity ``ceil(d_sae / n_groups)``.
    ``f [batch, d_sae]``, ``ids [d_sae]`` -> new ``[d_sae]`` int64 ids.
    """
    prof = F.normalize(f.float().T, dim=1, eps=1e-12)  # [d_sae, batch]
    cent = F.normalize(one_hot(ids, n_groups).T @ prof, dim=1, eps=1e-12)  # [n_groups, batch]
    return balanced_assign(prof @ cent.T, math.ceil(f.shape[1] / n_groups))


# --------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------
class _ReluL1SAE(DenseCodePairsMixin, SAE):
    """ReLU encoder, unit-norm decoder, plain L1 (seed 001 sec. 3.1 and Eq. 3's first two terms).

    ``kernels``: ``"sparse"`` (default: on the CPU, once a batch is sparse enough, the reconstruction on the pairs
    with ``pre > 0`` and the penalties on their dense code, :class:`.relu_pairs.DenseCodePairsMixin`; counted in
    ``sparse_steps``) or ``"dense"`` (always the dense step); same maths. None = ``kernels.DEFAULT_KERNELS``.
    """

    unit_norm_decoder = True

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, l1_coeff: float = 5.0, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        self.l1_coeff = l1_coeff
        self.kernels = check_kernels(kernels)
        self._calls = 0  # training forwards seen; drives the every-N-steps updates
        # Mechanism counters (plain floats, see counters()); saved in extra_state so a resumed run logs the same.
        self._stats: dict[str, float] = {}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU (seed 001 sec. 3.1)."""
        return torch.relu(pre)

    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor]]:
        """``("standard", W_enc/b_enc/W_dec/b_dec)``: inference is ReLU + linear decoder (sec. 3.1).

        Groups, alphas, attention keys/queries and cached assignments only enter the loss
        (Eqs. 2-4), so they are left out of SAELens' tensors (kept for saestrata).
        """
        return "standard", self.linear_tensors()

    def l1(self, f: torch.Tensor) -> torch.Tensor:
        """``l1_coeff * sparsity_scale * mean_batch ||f||_1`` (scalar float32; Eq. 3)."""
        return self.l1_coeff * self.sparsity_scale * f.float().sum(-1).mean()

    def _train_stats(self) -> dict | None:
        """The counters dict while training (``sparse_gram``: batches whose Gram came from the code's
        non-zeros, :func:`latent_gram`), None in eval mode."""
        return self._stats if self.training else None

    def _tick(self, every: int) -> bool:
        """Count a training forward; True on the first and then every ``every``-th one."""
        if not self.training:
            return False
        due = self._calls % every == 0
        self._calls += 1
        return due

    def counters(self) -> dict[str, float]:
        """Mechanism counters of the last training forward / update (see each class's ``_record``).

        Common to all seed 001 variants: ``l1`` (unweighted mean ``||f||_1``), the unweighted
        orthogonality sums of Eq. 4, ``sparse_gram`` (training batches whose Eq. 4 Gram came from the code's
        non-zeros, :func:`latent_gram`) and ``inter_group_corr`` (:func:`inter_group_correlation` of
        the batch over the current groups, seed 001 sec. 6.2's "feature correlation").
        """
        return {**super().counters(), "sparse_gram": 0, **self._stats}  # 0 until the kernel first runs

    def extra_state(self) -> dict:
        """``{"calls": int, "stats": dict}``: training forwards seen (they schedule the every-N-steps
        updates) and the counters of :meth:`counters`."""
        return {**super().extra_state(), "calls": self._calls, "stats": dict(self._stats)}

    def load_extra_state(self, state: dict) -> None:
        """Restore the forward counter and counters from :meth:`extra_state`. Raises ``KeyError`` if missing."""
        super().load_extra_state(state)
        self._calls = int(state["calls"])
        self._stats = dict(state["stats"])

    @torch.no_grad()
    def _record_batch(self, f: torch.Tensor, assign: torch.Tensor, **terms: torch.Tensor) -> None:
        """Store the batch's counters (training forwards only): ``l1``, ``inter_group_corr`` over
        ``assign [d_sae, n]`` and each unweighted loss term in ``terms`` (scalar tensors)."""
        if not self.training:
            return
        self._stats["l1"] = float(f.float().sum(-1).mean())
        self._stats["inter_group_corr"] = float(inter_group_correlation(f.detach(), assign.detach()))
        for name, value in terms.items():
            self._stats[name] = float(value.detach())


class GroupedOrthoSAE(_ReluL1SAE):
    """ReLU SAE with Eq. 4's orthogonality between ``n_groups`` latent groups (seed 001 sec. 6.1).

    ``[batch, d_in] -> [batch, d_sae]``. Fixed variant: static contiguous groups and constant
    ``alpha``. Adaptive variant (``adaptive=True``): every ``update_every`` training steps the
    groups are re-formed from co-activation and ``alpha`` is set inside ``alpha_range`` from the
    measured inter-group correlation (module docstring).

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        l1_coeff: L1 weight (dimensionless on normalised inputs).
        n_groups: number of groups (<= d_sae).
        alpha: orthogonality weight of the fixed variant.
        adaptive: re-form groups and adapt alpha.
        alpha_range: ``[lo, hi]`` of the adaptive alpha.
        update_every: training steps between adaptive updates.
        kernels: ``"sparse"`` (default) or ``"dense"`` training step (:class:`_ReluL1SAE`).
    Raises:
        ArchError: bad group count, alpha range or update interval.
    Buffers: ``group_ids [d_sae]`` int64, ``alpha`` scalar float32 (saved with the SAE).
    """

    arch = "seed001_grouped_ortho"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, l1_coeff: float = 5.0, n_groups: int = 32,
                 alpha: float = 0.1, adaptive: bool = False, alpha_range: tuple | list = (0.05, 0.15),
                 update_every: int = 100, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed, l1_coeff, kernels)
        lo, hi = (float(v) for v in alpha_range)
        if not 0 <= lo <= hi or update_every < 1:
            raise ArchError(f"need 0 <= alpha_range[0] <= alpha_range[1] and update_every >= 1, "
                            f"got {alpha_range}, {update_every}")
        self.n_groups, self.adaptive, self.alpha_range, self.update_every = n_groups, adaptive, (lo, hi), update_every
        self.init_alpha = alpha
        self.register_buffer("group_ids", static_group_ids(d_sae, n_groups))
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    latent_group_kind = "group"

    def latent_groups(self) -> dict[str, torch.Tensor]:
        """Current latent groups (``group_ids``) for diagnostics (seed 001 sec. 4.3)."""
        return groups_from_ids(self.group_ids, "group")

    def hparams(self) -> dict:
        """Constructor settings (JSON-serialisable)."""
        return {"l1_coeff": self.l1_coeff, "n_groups": self.n_groups, "alpha": self.init_alpha,
                "adaptive": self.adaptive, "alpha_range": list(self.alpha_range), "update_every": self.update_every}

    @torch.no_grad()
    def adapt(self, f: torch.Tensor) -> None:
        """Adaptive update from a batch ``f [batch, d_sae]``: new alpha, then regrouped latents.

        Counts ``group_updates`` and ``group_reassignments`` (latents that changed group, summed
        over updates; ``group_reassigned_last`` for the latest update) in :meth:`counters`.
        """
        lo, hi = self.alpha_range
        corr = inter_group_correlation(f, one_hot(self.group_ids, self.n_groups).to(f.device))
        self.alpha.fill_(lo + (hi - lo) * float(corr.clamp(0, 1)))
        new = coactivation_groups(f.detach(), self.group_ids, self.n_groups)
        moved = int((new != self.group_ids).sum())
        self.group_ids.copy_(new)
        self._stats["group_updates"] = self._stats.get("group_updates", 0) + 1
        self._stats["group_reassignments"] = self._stats.get("group_reassignments", 0) + moved
        self._stats["group_reassigned_last"] = moved

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``l1`` and ``ortho = alpha * sum_{i != j} ||h_gi^T h_gj||_F / batch`` (Eq. 3-4).

        Counters: ``ortho`` (the unweighted sum), ``alpha``, ``inter_group_corr``, ``l1`` and, when
        adaptive, the regrouping counts of :meth:`adapt`.
        """
        if self.adaptive and self._tick(self.update_every):
            self.adapt(f)
        assign = one_hot(self.group_ids, self.n_groups).to(f.device)
        ortho = ortho_penalty(f, assign, self._train_stats())
        self._record_batch(f, assign, ortho=ortho, alpha=self.alpha)
        return {"l1": self.l1(f), "ortho": self.alpha * ortho}


class StaticHierSAE(_ReluL1SAE):
    """ReLU SAE with the static two-level hierarchy of seed 001 sec. 4.1 and both terms of Eq. 4.

    ``[batch, d_in] -> [batch, d_sae]``. Latents form ``n_coarse`` contiguous coarse groups,
    each split into ``n_fine`` contiguous fine groups (8x8 in the paper).

    Args:
        d_in, d_sae, seed, l1_coeff: see :class:`GroupedOrthoSAE`.
        n_coarse, n_fine: hierarchy shape (``n_coarse * n_fine <= d_sae``).
        alpha_l1, alpha_l2: level weights (paper: 0.4, 0.2).
        kernels: ``"sparse"`` (default) or ``"dense"`` training step (:class:`_ReluL1SAE`).
    Raises:
        ArchError: more fine groups than latents.
    """

    arch = "seed001_static_hier"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, l1_coeff: float = 5.0, n_coarse: int = 8,
                 n_fine: int = 8, alpha_l1: float = 0.4, alpha_l2: float = 0.2, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed, l1_coeff, kernels)
        self.n_coarse, self.n_fine, self.alpha_l1, self.alpha_l2 = n_coarse, n_fine, alpha_l1, alpha_l2
        fine = static_group_ids(d_sae, n_coarse * n_fine)
        self.register_buffer("fine_ids", fine)  # coarse group of fine k is k // n_fine (nesting)

    latent_group_kind = "coarse group"

    def latent_groups(self) -> dict[str, torch.Tensor]:
        """Coarse groups (``fine_ids // n_fine``) for diagnostics (seed 001 sec. 4.1)."""
        return groups_from_ids(self.fine_ids // self.n_fine, "coarse")

    def hparams(self) -> dict:
        """Constructor settings (JSON-serialisable)."""
        return {"l1_coeff": self.l1_coeff, "n_coarse": self.n_coarse, "n_fine": self.n_fine,
                "alpha_l1": self.alpha_l1, "alpha_l2": self.alpha_l2}

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot ``(coarse [d_sae, n_coarse], fine [d_sae, n_coarse*n_fine])`` float32."""
        return (one_hot(self.fine_ids // self.n_fine, self.n_coarse),
                one_hot(self.fine_ids, self.n_coarse * self.n_fine))

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``l1``, ``ortho_level1 = alpha_L1 * level-1 sum``, ``ortho_level2 = alpha_L2 * level-2 sum`` (Eq. 4).

        Counters: the unweighted sums ``ortho_level1`` / ``ortho_level2``, ``inter_group_corr`` over
        the coarse groups and ``l1``.
        """
        coarse, fine = self.assignments()
        t1, t2 = hier_ortho_terms(f, coarse, fine, self.n_fine, self._train_stats())
        self._record_batch(f, coarse, ortho_level1=t1, ortho_level2=t2)
        return {"l1": self.l1(f), "ortho_level1": self.alpha_l1 * t1, "ortho_level2": self.alpha_l2 * t2}


def _live_grad(term: torch.Tensor) -> torch.Tensor:
    """``term - term.detach()``: zero in value, ``term``'s gradient (a term evaluated at the live assignments)."""
    return term - term.detach()


class DynamicHierSAE(StaticHierSAE):
    """8x8 hierarchy with attention-assigned soft groups, entropy regularisation and optional InfoNCE.

    Seed 001 sec. 4.2 (Eq. 2): ``p(g_k^l | latent) = softmax_k(q_k^l . K(latent) / tau)`` with
    learned queries, key projection and temperature; nested levels ``p(i, j) = p(i) p(j | i)``.
    Keys are ``LayerNorm(W_dec[n]) @ W_key`` (decoder detached; module docstring). Assignment
    values are refreshed every ``update_every`` training steps into the ``assign_coarse`` /
    ``assign_fine`` buffers; the attention gets a gradient every step (:meth:`assignments`).
    ``[batch, d_in] -> [batch, d_sae]``.

    Args:
        d_in, d_sae, seed, l1_coeff, n_coarse, n_fine, alpha_l1, alpha_l2: see :class:`StaticHierSAE`.
        d_key: width of keys and queries.
        temperature: initial tau (paper sec. 6.1: 1.0), learned as ``log_tau``.
        entropy_coeff: weight of the usage-entropy regulariser (paper: 0.01).
        update_every: steps between assignment refreshes (paper: 50).
        contrast_coeff: InfoNCE weight (0 = off; paper's contrastive variant: 0.1).
        contrast_temperature: InfoNCE temperature (paper: 0.1).
        contrast_over: ``"groups"`` (fine groups' batch patterns, default) or ``"tokens"``.
        view_noise: std of the second view's Gaussian noise, in units of each token's RMS.
        entropy_over: what the usage entropy regulariser counts: ``"latents"`` (default: every latent
            once, the paper's "entropy regularization on group assignments" read literally) or
            ``"activity"`` (each latent weighted by its summed activation in the batch, so dead latents
            cannot keep it high while the live ones collapse; not in the paper, a study option).
        kernels: ``"sparse"`` (default) or ``"dense"`` training step (:class:`_ReluL1SAE`).
    Raises:
        ArchError: bad ``contrast_over`` or ``entropy_over``, ``update_every < 1`` or too many groups.
    Buffers: ``assign_coarse``, ``assign_fine`` (cached assignments, saved); the inherited static
    ``fine_ids`` layout is kept for the shared hierarchy code but unused by this class's loss.
    """

    arch = "seed001_dynamic_hier"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, l1_coeff: float = 5.0, n_coarse: int = 8,
                 n_fine: int = 8, alpha_l1: float = 0.4, alpha_l2: float = 0.2, d_key: int = 64,
                 temperature: float = 1.0, entropy_coeff: float = 0.01, update_every: int = 50,
                 contrast_coeff: float = 0.0, contrast_temperature: float = 0.1, contrast_over: str = "groups",
                 view_noise: float = 0.1, entropy_over: str = "latents", kernels: str | None = None):
        super().__init__(d_in, d_sae, seed, l1_coeff, n_coarse, n_fine, alpha_l1, alpha_l2, kernels)
        if contrast_over not in ("groups", "tokens") or entropy_over not in ("latents", "activity") or update_every < 1:
            raise ArchError(f"contrast_over must be 'groups' or 'tokens', entropy_over 'latents' or 'activity' and "
                            f"update_every >= 1, got {contrast_over!r}, {entropy_over!r}, {update_every}")
        self.entropy_over = entropy_over
        self.d_key, self.init_temperature, self.entropy_coeff = d_key, temperature, entropy_coeff
        self.update_every, self.contrast_coeff, self.contrast_temperature = update_every, contrast_coeff, contrast_temperature
        self.contrast_over, self.view_noise = contrast_over, view_noise
        # Own generator for the second view's noise: the trainer may step SAEs in parallel threads,
        # so drawing from the global generator would make the noise depend on thread timing.
        self._noise = torch.Generator().manual_seed(seed + 2)
        gen = torch.Generator().manual_seed(seed + 1)
        self.W_key = nn.Parameter(torch.randn(d_in, d_key, generator=gen) / math.sqrt(d_in))
        # Query scale 1/sqrt(d_key): logits start ~N(0, 1), so initial assignments are soft but not uniform.
        self.q_coarse = nn.Parameter(torch.randn(n_coarse, d_key, generator=gen) / math.sqrt(d_key))
        self.q_fine = nn.Parameter(torch.randn(n_coarse, n_fine, d_key, generator=gen) / math.sqrt(d_key))
        self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)))
        with torch.no_grad():
            coarse, fine = self.live_assignments()
        self.register_buffer("assign_coarse", coarse)
        self.register_buffer("assign_fine", fine)

    def latent_groups(self) -> dict[str, torch.Tensor]:
        """Coarse groups by the most probable cached assignment (seed 001 sec. 4.2) for diagnostics."""
        return groups_from_ids(self.assign_coarse.argmax(-1), "coarse")

    def hparams(self) -> dict:
        """Constructor settings (JSON-serialisable)."""
        return {**super().hparams(), "d_key": self.d_key, "temperature": self.init_temperature,
                "entropy_coeff": self.entropy_coeff, "update_every": self.update_every,
                "contrast_coeff": self.contrast_coeff, "contrast_temperature": self.contrast_temperature,
                "contrast_over": self.contrast_over, "view_noise": self.view_noise, "entropy_over": self.entropy_over}

    def live_assignments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2 now: ``(coarse [d_sae, n_coarse], fine [d_sae, n_coarse*n_fine])`` float32, rows sum to 1
        (memberships below ``MEMBERSHIP_FLOOR`` 0 in value, :func:`_flush_tiny`; the logits' gradients too,
        :func:`_flush_tiny_grad`)."""
        keys = F.layer_norm(self.W_dec.detach().float(), (self.d_in,)) @ self.W_key  # [d_sae, d_key]
        tau = self.log_tau.exp()
        floor = MEMBERSHIP_FLOOR  # no subnormal in the memberships or, through the softmax, in the logits' gradients
        coarse = torch.softmax(_flush_tiny_grad(keys @ self.q_coarse.T / tau, floor), -1)
        cond = torch.softmax(_flush_tiny_grad(torch.einsum("nd,ijd->nij", keys, self.q_fine) / tau, floor), -1)  # p(j|i)
        fine = (coarse[:, :, None] * cond).reshape(self.d_sae, -1)
        return _flush_tiny(coarse, floor), _flush_tiny(fine, floor)

    def attention_parameters(self) -> list[nn.Parameter]:
        """The parameters of Eq. 2's attention: ``W_key``, ``q_coarse``, ``q_fine``, ``log_tau``."""
        return [self.W_key, self.q_coarse, self.q_fine, self.log_tau]

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coarse, fine)`` memberships for the loss: cached values, live gradient (training).

        Every ``update_every`` training forwards the cache is refreshed from the live Eq. 2
        attention (sec. 4.2: assignments "updated every 50 steps"); in between the loss sees
        the cached values. The returned tensors are ``cache + (live - live.detach())``: the cache in
        value, with the live attention's gradient. :meth:`penalties` takes each term's value and the
        encoder's gradient at the cache and the attention's gradient at the live point (see there).
        Outside training: the cache, no gradient.
        """
        cached, live = self._assignment_views()
        if live is None:
            return cached
        return tuple(c + _live_grad(a) for c, a in zip(cached, live))

    def _assignment_views(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """``((coarse, fine) cached, (coarse, fine) live)`` in training (refreshing the cache when due: call
        once per training forward), ``(cached, None)`` outside it. The cached values carry no gradient."""
        cached = (self.assign_coarse, self.assign_fine)
        if not self.training:
            return cached, None
        coarse, fine = self.live_assignments()
        if self._tick(self.update_every):
            self._refresh(coarse.detach(), fine.detach())
        return cached, (coarse, fine)

    @torch.no_grad()
    def _refresh(self, coarse: torch.Tensor, fine: torch.Tensor) -> None:
        """Cache new assignments; count latents whose most probable group changed (counters)."""
        moved_c = int((coarse.argmax(-1) != self.assign_coarse.argmax(-1)).sum())
        moved_f = int((fine.argmax(-1) != self.assign_fine.argmax(-1)).sum())
        self.assign_coarse.copy_(coarse)
        self.assign_fine.copy_(fine)
        st = self._stats
        st["assign_refreshes"] = st.get("assign_refreshes", 0) + 1
        st["coarse_reassignments"] = st.get("coarse_reassignments", 0) + moved_c
        st["fine_reassignments"] = st.get("fine_reassignments", 0) + moved_f
        st["fine_reassigned_last"] = moved_f
        usage = lambda a: float(usage_entropy(a))  # noqa: E731
        st["usage_entropy_coarse"], st["usage_entropy_fine"] = usage(coarse), usage(fine)
        # The same over latents alive (fired within the dead window) only: dead latents count in the
        # regulariser's usage too, and spread over the groups they can keep it near ln n while every live
        # latent sits in two groups (seed001_contrastive_hier, docs/results/benchmark_findings.md).
        alive = self.tokens_since_fired < getattr(self, "dead_window_tokens", 250_000)
        st["alive_latents"] = int(alive.sum())
        st["usage_entropy_coarse_alive"] = usage(coarse[alive]) if st["alive_latents"] else 0.0
        st["usage_entropy_fine_alive"] = usage(fine[alive]) if st["alive_latents"] else 0.0
        # Mean per-latent entropy of the fine assignment (nats; ln 64 = 4.16 uniform, 0 one-hot):
        # the "mean entropy" of seed 001 sec. 6.1 (2.3 there).
        st["latent_entropy_fine"] = float(-(fine * fine.clamp_min(1e-12).log()).sum(-1).mean())
        st["tau"] = float(self.log_tau.exp())

    def after_step(self, step: int, steps: int) -> None:
        """Count steps on which the attention parameters received a non-zero gradient (``assign_grad_steps``).

        Called by the trainer after the optimiser step; the gradients of that step are still held.
        """
        super().after_step(step, steps)
        got = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in self.attention_parameters())
        self._stats["assign_grad_steps"] = self._stats.get("assign_grad_steps", 0) + int(got)

    def entropy_reg(self, coarse: torch.Tensor, fine: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``entropy_coeff * sum_levels (log n_l - H(usage_l))`` (scalar float32, >= 0).

        ``usage_l`` is the mean of the level's assignment rows, or with ``weight [d_sae]`` (``entropy_over
        = "activity"``: each latent's summed batch activation, no gradient) their weighted mean.

        :meth:`penalties` passes the LIVE assignments, value and gradient. Through the cached values
        (straight-through, as every term was taken before 2026-12-04) its gradient is taken at a point up to
        ``update_every`` steps old: a fixed linear pull towards the groups least used at the last refresh,
        which drives the live assignments to collapse into them instead of balancing them. Measured
        (2026-12-04, 512 latents, the attention trained on this term alone, Adam lr 1e-2, 200 steps):
        usage entropy of the coarse level 2.08 -> 1.04-1.20 nats through the cache, 2.08 -> 2.079
        (the maximum, ln 8) on the live values. The same holds for the orthogonality terms (quadratic in
        the assignments): trained on them through the cache the attention RAISED their live value (876 ->
        2,650-3,950 over 150 steps, 512 latents), at the live point it lowered it (876 -> 575). So in
        :meth:`penalties` the encoder's gradient and every term's value come from the cached groups
        (the paper's 50-step updates) and the attention's gradient from the live ones.
        """
        gap = lambda a: math.log(a.shape[1]) - usage_entropy(a, weight)  # noqa: E731
        return self.entropy_coeff * (gap(coarse) + gap(fine))

    def _entropy_weight(self, f: torch.Tensor) -> torch.Tensor | None:
        """None (``entropy_over = "latents"``) or each latent's summed activation ``[d_sae]`` over the batch
        ``f [batch, d_sae]``, detached (``"activity"``); None too for a batch where nothing fired."""
        if self.entropy_over == "latents":
            return None
        w = f.detach().float().sum(0)
        return w if bool(w.sum() > 0) else None

    def extra_state(self) -> dict:
        """Parent state plus ``noise_rng``: the second view's generator state (uint8 tensor)."""
        return {**super().extra_state(), "noise_rng": self._noise.get_state()}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`; raises ``KeyError`` if ``noise_rng`` is missing."""
        super().load_extra_state(state)
        self._noise.set_state(state["noise_rng"])

    def second_view(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[batch, d_sae]`` of ``x`` plus Gaussian noise of ``view_noise`` x per-token RMS.

        On the pairs step (``kernels="sparse"``, a CPU training forward, at most ``SPARSE_MAX_DENSITY`` of the view's
        entries positive) the code is built from the view's positive pre-activations (:func:`.relu_pairs.positive_pairs`,
        :func:`.kernels.gather_pre_acts`, :func:`.kernels.pairs_code`), so its backward into the encoder touches those
        pairs only instead of two dense ``[batch, d_in] x [d_in, d_sae]`` products (the weight gradient and, for
        ``b_dec``, the input gradient: 8.4 + 7.9 ms of a ~108 ms step at d_sae 2048, 31st session); same values and
        gradients as the dense encode (tests/test_kernels.py). Counted in ``sparse_views``.
        """
        rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
        noise = torch.randn(x.shape, generator=self._noise).to(x.device)
        view = x + self.view_noise * rms * noise
        if self.kernels == "sparse" and self.training and fused_available(self, view):
            picked = positive_pairs(self, view)
            if picked is not None:
                mm, rows, cols, vals = picked
                act = ActiveSet(rows, cols, *mm.shape)
                self._stats["sparse_views"] = self._stats.get("sparse_views", 0) + 1
                return pairs_code(gather_pre_acts(view, self, vals, act), act)
        return self.encode(view)

    def contrast(self, f: torch.Tensor, f2: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """Unweighted InfoNCE between the views' fine-group activations ``f @ fine`` ([batch, n_groups])."""
        z1, z2 = f.float() @ fine, f2.float() @ fine
        if self.contrast_over == "groups":
            z1, z2 = z1.T, z2.T
        return info_nce(z1, z2, self.contrast_temperature)

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``l1``, ``ortho_level1``, ``ortho_level2``, ``entropy`` and (training, ``contrast_coeff > 0``) ``contrast``.

        Counters: those of :class:`StaticHierSAE` (soft groups), the refresh counts of
        :meth:`_refresh`, ``assign_grad_steps`` (:meth:`after_step`), ``infonce`` (unweighted) and ``sparse_views``
        (second views encoded from their pairs, :meth:`second_view`).
        """
        (coarse, fine), live = self._assignment_views()
        gram_sq = latent_gram_sq(f, self._train_stats())
        t1, t2 = _ortho_terms(gram_sq, coarse, fine, self.n_fine)
        if live is not None:  # the attention's gradient at the live point (why: entropy_reg's docstring)
            at_live = _ortho_terms(gram_sq.detach(), *live, self.n_fine)
            t1, t2 = t1 + _live_grad(at_live[0]), t2 + _live_grad(at_live[1])
        out = {"l1": self.l1(f), "ortho_level1": self.alpha_l1 * t1, "ortho_level2": self.alpha_l2 * t2,
               "entropy": self.entropy_reg(*(live or (coarse, fine)), weight=self._entropy_weight(f))}
        terms = {"ortho_level1": t1, "ortho_level2": t2}
        if self.contrast_coeff > 0 and self.training:
            f2 = self.second_view(x)
            nce = self.contrast(f, f2, fine) + _live_grad(self.contrast(f.detach(), f2.detach(), live[1]))
            out["contrast"] = self.contrast_coeff * nce
            terms["infonce"] = nce
        self._record_batch(f, coarse, **terms)
        return out


class ContrastiveHierSAE(DynamicHierSAE):
    """:class:`DynamicHierSAE` with InfoNCE on by default (seed 001 sec. 4.3, 6.1: T 0.1, weight 0.1)."""

    arch = "seed001_contrastive_hier"
    def __init__(self, d_in: int, d_sae: int, seed: int = 0, contrast_coeff: float = 0.1, **kwargs):
        super().__init__(d_in, d_sae, seed, contrast_coeff=contrast_coeff, **kwargs)


_SRC = f"{SEED}, sec. 4.1-4.3, 6.1"
# Sec. 5 / 6: AdamW, learning rate 3e-4, weight decay 0.01 (batch 2048 there; ours is the run's).
_OPT = {"lr": 3e-4, "weight_decay": 0.01}
ARCHS = {
    GroupedOrthoSAE.arch: ArchInfo(GroupedOrthoSAE, f"{SEED}, sec. 4.3 Eq. 4, 6.1 (fixed / adaptive orthogonal)", {
        "seed001_fixed_ortho": {**_OPT, "n_groups": 32, "alpha": 0.1},
        "seed001_adaptive_ortho32": {**_OPT, "n_groups": 32, "adaptive": True, "alpha": 0.1,
                                     "alpha_range": [0.05, 0.15], "update_every": 100},
        "seed001_adaptive_ortho64": {**_OPT, "n_groups": 64, "adaptive": True, "alpha": 0.3,
                                     "alpha_range": [0.2, 0.4], "update_every": 50},
    }),
    StaticHierSAE.arch: ArchInfo(StaticHierSAE, _SRC, {
        "seed001_static_hier": {**_OPT, "n_coarse": 8, "n_fine": 8, "alpha_l1": 0.4, "alpha_l2": 0.2},
    }),
    DynamicHierSAE.arch: ArchInfo(DynamicHierSAE, _SRC, {
        "seed001_dynamic_hier": {**_OPT, "temperature": 1.0, "entropy_coeff": 0.01, "update_every": 50},
    }),
    ContrastiveHierSAE.arch: ArchInfo(ContrastiveHierSAE, _SRC, {
        "seed001_contrastive_hier": {**_OPT, "temperature": 1.0, "entropy_coeff": 0.01, "update_every": 50,
                                     "contrast_coeff": 0.1, "contrast_temperature": 0.1},
    }),
}
