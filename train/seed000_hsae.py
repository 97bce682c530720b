"""Seed 000: two-level hierarchical SAE (HSAE) and its temporal and adaptive baselines.

Source: ``shared/seeds/000_f12e7a2a70be7625.txt`` ("Beyond sparsity: hierarchical
feature organization reveals fundamental limits in language model unlearning").
Row-vector convention below (``x [batch, d]``); ``k = d_sae``, each level ``k/2`` wide.

HSAE (sec. 4, eqs. 1-4; hyperparameters sec. 5)::

    z1    = ReLU(x W1 + b1)                      W1 [d, k/2]      (eq. 1)
    z2    = ReLU(z1 W2 + b2)                     W2 [k/2, k/2]    (eq. 2)
    x_hat = (z2 Wd2 + bd2) Wd1 + z1 Ws + bd1                      (eq. 3)
    L     = ||x - x_hat||^2 + l1 ||z1||_1 + l2 ||z2||_1 + ld ||G1 * G2||_F^2   (eq. 4)

with ``lambda1 = 0.03, lambda2 = 0.05, lambda_d = 0.02`` and unit-norm rows of
``Wd1``, ``Wd2`` (sec. 5). Saved names: ``W_enc = W1``, ``b_enc = b1``, ``W_enc2 = W2``,
``b_enc2 = b2``, ``W_dec = Wd1 [k/2, d]``, ``W_dec2 = Wd2``, ``b_dec2 = bd2``,
``W_skip = Ws [k/2, d]``, ``b_dec = bd1``; latents ``f = [z1, z2]`` (``[batch, k]``).

Baselines (sec. 5, "matched parameter counts and training settings"): a multi-scale
temporal SAE with dilated convolutions (rates 1, 2, 4) and an adaptive feature
selection SAE with learnable importance masks. The paper says nothing more about them.

Readings of ambiguous or contradictory points (choices, written down as required):

1. Widths. Sec. 5 trains ``k = d = 2304`` (expansion 1) split into two levels of
   1152. Here ``k`` is the trainer's ``d_sae`` (must be even); use ``--expansion 1``
   to match the paper. At ``k = d`` the HSAE has ``1.5 d k + k^2/2 = 2 d^2`` weights,
   exactly a standard SAE's ``2 d k``: this is what "matched parameter counts" means.
2. Eq. 3 shapes: ``Wd2 [k/2, k/2]`` maps level 2 back to level-1 space and ``Wd1
   [k/2, d]`` maps that to the input; the only shapes for which eq. 3 type-checks.
   Taken literally, level-1 latents reach ``x_hat`` only through the skip ``Ws``.
3. Gram matrices (eq. 4). ``G_i = z_i z_i^T`` is said to "measure feature
   correlations", and ``G1 * G2`` (elementwise) needs equal shapes. We use the
   batch feature Gram ``G_i = Z_i^T Z_i / B`` (``[k/2, k/2]``, uncentred second
   moment over the batch), diagonal included. Rejected: the per-token outer
   product (its ``||.||_F^2`` collapses to ``(sum_a z1a^2 z2a^2)^2``, no correlation
   at all) and the token Gram ``Z Z^T`` (``[B, B]``, correlations of tokens, not
   features). Dividing by ``B`` keeps ``lambda_d`` independent of the batch size.
4. Eq. 1 has no pre-encoder bias: the HSAE encodes ``x W1 + b1`` (``b_dec`` is not
   subtracted, unlike the SAELens convention used by the baselines).
5. Scale: the trainer feeds inputs normalised to mean norm ``sqrt(d)`` (train/base.py),
   the paper raw Gemma-2-2B residuals. Squared error and L1 scale differently, so the
   same lambdas give a different sparsity; the paper's "60% zero activations" (sec.
   6) already shows a weak L1, and so do ours (see the test report).
6. Only the L1 terms follow the trainer's sparsity warmup (``sparsity_scale``); the
   Gram term is not a sparsity coefficient and is applied in full from step 0.
7. ``Ws`` is left unconstrained (sec. 5 constrains only ``Wd1``, ``Wd2``), so the
   level-1 L1 can be lowered by shrinking ``W1`` and growing ``Ws``; kept as written.
8. Optimiser: sec. 5 uses AdamW, lr 3e-4, 1000 warmup steps, cosine decay, 100k
   steps; the shared trainer uses Adam with linear warmup/decay for every SAE of a
   pass. Presets carry architecture hyperparameters only; pass ``lr=3e-4`` in the
   ``SAESpec`` for the paper's learning rate.
9. Temporal SAE: causal depthwise dilated convolutions over the encoder
   pre-activations ``u_t = (x_t - b_dec) W_enc``, one branch per rate, summed:
   ``pre_t = b_enc + sum_r sum_j w[r, j] * u_{t - j r}`` (``w [n_rates, K, d_sae]``,
   ``K = 2``: the token and the token ``r`` back, WaveNet-style); ``f = ReLU(pre)``,
   token-wise decoder. Depthwise keeps the parameter count matched (+``n_rates K
   d_sae``); causal because the SAE is spliced into a causal LM and must not pass
   later tokens to earlier positions. Taps start at ``(1/n_rates, 0)`` (a plain SAE).
   A tap that would cross a row start or a document boundary, or land on an invalid
   (BOS/special) token, contributes zero. Token-only :meth:`encode` treats every
   token as a one-token document. The "single-scale temporal convolution" ablation
   (sec. 6) is the preset with rates ``[1]``.
10. Adaptive SAE: one learnable importance logit per latent, ``f = ReLU(pre) *
    sigmoid(m)``, logits start at 0 (mask 0.5, where sigmoid's gradient is largest).
    The L1 acts on the masked latents, so it also pushes unimportant masks down (the
    "feature selection"); no separate mask penalty is given in the paper.
11. Baseline sparsity: plain L1 with ``lambda1 = 0.03`` ("same hyperparameters",
    sec. 5) on unit-norm decoder rows, ReLU, SAELens pre-encoder bias.
12. Initialisation (not in the paper, which gives none for the HSAE): from the first
    batch, both levels' pre-activations are centred and ``W1``/``b1``/``b2`` share one
    least-squares gain that fits the reconstruction to the batch (:meth:`init_b_dec`).
    The tied init alone started at FVU ~32 with ~52% of the latents dead (issue 10).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .arch_info import ArchError, ArchInfo
from .base import SAE, ForwardOutput
from .kernels import check_kernels, code_nonzeros, sparse_decode
from .relu_pairs import SPARSE_MAX_DENSITY, PairsStepMixin, WeightedL1PairsMixin
from .sparse_gram import coactivation_gram

SEED = "seed 000 (shared/seeds/000_f12e7a2a70be7625.txt)"


def gram_disentanglement(z1: torch.Tensor, z2: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """Unweighted ``||G1 * G2||_F^2`` with ``G_i = Z_i^T Z_i / B`` (seed 000 eq. 4; reading 3).

    Args:
        z1, z2: ``[B, m]`` level latents (same width ``m``; ReLU codes: each Gram comes from its code's non-zeros
            when sparse enough, :func:`.sparse_gram.coactivation_gram`, counted in ``stats["sparse_gram"]``).

    Returns:
        fp32 scalar (units: latent activation to the 8th power).

    Raises:
        ValueError: the two levels differ in shape.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"levels must have equal shapes for G1 * G2, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    g1 = coactivation_gram(z1, stats) / n
    g2 = coactivation_gram(z2, stats) / n
    return (g1 * g2).pow(2).sum()


