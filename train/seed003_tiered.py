"""``tiered_hsae``: three-tier hierarchical SAE with learned softmax tier weights.

Source: seed 003, "Compositional Hierarchies: Sparse Autoencoders for
Multi-Level Language Model Interpretability"
(``shared/seeds/003_6f21324b84bfb1b6.txt``).

- Sec. 3.1 eq. (1)-(2), sec. 4: tiers are chained,
  ``h_i = ReLU(W_i h_{i-1} + b_i)`` with ``h_0 = x``, and the reconstruction
  sums every tier, ``x_hat = sum_i W'_i h_i + b'``.
- Sec. 4 / 5: three tiers of widths [768, 1536, 2304] on Gemma-2-2B, i.e. the
  ratio 1:2:3 of the total latent count (4608 = 2 d_model); here the widths are
  ``d_sae * (1, 2, 3) / 6`` so the preset fits any d_model / d_sae.
- Sec. 3.1 eq. (3), sec. 4 eq. (6): ``L = ||x - x_hat||^2 + lambda_1 sum_i w_i ||h_i||_1``,
  ``w = softmax(logits)`` learned, initialised to [0.1, 0.3, 0.6]; lambda_1 = 0.04.
- Sec. 5: Xavier initialisation, layer normalisation between tiers, AdamW
  lr 3e-4, weight decay 1e-4, cubic lr warmup over 2000 steps, per-tier gradient
  clipping thresholds [1.0, 2.0, 5.0]; abstract / sec. 1: "curriculum-based
  training that progressively builds feature complexity".

Interpretation choices (the paper leaves these open):

- The "softmax tier weights initialised at 0.1/0.3/0.6" are logits
  ``log([0.1, 0.3, 0.6])``, so ``softmax(logits)`` equals the stated values at
  initialisation (softmax of the raw numbers would give 0.26/0.32/0.42).
- Curriculum: tiers are switched on one after another. Tier 1 is always on;
  tier ``i >= 2`` fades in linearly (its latents are multiplied by a gate
  0 -> 1) over its share of the first ``curriculum_frac`` (default 0.2) of
  training, tier 2 first, then tier 3. The gate exists only in training mode, so
  a trained or reloaded SAE always uses every tier. The progress comes from the
  trainer's :meth:`SAE.after_step` hook; a fresh SAE starts at progress 0.
- Per-tier clipping: the gradient of each tier's own parameters (its encoder
  matrix, its slice of ``b_enc`` and of ``W_dec``) is rescaled to L2 norm at most
  1 / 2 / 5. Shared parameters (``b_dec``, the tier logits) are not clipped.
  The trainer calls :meth:`remove_parallel_grad` between ``backward`` and the
  optimiser step, so the clipping is done there; ``clips_own_grads`` tells the
  trainer to skip its global norm-1 clip, which would make the bounds 2 and 5 moot.
- The thresholds are in the units of this project's normalised inputs (mean
  norm ``sqrt(d_in)``), not raw Gemma residuals; with Adam the clipping mainly
  bounds the relative size of outlier steps.
- Tier 1 reads ``x - b_dec`` (the project's SAE convention; eq. 1 has ``x``)
  and uses the project's tied initialisation (unit-norm decoder rows, encoder
  = transpose); the tier-to-tier matrices are Xavier-uniform (sec. 5). Decoder
  rows are kept at unit norm: the paper does not say, but with an L1 penalty
  and a free decoder the penalty can be evaded by shrinking latents.
- The between-tier layer norm has no affine parameters (not specified); it
  only sees latents, so folding the input scale at save time is unaffected.
- ``W_enc`` is tier 1's input map ``[d_in, d_1]`` (not ``[d_in, d_sae]``): tiers
  2 and 3 read the previous tier, not ``x``, so there is no single input-to-
  latent matrix. Their maps are saved as extra tensors ``W_tier.0``,
  ``W_tier.1``. SAELens cannot load this arch; saestrata can.
- AdamW weight decay and the cubic warmup are not reproduced (the project
  trainer uses Adam with linear warmup for every SAE).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arch_info import ArchError, ArchInfo
from .base import ForwardOutput, SAE
from .kernels import check_kernels
from .relu_pairs import PairsStepMixin


def tier_widths(d_sae: int, ratios: tuple[float, ...]) -> list[int]:
    """Split ``d_sae`` latents into tiers proportional to ``ratios`` (seed 003 sec. 4: 1:2:3).

    Widths are rounded down; the rounding remainder goes to the last (widest) tier.

    Raises:
        ArchError: a ratio is not positive or a tier would be empty.
    """
    if not ratios or min(ratios) <= 0:
        raise ArchError(f"tier_ratios must be positive, got {ratios}")
    total = float(sum(ratios))
    widths = [int(d_sae * r / total) for r in ratios[:-1]]
    widths.append(d_sae - sum(widths))
    if min(widths) < 1:
        raise ArchError(f"d_sae={d_sae} is too small for tier ratios {ratios}")
    return widths


def curriculum_gates(progress: float, n_tiers: int, curriculum_frac: float) -> list[float]:
    """Gate in [0, 1] of each tier at training ``progress`` in [0, 1] (interpretation of seed 003 sec. 1).

    Tier 1 is always 1; tier ``i >= 2`` rises linearly from 0 to 1 over
    ``[(i-2) c, (i-1) c]`` with ``c = curriculum_frac / (n_tiers - 1)``.
    ``curriculum_frac <= 0`` disables the curriculum (all gates 1).
    """
    if curriculum_frac <= 0 or n_tiers == 1:
        return [1.0] * n_tiers
    slope = (n_tiers - 1) / curriculum_frac
    return [min(1.0, max(0.0, progress * slope - (i - 1))) for i in range(n_tiers)]


class TieredHSAE(PairsStepMixin, SAE):
    """Chained ReLU tiers, summed decoders, learned softmax tier weights. ``[batch, d_in] -> [batch, d_sae]``.

    Latents are the tiers concatenated in order: ``f = [h_1, h_2, h_3]``.

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        tier_ratios: relative tier widths (seed 003: 1, 2, 3).
        tier_init: initial softmax tier weights (seed 003: 0.1, 0.3, 0.6); must be positive.
        tier_clip: per-tier gradient-norm bounds (seed 003: 1, 2, 5); ``None`` entries disable one.
        l1_coeff: lambda_1 (seed 003: 0.04), on inputs normalised to mean norm ``sqrt(d_in)``.
        curriculum_frac: fraction of training over which tiers 2.. fade in (0 disables).
        tier_layernorm: layer-normalise a tier's output before the next tier reads it (seed 003 sec. 5).
        kernels: ``"sparse"`` (default: while training on the CPU, the decode and its gradients from the code's
            non-zeros once at most :data:`.relu_pairs.SPARSE_MAX_DENSITY` of it is non-zero,
            :meth:`.relu_pairs.PairsStepMixin.decode_code`; counted in ``sparse_steps``) or ``"dense"``; same maths. The chained
            tiers' encoders stay dense (tier ``i`` reads the layer norm of tier ``i - 1``, a dense vector).

    Raises:
        ArchError: the three per-tier lists differ in length, a weight is not positive, or d_sae is too small.
    """

    arch = "tiered_hsae"
    saelens_unsupported = "chained tiers (tier i reads layer-normed tier i-1); no SAELens arch"
    unit_norm_decoder = True
    clips_own_grads = True  # sec. 5's per-tier bounds, not the trainer's global clip of 1

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, tier_ratios=(1, 2, 3), tier_init=(0.1, 0.3, 0.6),
                 tier_clip=(1.0, 2.0, 5.0), l1_coeff: float = 0.04, curriculum_frac: float = 0.2,
                 tier_layernorm: bool = True, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        self.kernels = check_kernels(kernels)
        if not len(tier_ratios) == len(tier_init) == len(tier_clip):
            raise ArchError("tier_ratios, tier_init and tier_clip need one entry per tier")
        if min(tier_init) <= 0:
            raise ArchError(f"tier_init must be positive (they are softmax probabilities), got {tier_init}")
        self.tier_ratios, self.tier_init = [float(r) for r in tier_ratios], [float(w) for w in tier_init]
        self.tier_clip = [None if c is None else float(c) for c in tier_clip]
        self.l1_coeff, self.curriculum_frac = float(l1_coeff), float(curriculum_frac)
        self.tier_layernorm = bool(tier_layernorm)
        self.widths = tier_widths(d_sae, tuple(self.tier_ratios))
        self.progress = 0.0  # curriculum position, set by after_step
        self.clip_counts = [0] * len(self.widths)  # steps whose tier gradient was clipped (counters)
        self.last_grad_norms: list[float] | None = None
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            # Tier 1 reads x: keep the base tied init, restricted to tier 1's latents.
            self.W_enc = nn.Parameter(self.W_dec[: self.widths[0]].T.clone())
        self.W_tier = nn.ParameterList(
            nn.Parameter(_xavier_uniform(w_in, w_out, gen)) for w_in, w_out in zip(self.widths[:-1], self.widths[1:])
        )
        # softmax(log p) = p when sum(p) = 1; normalise so any positive init is reproduced exactly.
        init = torch.tensor(self.tier_init) / sum(self.tier_init)
        self.tier_logits = nn.Parameter(init.log())

    def hparams(self) -> dict:
        """Tier ratios, initial weights, clip bounds, lambda_1, curriculum fraction, layer norm flag."""
        return {"tier_ratios": self.tier_ratios, "tier_init": self.tier_init, "tier_clip": self.tier_clip,
                "l1_coeff": self.l1_coeff, "curriculum_frac": self.curriculum_frac,
                "tier_layernorm": self.tier_layernorm}

    # -- structure ----------------------------------------------------------------------
    latent_group_kind = "tier"

    def latent_groups(self) -> dict[str, torch.Tensor]:
        """Latent indices of each tier, for tier-activity diagnostics (seed 003 sec. 5)."""
        return {f"tier{i + 1}": torch.arange(s.start, s.stop) for i, s in enumerate(self.tier_slices())}

    def tier_slices(self) -> list[slice]:
        """Slice of each tier in the concatenated latent vector ``[d_sae]``."""
        ends = torch.tensor(self.widths).cumsum(0).tolist()
        return [slice(e - w, e) for w, e in zip(self.widths, ends)]

    def tier_weights(self) -> torch.Tensor:
        """Learned tier weights ``w = softmax(tier_logits)``, float ``[n_tiers]`` summing to 1 (seed 003 eq. 3)."""
        return torch.softmax(self.tier_logits.float(), dim=0)

    def tier_encoders(self) -> list[torch.Tensor]:
        """Each tier's input map: ``W_enc [d_in, d_1]``, then ``W_tier.i [d_i, d_{i+1}]``."""
        return [self.W_enc, *self.W_tier]

    # -- forward ------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Not defined for chained tiers (tier i>1 reads tier i-1); use :meth:`tier_latents`.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("tiered_hsae has no single pre-activation; use tier_latents(x)")

    def tier_latents(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Ungated tier activations ``h_i = ReLU(W_i LN(h_{i-1}) + b_i)``, ``h_0 = x - b_dec`` (seed 003 eq. 1).

        ``x`` is ``[batch, d_in]``; returns one ``[batch, d_i]`` tensor per tier.
        """
        h, out = x - self.b_dec, []
        for i, (w, sl) in enumerate(zip(self.tier_encoders(), self.tier_slices())):
            if i > 0 and self.tier_layernorm:
                h = F.layer_norm(h, h.shape[-1:])
            h = torch.relu(h @ w + self.b_enc[sl])
            out.append(h)
        return out

    def _gated(self, tiers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply the curriculum gates (training mode only)."""
        if not self.training:
            return tiers
        gates = curriculum_gates(self.progress, len(tiers), self.curriculum_frac)
        self._gates = gates  # the gates of the last training forward, for counters()
        return [h if g == 1.0 else h * g for h, g in zip(tiers, gates)]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, d_in] -> [batch, d_sae]``: the (gated while training) tiers concatenated."""
        return torch.cat(self._gated(self.tier_latents(x)), dim=-1)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Reconstruction (seed 003 eq. 5) and losses ``mse`` and ``l1 = lambda_1 sum_i w_i E||h_i||_1`` (eq. 6)."""
        tiers = self._gated(self.tier_latents(x))
        f = torch.cat(tiers, dim=-1)
        x_hat = self.decode_code(f)
        mse = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        l1_per_tier = torch.stack([h.float().abs().sum(-1).mean() for h in tiers])
        l1 = self.l1_coeff * self.sparsity_scale * (self.tier_weights() * l1_per_tier).sum()
        if self.training:  # per-tier L0 of this batch, for counters()
            self._tier_l0 = torch.stack([(h > 0).sum(-1).float().mean() for h in tiers]).detach()
        return ForwardOutput(x_hat, f, {"mse": mse, "l1": l1})

    def counters(self) -> dict[str, float]:
        """What each seed-003 mechanism did, at log time.

        ``l0_tier{i}``: mean active latents per token of tier ``i`` on the last training batch
        (gated latents count as inactive); ``dead_frac_tier{i}``: fraction of tier ``i``'s
        latents silent for the trainer's dead window; ``tier_weight{i}``: ``softmax(tier_logits)``
        (eq. 3); ``curriculum_progress`` (of the next step) and ``gate_tier{i}`` (the gate the last
        training forward used; before any, the gate at ``progress``) for the curriculum; ``clipped_tier{i}``:
        optimiser steps whose tier-``i`` gradient was rescaled by the per-tier clipping, and
        ``grad_norm_tier{i}``: that tier's gradient norm before clipping at the last step (sec. 5); ``sparse_steps``:
        training forwards that decoded from the code's non-zeros (:meth:`.relu_pairs.PairsStepMixin.decode_code`).
        """
        from .trainer import sae_dead_window  # the trainer imports this module's registry

        dead = (self.tokens_since_fired >= sae_dead_window(self)).float()
        gates = getattr(self, "_gates", None) or curriculum_gates(self.progress, len(self.widths), self.curriculum_frac)
        out = {**super().counters(), "curriculum_progress": self.progress}
        weights = self.tier_weights().detach()
        last_l0 = getattr(self, "_tier_l0", None)
        for i, sl in enumerate(self.tier_slices()):
            n = i + 1
            if last_l0 is not None:
                out[f"l0_tier{n}"] = float(last_l0[i])
            out[f"dead_frac_tier{n}"] = float(dead[sl].mean())
            out[f"tier_weight{n}"] = float(weights[i])
            out[f"gate_tier{n}"] = gates[i]
            out[f"clipped_tier{n}"] = self.clip_counts[i]
            if self.last_grad_norms is not None:
                out[f"grad_norm_tier{n}"] = self.last_grad_norms[i]
        return out

    # -- training hooks -----------------------------------------------------------------
    def after_step(self, step: int, steps: int) -> None:
        """Advance the curriculum: progress of the next step is ``(step + 1) / steps``."""
        self.progress = (step + 1) / max(steps, 1)

    def extra_state(self) -> dict:
        """``progress`` (the curriculum position set by :meth:`after_step`) and ``clip_counts``."""
        return {**super().extra_state(), "progress": self.progress, "clip_counts": list(self.clip_counts)}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`. Raises ``KeyError`` if ``progress`` is missing.

        Checkpoints written before ``clip_counts`` existed restore it as zeros.
        """
        super().load_extra_state(state)
        self.progress = float(state["progress"])
        self.clip_counts = [int(c) for c in state.get("clip_counts", [0] * len(self.widths))]

    def tier_grads(self, i: int) -> list[torch.Tensor]:
        """Gradient tensors (views) of tier ``i``'s own parameters; empty entries are skipped."""
        sl = self.tier_slices()[i]
        grads = [self.tier_encoders()[i].grad, None if self.b_enc.grad is None else self.b_enc.grad[sl],
                 None if self.W_dec.grad is None else self.W_dec.grad[sl]]
        return [g for g in grads if g is not None]

    def tier_grad_norms(self) -> list[float]:
        """Current L2 norm of each tier's gradient (0.0 when it has none)."""
        return [math.sqrt(sum(float(g.float().pow(2).sum()) for g in self.tier_grads(i)))
                for i in range(len(self.widths))]

    @torch.no_grad()
    def clip_tier_grads(self) -> list[float]:
        """Rescale each tier's gradient to norm <= ``tier_clip[i]`` (seed 003 sec. 5); returns the pre-clip norms.

        Counts the clipped tiers in ``clip_counts`` and keeps the norms in ``last_grad_norms`` (:meth:`counters`).
        """
        norms = self.tier_grad_norms()
        for i, (norm, bound) in enumerate(zip(norms, self.tier_clip)):
            if bound is not None and norm > bound:
                self.clip_counts[i] += 1
                for g in self.tier_grads(i):
                    g.mul_(bound / norm)
        self.last_grad_norms = norms
        return norms

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Base decoder projection, then per-tier clipping (the trainer calls this between backward and step)."""
        super().remove_parallel_grad()
        self.clip_tier_grads()


def _xavier_uniform(fan_in: int, fan_out: int, gen: torch.Generator) -> torch.Tensor:
    """Glorot/Xavier uniform ``[fan_in, fan_out]``: U(-a, a), ``a = sqrt(6 / (fan_in + fan_out))``."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(fan_in, fan_out, generator=gen) * 2 - 1) * bound


ARCHS = {
    "tiered_hsae": ArchInfo(
        TieredHSAE,
        "seed 003 (shared/seeds/003_6f21324b84bfb1b6.txt), sec. 3.1 eq. (1)-(3), sec. 4 eq. (5)-(6), sec. 5",
        presets={
            # Sec. 5: AdamW, lr 3e-4, weight decay 1e-4 (its cubic 2000-step warmup is not used: one shared schedule).
            # Sec. 4-5: widths 1:2:3 of d_sae (the paper's 4608 latents = --expansion 2 on Gemma-2-2B).
            "seed003-tiered": {"lr": 3e-4, "weight_decay": 1e-4, "tier_ratios": [1, 2, 3], "tier_init": [0.1, 0.3, 0.6],
                               "tier_clip": [1.0, 2.0, 5.0], "l1_coeff": 0.04, "curriculum_frac": 0.2,
                               "tier_layernorm": True},
        },
    ),
}
