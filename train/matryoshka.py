"""``matryoshka``: Matryoshka BatchTopK SAE (nested-prefix reconstruction losses).

Sources: Bussmann, Nabeshima, Karvonen, Nanda 2025, "Learning Multi-Level Features
with Matryoshka Sparse Autoencoders", sec. 3: latents come from BatchTopK
(:mod:`.batchtopk`) and the loss is
``sum_{m in M} ||x - (f_{1:m} W_dec[1:m] + b_dec)||^2 + alpha * L_aux``:
every nested prefix of the dictionary must reconstruct ``x`` on its own, so early
latents learn general features and later ones refine them. Nabeshima 2024
("Matryoshka Sparse Autoencoders", LessWrong) proposed the same nested objective.
The prefix ends ``M`` are fixed fractions of ``d_sae`` (default 1/16, 1/8, 1/4,
1/2, 1); the terms are summed with equal weight as in the paper's equation.
Inference (eval mode) uses BatchTopK's global threshold, so a saved SAE loads in
SAELens as ``architecture: "jumprelu"`` like BatchTopK.

Loss keys: ``mse`` is the full-dictionary term (the usual reconstruction error,
so logs compare across archs), ``prefix_mse`` the sum of the shorter prefixes'
terms, ``auxk`` the dead-latent term (training only).

Kernels: with ``kernels="sparse"`` each prefix reconstruction sums only the active
latents below its boundary: the active pairs are decoded per (row, prefix group) in one
``embedding_bag`` and the groups are summed cumulatively (:mod:`.kernels`), the same
maths as :meth:`MatryoshkaSAE.prefix_reconstructions`. On CPU with the compiled module the
whole training forward and backward is one fused op (:func:`.fused.fused_nested`).
"""

from __future__ import annotations

import torch

from .arch_info import ArchError, ArchInfo
from .base import ForwardOutput
from .batchtopk import BatchTopKSAE
from .fused import fused_available, fused_nested
from .kernels import sparse_decode

DEFAULT_PREFIX_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


