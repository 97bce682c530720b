"""Sparse training kernels for TopK-family SAEs (topk, batchtopk, matryoshka; issue 4).

A TopK SAE step computed densely spends most of its matmuls on zeros: the decoder
multiplies a ``[batch, d_sae]`` code with ~k non-zeros per row, and the backward pass
forms dense ``[batch, d_sae]`` gradients for the decoder input and the encoder. Only the
encoder's forward matmul is really needed densely (to find the top-k). Everything else
touches just the ``N ~ batch * k`` active (row, latent) pairs:

* decode:          ``x_hat[b] = sum_n v_n W_dec[c_n]`` over pairs of row ``b``
  (an ``embedding_bag`` with per-sample weights, never a ``[batch, d_sae]`` matmul);
* d loss / d v_n:  ``<dL/dx_hat[b_n], W_dec[c_n]>`` (a sampled dense-dense product);
* d loss / d W_dec[c]: ``sum_{n: c_n = c} v_n dL/dx_hat[b_n]`` (an ``embedding_bag`` over
  the pairs grouped by latent);
* encoder: ``v_n = pre[b_n, c_n]`` with ``pre = (x - b_dec) W_enc + b_enc``, so
  ``dW_enc[:, c] = sum_{n: c_n = c} g_n (x[b_n] - b_dec)``, ``db_enc[c] = sum g_n`` and
  ``db_dec = -W_enc @ db_enc``: no dense ``[batch, d_sae]`` gradient and no dense
  ``grad_pre @ W_enc^T``.

Sources of the idea: Gao et al. 2024, "Scaling and evaluating sparse autoencoders"
(their appendix on kernels: the decoder and the gradients only need the k active
latents), and EleutherAI ``sparsify``'s fused encoder / sparse decoder. This is our
own implementation on stock PyTorch ops (``embedding_bag``, ``sparse.sampled_addmm``,
``index_add_``) plus a numpy radix argsort; the TopK selection itself is the compiled per-row
top-k of :mod:`.native` (on CPU).

The plain ``topk`` SAE on CPU runs the fused compiled forward / backward of :mod:`.fused`
instead (same maths, fewer passes), and so do batchtopk and matryoshka on pairs from the compiled
batch-wide selection of the encoder matmul (:func:`.native.batch_topk_pairs`; the ``[batch, d_sae]``
``pre`` is never formed, and AuxK gets its dead columns from :class:`ColumnPre`); these kernels remain
their fallback (no compiler, ``SAESTRATA_NATIVE=0``, CUDA) and the reference the fused ops are tested
against besides the dense path.

Numerics: the selection runs on the caller's ``pre`` (bf16 under autocast, exactly the
values the dense path uses), the selected values are then carried in fp32, and every
sparse kernel runs in fp32 with autocast disabled: they are memory-bound gathers, bf16
would save little and would accumulate in low precision. The one dense block that
remains besides the encoder matmul (AuxK over the dead columns, :class:`_GatherColumns`)
runs its matmuls in the forward's autocast dtype, as the dense path does. Gradients
reach the fp32 master weights in fp32.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from .arch_info import ArchError
from .native import auxk_pairs, load_native

KERNELS = ("dense", "sparse")
# Default of the topk / batchtopk / matryoshka ``kernels`` switch ("dense" is the reference).
# bench/one_pass.py --kernels (topk, d_in 640, d_sae 4096, batch 1024, busy 2-core machine):
# sparse / dense mean step 0.49-0.56 with 1 thread, 0.54-0.87 with 2 threads (load-dependent).
DEFAULT_KERNELS = "sparse"


def check_kernels(kernels: str | None) -> str:
    """The ``kernels`` switch of the TopK-family SAEs, ``None`` meaning :data:`DEFAULT_KERNELS`.

    Raises:
        ArchError: not one of :data:`KERNELS` (a bad ``--set kernels=`` value).
    """
    kernels = DEFAULT_KERNELS if kernels is None else kernels
    if kernels not in KERNELS:
        raise ArchError(f"kernels={kernels!r} must be one of {', '.join(KERNELS)}")
    return kernels


def _argsort(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """Stable argsort of 1-D integer ``keys`` in ``[0, bound)``; long ``[N]``.

    On CPU: LSD radix sort with numpy's 16-bit stable argsort (a single-threaded radix
    pass), one pass per 16 bits of ``bound``. torch's own CPU integer sort is a multi-pass
    parallel radix sort; with 2 threads on a busy machine each pass waits for a descheduled
    worker and a 32k-key sort took 10-340 ms instead of 0.3 ms (measured, torch 2.13);
    the numpy passes take ~0.3 ms per 32k keys.
    """
    if keys.device.type != "cpu":
        return torch.argsort(keys, stable=True)
    k, order, shift = keys.numpy(), None, 0
    while True:
        digit = ((k if order is None else k[order]) >> shift) & 0xFFFF
        step = np.argsort(digit.astype(np.uint16), kind="stable")
        order = step if order is None else order[step]
        shift += 16
        if bound <= 1 << shift:
            return torch.from_numpy(order)


def _offsets(keys: torch.Tensor, n: int) -> torch.Tensor:
    """CSR-style offsets ``[n + 1]`` (long) of sorted ``keys`` in ``[0, n)``."""
    out = keys.new_zeros(n + 1)
    out[1:] = torch.bincount(keys, minlength=n).cumsum(0)
    return out


class ActiveSet:
    """The active (row, latent) pairs of one batch, sorted by row then latent.

    Args:
        rows, cols: long ``[N]``, any order, no duplicate pairs.
        n_rows: batch size ``B``. n_latents: ``d_sae``.
        group_ends: optional increasing latent boundaries ending at ``d_sae``
            (Matryoshka prefixes). The decoder then returns one partial reconstruction
            per (row, group) "bag" ``row * G + group`` instead of one per row.

    Everything the kernels need (bag offsets, the latent-major permutation) is derived
    lazily and shared between the encoder and decoder backward passes.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_latents: int,
                 group_ends: list[int] | None = None):
        keys = rows * n_latents + cols  # unique keys: a well-defined order
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):  # TopK's selection comes sorted already
            order = _argsort(keys, n_rows * n_latents)
            rows, cols = rows[order], cols[order]
        self.rows, self.cols = rows, cols
        self.n_rows, self.n_latents = n_rows, n_latents
        self.n_groups = len(group_ends) if group_ends else 1
        if self.n_groups > 1:
            bounds = torch.tensor(group_ends[:-1], dtype=self.cols.dtype, device=self.cols.device)
            self.bags = self.rows * self.n_groups + torch.bucketize(self.cols, bounds, right=True)
        else:
            self.bags = self.rows
        self.n_bags = n_rows * self.n_groups

    @classmethod
    def from_values(cls, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int,
                    n_latents: int, group_ends: list[int] | None = None) -> "ActiveSet":
        """Keep only pairs whose selected pre-activation ``values`` is > 0.

        The SAEs ReLU the selected values, so a pair with value <= 0 adds nothing to the
        reconstruction and gets a zero gradient (ReLU's derivative at <= 0 is 0 in torch):
        dropping it changes neither loss nor gradients, and the kept values need no ReLU.
        """
        keep = values > 0
        if bool(keep.all()):  # TopK's usual case: skip two boolean gathers (0.4-0.5 ms a step, issue 14)
            return cls(rows, cols, n_rows, n_latents, group_ends)
        return cls(rows[keep], cols[keep], n_rows, n_latents, group_ends)

    @classmethod
    def from_rowwise(cls, values: torch.Tensor, cols: torch.Tensor, n_latents: int,
                     group_ends: list[int] | None = None) -> "ActiveSet":
        """:meth:`from_values` for a per-row selection: ``values`` / ``cols`` ``[B, m]`` (row ``b``'s ``m``
        chosen latents, long ``cols``); pairs with a value <= 0 are dropped as there."""
        rows = torch.arange(cols.shape[0], device=cols.device).unsqueeze(1).expand_as(cols)
        return cls.from_values(values.flatten(), rows.flatten(), cols.flatten(), cols.shape[0], n_latents,
                               group_ends)

    @classmethod
    def from_row_offsets(cls, crow: torch.Tensor, cols: torch.Tensor, n_latents: int) -> "ActiveSet":
        """Pairs given in row then column order: row ``b``'s latents are ``cols[crow[b]:crow[b + 1]]`` (``crow`` long
        ``[B + 1]``, ``cols`` long ``[N]``)."""
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=cols.device), crow.diff())
        act = cls(rows, cols, crow.numel() - 1, n_latents)
        act.__dict__["bag_crow"] = crow  # the cached offsets: given, so not counted again
        return act

    def __len__(self) -> int:
        return self.cols.numel()

    @cached_property
    def bag_crow(self) -> torch.Tensor:
        """``[n_bags + 1]`` offsets of each decoder bag (rows are bags when there are no groups)."""
        return _offsets(self.bags, self.n_bags)

    @cached_property
    def row_crow(self) -> torch.Tensor:
        """``[n_rows + 1]`` offsets of each batch row."""
        return self.bag_crow if self.n_groups == 1 else _offsets(self.rows, self.n_rows)

    @cached_property
    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm [N], crow [d_sae + 1])``: the pairs grouped by latent, for weight gradients."""
        perm = _argsort(self.cols, self.n_latents)
        return perm, _offsets(self.cols[perm], self.n_latents)

    def sum_by_latent(self, table: torch.Tensor, table_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``out[c] = sum_{n: cols[n] = c} weights[n] * table[table_index[n]]``: ``[d_sae, D]`` fp32.

        ``table`` ``[R, D]`` fp32, ``table_index`` long ``[N]`` (rows or bags), ``weights`` ``[N]``.
        One ``embedding_bag`` over the latent-major order: the sparse ``f^T @ table``.
        """
        perm, crow = self.by_latent
        return F.embedding_bag(table_index[perm], table, crow[:-1], mode="sum",
                               per_sample_weights=weights[perm])

    def fired(self) -> torch.Tensor:
        """bool ``[d_sae]``: latents with at least one pair."""
        return torch.zeros(self.n_latents, dtype=torch.bool, device=self.cols.device).index_fill_(0, self.cols, True)

    def to_dense(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The ``[n_rows, d_sae]`` code with ``values`` (``[N]``) at the pairs, detached.

        For dead-latent tracking and metrics only (the loss goes through :func:`sparse_decode`),
        so it is written in place into one fresh buffer: no autograd node, no clone.
        """
        f = values.new_zeros((self.n_rows, self.n_latents), dtype=dtype)
        return f.index_put_((self.rows, self.cols), values.detach().to(dtype))


class ColumnPre:
    """The pre-activations ``pre = mm + b_enc`` of a step whose ``[B, d_sae]`` ``pre`` is never formed, given
    column by column: ``self(cols)`` is ``pre[:, cols]`` ``[B, len(cols)]`` in ``dtype`` (fp32 when ``mm`` is
    bf16, as torch's type promotion makes the dense ``pre``). For AuxK's dead columns
    (:meth:`.topk.AuxKMixin.auxk_plan` takes a callable).

    Args:
        mm: ``[B, d_sae]`` the encoder matmul ``(x - b_dec) @ W_enc`` without autograd (bf16 under autocast).
        b_enc: ``[d_sae]`` fp32, detached.
    """

    def __init__(self, mm: torch.Tensor, b_enc: torch.Tensor):
        self.mm, self.b_enc = mm, b_enc
        self.dtype = torch.promote_types(mm.dtype, b_enc.dtype)

    def __call__(self, cols: torch.Tensor) -> torch.Tensor:
        return self.mm.index_select(1, cols) + self.b_enc.index_select(0, cols)

    def positive_topk(self, cols: torch.Tensor, k: int):
        """Per row, the ``k`` largest entries of ``self(cols)`` that are > 0, as ``(act, vals)`` (an
        :class:`ActiveSet` over ``d_sae`` latents and their fp32 values ``[N]``), without gathering the columns:
        :func:`.native.auxk_pairs`. None where the compiled module cannot run (callers gather ``self(cols)``).
        ``cols`` long ascending, ``1 <= k <= len(cols)``."""
        picked = auxk_pairs(self.mm, self.b_enc, cols, k)
        if picked is None:
            return None
        crow, pair_cols, vals = picked
        return ActiveSet.from_row_offsets(crow, pair_cols, self.mm.shape[1]), vals


class _GatherPreActs(torch.autograd.Function):
    """``pre[rows, cols]`` with a sparse backward into ``x, b_dec, W_enc, b_enc``.

    ``pre = (x - b_dec) @ W_enc + b_enc`` was computed by the caller without autograd
    (the one dense matmul the TopK family needs); this op re-attaches the selected
    entries to the parameters. Backward, with ``g [N]`` the gradient of the values:
    ``db_enc = index_add(cols, g)``, ``dW_enc = (sum by latent of g * (x - b_dec)[rows])^T``,
    ``db_dec = -W_enc @ db_enc``, ``dx = sum by row of g * W_enc[:, cols]^T`` (only if needed).
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pre, act):
        """Autograd forward; shapes and formula in the class docstring (``pre`` ``[N]``: already gathered)."""
        ctx.act = act
        ctx.save_for_backward(x, b_dec, W_enc)
        return pre[act.rows, act.cols].float() if pre.dim() == 2 else pre.float().clone()

    @staticmethod
    def backward(ctx, grad):
        """Gradients of the inputs that need them (class docstring); None for the rest."""
        x, b_dec, W_enc = ctx.saved_tensors
        act = ctx.act
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[:4]
        g = grad.float()
        d_x = d_b_dec = d_W = d_b_enc = None
        with torch.autocast(g.device.type, enabled=False):
            col_sum = g.new_zeros(act.n_latents).index_add_(0, act.cols, g) if need_b_enc or need_b_dec else None
            if need_W:
                xc = x.float() - b_dec.float()
                d_W = act.sum_by_latent(xc, act.rows, g).t()  # [d_in, d_sae] view; AccumulateGrad lays it out
            if need_b_enc:
                d_b_enc = col_sum
            if need_b_dec:
                d_b_dec = -(W_enc.float() @ col_sum)
            if need_x:
                d_x = F.embedding_bag(act.cols, W_enc.float().t().contiguous(), act.row_crow[:-1], mode="sum",
                                      per_sample_weights=g).to(x.dtype)
        return d_x, d_b_dec, d_W, d_b_enc, None, None


class _GatherColumns(torch.autograd.Function):
    """``pre[:, cols]`` (``[B, n]``) with a backward into ``x, b_dec, W_enc, b_enc`` touching only ``cols``.

    For AuxK, whose top-``k_aux`` among the dead latents is too dense for pair lists at
    our sizes (``k_aux = d_in / 2`` of a few hundred dead latents): the gradient of the
    dead columns is a dense ``[B, n]`` block, so ``dW_enc[:, cols] = (x - b_dec)^T g`` is a
    matmul ``n / d_sae`` the size of the dense one, run in the forward's autocast dtype.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pre, cols, selected):
        """Autograd forward; shapes and formula in the class docstring (``selected``: ``pre`` is ``pre[:, cols]``)."""
        ctx.save_for_backward(x, b_dec, W_enc, cols)
        ctx.mm_dtype = _autocast_dtype(x.device.type)
        return pre.clone() if selected else pre.index_select(1, cols)

    @staticmethod
    def backward(ctx, grad):
        """Gradients of the inputs that need them (class docstring); None for the rest."""
        x, b_dec, W_enc, cols = ctx.saved_tensors
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[:4]
        d_x = d_b_dec = d_W = d_b_enc = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.float()
            col_sum = g.sum(0)
            # [d_in, n], gathered as rows of W_enc^T: index_select(1, .) on the column-major W_enc first copies
            # all of it contiguous (3.5-7.6 ms at d_in 640, d_sae 4096)
            w_cols = W_enc.t().index_select(0, cols).t().float()
            if need_W:
                xc = x.float() - b_dec.float()
                block = (xc.t().to(ctx.mm_dtype) @ g.to(ctx.mm_dtype)).float()  # [d_in, n]
                # in W_enc's own (column-major) layout: accumulating a row-major one into it was a strided copy
                d_W = torch.zeros_like(W_enc, dtype=torch.float32).index_copy_(1, cols, block)
            if need_b_enc:
                d_b_enc = g.new_zeros(W_enc.shape[1]).index_copy_(0, cols, col_sum)
            if need_b_dec:
                d_b_dec = -(w_cols @ col_sum)
            if need_x:
                d_x = (g.to(ctx.mm_dtype) @ w_cols.t().to(ctx.mm_dtype)).to(x.dtype)
        return d_x, d_b_dec, d_W, d_b_enc, None, None, None


def _autocast_dtype(device_type: str) -> torch.dtype:
    """The matmul dtype autocast would use now on ``device_type`` (fp32 when autocast is off)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32


class _SparseDecode(torch.autograd.Function):
    """``out[bag] = sum_{n in bag} vals[n] * W_dec[cols[n]]`` (no bias) with a sparse backward.

    Forward is one ``embedding_bag``. Backward: ``dvals[n] = <dout[bag_n], W_dec[cols_n]>`` via
    ``torch.sparse.sampled_addmm`` (only the N sampled dot products of ``dout @ W_dec^T``)
    and ``dW_dec = sum by latent of vals * dout[bags]`` via ``embedding_bag``.
    """

    @staticmethod
    def forward(ctx, vals, W_dec, act):
        """Autograd forward; shapes and formula in the class docstring."""
        ctx.act = act
        ctx.save_for_backward(vals, W_dec)
        with torch.autocast(vals.device.type, enabled=False):
            # rows contiguous: on a column-major weight (the optimiser's layout of encoder matrices, train/optim.py)
            # embedding_bag takes a path ~80x slower (seed 000's W_enc2 [1024, 1024]: 176 vs 2.2 ms)
            return F.embedding_bag(act.cols, W_dec.float().contiguous(), act.bag_crow[:-1], mode="sum",
                                   per_sample_weights=vals.float())

    @staticmethod
    def backward(ctx, grad_out):
        """Gradients of the inputs that need them (class docstring); None for the rest."""
        vals, W_dec = ctx.saved_tensors
        act = ctx.act
        d_vals = d_W = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.float().contiguous()
            w = W_dec.float()
            if ctx.needs_input_grad[0]:
                d_vals = sampled_dot(g, w, act).to(vals.dtype)
            if ctx.needs_input_grad[1]:
                d_W = act.sum_by_latent(g, act.bags, vals.float()).to(W_dec.dtype)
        return d_vals, d_W, None


def sampled_dot(g: torch.Tensor, w: torch.Tensor, act: ActiveSet) -> torch.Tensor:
    """``[N]``: ``<g[bags[n]], w[cols[n]]>`` for ``g [n_bags, D]``, ``w [d_sae, D]`` (fp32).

    ``sampled_addmm`` evaluates ``g @ w^T`` only at the CSR pattern (bags x latents, which
    is exactly our pair order), so nothing of size ``[batch, d_sae]`` is formed. On CPU the
    compiled :mod:`.native` kernel computes the same dot products (2 threads, idle, 32k pairs, D 640:
    1.03 vs 1.60 ms).
    """
    if len(act) == 0:
        return g.new_zeros(0)
    if g.device.type == "cpu" and (mod := load_native()) is not None:  # 1.03 vs 1.60 ms at 32k pairs, D 640
        with torch.profiler.record_function("saestrata::sampled_dot"):
            return mod.sampled_dot(g.contiguous(), w.contiguous(), act.bags.contiguous(), act.cols.contiguous())
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely only on sampled_addmm
        warnings.simplefilter("ignore")
        mask = torch.sparse_csr_tensor(act.bag_crow, act.cols, g.new_zeros(len(act)),
                                       (act.n_bags, act.n_latents), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, g, w.t()).values()


def gather_pre_acts(x: torch.Tensor, sae, pre: torch.Tensor, act: ActiveSet) -> torch.Tensor:
    """Selected pre-activations ``pre[act.rows, act.cols]`` as fp32 ``[N]``, differentiable in the SAE.

    ``x`` ``[B, d_in]``; ``sae`` has ``b_dec, W_enc [d_in, d_sae], b_enc``; ``pre`` ``[B, d_sae]``
    is ``sae.pre_acts(x)`` computed under ``torch.no_grad()`` (any float dtype), or ``[N]``: those
    entries already gathered, in ``act``'s pair order.
    """
    return _GatherPreActs.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, pre.detach(), act)


