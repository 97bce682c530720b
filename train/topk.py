"""``topk``: TopK SAE with the AuxK dead-latent loss.

Source: Gao et al. 2024, "Scaling and evaluating sparse autoencoders":
sec. 2.3 (``f = ReLU(TopK(W_enc (x - b_pre) + b_enc))``, unit-norm decoder rows),
appendix A.2 (AuxK: reconstruct the residual error ``e = x - x_hat`` with the top
``k_aux`` latents among those dead for a window of tokens, coefficient 1/32,
``k_aux = d_in / 2``). The AuxK term here is normalised by ``||e||^2`` as in the
paper's reference implementation, so it is scale-free.
"""

from __future__ import annotations

import torch

from .arch_info import ArchInfo
from .base import SAE


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest pre-activations of each row, ReLU them, zero the rest.

    ``[batch, d_sae] -> [batch, d_sae]``.
    """
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))


class AuxKMixin:
    """AuxK loss for TopK-family SAEs (Gao et al. 2024, app. A.2).

    Needs ``tokens_since_fired``, ``W_dec``, ``d_in`` and attributes ``aux_k``,
    ``aux_coeff``, ``dead_window_tokens`` (set by the trainer; default 250k tokens).
    """

    dead_window_tokens: int = 250_000

    def auxk_loss(self, x: torch.Tensor, pre: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Weighted AuxK term (scalar); zero when no latent is dead."""
        dead = self.tokens_since_fired >= self.dead_window_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(()).float()
        k_aux = min(self.aux_k, n_dead)
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        f_aux = topk_relu(masked, k_aux)
        e = (x - x_hat).detach().float()
        e_hat = (f_aux @ self.W_dec).float()
        return self.aux_coeff * (e_hat - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-12)


class TopKSAE(AuxKMixin, SAE):
    """TopK SAE. ``[batch, d_in] -> [batch, d_sae]`` with exactly <= k non-zeros per row.

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        k: active latents per token (default 32).
        aux_k: latents used by AuxK (default ``d_in // 2``).
        aux_coeff: AuxK weight (default 1/32).
    """

    arch = "topk"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, k: int = 32, aux_k: int | None = None,
                 aux_coeff: float = 1 / 32):
        super().__init__(d_in, d_sae, seed)
        self.k, self.aux_k, self.aux_coeff = k, aux_k or d_in // 2, aux_coeff

    def hparams(self) -> dict:
        """``k``, ``aux_k``, ``aux_coeff``."""
        return {"k": self.k, "aux_k": self.aux_k, "aux_coeff": self.aux_coeff}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU(TopK(pre))."""
        return topk_relu(pre, self.k)

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``auxk`` (only while training)."""
        return {"auxk": self.auxk_loss(x, pre, x_hat)} if self.training else {}


ARCHS = {"topk": ArchInfo(TopKSAE, "Gao et al. 2024, Scaling and evaluating sparse autoencoders, sec. 2.3, app. A.2")}
