"""``batchtopk``: BatchTopK SAE with a global inference threshold and the AuxK loss.

Source: Bussmann, Leask, Nanda 2024, "BatchTopK Sparse Autoencoders":
sec. 3, training keeps the ``k * batch`` largest (ReLU'd) pre-activations across
the whole batch instead of ``k`` per token, so the number of active latents varies
per token with an average of ``k``; at inference a single threshold ``theta``
replaces the batch dependence: ``f = ReLU(pre) * H(pre - theta)``, with ``theta``
the expectation over training batches of the smallest kept positive activation.
We estimate that expectation with an exponential running average (rate
``threshold_lr``, 0.01 by default, i.e. ~100-step memory) seeded by the first batch,
so short CPU runs are not dominated by the untrained first steps.
Dead latents get the AuxK loss of Gao et al. 2024, app. A.2 (``AuxKMixin``).

Saving: ``threshold`` is a ``[d_sae]`` buffer holding the global value in every
entry, which is exactly SAELens' JumpReLU ``threshold`` tensor, so a saved
BatchTopK SAE loads in SAELens as ``architecture: "jumprelu"`` with identical
inference behaviour (:meth:`BatchTopKSAE.saelens_export`). Thresholds act on
pre-activations, which :meth:`SAE.fold_input_scale` leaves unchanged, so the
base folding stays correct.

Kernels: ``kernels="sparse"`` trains on the active (row, latent) pairs only, a flat list
whose per-row counts vary (:mod:`.kernels`); same loss and gradients as ``"dense"``. On CPU with
the compiled module the pairs come straight from the encoder matmul
(:func:`.native.batch_topk_pairs`; the fp32 ``[batch, d_sae]`` ``pre`` is never formed) and train in
one fused op (:func:`.fused.fused_pairs`; issue 14).
"""

from __future__ import annotations

import torch

from .arch_info import ArchError, ArchInfo
from .base import SAE, ForwardOutput
from .fused import AuxKPairs, encoder_mm, fused_available, fused_pairs
from .kernels import ActiveSet, ColumnPre, check_kernels
from .native import batch_topk_pairs
from .topk import AuxKMixin, SparseKernelsMixin


