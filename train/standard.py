"""``standard``: ReLU SAE with an L1 penalty weighted by decoder-row norms.

Source: Anthropic, "Circuits Updates - April 2024" (Conerly et al.), training
recipe: loss ``||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||_2`` on inputs scaled
to ``E||x||^2 = d_in``, decoder rows unconstrained (the weighting makes the penalty
invariant to shrinking latents), lambda warmed up over the first 5% of steps by
the trainer's ``sparsity_scale``. The paper uses lambda ~5; default here 5.0.

Training on the CPU runs on the pairs with ``pre > 0`` once a batch is sparse enough (issue 14,
:mod:`.relu_pairs`): the L1's weights ``lambda * sparsity_scale * ||W_dec[i]||`` go to the fused op.
"""

from __future__ import annotations

import torch

from .arch_info import ArchInfo
from .base import SAE
from .kernels import check_kernels
from .relu_pairs import WeightedL1PairsMixin


class StandardSAE(WeightedL1PairsMixin, SAE):
    """ReLU + decoder-norm-weighted L1. ``[batch, d_in] -> [batch, d_sae]``.

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        l1_coeff: lambda of the weighted L1 term (dimensionless, on normalised inputs).
        init_dec_norm: initial decoder-row norm (the update suggests 0.05-1; 0.1 here).
        kernels: ``"sparse"`` (default: the pairs step on CPU when the batch is sparse enough, :mod:`.relu_pairs`)
            or ``"dense"`` (always the dense step); same maths. None = ``kernels.DEFAULT_KERNELS``.
    """

    arch = "standard"
    unit_norm_decoder = False
    max_grad_norm = 1.0  # April update: gradients clipped to norm 1

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, l1_coeff: float = 5.0, init_dec_norm: float = 0.1,
                 kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        self.l1_coeff, self.init_dec_norm = l1_coeff, init_dec_norm
        self.kernels = check_kernels(kernels)
        with torch.no_grad():  # April update: decoder rows start at a small norm, encoder = transpose
            self.W_dec *= init_dec_norm
            self.W_enc.copy_(self.W_dec.T)

    def hparams(self) -> dict:
        """``{"l1_coeff": ..., "init_dec_norm": ...}``."""
        return {"l1_coeff": self.l1_coeff, "init_dec_norm": self.init_dec_norm}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU."""
        return torch.relu(pre)

    def pair_l1_weights(self) -> torch.Tensor:
        """The pairs step's L1 weights ``lambda * sparsity_scale * ||W_dec[i]||`` (:meth:`penalties`' per latent)."""
        return self.l1_coeff * self.sparsity_scale * self.W_dec.norm(dim=-1)

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``l1``: lambda * sparsity_scale * mean over batch of ``sum_i f_i ||W_dec,i||``."""
        weighted = (f.float() * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return {"l1": self.l1_coeff * self.sparsity_scale * weighted}

    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor]]:
        """``("standard", W_enc/b_enc/W_dec/b_dec)``: SAELens' standard SAE is this SAE's inference."""
        return "standard", self.linear_tensors()


ARCHS = {"standard": ArchInfo(StandardSAE, "Conerly et al., Anthropic Circuits Update, April 2024")}
