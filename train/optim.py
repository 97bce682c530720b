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

:class:`Adam` / :class:`AdamW` also take ``unit_rows`` (an SAE's ``W_dec``): the optimiser then keeps the
unit-norm-row constraint and the gradient clip itself, fused into one compiled pass on the CPU
(:class:`_UnitRowsStep`).
"""

from __future__ import annotations

import math

import torch

from . import native

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


class _UnitRowsStep:
    """Mixin: the optimiser owns a unit-norm-row parameter's constraint and the gradient clip.

    ``unit_rows`` (keyword, default None): a ``[rows, d]`` parameter (an SAE's ``W_dec``) whose gradient
    rows are projected off the rows before the step and whose rows are renormalised after it
    (:meth:`~.base.SAE.remove_parallel_grad` / :meth:`~.base.SAE.normalize_decoder`, Bricken et al. 2023).
    The caller runs :meth:`clip_grad_norm_` after ``backward`` and then :meth:`step`. On the CPU with the
    compiled module, plain Adam (no weight decay, amsgrad or maximize) and fp32 contiguous rows, the
    projection, the clip's multiply, the Adam update and the renormalisation of ``unit_rows`` run in one
    pass (:func:`.native.adam_unit_rows_`), and the other parameters take the clip factor through the
    fused Adam's ``grad_scale`` instead of a multiply over every gradient: two of the TopK step's
    separate passes over ``[d_sae, d_in]`` tensors instead of seven (issue 14). Elsewhere the same
    three operations run unfused, in the trainer's old order. Same maths either way; the fused path's
    ``unit_rows.grad`` keeps the unprojected, unclipped gradient.
    """

    def __init__(self, params, *args, unit_rows: torch.Tensor | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.unit_rows = unit_rows
        self._clip: float | None = None  # the factor clip_grad_norm_ chose for the next fused step
        self._fused_rows = False

    def _fusable(self) -> bool:
        """True when the next step can run the fused unit-row kernel (see the class docstring)."""
        w = self.unit_rows
        # device first: on CUDA, building the CPU kernels (~1 min) inside step 0 would be timed as training
        if w is None or w.grad is None or w.device.type != "cpu" or not native.load_native():
            return False
        group = next(g for g in self.param_groups if any(p is w for p in g["params"]))
        plain = (not group.get("weight_decay") and not group.get("amsgrad") and not group.get("maximize")
                 and group.get("fused") and not isinstance(self, torch.optim.AdamW))
        return bool(plain and native.unit_rows_ready(w, w.grad))

    def clip_grad_norm_(self, max_norm: float, known: dict[torch.Tensor, float] | None = None) -> torch.Tensor:
        """Project ``unit_rows``' gradient, then clip all gradients to total L2 norm ``max_norm``.

        Returns the total norm of the projected gradients before clipping (0-dim; non-finite if one
        is), the value :func:`clip_grad_norm` returns after :func:`.native.remove_parallel_grad_`.
        On the fused path the projection and the clip factor wait for :meth:`step`, and ``known``
        (``{param: squared norm of its .grad}``, ``unit_rows``' of its projected gradient; e.g. from
        :meth:`~.base.SAE.grad_sq_norms`) replaces those parameters' passes over their gradients.
        """
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._clip, self._fused_rows = None, self._fusable()
        if not self._fused_rows:
            if self.unit_rows is not None and self.unit_rows.grad is not None:
                native.remove_parallel_grad_(self.unit_rows.grad, self.unit_rows.detach())
            return clip_grad_norm(params, max_norm)
        w, known = self.unit_rows, known or {}
        others = [p.grad for p in params if p is not w and p not in known]
        norms = [torch.linalg.vector_norm(g, 2.0, dtype=torch.float32) for g in others]
        norms += [torch.tensor(sq, dtype=torch.float64).sqrt().float() for p, sq in known.items() if p is not w]
        sq_w = known[w] if w in known else native.projected_sq_norm(w.grad, w)
        norms.append(torch.as_tensor(sq_w, dtype=torch.float64).sqrt().float())
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        coef = max_norm / (float(total) + 1e-6)  # torch.nn.utils.clip_grads_with_norm_'s factor
        if coef < 1.0:
            self._clip = coef
        return total

    @torch.no_grad()
    def step(self, closure=None):
        """The parent's step for every parameter, ``unit_rows`` included, with the constraint around it.

        Raises:
            RuntimeError: the fused path was chosen by :meth:`clip_grad_norm_` but ``unit_rows`` changed since.
        """
        w = self.unit_rows
        if w is None:
            return super().step(closure)
        if not self._fused_rows:
            loss = super().step(closure)
            native.normalize_rows_(w.data)
            return loss
        self._fused_rows = False
        grad, w.grad = w.grad, None  # the parent's step skips it
        clip, self._clip = self._clip, None
        if clip is not None:
            self.grad_scale = torch.tensor(1.0 / clip)  # fused Adam divides every gradient by it
        try:
            loss = super().step(closure)
        finally:
            self.__dict__.pop("grad_scale", None)
        self._step_unit_rows(w, grad, 1.0 if clip is None else clip)
        w.grad = grad
        return loss

    def _step_unit_rows(self, w: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
        """``unit_rows``' Adam step on the kernel, with torch's state layout (checkpoints are interchangeable)."""
        group = next(g for g in self.param_groups if any(p is w for p in g["params"]))
        state = self.state[w]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        if not native.adam_unit_rows_(w, grad, state["exp_avg"], state["exp_avg_sq"],
                                      step_size=lr / (1 - beta1 ** t), bc2_sqrt=math.sqrt(1 - beta2 ** t),
                                      beta1=beta1, beta2=beta2, eps=group["eps"], grad_scale=scale):
            raise RuntimeError("adam_unit_rows_: the decoder changed between clip_grad_norm_ and step")


class Adam(_UnitRowsStep, _ContiguousStep, torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments, plus ``unit_rows``: :class:`_UnitRowsStep`) without transposed
    copies in its fused step."""


class AdamW(_UnitRowsStep, _ContiguousStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments, plus ``unit_rows``: :class:`_UnitRowsStep`, never fused here:
    decoupled weight decay) without transposed copies in its fused step."""


__all__ = ["Adam", "AdamW", "clip_grad_norm"]


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