def gather_columns(x: torch.Tensor, sae, pre: torch.Tensor, cols: torch.Tensor, selected: bool = False) -> torch.Tensor:
    """``pre[:, cols]`` ``[B, n]`` (``pre``'s dtype), differentiable in the SAE's encoder; see :class:`_GatherColumns`.

    ``cols`` long ``[n]``; ``pre`` is ``sae.pre_acts(x)`` computed under ``torch.no_grad()``, or, with
    ``selected``, already its columns ``pre[:, cols]`` ``[B, n]``.
    """
    return _GatherColumns.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, pre.detach(), cols, selected)


def sparse_decode(vals: torch.Tensor, W_dec: torch.Tensor, act: ActiveSet) -> torch.Tensor:
    """``sum_n vals[n] W_dec[cols[n]]`` per bag: fp32 ``[n_bags, d_in]`` (no ``b_dec``).

    Equals ``f @ W_dec`` for the dense code ``f = act.to_dense(vals)`` when there are no
    groups; with Matryoshka groups, row ``r * G + g`` holds group ``g``'s share of row ``r``.
    """
    return _SparseDecode.apply(vals, W_dec, act)


class _CodeValues(torch.autograd.Function):
    """``f[act.rows, act.cols]`` of a dense code ``f`` ``[B, L]`` as ``[N]``, whose backward writes the gradient into a
    fresh ``[B, L]`` buffer at the pairs only (``index_put`` without accumulation: the pairs are unique), where
    advanced indexing's backward accumulates through a sort."""

    @staticmethod
    def forward(ctx, f, act):
        """Autograd forward: the gather."""
        ctx.act, ctx.shape = act, f.shape
        return f[act.rows, act.cols]

    @staticmethod
    def backward(ctx, grad):
        """The gradient scattered to the pairs, zero elsewhere; None for ``act``."""
        act = ctx.act
        return grad.new_zeros(ctx.shape).index_put_((act.rows, act.cols), grad), None


