"""The co-activation Gram ``f^T f`` of a sparse code, from its non-zeros (issue 14).

Seed 001's orthogonality (Eq. 4: ``||h_gi^T h_gj||_F`` between latent groups, ``train/seed001_grouped.py``) and
seed 000's disentanglement (eq. 4: ``||G1 * G2||_F^2`` with ``G = Z^T Z / B``, ``train/seed000_hsae.py``) need the
``[d_sae, d_sae]`` Gram of a batch's code. A dense ``f^T f`` costs ``batch * d_sae^2`` multiply-adds forward and
twice that backward (``f @ (dG + dG^T)``): at batch 1024, d_sae 2048 about 13 GFLOP a step, most of a seed 001 step
on the CPU. But a ReLU code at L0 ~30 has ~30 non-zeros a row, and ``G[p, q] = sum_b f[b, p] f[b, q]`` needs only
products of two non-zeros of one row: ``sum_b n_b^2`` of them (~0.9M here, ~5,000x fewer). Backward,
``dL/df[b, p] = sum_q (dG[p, q] + dG[q, p]) f[b, q]`` at the non-zeros only: where ``f == 0`` the dense product
gives a gradient too, which the ReLU behind ``f`` (the only activation of these archs) sets to zero; so callers
must pass a ReLU-type code (``f = 0`` exactly where its gradient is not wanted).

:func:`coactivation_gram` runs the compiled kernels (``code_gram`` / ``code_gram_backward`` of
``csrc/native.cpp``) for an fp32 CPU code with at most ``batch * d_sae^2 /`` :data:`RATIO` products, and the dense
matmul otherwise: a run's first steps (L0 ~d_sae / 2), CUDA (where the matmul is fast), bf16 under autocast (whose dense Gram is a
bf16 matmul: the kernel would change its numerics), no compiler. Same maths as the dense product, summed in
another order (fp32 rounding; tests/test_sparse_gram.py compares both, values and gradients).
"""

from __future__ import annotations

import torch

from .native import load_native

# The kernel runs when its products are at most 1/RATIO of the dense matmul's multiply-adds (B d_sae^2).
# `bench/sparse_gram.py --breakeven` (twenty-ninth session, Intel Xeon with AMX, 2 threads, fp32, forward + backward,
# B 1024, d_sae 128-2048; docs/results/bench/sparse_gram_breakeven_2026-12-06.txt): the kernel is 2.3-7.6x faster
# than the matmul at B d^2 / products ~5,500-9,300 (L0 1% of d_sae), 1.5-2.8x at ~340-385 (5%), 0.5-0.8x at ~42-44
# (15%), 0.1-0.3x at ~11 (30%). A run's first steps (L0 ~d_sae / 2) take the matmul.
RATIO = 100


class _CodeGram(torch.autograd.Function):
    """``f^T f`` from the kernel's ``(gram, crow, cols, vals)``; backward: ``df`` at the non-zeros only."""

    @staticmethod
    def forward(ctx, f, gram, crow, cols, vals):
        """``gram`` (fp32 ``[d_sae, d_sae]``, computed by ``code_gram`` from ``f [B, d_sae]``) as ``f``'s function;
        keeps the code's CSR (``crow`` long ``[B + 1]``, ``cols`` long ``[N]``, ``vals`` fp32 ``[N]``)."""
        ctx.save_for_backward(crow, cols, vals)
        return gram

    @staticmethod
    def backward(ctx, grad):
        """``dL/df`` fp32 ``[B, d_sae]`` from ``grad = dL/dG`` ``[d_sae, d_sae]``: ``sum_q (grad[p, q] + grad[q, p])
        f[b, q]`` at ``f``'s non-zeros, 0 elsewhere (``code_gram_backward``); no gradient for the other inputs."""
        crow, cols, vals = ctx.saved_tensors
        return load_native().code_gram_backward(grad.float(), crow, cols, vals), None, None, None, None


