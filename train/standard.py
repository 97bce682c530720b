"""``standard``: ReLU SAE with an L1 penalty weighted by decoder-row norms.

Source: Anthropic, "Circuits Updates - April 2024" (Conerly et al.), training
recipe: loss ``||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||_2`` on inputs scaled
to ``E||x||^2 = d_in``, decoder rows unconstrained (the weighting makes the penalty
invariant to shrinking latents), lambda warmed up over the first 5% of steps by
the trainer's ``sparsity_scale``. The paper uses lambda ~5; default here 5.0.

Training on the CPU runs, once the code is sparse enough, one fused op on the positive pre-activations
(issue 14): the dense step spends four of its five ``[batch, d_in] x [d_in, d_sae]``-sized matmuls on
zeros (decode, its two gradients, the encoder's weight gradient) once L0 is ~30 of thousands. The pairs
with ``pre > 0`` come from the encoder matmul (:func:`.native.batch_topk_pairs` with every entry allowed:
the ReLU's support), and :func:`.fused.fused_pairs_l1` decodes them, forms the squared error and the weighted
L1 and runs the latent-grouped backward of the TopK family's fused ops. Same maths as the dense path
(tests/test_kernels.py compares losses and gradients); steps denser than :data:`SPARSE_MAX_DENSITY` (the
first ~50-80 of a run, while the L1 is warming up) stay dense.
"""

from __future__ import annotations

import torch

from .arch_info import ArchInfo
from .base import SAE, ForwardOutput
from .fused import encoder_mm, fused_available, fused_pairs_l1
from .kernels import ActiveSet, check_kernels
from .native import batch_topk_pairs

# Largest share of (token, latent) pre-activations > 0 for which a step runs on the pairs (else dense): the
# pairs path's work grows with their number, the dense step's does not. bench/relu_sparse.py --crossover (d_in
# 640, batch 1024): fp32 d_sae 2048, pairs / dense step 2.37x faster at 12.3% positive, 1.67x at 22.6%, 0.89x
# at 48%; bf16 autocast d_sae 4096: 1.60x at 11.5% (docs/results/bench/README.md).
SPARSE_MAX_DENSITY = 1 / 8


class StandardSAE(SAE):
    """ReLU + decoder-norm-weighted L1. ``[batch, d_in] -> [batch, d_sae]``.

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        l1_coeff: lambda of the weighted L1 term (dimensionless, on normalised inputs).
        init_dec_norm: initial decoder-row norm (the update suggests 0.05-1; 0.1 here).
        kernels: ``"sparse"`` (default: the fused pairs step on CPU when the batch is sparse enough, module
            docstring) or ``"dense"`` (always the dense step); same maths. None = ``kernels.DEFAULT_KERNELS``.
    """

    arch = "standard"
    unit_norm_decoder = False
    max_grad_norm = 1.0  # April update: gradients clipped to norm 1

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, l1_coeff: float = 5.0, init_dec_norm: float = 0.1,
                 kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        self.l1_coeff, self.init_dec_norm = l1_coeff, init_dec_norm
        self.kernels = check_kernels(kernels)
        self.sparse_steps = 0  # training forwards that ran on the pairs (the log's counter)
        with torch.no_grad():  # April update: decoder rows start at a small norm, encoder = transpose
            self.W_dec *= init_dec_norm
            self.W_enc.copy_(self.W_dec.T)

    def hparams(self) -> dict:
        """``{"l1_coeff": ..., "init_dec_norm": ...}``."""
        return {"l1_coeff": self.l1_coeff, "init_dec_norm": self.init_dec_norm}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU."""
        return torch.relu(pre)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """:meth:`SAE.forward`; while training on the CPU with ``kernels="sparse"``, the fused pairs step when at most
        :data:`SPARSE_MAX_DENSITY` of the pre-activations are positive (module docstring)."""
        if self.kernels == "sparse" and self.training and fused_available(self, x):
            out = self._pairs_forward(x)
            if out is not None:
                return out
        return super().forward(x)

    def _pairs_forward(self, x: torch.Tensor) -> ForwardOutput | None:
        """The training forward on the pairs with ``pre > 0`` (:func:`.fused.fused_pairs_l1`), or None when there are
        more than :data:`SPARSE_MAX_DENSITY` of them (the caller runs the dense step)."""
        mm = encoder_mm(x, self)
        b_enc = self.b_enc.detach()
        picked = batch_topk_pairs(mm, b_enc, mm.numel())  # every positive entry: the ReLU's support, row-sorted
        if picked is None or picked[1].numel() > SPARSE_MAX_DENSITY * mm.numel():
            return None
        rows, cols, vals = picked
        act = ActiveSet(rows, cols, *mm.shape)
        l1_w = self.l1_coeff * self.sparsity_scale * self.W_dec.norm(dim=-1)
        mse, l1, x_hat = fused_pairs_l1(x, self, act, vals, l1_w)
        self.sparse_steps += 1
        return ForwardOutput(x_hat, None, {"mse": mse, "l1": l1}, active=act, values=vals,
                             f_dtype=torch.promote_types(mm.dtype, b_enc.dtype), sq_error=mse.detach())

    def counters(self) -> dict[str, float]:
        """``sparse_steps``: training forwards that ran on the pairs (the rest were dense)."""
        return {**super().counters(), "sparse_steps": self.sparse_steps}

    def extra_state(self) -> dict:
        """``sparse_steps`` (a resumed run's counter continues)."""
        return {**super().extra_state(), "sparse_steps": self.sparse_steps}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`'s counter (0 from checkpoints written before it existed)."""
        super().load_extra_state(state)
        self.sparse_steps = int(state.get("sparse_steps", 0))

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``l1``: lambda * sparsity_scale * mean over batch of ``sum_i f_i ||W_dec,i||``."""
        weighted = (f.float() * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return {"l1": self.l1_coeff * self.sparsity_scale * weighted}

    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor]]:
        """``("standard", W_enc/b_enc/W_dec/b_dec)``: SAELens' standard SAE is this SAE's inference."""
        return "standard", self.linear_tensors()


ARCHS = {"standard": ArchInfo(StandardSAE, "Conerly et al., Anthropic Circuits Update, April 2024")}
