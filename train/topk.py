"""``topk``: TopK SAE with the AuxK dead-latent loss.

Source: Gao et al. 2024, "Scaling and evaluating sparse autoencoders":
sec. 2.3 (``f = ReLU(TopK(W_enc (x - b_pre) + b_enc))``, unit-norm decoder rows),
appendix A.2 (AuxK: reconstruct the residual error ``e = x - x_hat`` with the top
``k_aux`` latents among those dead for a window of tokens, coefficient 1/32,
``k_aux = d_in / 2``). The AuxK term here is normalised by ``||e||^2`` as in the
paper's reference implementation, so it is scale-free.

Kernels: ``kernels="dense"`` computes the step with dense matmuls over the
``[batch, d_sae]`` code; ``kernels="sparse"`` (``--set kernels=sparse``) computes the same
loss and gradients from the active latents only (:mod:`.kernels`), AuxK included. The
default is ``kernels.DEFAULT_KERNELS``; the switch affects training-mode forward passes
only and is not saved with the SAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch_info import ArchInfo
from .base import SAE, ForwardOutput
from .fused import AuxKPairs, GradSqNorms, encoder_mm, fused_available, fused_topk
from .native import rowwise_topk_indices
from .kernels import ActiveSet, ColumnPre, check_kernels, gather_columns, gather_pre_acts, sparse_decode

# AuxK on the sparse kernels: dead-column matmuls when k_aux >= n_dead / AUXK_DENSE_SHARE, pair
# lists below. Measured here at d_in 640, d_sae 4096, k_aux 320, batch 1024 (fwd+bwd, 1 thread):
# the matmuls won up to n_dead = 2048 (k_aux / n_dead = 0.16), the pair lists at 4096 (0.08).
AUXK_DENSE_SHARE = 8


@dataclass
class AuxKPlan:
    """One step's AuxK work (:meth:`AuxKMixin.auxk_plan`): ``kind`` ``"none"`` / ``"constant"`` / ``"columns"``
    (``dead`` long ``[n_dead]`` ascending, ``dead_pre`` ``[batch, n_dead]``, ``k_aux``) / ``"pairs"`` (``act``
    the pairs above 0, ``vals`` fp32 ``[N]`` their pre-activations in ``act``'s order)."""

    kind: str
    dead: torch.Tensor | None = None
    dead_pre: torch.Tensor | None = None
    k_aux: int = 0
    act: ActiveSet | None = None
    vals: torch.Tensor | None = None


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest pre-activations of each row, ReLU them, zero the rest.

    ``[batch, d_sae] -> [batch, d_sae]``.
    """
    indices = rowwise_topk_indices(pre, k)
    return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(pre.gather(-1, indices)))


class AuxKMixin:
    """AuxK loss for TopK-family SAEs (Gao et al. 2024, app. A.2).

    Needs ``tokens_since_fired``, ``W_dec``, ``d_in`` and attributes ``aux_k``,
    ``aux_coeff``, ``dead_window_tokens`` (set by the trainer; default 250k tokens).
    """

    dead_window_tokens: int = 250_000
    sparsity_control = "k"  # --target-l0 L trains with k = L
    _auxk_pairs = 0  # (token, dead latent) pairs of the last AuxK term that survived its ReLU

    def counters(self) -> dict[str, float]:
        """``auxk_dead``: latents AuxK currently treats as dead (it can act only when > 0); ``auxk_pairs``:
        (token, dead latent) pairs of the last step's AuxK term with a positive activation, the only
        ones that reconstruct anything or get a gradient (0 = AuxK inert although latents are dead)."""
        n_dead = int((self.tokens_since_fired >= self.dead_window_tokens).sum())
        return {**super().counters(), "auxk_dead": n_dead, "auxk_pairs": self._auxk_pairs}

    def auxk_loss(self, x: torch.Tensor, pre: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Weighted AuxK term (scalar); zero when no latent is dead."""
        dead = self.tokens_since_fired >= self.dead_window_tokens
        n_dead = int(dead.sum())
        self._auxk_pairs = 0
        if n_dead == 0:
            return pre.new_zeros(()).float()
        k_aux = min(self.aux_k, n_dead)
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        f_aux = topk_relu(masked, k_aux)
        self._auxk_pairs = int((f_aux > 0).sum())
        e = (x - x_hat).detach().float()
        e_hat = (f_aux @ self.W_dec).float()
        return self.aux_coeff * (e_hat - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-12)

    def auxk_plan(self, pre) -> AuxKPlan:
        """Which AuxK work this step needs, from the dead latents' pre-activations (no autograd).

        ``pre`` is the ``[batch, d_sae]`` pre-activations, or a function ``cols -> pre[:, cols]`` (fp32
        ``[batch, len(cols)]``), called only when a latent is dead and only for the dead columns; the fused
        steps, which never form ``pre``, pass a :class:`.kernels.ColumnPre`, whose compiled
        :meth:`~.kernels.ColumnPre.positive_topk` picks the pairs without gathering the columns. The ``k_aux`` largest pre-activations among dead latents are ReLU'd, so
        only the pairs above 0 add to ``e_hat`` or get a gradient, and the work follows their number
        ``n_pos`` (the ``auxk_pairs`` counter): ``"none"`` (no dead latent: the term is 0); ``"constant"``
        (``n_pos`` 0, the usual case once latents die: ~0.03% of (token, dead latent) pre-activations are
        positive on layer 8, docs/results/benchmark_findings.md; the term is its constant ``aux_coeff`` without
        a graph, as the dense path's zero ``e_hat`` gives); ``"pairs"`` (pair lists); ``"columns"`` (a block
        denser than ``1 / AUXK_DENSE_SHARE``: matmuls on the dead columns only). Selections equal the dense
        path's ``-inf`` mask up to tie order (the compiled one's ties: the dense path's rule, lower column wins).
        """
        dead = (self.tokens_since_fired >= self.dead_window_tokens).nonzero().flatten()
        self._auxk_pairs = 0
        if dead.numel() == 0:
            return AuxKPlan("none")
        k_aux = min(self.aux_k, dead.numel())
        picked = pre.positive_topk(dead, k_aux) if isinstance(pre, ColumnPre) else None  # compiled, no gather
        if picked is not None:
            act, vals = picked
            n_pos = self._auxk_pairs = len(act)
            if n_pos == 0:
                return AuxKPlan("constant")
            if n_pos * AUXK_DENSE_SHARE < act.n_rows * dead.numel():
                return AuxKPlan("pairs", act=act, vals=vals)
            return AuxKPlan("columns", dead, pre(dead), k_aux)
        dead_pre = pre(dead) if callable(pre) else pre.index_select(1, dead)  # [batch, n_dead], no autograd
        values, j = dead_pre.topk(k_aux, dim=-1, sorted=False)
        n_pos = self._auxk_pairs = int((values > 0).sum())
        if n_pos == 0:
            return AuxKPlan("constant")
        if n_pos * AUXK_DENSE_SHARE >= dead_pre.numel():
            return AuxKPlan("columns", dead, dead_pre, k_aux)
        act = ActiveSet.from_rowwise(values, dead[j], self.d_sae)  # drops the pairs ReLU'd away
        local = torch.searchsorted(dead, act.cols)  # dead is ascending (nonzero)
        return AuxKPlan("pairs", act=act, vals=dead_pre[act.rows, local].float())

    def auxk_loss_sparse(self, x: torch.Tensor, pre, x_hat: torch.Tensor, plan: AuxKPlan | None = None) -> torch.Tensor:
        """:meth:`auxk_loss` for the sparse kernels: the same maths, with the work :meth:`auxk_plan`
        chose (``plan``, or planned here from ``pre``)."""
        plan = plan or self.auxk_plan(pre)
        if plan.kind == "none":
            return x.new_zeros((), dtype=torch.float32)
        e = (x - x_hat).detach().float()
        if plan.kind == "constant":
            e_hat = torch.zeros_like(e)
        elif plan.kind == "columns":
            f_aux = topk_relu(gather_columns(x, self, plan.dead_pre, plan.dead, selected=True), plan.k_aux)
            e_hat = (f_aux @ self.W_dec[plan.dead]).float()  # f_aux: [batch, n_dead]
        else:
            e_hat = sparse_decode(gather_pre_acts(x, self, plan.vals, plan.act), self.W_dec, plan.act)
        return self.aux_coeff * (e_hat - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-12)


class SparseKernelsMixin:
    """Training forward pass of the TopK family on :mod:`.kernels` (needs ``AuxKMixin`` and ``SAE``).

    Subclasses implement :meth:`select` (which pairs are active) and set ``kernels``.
    """

    kernels: str = "dense"
    _grad_norms: GradSqNorms | None = None  # the last fused backward's gradient norms (topk, batchtopk on CPU)

    def grad_sq_norms(self) -> dict[torch.Tensor, float]:
        """The fused backward's norms of ``W_enc.grad`` and projected ``W_dec.grad``, while valid
        (:class:`.fused.GradSqNorms`); ``{}`` after a forward that did not run fused."""
        return self._grad_norms.for_params(self.W_enc, self.W_dec) if self._grad_norms is not None else {}

    def _norms_for_step(self) -> GradSqNorms:
        """This SAE's :class:`.fused.GradSqNorms`, reset for a new fused forward; created (hooks registered on
        ``W_enc`` / ``W_dec``) once per pair of parameter objects, e.g. again in a deep copy."""
        tracker = self.__dict__.get("_norms_tracker")
        if tracker is None or not tracker.watches(self.W_enc, self.W_dec):
            tracker = self.__dict__["_norms_tracker"] = GradSqNorms(self.W_enc, self.W_dec)
        tracker.expect()
        return tracker

    def use_sparse(self) -> bool:
        """True when this forward pass should run on the sparse kernels (training mode only)."""
        return self.kernels == "sparse" and self.training

    def select(self, pre: torch.Tensor, group_ends: list[int] | None = None) -> ActiveSet:
        """The pairs of ``pre`` ``[batch, d_sae]`` (no autograd) where ``activation`` is > 0.

        ``group_ends``: Matryoshka prefix ends, passed on to :class:`ActiveSet`.
        """
        raise NotImplementedError

    def sparse_code(self, x: torch.Tensor, group_ends: list[int] | None = None):
        """``(pre, act, vals)``: dense pre-activations (no autograd), active pairs, their fp32 values ``[N]``."""
        with torch.no_grad():
            pre = self.pre_acts(x)  # the one dense matmul (bf16 under autocast)
            act = self.select(pre, group_ends)
        return pre, act, gather_pre_acts(x, self, pre, act)

    def sparse_forward(self, x: torch.Tensor) -> ForwardOutput:
        """:meth:`SAE.forward` with the same losses, computed from the active latents only."""
        pre, act, vals = self.sparse_code(x)
        x_hat = sparse_decode(vals, self.W_dec, act) + self.b_dec
        mse = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        return ForwardOutput(x_hat, None, {"mse": mse, "auxk": self.auxk_loss_sparse(x, pre, x_hat)},
                             active=act, values=vals.detach(), f_dtype=pre.dtype)


class TopKSAE(SparseKernelsMixin, AuxKMixin, SAE):
    """TopK SAE. ``[batch, d_in] -> [batch, d_sae]`` with exactly <= k non-zeros per row.

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        k: active latents per token (default 32).
        aux_k: latents used by AuxK (default ``d_in // 2``).
        aux_coeff: AuxK weight (default 1/32).
        kernels: ``"dense"`` or ``"sparse"`` training kernels (:mod:`.kernels`), same maths;
            None = ``kernels.DEFAULT_KERNELS``.
    """

    arch = "topk"
    # Gradient norm clipped to 1, as dictionary_learning's TopKTrainer does (Gao et al. 2024 do
    # not say). Held-out FVU at L0 32 after 200 steps, d_sae 2048, layer 8: 0.1347 unclipped vs
    # 0.1165 clipped, theirs 0.1179 (bench/vs_dictionary_learning.py --arms topk, 2026-11-22).
    max_grad_norm = 1.0

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, k: int = 32, aux_k: int | None = None,
                 aux_coeff: float = 1 / 32, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        self.k, self.aux_k, self.aux_coeff = k, aux_k or d_in // 2, aux_coeff
        self.kernels = check_kernels(kernels)

    def hparams(self) -> dict:
        """``k``, ``aux_k``, ``aux_coeff``."""
        return {"k": self.k, "aux_k": self.aux_k, "aux_coeff": self.aux_coeff}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU(TopK(pre))."""
        return topk_relu(pre, self.k)

    def select(self, pre: torch.Tensor, group_ends=None) -> ActiveSet:
        """The pairs :func:`topk_relu` keeps non-zero: per-row top-k with a positive value."""
        cols = rowwise_topk_indices(pre, self.k)  # the dense path's exact selection
        values = pre.gather(-1, cols)
        return ActiveSet.from_rowwise(values, cols, pre.shape[1], group_ends)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """:meth:`SAE.forward`, on the sparse kernels when ``kernels="sparse"`` and training."""
        self._grad_norms = None  # only a fused forward's backward computes them (a freed gradient's address may recur)
        return self.sparse_forward(x) if self.use_sparse() else super().forward(x)

    def sparse_forward(self, x: torch.Tensor) -> ForwardOutput:
        """The sparse training forward, fused into two compiled calls on CPU (:mod:`.fused`), else :mod:`.kernels`'."""
        if not fused_available(self, x):
            return super().sparse_forward(x)
        self._grad_norms = self._norms_for_step()
        mm = encoder_mm(x, self)
        plan = self.auxk_plan(ColumnPre(mm, self.b_enc.detach()))  # dead columns' pre, formed only if one is dead
        pairs = AuxKPairs(plan.act, plan.vals, self.aux_coeff) if plan.kind == "pairs" else None  # fused in
        mse, auxk, x_hat, idx, val, mm = fused_topk(x, self, self.k, self._grad_norms, mm=mm, aux=pairs)
        if pairs is None:
            auxk = self.auxk_loss_sparse(x, None, x_hat, plan=plan)
        act = ActiveSet.from_rowwise(val, idx, self.d_sae)
        return ForwardOutput(x_hat, None, {"mse": mse, "auxk": auxk}, active=act,
                             values=val.flatten() if len(act) == val.numel() else val[val > 0],
                             f_dtype=torch.promote_types(mm.dtype, self.b_enc.dtype), sq_error=mse.detach())

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``auxk`` (only while training)."""
        return {"auxk": self.auxk_loss(x, pre, x_hat)} if self.training else {}

    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor]]:
        """``("topk", W_enc/b_enc/W_dec/b_dec)``: SAELens' TopK encodes ``ReLU(TopK(pre))`` as we do (sec. 2.3)."""
        return "topk", self.linear_tensors()


ARCHS = {"topk": ArchInfo(TopKSAE, "Gao et al. 2024, Scaling and evaluating sparse autoencoders, sec. 2.3, app. A.2")}