def prefix_sizes(d_sae: int, fractions) -> list[int]:
    """Prefix lengths ``round(fraction * d_sae)`` for strictly increasing fractions ending at 1.

    Returns a list of ints, the last equal to ``d_sae``.

    Raises:
        ArchError: empty list, a fraction outside (0, 1], not strictly increasing,
            last fraction not 1, or two fractions rounding to the same length.
    """
    fractions = [float(f) for f in fractions]
    if not fractions or fractions[-1] != 1.0 or any(not 0 < f <= 1 for f in fractions):
        raise ArchError(f"prefix_fractions {fractions} must lie in (0, 1] and end with 1.0")
    sizes = [max(1, round(f * d_sae)) for f in fractions]
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ArchError(f"prefix_fractions {fractions} give non-increasing prefix sizes {sizes} for d_sae={d_sae}")
    return sizes


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over ``d_in``, mean over batch (the base class's ``mse``); fp32 scalar."""
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE. ``[batch, d_in] -> [batch, d_sae]``.

    Args:
        d_in, d_sae, seed, k, aux_k, aux_coeff, threshold_lr, kernels: see :class:`BatchTopKSAE`.
        prefix_fractions: increasing fractions of ``d_sae`` ending at 1.0 that mark the
            nested prefixes (default 1/16, 1/8, 1/4, 1/2, 1).

    Raises:
        ArchError: bad ``prefix_fractions`` (see :func:`prefix_sizes`) or BatchTopK arguments.
    """

    arch = "matryoshka"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, k: int = 32, aux_k: int | None = None,
                 aux_coeff: float = 1 / 32, threshold_lr: float = 0.01,
                 prefix_fractions=DEFAULT_PREFIX_FRACTIONS, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed, k=k, aux_k=aux_k, aux_coeff=aux_coeff, threshold_lr=threshold_lr,
                         kernels=kernels)
        self.prefix_fractions = [float(f) for f in prefix_fractions]
        self.prefix_sizes = prefix_sizes(d_sae, self.prefix_fractions)

    latent_group_kind = "prefix"

    def latent_groups(self) -> dict[str, torch.Tensor]:
        """Latents added by each nested prefix (Bussmann et al. 2025 sec. 3) for diagnostics."""
        starts = [0, *self.prefix_sizes[:-1]]
        return {f"prefix{i + 1}": torch.arange(a, b) for i, (a, b) in enumerate(zip(starts, self.prefix_sizes))}

    def hparams(self) -> dict:
        """BatchTopK's hyperparameters plus ``prefix_fractions``."""
        return {**super().hparams(), "prefix_fractions": self.prefix_fractions}

    def prefix_reconstructions(self, f: torch.Tensor) -> list[torch.Tensor]:
        """``[f_{1:m} W_dec[1:m] + b_dec for m in prefix_sizes]``, each ``[batch, d_in]``.

        Built group by group so the whole list costs one decoder matmul; the last
        entry equals :meth:`decode` up to float rounding.
        """
        out, running, start = [], self.b_dec, 0
        for end in self.prefix_sizes:
            running = running + f[:, start:end] @ self.W_dec[start:end]
            out.append(running)
            start = end
        return out

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Encode, decode every prefix, and return the summed nested losses; ``x`` is ``[batch, d_in]``.

        ``x_hat`` is the full-dictionary reconstruction; loss = ``mse + prefix_mse (+ auxk)``.
        """
        self._grad_norms = None  # only a fused forward's backward computes them (a freed gradient's address may recur)
        if self.use_sparse():
            return self.sparse_forward(x)
        pre = self.pre_acts(x)
        f = self.activation(pre)
        partials = self.prefix_reconstructions(f)
        return ForwardOutput(partials[-1], f, self._nested_losses(x, partials, self.penalties(x, pre, f, partials[-1])))

    def sparse_forward(self, x: torch.Tensor) -> ForwardOutput:
        """:meth:`forward` on the sparse kernels: group ``g``'s share of each row holds only its active latents.

        On CPU with the compiled module the pairs come from the encoder matmul and the nested losses, AuxK
        and all gradients from one fused op (:func:`.fused.fused_nested`, which also hands the clip its
        gradient norms); elsewhere :mod:`.kernels`' ops and :func:`prefix_squared_errors` (same maths).
        """
        self._grad_norms = None
        if fused_available(self, x):
            return self._fused_forward(x)
        pre, act, vals = self.sparse_code(x, self.prefix_sizes)
        groups = sparse_decode(vals, self.W_dec, act).view(x.shape[0], len(self.prefix_sizes), -1)
        errors, x_hat = prefix_squared_errors(groups, x, self.b_dec)
        losses = self._prefix_losses(errors, {"auxk": self.auxk_loss_sparse(x, pre, x_hat)})
        return ForwardOutput(x_hat, None, losses, active=act, values=vals.detach(), f_dtype=pre.dtype)

    def _fused_forward(self, x: torch.Tensor) -> ForwardOutput:
        """:meth:`sparse_forward` through :func:`.fused.fused_nested` (CPU, compiled module built)."""
        pre, act, vals, errors, auxk, x_hat = self._fused_step(x, fused_nested, self.prefix_sizes)
        return ForwardOutput(x_hat, None, self._prefix_losses(errors, {"auxk": auxk}), active=act, values=vals,
                             f_dtype=pre.dtype, sq_error=errors[-1].detach())

    @staticmethod
    def _prefix_losses(errors: torch.Tensor, penalties: dict) -> dict:
        """The loss dict of Bussmann et al. 2025 sec. 3 from the prefixes' squared errors fp32 ``[G]`` (last: the
        whole dictionary's ``mse``; the rest summed into ``prefix_mse``) and the penalty terms (``auxk``)."""
        losses = {"mse": errors[-1]}
        if errors.numel() > 1:
            losses["prefix_mse"] = errors[:-1].sum()
        return {**losses, **penalties}

    @classmethod
    def _nested_losses(cls, x, partials, penalties) -> dict:
        """:meth:`_prefix_losses` from the prefix reconstructions ``[batch, d_in]`` (the dense path)."""
        return cls._prefix_losses(torch.stack([squared_error(x, p) for p in partials]), penalties)


class _PrefixErrors(torch.autograd.Function):
    """Every prefix's squared error from the per-group decodes, in one node (:func:`prefix_squared_errors`).

    Forward: ``E[:, m] = b_dec + sum_{g <= m} groups[:, g] - x`` (the running sum written slice by slice into
    one ``[B, G, D]`` buffer) and ``errors[m] = mean_b ||E[b, m]||^2``. Backward, ``gE_m = 2 / B * d errors[m]
    * E[:, m]``: group ``g`` feeds every prefix ``m >= g``, so its gradient is the suffix sum
    ``sum_{m >= g} gE_m`` (formed in place, last group first); ``d x = -(that sum at g = 0)``, ``d b_dec`` its
    batch sum. Autograd's graph of ``cumsum``, ``unbind``, G subtractions and squares cost ~9 ms of a 53 ms
    Matryoshka step at B 1024, G 5, D 640 (``cumsum`` / ``flip`` in its backward; bench/topk_profile.py).
    """

    @staticmethod
    def forward(ctx, groups, x, b_dec):
        """Autograd forward: ``(errors [G] fp32, E[:, -1] [B, D] fp32)``, formula in the class docstring."""
        err = torch.empty_like(groups)
        torch.add(groups[:, 0], b_dec - x, out=err[:, 0])
        for m in range(1, groups.shape[1]):
            torch.add(err[:, m - 1], groups[:, m], out=err[:, m])
        errors = torch.linalg.vector_norm(err, dim=-1).square().mean(0)
        ctx.save_for_backward(err)
        last = err[:, -1].clone()
        ctx.mark_non_differentiable(last)
        return errors, last

    @staticmethod
    def backward(ctx, grad_errors, _grad_last):
        """Gradients of ``groups``, ``x`` and ``b_dec`` (class docstring)."""
        (err,) = ctx.saved_tensors
        g = err * (grad_errors * (2.0 / err.shape[0])).view(1, -1, 1)
        for m in range(g.shape[1] - 2, -1, -1):
            g[:, m] += g[:, m + 1]
        total = g[:, 0]
        d_x = -total if ctx.needs_input_grad[1] else None
        d_b_dec = total.sum(0) if ctx.needs_input_grad[2] else None
        return g, d_x, d_b_dec


def prefix_squared_errors(groups: torch.Tensor, x: torch.Tensor, b_dec: torch.Tensor):
    """The nested losses' terms from each latent group's share of the decode (Bussmann et al. 2025, sec. 3).

    ``groups`` fp32 ``[B, G, d_in]`` (group ``g``'s latents' decode, no bias; :func:`.kernels.sparse_decode`'s
    bags viewed per row), ``x`` ``[B, d_in]``, ``b_dec`` ``[d_in]``. Returns ``errors`` fp32 ``[G]``:
    ``errors[m] = mean_b ||b_dec + sum_{g <= m} groups[b, g] - x[b]||^2`` (prefix ``m``'s
    :func:`squared_error`), differentiable in all three inputs, and ``x_hat`` fp32 ``[B, d_in]``, the whole
    dictionary's reconstruction (no gradient). Same maths as :meth:`MatryoshkaSAE.prefix_reconstructions`
    with :func:`squared_error`, up to fp32 rounding (tests/test_kernels.py compares the gradients).
    """
    errors, last = _PrefixErrors.apply(groups, x.float(), b_dec)
    return errors, last + x.detach().float()


ARCHS = {"matryoshka": ArchInfo(
    MatryoshkaSAE, "Bussmann et al. 2025, Learning Multi-Level Features with Matryoshka SAEs, sec. 3; "
                   "Nabeshima 2024")}