class _PairsCode(torch.autograd.Function):
    """The reverse of :class:`_CodeValues`: the dense code ``[B, L]`` (fp32) holding ``vals`` at the pairs and 0 elsewhere,
    whose backward reads the gradient at the pairs only (a gather)."""

    @staticmethod
    def forward(ctx, vals, act):
        """Autograd forward: the scatter."""
        ctx.act = act
        return act.to_dense(vals, torch.float32)

    @staticmethod
    def backward(ctx, grad):
        """The gradient at the pairs, ``[N]`` in ``vals``' dtype; None for ``act``."""
        act = ctx.act
        return grad[act.rows, act.cols], None


def pairs_code(vals: torch.Tensor, act: ActiveSet) -> torch.Tensor:
    """A ReLU code ``[B, L]`` fp32 from its positive pairs: ``vals`` ``[N]`` (> 0, differentiable, e.g.
    :func:`gather_pre_acts`) at ``act``'s (row, latent) pairs, 0 elsewhere. Its gradient reaches ``vals`` at the
    pairs only, as a ReLU's reaches ``pre`` (0 where ``pre <= 0``): with :func:`gather_pre_acts` the encoder's
    backward touches the ``N`` pairs instead of a ``[B, d_in] x [d_in, L]`` matmul and its input gradient."""
    return _PairsCode.apply(vals, act)


