"""Adam and AdamW whose fused step never copies a transposed (column-major) parameter.

The SAEs keep ``W_enc`` ``[d_in, d_sae]`` column-major (built as ``W_dec.T``, so each
latent's encoder column is contiguous, the layout the sparse kernels' per-latent gradient
comes out in, :mod:`.kernels`). torch's fused CPU Adam kernel works on contiguous tensors
and otherwise clones the parameter (and its state) into a contiguous copy each step: a
transposed copy of 2.6M floats. Adam is elementwise, so the step computed on the
transposed, contiguous views of the parameter, its gradient and its two moments is the
same update bit for bit; these classes hand the fused kernel those views for the step
and restore the original views after it.

Profile behind it (issue 14; topk, d_in 640, d_sae 4096, batch 1024, sparse kernels, one
thread, idle machine, torch 2.13): ``aten::copy_`` under ``aten::_fused_adam_`` cost
3.1-3.4 ms of a 74.5 ms step; the step fell to 71.1 ms with the views.
"""

from __future__ import annotations

import torch

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _transposable(p: torch.Tensor) -> bool:
    """True for a 2-D parameter stored column-major whose gradient has the same layout."""
    return (p.dim() == 2 and p.grad is not None and not p.is_contiguous() and p.t().is_contiguous()
            and p.grad.stride() == p.stride())


def _transpose_in_place(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Swap each parameter's data, gradient and Adam moments for their transposes (views, no copy)."""
    for p in params:
        p.data = p.data.t()
        p.grad = p.grad.t()
        state = opt.state.get(p, {})
        for key in _MOMENTS:
            if key in state:
                state[key] = state[key].t()


class _ContiguousStep:
    """Mixin: run the parent's ``step`` on contiguous views of column-major parameters."""

    def step(self, closure=None):
        """The parent optimiser's step (same arguments and result), on contiguous views."""
        params = [p for group in self.param_groups for p in group["params"] if _transposable(p)]
        _transpose_in_place(self, params)
        try:
            return super().step(closure)
        finally:
            _transpose_in_place(self, params)


class Adam(_ContiguousStep, torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments) without transposed copies in its fused step."""


class AdamW(_ContiguousStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments) without transposed copies in its fused step."""


__all__ = ["Adam", "AdamW"]


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` bit for bit, minus its no-op multiply on CPU.

    torch multiplies every gradient by ``min(max_norm / (total + 1e-6), 1)`` on every step, to avoid
    a device sync; a multiply by 1.0 changes nothing, and on the CPU reading the norm costs nothing,
    so that pass over all gradients (2.4 ms of a ~50 ms TopK step at d_in 640, d_sae 4096, issue 14's
    profile) runs only when it clips. Elsewhere the call is torch's.

    Args:
        params: iterable of parameters (those without ``.grad`` are skipped, as torch does).
        max_norm: the largest total L2 norm allowed (``inf`` = never clip).
    Returns:
        The total L2 norm of the gradients before clipping (0-dim tensor; non-finite if one is).
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or grads[0].device.type != "cpu":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if bool(max_norm / (total + 1e-6) < 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
