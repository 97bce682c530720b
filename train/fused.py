"""The TopK family's training forward and backward fused into compiled CPU calls (issue 14).

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
* AuxK (Gao et al. 2024, app. A.2), when its few positive (token, dead latent) pairs are handed in
  (:class:`AuxKPairs`, picked by ``native.auxk_select``; the usual case once latents die): its decode and loss
  in the same node (``native.auxk_forward``, only the rows with pairs), and in the backward its gradients added
  to the touched latents' rows of the gradients above, with their squared norms corrected
  (``native.auxk_backward_``), instead of a second autograd graph whose ``[d_sae, d_in]`` gradients would be
  accumulated into these and would invalidate the norms (``bench/topk_auxk.py``).

BatchTopK and Matryoshka (Bussmann et al. 2024 sec. 3; 2025 sec. 3) select their pairs batch-wide
(:func:`.native.batch_topk_pairs`, per-row counts vary) and then run the same op on them:
:func:`fused_pairs` (``native.pairs_fused_forward``: the decode and error terms without the selection;
``native.pairs_fused_backward``: the latent-grouped backward with each pair's row given) and, for
Matryoshka's nested losses, :func:`fused_nested` (every prefix's running error, their suffix sums and the
pairs' ``<S, W_dec[c]>`` per row, ``native.nested_fused_forward``; then the same latent-grouped backward
reading each pair's (row, group) bag).

The ``standard`` ReLU SAE (Conerly et al. 2024) runs :func:`fused_pairs_l1` on its positive pre-activations
once they are sparse enough (:mod:`.standard`): the same op with a per-latent weighted L1, whose gradient is
added to the pairs' ``dv`` inside the compiled backward (``pairs_fused_backward``'s ``dv_add``).

Same maths as the dense path (Gao et al. 2024, sec. 2.3); tests/test_kernels.py compares
losses and gradients with ``kernels="dense"``. Where the compiled module is missing
(``SAESTRATA_NATIVE=0``, no compiler) or the tensors are not fp32 CPU parameters,
:func:`fused_available` is False and the three SAEs use :mod:`.kernels` instead.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kernels import ActiveSet
from .native import load_native


def fused_available(sae, x: torch.Tensor) -> bool:
    """True when :func:`fused_topk` can run: CPU tensors, fp32 parameters, the compiled module built."""
    return (x.device.type == "cpu" and sae.W_enc.dtype == sae.W_dec.dtype == torch.float32
            and load_native() is not None)


class GradSqNorms:
    """Squared L2 norms of ``W_enc.grad`` and of ``W_dec.grad`` projected off ``W_dec``'s (unit) rows, as
    the fused backward computed them, valid while those gradients hold exactly the backward's values.

    ``for_params(W_enc, W_dec)`` returns ``{W_enc: float, W_dec: float}`` (the ``known`` argument of
    :meth:`.optim.Adam.clip_grad_norm_`), or ``{}`` when either ``.grad`` is not the backward's alone: another
    term's gradient summed in (a dense AuxK), ``.grad`` not empty before the backward, or changed since; the
    clip then computes the norms itself, in its own (last-bit different) arithmetic.

    Which of the two the clip takes must not depend on anything but the step's maths. It did: validity was the
    ``.grad`` tensor's address, and autograd stores the backward's tensor as ``.grad`` only when nothing else
    holds a reference to it, else a copy. A thread sampling ``sys._current_frames()`` (dask's worker profiler,
    every 10 ms) keeps the backward's frame, and its locals, alive for a moment, so on a dask worker some steps
    lost the norms at random and the SAE differed in the last bits from a one-process run (the flaky
    tests/test_train_distributed.py of the 32nd session; tests/test_kernels.py forces the copy by holding the
    gradients). So the two parameters carry hooks, registered once (:meth:`watches` says for which parameters):
    a pre-hook checks that the gradient arriving at ``.grad`` is the backward's own tensor (not summed with
    another) and ``.grad`` empty, and a post-accumulate hook stamps the ``.grad`` it became, the tensor or its
    copy; ``for_params`` checks that stamp (address and version counter).

    Raises: nothing; a parameter without the hooks only loses the norms (the clip computes them).
    """

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor):
        self._params = (weakref.ref(W_enc), weakref.ref(W_dec))  # weak: the hooks on them hold this tracker
        for i, p in enumerate((W_enc, W_dec)):
            p.register_hook(functools.partial(self._arrive, i))
            p.register_post_accumulate_grad_hook(functools.partial(self._accumulated, i))
        self.expect()

    def watches(self, W_enc: torch.Tensor, W_dec: torch.Tensor) -> bool:
        """True when this tracker's hooks sit on these two parameter objects."""
        return self._params[0]() is W_enc and self._params[1]() is W_dec

    def __deepcopy__(self, memo) -> None:
        """None: a deep-copied SAE's parameters are new objects without these hooks (torch does not copy
        them); its next fused forward makes its own tracker."""
        return None

    def expect(self) -> None:
        """A new fused forward: forget the last backward's norms."""
        self._produced: list[tuple[int, int, float]] | None = None
        self._arrived = [False, False]
        self._stamps: list[tuple[int, int] | None] = [None, None]

    def record(self, d_W_enc: torch.Tensor, d_W_dec: torch.Tensor, sq: torch.Tensor) -> None:
        """Remember the backward's gradients (by storage and version) and ``sq`` fp64 ``[2]`` =
        (projected ``||dW_dec||^2``, ``||dW_enc||^2``)."""
        self._produced = [(d_W_enc.data_ptr(), d_W_enc._version, float(sq[1])),
                          (d_W_dec.data_ptr(), d_W_dec._version, float(sq[0]))]

    def _arrive(self, i: int, grad: torch.Tensor) -> None:
        """Pre-accumulate hook of parameter ``i``: ``grad`` (all terms summed) is the backward's own tensor and
        ``.grad`` is empty, so ``.grad`` will hold exactly the backward's values."""
        p = self._params[i]()
        self._arrived[i] = (self._produced is not None and p is not None and p.grad is None
                            and (grad.data_ptr(), grad._version) == self._produced[i][:2])

    def _accumulated(self, i: int, p: torch.Tensor) -> None:
        """Post-accumulate hook: stamp the ``.grad`` that holds the backward's values (its tensor or a copy)."""
        self._stamps[i] = (p.grad.data_ptr(), p.grad._version) if self._arrived[i] and p.grad is not None else None
        self._arrived[i] = False

    def for_params(self, W_enc: torch.Tensor, W_dec: torch.Tensor) -> dict[torch.Tensor, float]:
        """``{W_enc: ||W_enc.grad||^2, W_dec: ||projected W_dec.grad||^2}`` if still valid, else ``{}``."""
        if self._produced is None or not self.watches(W_enc, W_dec):
            return {}
        known = {}
        for p, stamp, (_, _, sq) in zip((W_enc, W_dec), self._stamps, self._produced):
            if stamp is None or p.grad is None or (p.grad.data_ptr(), p.grad._version) != stamp:
                return {}
            known[p] = sq
        return known