def _unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, d]`` fp32 Gaussian matrix with unit-norm rows."""
    w = torch.randn(n, d, generator=gen)
    return w / w.norm(dim=1, keepdim=True)


def _mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, mean over tokens (fp32 scalar)."""
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


class HierarchicalSAE(PairsStepMixin, SAE):
    """Two-level HSAE with decoder skip connection and Gram disentanglement (seed 000 sec. 4).

    ``encode: [batch, d_in] -> [batch, d_sae]`` (``[z1, z2]``, each ``d_sae/2``);
    ``decode`` is eq. 3. Loss terms: ``mse``, ``l1_level1``, ``l1_level2``, ``disentangle``.

    Args:
        d_in, seed: see :class:`SAE`.
        d_sae: total latents ``k`` (even); each level has ``k/2``.
        lambda1, lambda2: L1 weights of levels 1 and 2 (eq. 4; sec. 5: 0.03, 0.05).
        lambda_d: weight of the Gram disentanglement term (eq. 4; sec. 5: 0.02).
        kernels: ``"sparse"`` (default: in CPU training forwards, the products of the sparse level codes,
            ``z1 W2``, ``z2 Wd2`` and ``z1 Ws``, and their gradients from the codes' non-zeros once at most
            :data:`.relu_pairs.SPARSE_MAX_DENSITY` of ``z1`` is non-zero, :func:`.kernels.code_nonzeros`; counted in
            ``sparse_steps``) or ``"dense"``; same maths. ``x W1`` and ``(.) Wd1`` read dense inputs and stay dense.

    Raises:
        ArchError: ``d_sae`` odd or < 2.
    """

    arch = "hsae_skip"
    saelens_unsupported = "two-level encoder (z2 = ReLU(z1 W_enc2 + b_enc2)) and a skip decoder; no SAELens arch"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, lambda1: float = 0.03, lambda2: float = 0.05,
                 lambda_d: float = 0.02, kernels: str | None = None):
        if d_sae < 2 or d_sae % 2:
            raise ArchError(f"hsae_skip splits d_sae into two equal levels: d_sae must be even, got {d_sae}")
        super().__init__(d_in, d_sae, seed)
        self.lambda1, self.lambda2, self.lambda_d = lambda1, lambda2, lambda_d
        self.kernels = check_kernels(kernels)
        half = d_sae // 2
        gen = torch.Generator().manual_seed(seed + 1_000_003)
        w_d1, w_d2 = _unit_rows(half, d_in, gen), _unit_rows(half, half, gen)
        # Tied init at both levels (as the base class); the skip starts as a copy of Wd1.
        self.W_enc, self.b_enc = nn.Parameter(w_d1.T.clone()), nn.Parameter(torch.zeros(half))
        self.W_enc2, self.b_enc2 = nn.Parameter(w_d2.T.clone()), nn.Parameter(torch.zeros(half))
        self.W_dec, self.W_skip = nn.Parameter(w_d1), nn.Parameter(w_d1.clone())
        self.W_dec2, self.b_dec2 = nn.Parameter(w_d2), nn.Parameter(torch.zeros(half))
        self._grams: dict[str, int] = {}  # "sparse_gram": training Grams formed from the code's non-zeros

    latent_group_kind = "level"

    def latent_groups(self) -> dict[str, torch.Tensor]:
        """Latent indices of level 1 (first half) and level 2 (second half) for diagnostics (seed 000 sec. 4)."""
        half = self.d_sae // 2
        return {"level1": torch.arange(half), "level2": torch.arange(half, self.d_sae)}

    def hparams(self) -> dict:
        """``lambda1``, ``lambda2``, ``lambda_d``."""
        return {"lambda1": self.lambda1, "lambda2": self.lambda2, "lambda_d": self.lambda_d}

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Level-1 pre-activations ``x W1 + b1`` (eq. 1, no pre-encoder bias): ``[batch, d_in] -> [batch, d_sae/2]``."""
        return x @ self.W_enc + self.b_enc

    def levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [batch, d_in] -> (z1, z2)``, each ``[batch, d_sae/2]`` (eqs. 1-2)."""
        z1 = torch.relu(self.pre_acts(x))
        return z1, torch.relu(z1 @ self.W_enc2 + self.b_enc2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, d_in] -> [batch, d_sae]``: ``[z1, z2]`` concatenated."""
        return torch.cat(self.levels(x), dim=-1)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Eq. 3: ``x_hat = (z2 Wd2 + bd2) Wd1 + z1 Ws + bd1``; ``[..., d_sae] -> [..., d_in]``."""
        z1, z2 = f.split(self.d_sae // 2, dim=-1)
        return (z2 @ self.W_dec2 + self.b_dec2) @ self.W_dec + z1 @ self.W_skip + self.b_dec

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Eq. 4 terms on ``x [batch, d_in]``: mse, the two level L1s (warmed up) and the Gram term.

        In training mode the batch's per-level L0 and the unweighted Gram value are kept
        (detached) for :meth:`counters`.
        """
        sparse = self.kernels == "sparse" and self.training and x.device.type == "cpu"
        z1, z2, x_hat = self._sparse_levels(x) if sparse else (*self.levels(x), None)
        f = torch.cat([z1, z2], dim=-1)
        if x_hat is None:
            x_hat = self.decode(f)
        gram = gram_disentanglement(z1, z2, self._grams if self.training else None)
        if self.training:
            self._last = {"l0_level1": (z1 > 0).sum(-1).float().mean().detach(),
                          "l0_level2": (z2 > 0).sum(-1).float().mean().detach(), "gram": gram.detach()}
        return ForwardOutput(x_hat, f, {
            "mse": _mse(x, x_hat),
            "l1_level1": self.lambda1 * self.sparsity_scale * z1.float().sum(-1).mean(),
            "l1_level2": self.lambda2 * self.sparsity_scale * z2.float().sum(-1).mean(),
            "disentangle": self.lambda_d * gram,
        })

    def _sparse_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(z1, z2, x_hat)`` of :meth:`levels` and :meth:`decode` with the sparse codes' products from their non-zeros
        (:func:`.kernels.code_nonzeros`: ReLU codes, whose zeros pass no gradient back); ``x_hat`` None (decode
        densely) when ``z1`` is too dense. ``x_hat`` is fp32 ``[batch, d_in]``."""
        z1 = torch.relu(self.pre_acts(x))
        c1 = code_nonzeros(z1, SPARSE_MAX_DENSITY)
        if c1 is None:
            return z1, torch.relu(z1 @ self.W_enc2 + self.b_enc2), None
        self.sparse_steps += 1
        z2 = torch.relu(sparse_decode(c1[0], self.W_enc2, c1[1]) + self.b_enc2)
        c2 = code_nonzeros(z2, SPARSE_MAX_DENSITY)
        mid = (z2 @ self.W_dec2 if c2 is None else sparse_decode(c2[0], self.W_dec2, c2[1])) + self.b_dec2
        return z1, z2, mid @ self.W_dec + sparse_decode(c1[0], self.W_skip, c1[1]) + self.b_dec

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        """Data-dependent start from the trainer's first batch ``x [batch, d_in]`` (reading 12).

        ``bd1`` = batch mean (as every arch); ``b1 = -bd1 W1`` and ``b2 = -mean(z1) W2``
        centre both levels' pre-activations on the batch; then ``W1``, ``b1`` and ``b2``
        are multiplied by the least-squares gain ``g`` that best fits ``x_hat - bd1`` to
        ``x - bd1`` (``x_hat - bd1 - bd2 Wd1`` is positively homogeneous in that scale, so the
        fit is exact). A ``g`` that is not finite and positive (e.g. a constant batch) is skipped.
        """
        super().init_b_dec(x)
        x = x.float()
        self.b_enc.copy_(-self.b_dec @ self.W_enc)
        z1 = torch.relu(x @ self.W_enc + self.b_enc)
        self.b_enc2.copy_(-z1.mean(0) @ self.W_enc2)
        const = self.b_dec + self.b_dec2 @ self.W_dec  # the part of x_hat that does not scale
        part, target = self.decode(self.encode(x)) - const, x - const
        gain = float((part * target).sum() / part.pow(2).sum().clamp_min(1e-30))
        if math.isfinite(gain) and gain > 0:
            for p in (self.W_enc, self.b_enc, self.b_enc2):
                p.mul_(gain)

    def counters(self) -> dict[str, float]:
        """Per-level L0 and dead fraction, and the Gram term (eq. 4) of the last training batch.

        ``l0_level1/2``: mean active latents per token of each level; ``dead_frac_level1/2``:
        fraction of each level's latents silent for the trainer's dead window; ``gram``: the
        unweighted ``||G1 * G2||_F^2`` (reading 3), ``disentangle``: ``lambda_d * gram`` as added
        to the loss (0 in the no-separation ablation, while ``gram`` shows what it would penalise).
        ``enc_norm_level1`` / ``skip_norm``: mean column norm of ``W1`` / row norm of ``Ws`` (both
        start at the init gain, reading 12): their ratio is the scale symmetry of reading 7
        through which the level-1 L1 can be lowered without sparsifying level 1. ``sparse_gram``: training
        Grams (two a step) formed from the code's non-zeros (:func:`.sparse_gram.coactivation_gram`); ``sparse_steps``:
        training forwards whose level products came from the codes' non-zeros (:meth:`_sparse_levels`).
        """
        from .trainer import sae_dead_window  # the trainer imports this module's registry

        half = self.d_sae // 2
        dead = (self.tokens_since_fired >= sae_dead_window(self)).float()
        out = {**super().counters(), "dead_frac_level1": float(dead[:half].mean()),
               "dead_frac_level2": float(dead[half:].mean()),
               "enc_norm_level1": float(self.W_enc.detach().norm(dim=0).mean()),
               "skip_norm": float(self.W_skip.detach().norm(dim=1).mean())}
        last = getattr(self, "_last", None)
        if last is not None:
            out.update({k: float(v) for k, v in last.items()}, disentangle=self.lambda_d * float(last["gram"]))
        return {**out, "sparse_gram": self._grams.get("sparse_gram", 0)}

    def extra_state(self) -> dict:
        """``sparse_gram``: the training Grams (two a step) formed from the code's non-zeros, so a resumed run's
        counter continues (:func:`gram_disentanglement`)."""
        return {**super().extra_state(), "sparse_gram": self._grams.get("sparse_gram", 0)}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`'s counter (0 from checkpoints written before it existed)."""
        super().load_extra_state(state)
        self._grams = {"sparse_gram": int(state.get("sparse_gram", 0))}

    def _unit_norm_weights(self) -> tuple[nn.Parameter, ...]:
        return self.W_dec, self.W_dec2  # sec. 5: unit norm on Wd1 and Wd2 only

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each unit-norm row of ``Wd1`` and ``Wd2``."""
        for w in self._unit_norm_weights():
            if w.grad is not None:
                w.grad -= (w.grad * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale the rows of ``Wd1`` and ``Wd2`` to unit norm (sec. 5)."""
        for w in self._unit_norm_weights():
            w /= w.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Take raw ``x`` instead of ``x * scale``; latents unchanged.

        ``z1 = (s x) W1 + b1 = x (s W1) + b1``; every term of eq. 3 ending in input space
        (``Wd1``, ``Ws``, ``bd1``) is divided by ``s``; level-space ``Wd2``, ``bd2`` stay.
        """
        super().fold_input_scale(scale)  # W_enc *= s, W_dec /= s, b_dec /= s
        self.W_skip /= scale


class TemporalSAE(PairsStepMixin, SAE):
    """Multi-scale temporal SAE: causal dilated depthwise convolutions over pre-activations (seed 000 sec. 5).

    Sequence SAE (reading 9): :meth:`encode_seq` ``x [R, T, d_in] -> f [R, T, d_sae]``;
    :meth:`forward_seq` returns the valid tokens only. Loss terms ``mse`` and ``l1``.

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        rates: dilation rates, one branch each (paper: 1, 2, 4).
        kernel_size: taps per branch; tap ``j`` looks ``j * rate`` tokens back.
        l1_coeff: L1 weight (reading 11: lambda1 = 0.03).
        kernels: ``"sparse"`` (default: in CPU training forwards the decode and its gradients from the code's
            non-zeros once sparse enough, :meth:`.relu_pairs.PairsStepMixin.decode_code`; counted in ``sparse_steps``)
            or ``"dense"``; same maths. The encoder and its convolutions stay dense.

    Raises:
        ArchError: empty rates, a rate < 1 or kernel_size < 1.
    """

    arch = "temporal_dilated"
    needs_sequences = True
    saelens_unsupported = "latents read earlier tokens (causal dilated convolutions); SAELens SAEs are token-wise"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, rates=(1, 2, 4), kernel_size: int = 2,
                 l1_coeff: float = 0.03, kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        self.kernels = check_kernels(kernels)
        self.rates, self.kernel_size, self.l1_coeff = tuple(int(r) for r in rates), int(kernel_size), l1_coeff
        if not self.rates or min(self.rates) < 1 or self.kernel_size < 1:
            raise ArchError(f"temporal_dilated needs rates >= 1 and kernel_size >= 1, got {rates}, {kernel_size}")
        taps = torch.zeros(len(self.rates), self.kernel_size, d_sae)
        taps[:, 0] = 1.0 / len(self.rates)  # starts as a plain SAE
        self.conv_weight = nn.Parameter(taps)

    def hparams(self) -> dict:
        """``rates``, ``kernel_size``, ``l1_coeff``."""
        return {"rates": list(self.rates), "kernel_size": self.kernel_size, "l1_coeff": self.l1_coeff}

    def lag_weights(self) -> dict[int, torch.Tensor]:
        """``{lag: [d_sae] summed tap weight}``, lag = tap index * rate (taps sharing a lag are added)."""
        weights: dict[int, torch.Tensor] = {}
        for i, rate in enumerate(self.rates):
            for j in range(self.kernel_size):
                weights[j * rate] = weights.get(j * rate, 0) + self.conv_weight[i, j]
        return weights

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Token-only path, ``[batch, d_in] -> [batch, d_sae]``: each token is a one-token document."""
        return ((x - self.b_dec) @ self.W_enc) * self.lag_weights()[0] + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU."""
        return torch.relu(pre)

    def encode_seq(self, x: torch.Tensor, doc_index: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x [R, T, d_in]`` -> ``f [R, T, d_sae]``; context stays inside a row and a document.

        Args:
            x: whole context rows (float).
            doc_index: ``[R, T]`` int document id of each token.
            valid: ``[R, T]`` bool, False for tokens that must give no context (BOS,
                special tokens); None = all valid. Invalid tokens still get latents.
        """
        return torch.relu(self.b_enc + sum(self.lag_terms(x, doc_index, valid).values()))

    def lag_terms(self, x: torch.Tensor, doc_index: torch.Tensor,
                  valid: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """``{lag: [R, T, d_sae]}``: each lag's share of the pre-activation (``encode_seq`` = ReLU(b_enc + sum)).

        Lag 0 is the token itself (``sum_r w[r, 0] * u_t``); lag ``j r`` is the dilated branches'
        view of token ``t - j r`` (zero across rows, documents and invalid tokens). Arguments as
        :meth:`encode_seq`.
        """
        u = (x - self.b_dec) @ self.W_enc
        source = u if valid is None else u * valid[..., None].to(u.dtype)
        return {lag: w * (u if lag == 0 else shift_within_documents(source, doc_index, lag))
                for lag, w in self.lag_weights().items()}

    def forward_seq(self, x: torch.Tensor, doc_index: torch.Tensor,
                    valid: torch.Tensor | None = None) -> ForwardOutput:
        """Loss on the valid tokens of ``x [R, T, d_in]``; ``x_hat``, ``f`` are ``[n_valid, .]`` in row-major order.

        In training mode the norm of each lag's term over the valid tokens is kept (detached)
        for :meth:`counters`.
        """
        terms = self.lag_terms(x, doc_index, valid)
        f = torch.relu(self.b_enc + sum(terms.values()))
        if self.training:
            with torch.no_grad():
                self._lag_norms = {lag: (t[valid] if valid is not None else t).float().norm() for lag, t in terms.items()}
        if valid is not None:
            x, f = x[valid], f[valid]
        else:
            x, f = x.flatten(0, 1), f.flatten(0, 1)
        x_hat = self.decode_code(f)
        return ForwardOutput(x_hat, f, {"mse": _mse(x, x_hat), **self.penalties(x, None, f, x_hat)})

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``l1``: ``l1_coeff * sparsity_scale * mean_tokens sum_i f_i`` (decoder rows are unit norm)."""
        return {"l1": self.l1_coeff * self.sparsity_scale * f.float().sum(-1).mean()}

    def counters(self) -> dict[str, float]:
        """How much the dilated context acts (reading 9).

        ``tap_abs_lag{L}``: mean over latents of ``|summed tap weight|`` at lag ``L`` (lag 0 starts
        at 1, the others at 0); ``norm_share_lag{L}``: on the last training batch, the Frobenius
        norm of lag ``L``'s pre-activation term over the valid tokens divided by the sum over
        all lags (lag > 0 = what the context adds; all 0 before the first training forward); ``sparse_steps``:
        training forwards that decoded from the code's non-zeros.
        """
        out = {**super().counters(),
               **{f"tap_abs_lag{lag}": float(w.detach().abs().mean()) for lag, w in self.lag_weights().items()}}
        norms = getattr(self, "_lag_norms", None)
        if norms is not None:
            total = max(sum(float(n) for n in norms.values()), 1e-30)
            out.update({f"norm_share_lag{lag}": float(n) / total for lag, n in norms.items()})
        return out


def shift_within_documents(u: torch.Tensor, doc_index: torch.Tensor, lag: int) -> torch.Tensor:
    """``out[r, t] = u[r, t - lag]`` when ``t >= lag`` and both tokens share a document, else 0.

    Args:
        u: ``[R, T, C]`` values per token (rows are independent).
        doc_index: ``[R, T]`` int document ids (documents are contiguous within a row).
        lag: tokens back, >= 1.

    Returns:
        ``[R, T, C]`` tensor of ``u``'s dtype.
    """
    if lag >= u.shape[1]:
        return torch.zeros_like(u)
    same_doc = (doc_index[:, lag:] == doc_index[:, :-lag]).to(u.dtype)
    return nn.functional.pad(u[:, :-lag] * same_doc[..., None], (0, 0, lag, 0))


class AdaptiveMaskSAE(WeightedL1PairsMixin, SAE):
    """ReLU SAE whose latents are gated by learnable importance masks (seed 000 sec. 5; reading 10).

    ``f = ReLU((x - b_dec) W_enc + b_enc) * sigmoid(importance)``; ``[batch, d_in] -> [batch, d_sae]``.
    Loss terms ``mse`` and ``l1``. Training on the CPU runs on the pairs with ``pre > 0`` once a batch is sparse
    enough (issue 14, :mod:`.relu_pairs`; the mask is the pairs' gain).

    Args:
        d_in, d_sae, seed: see :class:`SAE`.
        l1_coeff: L1 weight on the masked latents (reading 11: 0.03).
        mask_init: initial importance logit of every latent (0 -> mask 0.5).
        kernels: ``"sparse"`` (default: the pairs step on CPU when sparse enough) or ``"dense"``; same maths.
    """

    arch = "adaptive_mask"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, l1_coeff: float = 0.03, mask_init: float = 0.0,
                 kernels: str | None = None):
        super().__init__(d_in, d_sae, seed)
        self.l1_coeff, self.mask_init = l1_coeff, mask_init
        self.kernels = check_kernels(kernels)
        self.importance = nn.Parameter(torch.full((d_sae,), float(mask_init)))

    def hparams(self) -> dict:
        """``l1_coeff``, ``mask_init``."""
        return {"l1_coeff": self.l1_coeff, "mask_init": self.mask_init}

    def mask(self) -> torch.Tensor:
        """``[d_sae]`` importance mask in (0, 1)."""
        return torch.sigmoid(self.importance)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """``ReLU(pre) * mask``."""
        return torch.relu(pre) * self.mask()

    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor]]:
        """``("standard", ...)`` with the mask folded into the encoder: ``ReLU(pre) * m = ReLU(pre * m)``, ``m > 0``.

        Latents and decoder are unchanged; ``importance`` stays in saestrata's tensors.
        """
        return "standard", self.linear_tensors(self.mask())

    def penalties(self, x, pre, f, x_hat) -> dict:
        """``l1``: ``l1_coeff * sparsity_scale * mean_tokens sum_i f_i`` on the masked latents."""
        return {"l1": self.l1_coeff * self.sparsity_scale * f.float().sum(-1).mean()}

    def pair_l1_weights(self) -> torch.Tensor:
        """The pairs step's L1 weights: ``l1_coeff * sparsity_scale`` for every latent (on the masked ``f``)."""
        return torch.full((self.d_sae,), self.l1_coeff * self.sparsity_scale, device=self.b_enc.device)

    def pair_gain(self) -> torch.Tensor:
        """The importance masks ``sigmoid(importance)`` (with their gradient)."""
        return self.mask()

    def counters(self) -> dict[str, float]:
        """Mask statistics over the latents (reading 10): every mask starts at ``sigmoid(mask_init)``.

        ``mask_mean``, ``mask_min``, ``mask_max``; ``mask_frac_below_0.5`` / ``mask_frac_below_0.1``:
        fraction of latents whose mask fell under 0.5 (from 0.5 at the default init) / under 0.1
        (latents the masks have nearly switched off).
        """
        m = self.mask().detach().float()
        return {**super().counters(), "mask_mean": float(m.mean()), "mask_min": float(m.min()),
                "mask_max": float(m.max()), "mask_frac_below_0.5": float((m < 0.5).float().mean()),
                "mask_frac_below_0.1": float((m < 0.1).float().mean())}


# Sec. 5: "AdamW ... learning rate 3e-4"; no weight decay is stated, so torch.optim.AdamW's default 0.01.
_OPT = {"lr": 3e-4, "weight_decay": 0.01}
ARCHS = {
    "hsae_skip": ArchInfo(HierarchicalSAE, f"{SEED}, sec. 4 eqs. 1-4, sec. 5", {
        "seed000_hsae": {**_OPT, "lambda1": 0.03, "lambda2": 0.05, "lambda_d": 0.02},
        "seed000_hsae_no_separation": {**_OPT, "lambda1": 0.03, "lambda2": 0.05, "lambda_d": 0.0},  # sec. 6 ablation
    }),
    "temporal_dilated": ArchInfo(TemporalSAE, f"{SEED}, sec. 5 baseline (dilated convolutions, rates 1,2,4)", {
        "seed000_temporal": {**_OPT, "rates": [1, 2, 4], "kernel_size": 2, "l1_coeff": 0.03},
        "seed000_temporal_single_scale": {**_OPT, "rates": [1], "kernel_size": 2, "l1_coeff": 0.03},  # sec. 6 ablation
    }),
    "adaptive_mask": ArchInfo(AdaptiveMaskSAE, f"{SEED}, sec. 5 baseline (learnable importance masks)", {
        "seed000_adaptive": {**_OPT, "l1_coeff": 0.03, "mask_init": 0.0},
    }),
}
