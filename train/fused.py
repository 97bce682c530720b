"""The TopK SAE's training forward and backward fused into two compiled CPU calls (issue 14).

The sparse kernels of :mod:`.kernels` compute a TopK step from the active pairs with stock
ops (``embedding_bag``, gathers, a radix argsort, several autograd nodes); on the CPU their
bookkeeping (pair lists, bias add over ``[batch, d_sae]``, zero-filled gradients) cost about
as much as the sparse maths itself. Here, for the plain ``topk`` SAE on CPU:

* forward (``native.topk_fused_forward``): per row, the top ``k`` of
  ``pre = mm + b_enc`` where ``mm = (x - b_dec) @ W_enc`` is the one dense matmul (bf16 under
  autocast, computed by torch); the sum is formed in fp32 on the fly, exactly as torch's type
  promotion forms the dense path's ``pre``, so the same latents win (ties to the lower
  column, :func:`.native.rowwise_topk_indices`). Then
  ``x_hat = b_dec + sum_t relu(v_t) W_dec[c_t]``, its error ``e = x_hat - x`` with ``||e||^2`` per row
  (the ``mse`` loss term, in the same autograd node) and ``<e, W_dec[c_t]>`` per pair, while the
  row's ``k`` decoder rows are still in cache. ``pre`` is never written out.
* backward (``native.topk_fused_backward``), with ``g = d mse / d x_hat = coef e``:
  ``dv = 1[v > 0] coef <e, W_dec[c]>`` per pair (from the forward), then
  one pass per latent (pairs grouped by a counting sort) writes its rows of ``dW_dec``,
  ``dW_enc^T`` and ``db_enc``, zeros for latents that did not fire, and sums ``W_enc db_enc``
  and the squared norms of both gradients on the way; ``db_dec = sum_b g[b] - W_enc db_enc`` and
  (only if asked) ``dx`` are torch ops. The norms go to a :class:`GradSqNorms` the caller passed, so the
  gradient clip (train/optim.py) needs no pass over the ``[d_sae, d_in]`` gradients.

Same maths as the dense path (Gao et al. 2024, sec. 2.3); tests/test_kernels.py compares
losses and gradients with ``kernels="dense"``. Where the compiled module is missing
(``SAESTRATA_NATIVE=0``, no compiler) or the tensors are not fp32 CPU parameters,
:func:`fused_available` is False and the TopK SAE uses :mod:`.kernels` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .native import load_native


def fused_available(sae, x: torch.Tensor) -> bool:
    """True when :func:`fused_topk` can run: CPU tensors, fp32 parameters, the compiled module built."""
    return (x.device.type == "cpu" and sae.W_enc.dtype == sae.W_dec.dtype == torch.float32
            and load_native() is not None)


class GradSqNorms:
    """Squared L2 norms of ``W_enc.grad`` and of ``W_dec.grad`` projected off ``W_dec``'s (unit) rows, as
    the fused backward computed them, valid while those gradient tensors are the backward's, unchanged.

    ``for_params(W_enc, W_dec)`` returns ``{W_enc: float, W_dec: float}`` (the ``known`` argument of
    :meth:`.optim.Adam.clip_grad_norm_`), or ``{}`` when either ``.grad`` is not the tensor the backward
    returned (autograd copied it) or was changed since (e.g. the AuxK term's gradient added in place:
    its version counter moved); the clip then computes the norms itself.
    """

    def __init__(self):
        self._stamps: list[tuple[int, int, float]] | None = None

    def record(self, d_W_enc: torch.Tensor, d_W_dec: torch.Tensor, sq: torch.Tensor) -> None:
        """Remember the backward's gradients (by storage and version) and ``sq`` fp64 ``[2]`` =
        (projected ``||dW_dec||^2``, ``||dW_enc||^2``)."""
        self._stamps = [(d_W_enc.data_ptr(), d_W_enc._version, float(sq[1])),
                        (d_W_dec.data_ptr(), d_W_dec._version, float(sq[0]))]

    def for_params(self, W_enc: torch.Tensor, W_dec: torch.Tensor) -> dict[torch.Tensor, float]:
        """``{W_enc: ||W_enc.grad||^2, W_dec: ||projected W_dec.grad||^2}`` if still valid, else ``{}``."""
        if self._stamps is None:
            return {}
        known = {}
        for p, (ptr, version, sq) in zip((W_enc, W_dec), self._stamps):
            if p.grad is None or p.grad.data_ptr() != ptr or p.grad._version != version:
                return {}
            known[p] = sq
        return known


class _FusedTopK(torch.autograd.Function):
    """``(mse, x_hat [B, D] fp32, idx long [B, k], val fp32 [B, k])`` from ``mm`` ``[B, L]``; only ``mse``
    (``||x_hat - x||^2`` summed over ``D``, mean over ``B``) carries a gradient, into ``x, b_dec, W_enc,
    b_enc, W_dec`` (module docstring): the loss is part of the fused op, so autograd records one node
    instead of the five of ``(x_hat - x).pow(2).sum(-1).mean()``."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, mm, k, norms):
        """Autograd forward: the compiled top-k of ``mm + b_enc``, the decode, the squared error."""
        mod = load_native()
        xf = x.detach().float()
        with torch.profiler.record_function("saestrata::topk_fused_forward"):  # named in bench/topk_profile.py
            idx, val, x_hat, e, sq, de = mod.topk_fused_forward(mm, b_enc.detach(), k, W_dec.detach(),
                                                                 b_dec.detach(), xf)
        mse = sq.mean()
        ctx.save_for_backward(xf, e, de, b_dec, W_enc, idx, val)
        ctx.x_dtype, ctx.norms = x.dtype, norms
        ctx.mark_non_differentiable(x_hat, idx, val)
        return mse, x_hat, idx, val

    @staticmethod
    def backward(ctx, grad_mse, _grad_x_hat, _grad_idx, _grad_val):
        """Gradients of the inputs that need them; None for ``mm``, ``k`` and ``norms``."""
        xf, e, de, b_dec, W_enc, idx, val = ctx.saved_tensors
        need_x, need_b_dec = ctx.needs_input_grad[:2]
        coef = 2 * float(grad_mse) / xf.shape[0]  # g = d mse / d x_hat = coef e
        with torch.profiler.record_function("saestrata::topk_fused_backward"):
            dv, d_W_enc_t, d_b_enc, d_W_dec, w_db, sq = load_native().topk_fused_backward(
                e, coef, idx, val, de, xf, b_dec.detach(), W_enc.detach().t())
        if ctx.norms is not None:
            ctx.norms.record(d_W_enc_t, d_W_dec, sq)
        d_x = d_b_dec = None
        if need_b_dec:
            d_b_dec = e.sum(0).mul_(coef) - w_db  # w_db = W_enc @ db_enc, formed inside the kernel
        if need_x:  # through the error term and through the encoder
            enc = F.embedding_bag(idx, W_enc.detach().t().contiguous(), mode="sum", per_sample_weights=dv)
            d_x = (enc - e * coef).to(ctx.x_dtype)
        # dW_enc comes out latent-major, the layout of the SAEs' column-major W_enc (train/optim.py)
        return d_x, d_b_dec, d_W_enc_t.t(), d_b_enc, d_W_dec, None, None, None