class AuxKPairs(NamedTuple):
    """An AuxK term on few (token, dead latent) pairs (:meth:`.topk.AuxKMixin.auxk_plan`) for :func:`fused_topk`.

    ``act``: the pairs (:class:`.kernels.ActiveSet`, ``N`` pairs, rows ``B``, latents ``d_sae``); ``vals`` fp32
    ``[N]`` their pre-activations, all > 0 (ReLU'd pairs are left out); ``coeff`` AuxK's weight.
    """

    act: ActiveSet
    vals: torch.Tensor
    coeff: float


class JumpWindow(NamedTuple):
    """The (token, latent) entries inside JumpReLU's straight-through window (Rajamanoharan et al. 2024, sec. 4:
    ``|z - theta| < bandwidth / 2``, active or not) for :func:`fused_pairs_jump`: ``rows`` / ``cols`` long ``[M]``;
    ``bandwidth`` epsilon in pre-activation units."""

    rows: torch.Tensor
    cols: torch.Tensor
    bandwidth: float


def _aux_forward(aux: "AuxKPairs | None", W_dec: torch.Tensor, e: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """AuxK's loss on given pairs (fp32 scalar): ``coeff mean_b ||e_hat - (x - x_hat)||^2 / mse`` with ``e_hat`` the
    pairs' decode of the residual ``x - x_hat = -e`` (``e`` fp32 ``[B, D]``, rows may be strided) and ``mse`` =
    ``mean_b ||e||^2``; only the rows with pairs are visited (``native.auxk_forward``). 0 without ``aux``."""
    if aux is None:
        return mse.new_zeros(())
    delta = load_native().auxk_forward(aux.act.row_crow, aux.act.cols, aux.vals, W_dec.detach(), e)
    mean_sq = (mse.double() + delta / e.shape[0]).float()
    return aux.coeff * mean_sq / mse.clamp_min(1e-12)


def _fused_grads(ctx, grad_aux, native_out, e, coef, xf, b_dec, W_enc, W_dec, idx, dx_offsets, aux_e, mse):
    """The backward tail all fused ops share: ``(d_x, d_b_dec, d_W_enc, d_b_enc, d_W_dec)`` from the compiled
    latent-grouped kernel's ``native_out`` ``(dv, dW_enc^T, db_enc, dW_dec, W_enc db_enc, sq)``, with AuxK's
    pairs added and the gradient norms recorded for the clip.

    ``coef e`` fp32 ``[B, D]`` is ``d loss / d x_hat`` (the gradient every reconstruction passes to ``b_dec``
    and, negated, to ``x``); ``idx`` the pairs' latents, ``[B, k]`` (``dx_offsets`` None) or ``[N]`` with the
    ``embedding_bag`` offsets of each row; ``aux_e`` / ``mse`` AuxK's residual and its mean squared norm as
    :func:`_aux_forward` had them.
    """
    dv, d_W_enc_t, d_b_enc, d_W_dec, w_db, sq = native_out
    need_x, need_b_dec = ctx.needs_input_grad[:2]
    d_x = d_b_dec = None
    if need_b_dec:
        d_b_dec = e.sum(0).mul_(coef) - w_db  # w_db = W_enc @ db_enc, formed inside the kernel
    if need_x:  # through the error term and through the encoder
        enc = F.embedding_bag(idx, W_enc.detach().t().contiguous(), dx_offsets, mode="sum", per_sample_weights=dv)
        d_x = enc - e * coef
    aux_scale = float(grad_aux) * 2 * ctx.aux.coeff / (xf.shape[0] * float(mse.clamp_min(1e-12))) \
        if ctx.aux is not None else 0.0
    if aux_scale != 0.0:  # d aux / d e_hat = aux_scale (e + e_hat); its pairs' gradients added in place
        act = ctx.aux.act
        w_db_aux = load_native().auxk_backward_(
            act.row_crow, act.cols, ctx.aux.vals, W_dec.detach(), aux_e, aux_scale, xf.contiguous(),
            b_dec.detach().contiguous(), W_enc.detach().t().contiguous(), d_W_dec, d_W_enc_t, d_b_enc, sq,
            d_x if d_x is not None else xf.new_empty(0))
        d_b_dec = d_b_dec - w_db_aux if d_b_dec is not None else None
    if d_x is not None:
        d_x = d_x.to(ctx.x_dtype)
    if ctx.norms is not None:
        ctx.norms.record(d_W_enc_t, d_W_dec, sq)
    # dW_enc comes out latent-major, the layout of the SAEs' column-major W_enc (train/optim.py)
    return d_x, d_b_dec, d_W_enc_t.t(), d_b_enc, d_W_dec


class _FusedTopK(torch.autograd.Function):
    """``(mse, aux, x_hat [B, D] fp32, idx long [B, k], val fp32 [B, k])`` from ``mm`` ``[B, L]``; ``mse``
    (``||x_hat - x||^2`` summed over ``D``, mean over ``B``) and ``aux`` (AuxK on given pairs, or 0) carry
    gradients, into ``x, b_dec, W_enc, b_enc, W_dec`` (module docstring): the losses are part of the fused
    op, so autograd records one node instead of the five of ``(x_hat - x).pow(2).sum(-1).mean()``, and the
    AuxK pairs' gradients are added to the rows of the backward's own gradients (no ``[L, D]`` temporaries)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, mm, k, norms, aux):
        """Autograd forward: the compiled top-k of ``mm + b_enc``, the decode, the squared error, AuxK."""
        mod = load_native()
        xf = x.detach().float()
        with torch.profiler.record_function("saestrata::topk_fused_forward"):  # named in bench/topk_profile.py
            idx, val, x_hat, e, sq, de = mod.topk_fused_forward(mm, b_enc.detach(), k, W_dec.detach(),
                                                                 b_dec.detach(), xf)
        mse = sq.mean()
        aux_loss = _aux_forward(aux, W_dec, e, mse)
        ctx.save_for_backward(xf, e, de, b_dec, W_enc, W_dec, idx, val, mse)
        ctx.x_dtype, ctx.norms, ctx.aux = x.dtype, norms, aux
        ctx.mark_non_differentiable(x_hat, idx, val)
        return mse, aux_loss, x_hat, idx, val

    @staticmethod
    def backward(ctx, grad_mse, grad_aux, _grad_x_hat, _grad_idx, _grad_val):
        """Gradients of the inputs that need them; None for ``mm``, ``k``, ``norms`` and ``aux``."""
        xf, e, de, b_dec, W_enc, W_dec, idx, val, mse = ctx.saved_tensors
        coef = 2 * float(grad_mse) / xf.shape[0]  # g = d mse / d x_hat = coef e
        with torch.profiler.record_function("saestrata::topk_fused_backward"):  # named in bench/topk_profile.py
            out = load_native().topk_fused_backward(e, coef, idx, val, de, xf, b_dec.detach(), W_enc.detach().t())
        grads = _fused_grads(ctx, grad_aux, out, e, coef, xf, b_dec, W_enc, W_dec, idx, None, e, mse)
        return *grads, None, None, None, None


class _FusedPairs(torch.autograd.Function):
    """:class:`_FusedTopK` on pairs selected elsewhere (BatchTopK: per-row counts vary): ``(mse, aux, pen, x_hat)``
    from the row-sorted pairs ``act`` (:class:`.kernels.ActiveSet`) and their pre-activations ``vals`` fp32
    ``[N]`` (``mm + b_enc`` at the pairs, no autograd); same losses and gradients as :class:`_FusedTopK`'s.

    Optional terms of the dense ReLU-type SAEs (their pairs' values are all > 0):

    * ``pen_w`` (fp32 ``[L]``, may carry a gradient): per-latent weights of a penalty linear in the activations,
      ``pen = mean_b sum_i f_i pen_w[i]`` (the standard SAE's decoder-norm-weighted L1); its gradient reaches the
      pairs' pre-activations inside the compiled backward (added to their ``dv``, so the encoder gradients come
      from the same latent-grouped pass) and ``pen_w`` as the latent's activations summed, over ``B``. 0 without it.
    * ``gain`` (fp32 ``[L]``, > 0, may carry a gradient): the activations are ``f = pre * gain[i]`` at the pairs
      (seed 000's importance masks, ``ReLU(pre) * sigmoid(importance)``); ``d loss / d pre = gain d loss / d f``
      (the forward's ``<e, W_dec[i]>`` and the penalty's add scaled by it) and ``d loss / d gain[i]`` = the latent's
      ``sum_b pre d loss / d f``.
    * ``theta`` (fp32 ``[L]``, may carry a gradient) with ``window`` (:class:`JumpWindow`): JumpReLU's thresholds;
      the decode is ``f = z H(z - theta)`` of the pairs (all above theta), and ``theta`` gets the reconstruction's
      pseudo-derivative ``sum_b -(theta / eps) K((z - theta) / eps) d loss / d f`` (sec. 4, rectangle ``K``) over
      the window's entries, whose ``d loss / d f = coef <e, W_dec[i]>`` are formed only there.
    * ``code`` (True): a fifth output, the code ``f`` as a dense fp32 ``[B, L]`` tensor (zero off the pairs) that
      carries a gradient, for penalties that are not linear in the activations (seed 001's Eq. 4 Gram, its
      entropy weights and InfoNCE, :class:`.relu_pairs.DenseCodePairsMixin`); its gradient at the pairs joins the
      pairs' ``dv`` inside the compiled backward like ``pen_w``'s (off the pairs it is dropped: there the dense
      step's ReLU passes none)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, act, vals, norms, aux, pen_w, theta, window, gain, code=False):
        """Autograd forward: the decode, the squared error, AuxK and the linear penalty of the given pairs (and
        the dense code when ``code``)."""
        mod = load_native()
        xf = x.detach().float()
        f = vals if gain is None else vals * gain.detach().float()[act.cols]
        with torch.profiler.record_function("saestrata::topk_fused_forward"):
            x_hat, e, sq, de = mod.pairs_fused_forward(act.row_crow, act.cols, f, W_dec.detach(), b_dec.detach(), xf)
        mse = sq.mean()
        aux_loss = _aux_forward(aux, W_dec, e, mse)
        pen = mse.new_zeros(()) if pen_w is None else pen_w.detach().float()[act.cols].dot(f) / xf.shape[0]
        ctx.save_for_backward(xf, e, de, b_dec, W_enc, W_dec, vals, f, mse, pen_w, theta, gain)
        ctx.x_dtype, ctx.norms, ctx.aux, ctx.act, ctx.window = x.dtype, norms, aux, act, window
        ctx.mark_non_differentiable(x_hat)
        if not code:
            return mse, aux_loss, pen, x_hat
        return mse, aux_loss, pen, x_hat, act.to_dense(f, torch.float32)

    @staticmethod
    def backward(ctx, grad_mse, grad_aux, grad_pen, _grad_x_hat, *grad_code):
        """Gradients of the inputs that need them; None for ``act``, ``vals``, ``norms``, ``aux``, ``window`` and
        ``code``."""
        xf, e, de, b_dec, W_enc, W_dec, vals, f, mse, pen_w, theta, gain = ctx.saved_tensors
        act = ctx.act
        B = xf.shape[0]
        coef = 2 * float(grad_mse) / B
        scale = float(grad_pen) / B if pen_w is not None else 0.0
        d_f_pen = pen_w.detach().float()[act.cols] * scale if scale != 0.0 else None  # the penalty's d loss / d f
        if grad_code and grad_code[0] is not None:  # the dense code's gradient, at the pairs
            at_pairs = grad_code[0].float()[act.rows, act.cols]
            d_f_pen = at_pairs if d_f_pen is None else d_f_pen + at_pairs
        g = None if gain is None else gain.detach().float()[act.cols]
        dv_add = xf.new_empty(0) if d_f_pen is None else (d_f_pen if g is None else d_f_pen * g)
        with torch.profiler.record_function("saestrata::topk_fused_backward"):
            out = load_native().pairs_fused_backward(e, coef, act.rows, act.cols, f, de if g is None else de * g, xf,
                                                     b_dec.detach(), W_enc.detach().t(), act.bags, dv_add)
        grads = _fused_grads(ctx, grad_aux, out, e, coef, xf, b_dec, W_enc, W_dec, act.cols, act.row_crow[:-1],
                             e, mse)
        d_pen_w = d_theta = d_gain = None
        if pen_w is not None and ctx.needs_input_grad[9]:  # d pen / d pen_w[i] = latent i's activations summed, / B
            d_pen_w = torch.zeros_like(pen_w, dtype=torch.float32).index_add_(0, act.cols, f).mul_(scale)
            d_pen_w = d_pen_w.to(pen_w.dtype)
        if theta is not None and ctx.needs_input_grad[10]:
            d_theta = _threshold_grad(ctx.window, theta, e, coef, W_dec)
        if gain is not None and ctx.needs_input_grad[12]:  # sum over the latent's pairs of pre * d loss / d f
            d_f = coef * de if d_f_pen is None else coef * de + d_f_pen
            d_gain = torch.zeros_like(gain, dtype=torch.float32).index_add_(0, act.cols, vals * d_f).to(gain.dtype)
        return *grads, None, None, None, None, d_pen_w, d_theta, None, d_gain, None


def _threshold_grad(window: JumpWindow, theta: torch.Tensor, e: torch.Tensor, coef: float,
                    W_dec: torch.Tensor) -> torch.Tensor:
    """JumpReLU's ``d loss / d theta`` ``[L]`` (``theta``'s dtype) from the reconstruction: over the window's entries
    ``(b, i)``, ``-(theta_i / eps) coef <e[b], W_dec[i]>`` (Rajamanoharan et al. 2024, sec. 4; ``coef e`` = d loss /
    d x_hat, so ``coef <e[b], W_dec[i]>`` = d loss / d f[b, i])."""
    d_theta = torch.zeros(theta.shape, dtype=torch.float32, device=theta.device)
    if window.cols.numel() and coef != 0.0:
        dots = load_native().sampled_dot(e, W_dec.detach().contiguous(), window.rows, window.cols)
        th = theta.detach().float()[window.cols]
        d_theta.index_add_(0, window.cols, -(th / window.bandwidth) * (coef * dots))
    return d_theta.to(theta.dtype)


class _FusedNested(torch.autograd.Function):
    """Matryoshka's nested losses (Bussmann et al. 2025, sec. 3) on its selected pairs in one node:
    ``(errors [G] fp32, aux, x_hat [B, D] fp32)`` with ``errors[m] = mean_b ||E_m[b]||^2``, ``E_m = b_dec +
    sum_{g <= m} decode_g - x`` (prefix ``m``'s error; the pairs' bags are (row, prefix group), ``act`` built with
    the prefix ends). Group ``g``'s decode feeds every prefix ``m >= g``, so its gradient is ``sum_{m >= g} 2 / B
    d errors[m] E_m``: with the equal weights of ``mse + prefix_mse`` that is ``2 / B w S_g`` for the suffix sums
    ``S_g = sum_{m >= g} E_m``. Forward (compiled ``nested_fused_forward``, per row in registers): the errors,
    their norms, ``S`` and each pair's ``de = <S_bag, W_dec[c]>``. Backward: the latent-grouped kernel of
    :class:`_FusedPairs` on ``S`` with ``coef = 2 w / B``, each pair reading its bag (unequal weights: the per-bag
    gradients and ``dv`` formed first, ``nested_fused_grads``). No autograd graph over ``cumsum``, the decode or
    the encoder gather, and the clip's norms come with the gradients."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, act, vals, norms, aux):
        """Autograd forward: per-bag decode, the prefixes' squared errors, AuxK on the full reconstruction."""
        xf = x.detach().float()
        G = act.n_groups
        with torch.profiler.record_function("saestrata::topk_fused_forward"):
            suffix, sq, de = load_native().nested_fused_forward(act.bag_crow, act.cols, vals, W_dec.detach(),
                                                                b_dec.detach(), xf, G)
        errors = sq.mean(0)
        mse = errors[-1].detach()
        e = suffix[:, -1]  # S_{G-1} = E_{G-1}: the whole dictionary's error
        aux_loss = _aux_forward(aux, W_dec, e, mse)
        x_hat = e + xf
        ctx.save_for_backward(xf, suffix, de, b_dec, W_enc, W_dec, vals, mse)
        ctx.x_dtype, ctx.norms, ctx.aux, ctx.act = x.dtype, norms, aux, act
        ctx.mark_non_differentiable(x_hat)
        return errors, aux_loss, x_hat

    @staticmethod
    def backward(ctx, grad_errors, grad_aux, _grad_x_hat):
        """Gradients of the inputs that need them; None for ``act``, ``vals``, ``norms`` and ``aux``."""
        xf, suffix, de, b_dec, W_enc, W_dec, vals, mse = ctx.saved_tensors
        act = ctx.act
        B, G = suffix.shape[:2]
        mod = load_native()
        weights = grad_errors.float() * (2.0 / B)
        with torch.profiler.record_function("saestrata::topk_fused_backward"):
            if bool((weights == weights[0]).all()):  # the trainer's case: d loss / d decode_g = w S_g
                coef = float(weights[0])
                per_bag = suffix.view(B * G, -1)
            else:  # per-bag gradients from the errors E_m = S_m - S_{m+1}
                err = suffix.clone()
                err[:, :-1] -= suffix[:, 1:]
                coef = 1.0
                per_bag, de = mod.nested_fused_grads(err, weights, act.bag_crow, act.cols, W_dec.detach())
            out = mod.pairs_fused_backward(per_bag, coef, act.rows, act.cols, vals, de, xf, b_dec.detach(),
                                           W_enc.detach().t(), act.bags, xf.new_empty(0))
        total = per_bag.view(B, G, -1)[:, 0]  # group 0 feeds every prefix: d loss / d b_dec's share, -d x's
        grads = _fused_grads(ctx, grad_aux, out, total, coef, xf, b_dec, W_enc, W_dec, act.cols, act.row_crow[:-1],
                             suffix[:, -1], mse)
        return *grads, None, None, None, None


def encoder_mm(x: torch.Tensor, sae) -> torch.Tensor:
    """``(x - b_dec) @ W_enc`` without autograd: the TopK step's one dense matmul, in autocast's dtype as in
    :meth:`.base.SAE.pre_acts` (bf16 ``[B, d_sae]`` under the trainer's autocast, else fp32)."""
    with torch.no_grad():
        return (x - sae.b_dec) @ sae.W_enc


def fused_topk(x: torch.Tensor, sae, k: int, norms: GradSqNorms | None = None, mm: torch.Tensor | None = None,
               aux: AuxKPairs | None = None):
    """A TopK SAE's training forward and losses: ``(mse, aux_loss, x_hat, idx, val, mm)``.

    Args:
        x: ``[B, d_in]`` inputs (fp32 or bf16) on CPU.
        sae: has fp32 ``b_dec [d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``.
        k: latents kept per row, ``1 <= k <= d_sae``.
        norms: where the backward leaves the gradient norms it computes (:class:`GradSqNorms`), if given.
        mm: :func:`encoder_mm` of ``x`` if the caller already has it (computed here otherwise).
        aux: AuxK pairs to add to the step (:class:`AuxKPairs`), if any.
    Returns:
        ``mse`` fp32 scalar, ``||x_hat - x||^2`` summed over ``d_in`` and averaged over the batch (the
        ``mse`` term of :class:`~.base.ForwardOutput`), differentiable in the SAE's parameters and
        ``x``; ``aux_loss`` fp32 scalar, ``coeff ||e_hat - (x - x_hat)||^2 / ||x - x_hat||^2`` (batch means; Gao et
        al. 2024, app. A.2) with ``e_hat`` the pairs' decode, differentiable in the SAE (0 without ``aux``);
        ``x_hat`` fp32 ``[B, d_in]`` (no gradient: the losses above are its only differentiable use); ``idx``
        long ``[B, k]`` (each row's winners, ascending); ``val`` fp32 ``[B, k]`` their pre-activations before
        the ReLU (pairs with ``val <= 0`` add nothing); ``mm`` ``[B, d_sae]`` the bias-free encoder matmul, from
        which ``mm + b_enc`` gives the dense ``pre`` when needed.
    Raises:
        RuntimeError: from the compiled module on shape or dtype mismatches (callers check
            :func:`fused_available` first).
    """
    mm = encoder_mm(x, sae) if mm is None else mm
    mse, aux_loss, x_hat, idx, val = _FusedTopK.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, mm, k, norms,
                                                      aux)
    return mse, aux_loss, x_hat, idx, val, mm


def fused_pairs(x: torch.Tensor, sae, act: ActiveSet, vals: torch.Tensor, norms: GradSqNorms | None = None,
                aux: AuxKPairs | None = None):
    """:func:`fused_topk` on pairs selected elsewhere (BatchTopK's :func:`.native.batch_topk_pairs`):
    ``(mse, aux_loss, x_hat)``.

    Args:
        x: ``[B, d_in]`` inputs (fp32 or bf16) on CPU; ``sae``: as :func:`fused_topk`'s.
        act: the row-sorted pairs (:class:`.kernels.ActiveSet` without groups), ``N`` of them.
        vals: fp32 ``[N]`` their pre-activations ``mm + b_enc`` (no autograd; pairs with a value <= 0 add nothing).
        norms, aux: as :func:`fused_topk`'s.
    Returns:
        ``mse``, ``aux_loss`` and ``x_hat`` as :func:`fused_topk`'s, differentiable in the SAE's parameters and ``x``
        (the encoder's gradients through the pairs' pre-activations, computed inside the op).
    Raises:
        RuntimeError: from the compiled module on shape or dtype mismatches.
    """
    mse, aux_loss, _, x_hat = _FusedPairs.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, act, vals, norms, aux,
                                                None, None, None, None)
    return mse, aux_loss, x_hat


def fused_pairs_l1(x: torch.Tensor, sae, act: ActiveSet, vals: torch.Tensor, l1_w: torch.Tensor,
                   gain: torch.Tensor | None = None):
    """A ReLU SAE's training forward on its positive pre-activations, with a per-latent weighted L1 penalty, in
    one fused op (the ``standard`` SAE, :mod:`.standard`): ``(mse, l1, x_hat)``.

    Args:
        x: ``[B, d_in]`` inputs (fp32 or bf16) on CPU; ``sae``: as :func:`fused_topk`'s (any decoder norms).
        act: the row-sorted pairs with ``mm + b_enc > 0`` (:class:`.kernels.ActiveSet` without groups), ``N``.
        vals: fp32 ``[N]`` their pre-activations, all > 0 (= the ReLU'd latents; no autograd).
        l1_w: fp32 ``[d_sae]`` each latent's L1 weight (e.g. ``lambda * ||W_dec[i]||``), may carry a gradient.
        gain: None (``f = vals``), or fp32 ``[d_sae]`` > 0 multiplying each latent's activations (``f = vals *
            gain[i]``: seed 000's importance masks), may carry a gradient.
    Returns:
        ``mse`` and ``x_hat`` as :func:`fused_pairs`'s; ``l1`` fp32 scalar ``mean_b sum_i f_i l1_w[i]``. Both losses
        are differentiable in the SAE's parameters and ``x`` (``l1`` also in ``l1_w``, both in ``gain``); the
        gradient norms are not handed to the clip (the decoder rows need not be unit: the clip computes them).
    Raises:
        RuntimeError: from the compiled module on shape or dtype mismatches.
    """
    mse, _, l1, x_hat = _FusedPairs.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, act, vals, None, None, l1_w,
                                          None, None, gain)
    return mse, l1, x_hat


def fused_pairs_jump(x: torch.Tensor, sae, act: ActiveSet, vals: torch.Tensor, theta: torch.Tensor,
                     window: JumpWindow):
    """A JumpReLU SAE's reconstruction on its active pairs in one fused op (:mod:`.jumprelu`): ``(mse, x_hat)``.

    Args:
        x: ``[B, d_in]`` inputs (fp32 or bf16) on CPU; ``sae``: as :func:`fused_topk`'s (any decoder norms).
        act: the row-sorted pairs with ``z = ReLU(mm + b_enc) > theta`` (:class:`.kernels.ActiveSet` without groups).
        vals: fp32 ``[N]`` their pre-activations (= the latents: ``f = z`` above the threshold; no autograd).
        theta: fp32 ``[d_sae]`` the thresholds (> 0), may carry a gradient.
        window: the entries with ``|z - theta| < bandwidth / 2`` (:class:`JumpWindow`), active or not.
    Returns:
        ``mse`` and ``x_hat`` as :func:`fused_pairs`'s; ``mse`` is differentiable in the SAE's parameters, ``x`` and
        ``theta`` (the straight-through pseudo-derivative over the window, :class:`_FusedPairs`).
    Raises:
        RuntimeError: from the compiled module on shape or dtype mismatches.
    """
    mse, _, _, x_hat = _FusedPairs.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, act, vals, None, None, None,
                                         theta, window, None)
    return mse, x_hat