def batch_topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k * batch`` largest ReLU'd pre-activations of the whole batch, zero the rest.

    Bussmann et al. 2024, sec. 3 (BatchTopK). ``pre`` is ``[batch, d_sae]`` float;
    returns the same shape and dtype. Non-zeros number ``min(k * batch, #positive)``
    (a kept zero stays zero). Gradients flow to the kept entries only.
    """
    flat = torch.relu(pre).flatten()
    values, indices = top_n(flat, min(k * pre.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)


def top_n(flat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` largest entries of 1-D ``flat`` and their indices (unsorted): ``flat.topk(n)``, faster.

    ``torch.topk`` over a whole batch (4M entries, n = 32,768) takes ~30 ms on this CPU, a
    third of a BatchTopK step. Exact shortcut: take a lower bound ``t`` of the n-th largest
    value from an evenly strided sample (2x oversampled), keep the entries ``>= t`` (about
    ``2n``), check there are at least ``n`` of them, and run ``topk`` on those only
    (~4.4 ms). Every entry larger than the n-th largest is ``>= t``, so the kept values are
    exactly ``flat.topk(n)``'s; only the choice among entries tied with the n-th largest
    may differ, which ``topk`` leaves unspecified too. Falls back to ``flat.topk`` when the
    check fails or ``n`` is over about an eighth of the entries. The stride is odd so that on a
    flattened ``[batch, 2^j]`` code the sample covers every latent.
    """
    stride = (flat.numel() // (2 * n)) | 1
    if stride >= 5:
        sample = flat[::stride]
        m = max(1, min(sample.numel(), (2 * n) // stride))
        bound = sample.topk(m, sorted=False).values.min()
        candidates = (flat >= bound).nonzero().squeeze(1)
        if candidates.numel() >= n:
            values, picked = flat[candidates].topk(n, sorted=False)
            return values, candidates[picked]
    return flat.topk(n, sorted=False)


def threshold_relu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU inference: ``ReLU(pre) * (pre > threshold)``, SAELens' JumpReLU encode rule.

    ``pre`` ``[batch, d_sae]``; ``threshold`` ``[d_sae]`` (or broadcastable), same units
    as ``pre``. Returns ``[batch, d_sae]`` in ``pre``'s dtype.
    """
    return torch.relu(pre) * (pre > threshold).to(pre.dtype)


class BatchTopKSAE(SparseKernelsMixin, AuxKMixin, SAE):
    """BatchTopK SAE: ``k * batch`` active latents per training batch, a global threshold in eval.

    ``[batch, d_in] -> [batch, d_sae]``. Training mode uses :func:`batch_topk_relu`;
    eval mode uses :func:`threshold_relu` with the ``threshold`` buffer (``[d_sae]``,
    all entries equal; 0 until the first training batch, i.e. plain ReLU).

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        k: mean active latents per token in training (default 32).
        aux_k: latents used by AuxK (default ``d_in // 2``, Gao et al. 2024 app. A.2).
        aux_coeff: AuxK weight (default 1/32).
        threshold_lr: rate of the running average of the threshold, in (0, 1].
        kernels: ``"dense"`` or ``"sparse"`` training kernels (:mod:`.kernels`), same maths;
            None = ``kernels.DEFAULT_KERNELS``.

    Raises:
        ArchError: ``k`` outside ``[1, d_sae]``, ``threshold_lr`` outside ``(0, 1]`` or unknown ``kernels``.
    """

    arch = "batchtopk"
    # Gradient norm clipped to 1, as the reference BatchTopK / Matryoshka trainers do
    # (saprmarks/dictionary_learning). With Adam's slow second moment (beta2 0.999) the
    # huge early gradients otherwise shrink every later step: held-out FVU at L0 32 after
    # 200 steps 0.158 unclipped vs 0.118 clipped (bench/vs_dictionary_learning.py).
    max_grad_norm = 1.0

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, k: int = 32, aux_k: int | None = None,
                 aux_coeff: float = 1 / 32, threshold_lr: float = 0.01, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        _check_batchtopk_args(k, d_sae, threshold_lr)
        self.kernels = check_kernels(kernels)
        self.k, self.aux_k, self.aux_coeff = k, aux_k or d_in // 2, aux_coeff
        self.threshold_lr = threshold_lr
        self.register_buffer("threshold", torch.zeros(d_sae))

    def hparams(self) -> dict:
        """``k``, ``aux_k``, ``aux_coeff``, ``threshold_lr``."""
        return {"k": self.k, "aux_k": self.aux_k, "aux_coeff": self.aux_coeff, "threshold_lr": self.threshold_lr}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """BatchTopK while training, the global JumpReLU threshold in eval; ``[batch, d_sae]``."""
        if self.training:
            return batch_topk_relu(pre, self.k)
        return threshold_relu(pre, self.threshold)

    def select(self, pre: torch.Tensor, group_ends=None) -> ActiveSet:
        """The pairs :func:`batch_topk_relu` keeps non-zero, as a flat list (per-row counts vary)."""
        flat = torch.relu(pre).flatten()
        values, indices = top_n(flat, min(self.k * pre.shape[0], flat.numel()))  # the dense path's call
        d_sae = pre.shape[1]
        return ActiveSet.from_values(values, indices // d_sae, indices % d_sae, *pre.shape, group_ends)

    def _matmul_pairs(self, x: torch.Tensor, group_ends: list[int] | None = None):
        """``(pre, act, vals)``: :func:`.native.batch_topk_pairs` on the encoder matmul (no autograd), ``pre`` a
        :class:`.kernels.ColumnPre` (it forms only the columns AuxK asks for), ``vals`` fp32 ``[N]`` detached."""
        mm = encoder_mm(x, self)
        b_enc = self.b_enc.detach()
        rows, cols, vals = batch_topk_pairs(mm, b_enc, min(self.k * mm.shape[0], mm.numel()))
        return ColumnPre(mm, b_enc), ActiveSet(rows, cols, *mm.shape, group_ends), vals  # row-sorted: no sort

    def sparse_forward(self, x: torch.Tensor) -> ForwardOutput:
        """The sparse training forward; on CPU with the compiled module one fused op on the selected pairs
        (:func:`.fused.fused_pairs`: decode, loss, AuxK's pairs, and a latent-grouped backward that hands the
        clip its gradient norms), else :mod:`.kernels`' (same maths)."""
        self._grad_norms = None
        if not fused_available(self, x):
            return super().sparse_forward(x)
        pre, act, vals, mse, auxk, x_hat = self._fused_step(x, fused_pairs)
        return ForwardOutput(x_hat, None, {"mse": mse, "auxk": auxk}, active=act, values=vals, f_dtype=pre.dtype,
                             sq_error=mse.detach())

    def _fused_step(self, x: torch.Tensor, fused_op, group_ends: list[int] | None = None):
        """The pairs of :meth:`_matmul_pairs`, AuxK planned on the dead columns (its few positive pairs handed to
        the op, else its term computed beside it), then ``fused_op(x, self, act, vals, norms, aux=)``
        (:func:`.fused.fused_pairs` / :func:`.fused.fused_nested`), whose backward leaves the clip's norms in
        ``self._grad_norms``. Returns ``(pre, act, vals, loss, auxk, x_hat)``, ``loss`` the op's first output."""
        pre, act, vals = self._matmul_pairs(x, group_ends)
        plan = self.auxk_plan(pre)
        pairs = AuxKPairs(plan.act, plan.vals, self.aux_coeff) if plan.kind == "pairs" else None  # fused in
        self._grad_norms = self._norms_for_step()
        loss, auxk, x_hat = fused_op(x, self, act, vals, self._grad_norms, aux=pairs)
        if pairs is None:
            auxk = self.auxk_loss_sparse(x, None, x_hat, plan=plan)
        return pre, act, vals, loss, auxk, x_hat

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """:meth:`SAE.forward`, on the sparse kernels when ``kernels="sparse"`` and training."""
        self._grad_norms = None  # only a fused forward's backward computes them (a freed gradient's address may recur)
        return self.sparse_forward(x) if self.use_sparse() else super().forward(x)

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``auxk`` (only while training)."""
        return {"auxk": self.auxk_loss(x, pre, x_hat)} if self.training else {}

    @torch.no_grad()
    def update_firing(self, out: ForwardOutput | torch.Tensor) -> None:
        """Dead-latent tracking plus the threshold's running average (training batches only).

        ``out``: a training-mode forward's :class:`ForwardOutput` or its latents ``f`` ``[batch, d_sae]``.
        """
        out = out if isinstance(out, ForwardOutput) else ForwardOutput(None, out)
        super().update_firing(out)
        if self.training:
            self.update_threshold(out)

    @torch.no_grad()
    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor]]:
        """``("jumprelu", linear tensors + threshold [d_sae])``: eval mode is JumpReLU with the global threshold.

        Exact for eval mode only (training mode's batch-wide top-k has no SAELens form);
        :class:`~.matryoshka.MatryoshkaSAE` inherits this (its prefixes only shape the loss).
        """
        return "jumprelu", {**self.linear_tensors(), "threshold": self.threshold.detach().float().cpu().clone()}

    @torch.no_grad()
    def update_threshold(self, out: ForwardOutput) -> None:
        """Move ``threshold`` towards the batch's smallest positive activation (Bussmann et al. 2024, sec. 3).

        The first observation sets it directly (a zero threshold means "not yet seen").
        A batch without positive entries leaves it unchanged.
        """
        observed = out.min_active()
        if observed is None:
            return
        current = self.threshold[0]
        new = observed if current <= 0 else current + self.threshold_lr * (observed - current)
        self.threshold.fill_(float(new))


def _check_batchtopk_args(k: int, d_sae: int, threshold_lr: float) -> None:
    """Raise ``ArchError`` for a ``k`` or ``threshold_lr`` the method cannot use."""
    if not 1 <= k <= d_sae:
        raise ArchError(f"k={k} must be between 1 and d_sae={d_sae}")
    if not 0 < threshold_lr <= 1:
        raise ArchError(f"threshold_lr={threshold_lr} must be in (0, 1]")


ARCHS = {"batchtopk": ArchInfo(BatchTopKSAE, "Bussmann, Leask, Nanda 2024, BatchTopK Sparse Autoencoders, sec. 3")}