def fused_topk(x: torch.Tensor, sae, k: int, norms: GradSqNorms | None = None):
    """A TopK SAE's training forward and reconstruction loss: ``(mse, x_hat, idx, val, mm)``.

    Args:
        x: ``[B, d_in]`` inputs (fp32 or bf16) on CPU.
        sae: has fp32 ``b_dec [d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``.
        k: latents kept per row, ``1 <= k <= d_sae``.
        norms: where the backward leaves the gradient norms it computes (:class:`GradSqNorms`), if given.
    Returns:
        ``mse`` fp32 scalar, ``||x_hat - x||^2`` summed over ``d_in`` and averaged over the batch (the
        ``mse`` term of :class:`~.base.ForwardOutput`), differentiable in the SAE's parameters and
        ``x``; ``x_hat`` fp32 ``[B, d_in]`` (no gradient: the loss above is its only differentiable
        use); ``idx`` long ``[B, k]`` (each row's winners, ascending); ``val`` fp32 ``[B, k]`` their
        pre-activations before the ReLU (pairs with ``val <= 0`` add nothing); ``mm`` ``[B, d_sae]``
        the bias-free encoder matmul (autocast's dtype), from which ``mm + b_enc`` gives the dense
        ``pre`` when needed (AuxK).
    Raises:
        RuntimeError: from the compiled module on shape or dtype mismatches (callers check
            :func:`fused_available` first).
    """
    with torch.no_grad():
        mm = (x - sae.b_dec) @ sae.W_enc  # the one dense matmul, in autocast's dtype as in SAE.pre_acts
    mse, x_hat, idx, val = _FusedTopK.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, mm, k, norms)
    return mse, x_hat, idx, val, mm


__all__ = ["GradSqNorms", "fused_available", "fused_topk"]