def code_nonzeros(f: torch.Tensor, max_density: float) -> tuple[torch.Tensor, ActiveSet] | None:
    """The non-zeros of a dense, mostly zero code as ``(vals, act)``, for :func:`sparse_decode`: ``vals`` fp32-or-``f``'s
    dtype ``[N]`` differentiable in ``f``, ``act`` their (row, latent) pairs (:class:`ActiveSet`).

    For SAEs whose code comes from a dense computation (seed 003's chained tiers, seed 000's two levels) but is
    sparse: a product ``f @ W`` and its two gradients then touch only the ``N`` non-zeros instead of three
    ``[B, L] x [L, D]`` matmuls. ``f``'s gradient is exact at its non-zeros and 0 elsewhere, where the dense
    product's is ``<dout[b], W[i]>``: so use it only where that gradient reaches nothing, i.e. ``f = ReLU(.)``-like
    codes whose zeros pass no gradient back (a ReLU's derivative at <= 0 is 0; a zero gate multiplies it away).

    Args:
        f: ``[B, L]`` float code (any autograd history).
        max_density: largest share of non-zero entries for which it runs (:data:`.relu_pairs.SPARSE_MAX_DENSITY`).
    Returns:
        ``(vals, act)``, or None when ``f`` has more than ``max_density`` non-zeros (the caller then runs the dense
        product).
    """
    rows, cols = f.detach().nonzero(as_tuple=True)
    if rows.numel() > max_density * f.numel():
        return None
    act = ActiveSet(rows, cols, *f.shape)
    return _CodeValues.apply(f, act), act


def decode_nonzeros(f: torch.Tensor, W_dec: torch.Tensor, max_density: float) -> torch.Tensor | None:
    """``f @ W_dec`` from the non-zeros of ``f`` ``[B, L]`` with a sparse backward (:func:`code_nonzeros`, same
    conditions): fp32 ``[B, D]`` (no bias; fp32 under autocast too), or None when ``f`` is too dense.
    ``W_dec`` ``[L, D]``: a parameter or any differentiable tensor."""
    got = code_nonzeros(f, max_density)
    return None if got is None else sparse_decode(got[0], W_dec, got[1])


__all__ = ["DEFAULT_KERNELS", "KERNELS", "ActiveSet", "ColumnPre", "check_kernels", "code_nonzeros", "decode_nonzeros",
           "gather_columns", "gather_pre_acts", "pairs_code", "sampled_dot", "sparse_decode"]