def fused_pairs_code(x: torch.Tensor, sae, act: ActiveSet, vals: torch.Tensor):
    """A ReLU SAE's reconstruction on its positive pre-activations in one fused op, with its code handed out dense
    for penalties of any form (:class:`.relu_pairs.DenseCodePairsMixin`, seed 001): ``(mse, x_hat, f)``.

    Args:
        x: ``[B, d_in]`` inputs (fp32 or bf16) on CPU; ``sae``: as :func:`fused_topk`'s (any decoder norms).
        act: the row-sorted pairs with ``mm + b_enc > 0`` (:class:`.kernels.ActiveSet` without groups), ``N``.
        vals: fp32 ``[N]`` their pre-activations, all > 0 (= the ReLU'd latents; no autograd).
    Returns:
        ``mse`` and ``x_hat`` as :func:`fused_pairs`'s; ``f`` fp32 ``[B, d_sae]``, ``vals`` at the pairs and 0
        elsewhere (the dense step's ``ReLU(pre)``). ``mse`` and every loss computed from ``f`` are differentiable in
        the SAE's parameters and ``x``; ``f``'s gradient reaches the encoder through the pairs' ``dv`` inside the
        compiled latent-grouped backward (no dense encoder-gradient matmul), and off the pairs it is dropped, as
        the dense step's ReLU drops it. Gradient norms are not handed to the clip.
    Raises:
        RuntimeError: from the compiled module on shape or dtype mismatches.
    """
    mse, _, _, x_hat, f = _FusedPairs.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, act, vals, None, None,
                                            None, None, None, None, True)
    return mse, x_hat, f


