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
  ``x_hat = b_dec + sum_t relu(v_t) W_dec[c_t]``, and the ``mse`` loss term in the same
  autograd node. ``pre`` is never written out.
* backward (``native.topk_fused_backward``), with ``g = d mse / d x_hat``:
  ``dv = 1[v > 0] <g, W_dec[c]>`` per pair, then
  one pass per latent (pairs grouped by a counting sort) writes its rows of ``dW_dec``,
  ``dW_enc^T`` and ``db_enc``, zeros for latents that did not fire, and sums ``W_enc db_enc``
  on the way; ``db_dec = sum_b g[b] - W_enc db_enc`` and (only if asked) ``dx`` are torch ops.

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


class _FusedTopK(torch.autograd.Function):
    """``(mse, x_hat [B, D] fp32, idx long [B, k], val fp32 [B, k])`` from ``mm`` ``[B, L]``; only ``mse``
    (``||x_hat - x||^2`` summed over ``D``, mean over ``B``) carries a gradient, into ``x, b_dec, W_enc,
    b_enc, W_dec`` (module docstring): the loss is part of the fused op, so autograd records one node
    instead of the five of ``(x_hat - x).pow(2).sum(-1).mean()``."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, mm, k):
        """Autograd forward: the compiled top-k of ``mm + b_enc``, the decode, the squared error."""
        mod = load_native()
        with torch.profiler.record_function("saestrata::topk_fused_forward"):  # named in bench/topk_profile.py
            idx, val, x_hat = mod.topk_fused_forward(mm, b_enc.detach(), k, W_dec.detach(), b_dec.detach())
        xf = x.detach().float()
        r = x_hat - xf  # kept for the backward: g is a multiple of it
        # One read of r, row by row (a whole-tensor dot or sum would depend on the thread count).
        mse = torch.linalg.vector_norm(r, 2, dim=-1).square_().mean()
        ctx.save_for_backward(xf, r, b_dec, W_enc, W_dec, idx, val)
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(x_hat, idx, val)
        return mse, x_hat, idx, val

    @staticmethod
    def backward(ctx, grad_mse, _grad_x_hat, _grad_idx, _grad_val):
        """Gradients of the inputs that need them; None for ``mm`` and ``k``."""
        xf, r, b_dec, W_enc, W_dec, idx, val = ctx.saved_tensors
        need_x, need_b_dec = ctx.needs_input_grad[:2]
        g = r * (2 * grad_mse.float() / xf.shape[0])  # d mse / d x_hat
        with torch.profiler.record_function("saestrata::topk_fused_backward"):
            dv, d_W_enc_t, d_b_enc, d_W_dec, w_db = load_native().topk_fused_backward(
                g, idx, val, xf, b_dec.detach(), W_dec.detach(), W_enc.detach().t())
        d_x = d_b_dec = None
        if need_b_dec:
            d_b_dec = g.sum(0) - w_db  # w_db = W_enc @ db_enc, formed inside the kernel
        if need_x:  # through the error term and through the encoder
            enc = F.embedding_bag(idx, W_enc.detach().t().contiguous(), mode="sum", per_sample_weights=dv)
            d_x = (enc - g).to(ctx.x_dtype)
        # dW_enc comes out latent-major, the layout of the SAEs' column-major W_enc (train/optim.py)
        return d_x, d_b_dec, d_W_enc_t.t(), d_b_enc, d_W_dec, None, None


def fused_topk(x: torch.Tensor, sae, k: int):
    """A TopK SAE's training forward and reconstruction loss: ``(mse, x_hat, idx, val, mm)``.

    Args:
        x: ``[B, d_in]`` inputs (fp32 or bf16) on CPU.
        sae: has fp32 ``b_dec [d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``.
        k: latents kept per row, ``1 <= k <= d_sae``.
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
    mse, x_hat, idx, val = _FusedTopK.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, mm, k)
    return mse, x_hat, idx, val, mm


__all__ = ["fused_available", "fused_topk"]