def coactivation_gram(f: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """``f^T f``: fp32 ``[d_sae, d_sae]`` (not divided by the batch) of a ReLU-type code ``f [batch, d_sae]``.

    From the code's non-zeros (module docstring) for an fp32 CPU code of at most ``batch * d_sae^2 /`` :data:`RATIO`
    products when the compiled module is built; else ``(f.T @ f).float()``. ``stats``: a dict whose ``"sparse_gram"`` count is
    raised by one when the non-zeros path ran (the arch's counter, so a log shows which path a step took).
    """
    out = _on_nonzeros(f, stats, lambda mod, code, budget: mod.code_gram(code, budget))
    return _CodeGram.apply(f, *out) if out else (f.T @ f).float()


def _on_nonzeros(f: torch.Tensor, stats: dict | None, kernel):
    """``kernel(native module, f detached contiguous, pair budget)``'s outputs for an fp32 2-D CPU code ``f`` when the
    compiled module is built and the code's products fit ``batch * d_sae^2 /`` :data:`RATIO` (counted in
    ``stats["sparse_gram"]``), else None (the caller's dense matmul)."""
    mod = load_native() if f.device.type == "cpu" and f.dtype == torch.float32 and f.dim() == 2 else None
    if mod is None:
        return None
    with torch.profiler.record_function("saestrata::code_gram"):
        out = kernel(mod, f.detach().contiguous(), f.shape[0] * f.shape[1] ** 2 // RATIO)
    if not out:
        return None
    if stats is not None:
        stats["sparse_gram"] = stats.get("sparse_gram", 0) + 1
    return out


class _CodeGramSq(torch.autograd.Function):
    """``(f^T f / divisor)^2`` from the kernel's ``(gram, crow, cols, vals, sq)``; backward: ``df`` at the non-zeros,
    the square's and the division's gradients formed only at the entries those read (``code_gram_sq_backward``)."""

    @staticmethod
    def forward(ctx, f, gram, crow, cols, vals, sq, divisor):
        """``sq`` (fp32 ``[d_sae, d_sae]``, ``code_gram_sq``'s) as ``f``'s function; keeps ``gram`` and the code's CSR."""
        ctx.save_for_backward(gram, crow, cols, vals)
        ctx.divisor = divisor
        return sq

    @staticmethod
    def backward(ctx, grad):
        """``dL/df`` fp32 ``[B, d_sae]`` at ``f``'s non-zeros from ``grad = dL/d sq``; no gradient for the rest."""
        gram, crow, cols, vals = ctx.saved_tensors
        d_f = load_native().code_gram_sq_backward(grad.float(), gram, ctx.divisor, crow, cols, vals)
        return d_f, None, None, None, None, None, None


def coactivation_gram_sq(f: torch.Tensor, divisor: float, stats: dict | None = None) -> torch.Tensor:
    """``(f^T f / divisor)^2`` elementwise: fp32 ``[d_sae, d_sae]`` of a ReLU-type code ``f [batch, d_sae]``, ``divisor`` > 0
    (seed 001's Eq. 4 reads the squared batch-mean Gram only).

    Where :func:`coactivation_gram` takes the non-zeros path, the kernel squares each row of the Gram as it finishes
    it and the backward forms the square's and division's gradients only at the entries the non-zeros read, instead
    of torch's two passes over ``[d_sae, d_sae]`` forward and three backward (seed001_dynamic_hier at step 600 of its
    benchmark run, d_sae 2048: 56.9 -> 54.4 ms a step, 31st session; the kernel's own square and two-tensor
    backward give back part of the ~1.3 ms a pass saved). Values and gradients as ``(coactivation_gram(f) / divisor).pow(2)``
    computes them (tests/test_sparse_gram.py); that expression otherwise. ``stats`` as there.
    """
    out = _on_nonzeros(f, stats, lambda mod, code, budget: mod.code_gram_sq(code, budget, float(divisor)))
    return _CodeGramSq.apply(f, *out, float(divisor)) if out else ((f.T @ f).float() / divisor).pow(2)


__all__ = ["RATIO", "coactivation_gram", "coactivation_gram_sq"]