def fused_nested(x: torch.Tensor, sae, act: ActiveSet, vals: torch.Tensor, norms: GradSqNorms | None = None,
                 aux: AuxKPairs | None = None):
    """Matryoshka's training losses on its selected pairs in one fused op: ``(errors, aux_loss, x_hat)``.

    Args:
        x, sae, norms, aux: as :func:`fused_pairs`'s.
        act: the row-sorted pairs, built with the prefix ends as ``group_ends`` (``G`` groups, bags
            ``row * G + group``); vals: fp32 ``[N]`` their pre-activations, all > 0 (no autograd).
    Returns:
        ``errors`` fp32 ``[G]``: prefix ``m``'s ``mean_b ||x_hat_m - x||^2`` (the last is the ``mse`` term, the
        others sum to ``prefix_mse``), differentiable in the SAE's parameters and ``x``; ``aux_loss`` AuxK on
        the full reconstruction (0 without ``aux``); ``x_hat`` fp32 ``[B, d_in]`` the full dictionary's
        reconstruction (no gradient). Same maths as :meth:`.matryoshka.MatryoshkaSAE.prefix_reconstructions`
        with :func:`.matryoshka.squared_error` (tests/test_kernels.py).
    Raises:
        RuntimeError: from the compiled module on shape or dtype mismatches.
    """
    return _FusedNested.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, act, vals, norms, aux)


__all__ = ["AuxKPairs", "GradSqNorms", "JumpWindow", "encoder_mm", "fused_available", "fused_nested", "fused_pairs",
           "fused_pairs_code", "fused_pairs_jump", "fused_pairs_l1", "fused_topk"]
