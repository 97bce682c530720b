"""The interface every SAE shares, plus the parts most architectures reuse.

Shapes: inputs ``x`` are ``[batch, d_in]`` float (fp32 master weights; the trainer
may autocast matmuls to bf16), latents ``f`` are ``[batch, d_sae]``.

Parameter names follow SAELens: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; extra parameters keep their own names
and are saved as extra tensors (DESIGN.md, "SAE architectures").

Activation normalisation: the trainer feeds ``x * s`` with ``s = sqrt(d_in) /
E||x||`` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 2.1
and Anthropic's April 2024 update, both normalise inputs to a fixed norm); at
save time :meth:`SAE.fold_input_scale` rewrites the weights so the saved SAE takes
raw activations and returns raw reconstructions with the same latents.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .native import normalize_rows_, remove_parallel_grad_


class ForwardOutput:
    """Result of :meth:`SAE.forward`.

    Attributes:
        x_hat: ``[batch, d_in]`` reconstruction.
        f: ``[batch, d_sae]`` latent activations (non-negative for all built-in archs). The
            sparse kernels (:mod:`.kernels`) pass ``active`` + ``values`` instead and ``f`` is
            built on first access, so training steps that never read it skip a dense
            ``[batch, d_sae]`` write.
        losses: named scalar loss terms, already weighted; the training loss is their sum.
            ``mse`` (squared error summed over ``d_in``, mean over batch) is always present.
        active: the :class:`~.kernels.ActiveSet` of (row, latent) pairs with ``f > 0``, or None.
        values: fp32 ``[N]`` activations at ``active``'s pairs (detached), or None.
        sq_error: fp32 scalar ``||x - x_hat||^2`` summed over ``d_in``, mean over the batch, unweighted
            and detached, when the forward formed it anyway (the fused TopK step's ``mse``), else None:
            the trainer's FVU then skips recomputing it (issue 14).

    Raises:
        ValueError: neither ``f`` nor ``active`` given.
    """

    def __init__(self, x_hat: torch.Tensor, f: torch.Tensor | None = None, losses: dict | None = None, *,
                 active=None, values: torch.Tensor | None = None, f_dtype: torch.dtype = torch.float32,
                 sq_error: torch.Tensor | None = None):
        if f is None and active is None:
            raise ValueError("ForwardOutput needs f or active + values")
        self.x_hat, self._f, self.losses = x_hat, f, losses if losses is not None else {}
        self.active, self.values, self._f_dtype = active, values, f_dtype
        self.sq_error = sq_error

    @property
    def f(self) -> torch.Tensor:
        """``[batch, d_sae]`` latents (built from ``active`` on first access)."""
        if self._f is None:
            self._f = self.active.to_dense(self.values, self._f_dtype)
        return self._f

    @property
    def loss(self) -> torch.Tensor:
        """Total training loss (sum of ``losses``)."""
        return sum(self.losses.values())

    @property
    def n_rows(self) -> int:
        """Batch size (tokens) of this output."""
        return self.active.n_rows if self._f is None else self._f.shape[0]

    def fired(self) -> torch.Tensor:
        """bool ``[d_sae]``: latents active on at least one token of the batch."""
        return self.active.fired() if self.active is not None else (self.f > 0).any(0)

    def l0(self) -> float:
        """Mean number of active latents per token."""
        if self.active is not None:
            return len(self.active) / self.active.n_rows
        return float((self.f > 0).sum(-1).float().mean())

    def min_active(self) -> torch.Tensor | None:
        """Smallest positive activation of the batch (fp32 scalar), None when nothing fired."""
        if self.active is not None:
            return self.values.min().float() if len(self.active) else None
        positive = self.f[self.f > 0]
        return positive.min().float() if positive.numel() else None


class SAE(nn.Module):
    """Base class: a linear encoder, an activation, a linear decoder.

    Subclasses set ``arch`` and implement :meth:`activation` and optionally
    :meth:`penalties`. ``sparsity_scale`` (0..1) is set by the trainer for
    sparsity-coefficient warmup; ``unit_norm_decoder`` asks the trainer to keep
    decoder rows at unit norm.

    Sequence SAEs (``needs_sequences = True``, e.g. seed 000's temporal SAE) see whole
    context rows. They also implement ``encode_seq(x [R, T, d_in], doc_index [R, T],
    valid [R, T] bool | None) -> f [R, T, d_sae]`` and ``forward_seq(x, doc_index, valid)
    -> ForwardOutput`` whose ``x_hat``/``f`` hold only the valid tokens, flattened
    row-major (the rows of ``x[valid]``), so the trainer's metrics see the same tokens
    it feeds token SAEs. Their context never crosses a row or a change of ``doc_index``.

    Args:
        d_in: input width (d_model of the hooked layer).
        d_sae: number of latents.
        seed: RNG seed of the initialisation.
    """

    arch: ClassVar[str] = "base"
    unit_norm_decoder: ClassVar[bool] = True
    max_grad_norm: ClassVar[float] = float("inf")  # gradient-norm clip applied by the trainer
    # True: the arch's paper prescribes its own clipping (done in remove_parallel_grad), which the
    # trainer's global clip must not override (seed 003 sec. 5: per-tier bounds 1 / 2 / 5).
    clips_own_grads: ClassVar[bool] = False
    needs_sequences: ClassVar[bool] = False  # True: fed [R, T, d] rows via encode_seq/forward_seq
    # How ``--target-l0`` reaches this arch (trainer.py): "penalty" = the trainer scales every
    # sparsity term through ``sparsity_scale``; "k" = the arch takes ``k`` latents per token;
    # "target" = the arch also takes ``target_l0`` as a hyperparameter (jumprelu.py: init and a two-sided
    # loss), and the trainer's controller scales that loss like a penalty arch's.
    sparsity_control: ClassVar[str] = "penalty"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        # Tied init (Gao et al. 2024 sec. 2.3; Conerly et al. 2024): encoder = decoder transpose.
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.sparsity_scale = 1.0
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    # -- hyperparameters (saved in cfg.json) ------------------------------------------
    def hparams(self) -> dict:
        """Architecture hyperparameters needed to rebuild this SAE (JSON-serialisable)."""
        return {}

    # -- the forward pass -------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc``: ``[batch, d_in] -> [batch, d_sae]``."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Latents from pre-activations; ``[batch, d_sae] -> [batch, d_sae]``."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, d_in] -> [batch, d_sae]`` latent activations."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``[batch, d_sae] -> [batch, d_in]``: ``f @ W_dec + b_dec``."""
        return f @ self.W_dec + self.b_dec

    @torch.no_grad()
    def latent_directions(self, idx: torch.Tensor) -> torch.Tensor:
        """Residual-space change per unit of each latent: ``decode(e_i) - decode(0)``.

        ``idx`` long ``[n]`` (any device) -> fp32 ``[n, d_in]`` on the parameters' device, in the
        units of the SAE's input (raw activations for a saved SAE). Computed through
        :meth:`decode` itself, so it is right for every arch whose decoder is affine in the
        latents (every built-in one: ``f W_dec + b_dec``, and seed 000's two-level
        ``(z2 Wd2 + bd2) Wd1 + z1 Ws + bd1``, where level-1 directions are rows of ``W_skip``
        and level-2 ones ``Wd2 Wd1``); then ``decode(f + t e_i) - decode(f) = t *
        latent_directions([i])`` for any ``f``. An arch with a decoder not affine in ``f``
        must override this (and then it only describes the change from ``f = 0``).

        Raises:
            IndexError: an index outside ``[0, d_sae)``.
        """
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d_sae):
            raise IndexError(f"latent index out of range [0, {self.d_sae}): got {idx.tolist()}")
        ref = self.b_dec
        if type(self).decode is SAE.decode:  # closed form of the base decoder, no d_sae-wide matmul
            return self.W_dec[idx.to(ref.device)].float()
        one_hot = torch.zeros(len(idx), self.d_sae, dtype=ref.dtype, device=ref.device)
        one_hot[torch.arange(len(idx), device=ref.device), idx.to(ref.device)] = 1.0
        zero = torch.zeros(1, self.d_sae, dtype=ref.dtype, device=ref.device)
        return (self.decode(one_hot).float() - self.decode(zero).float()).reshape(len(idx), self.d_in)

    def penalties(self, x: torch.Tensor, pre: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> dict:
        """Extra weighted loss terms (sparsity, auxiliary). Default: none."""
        return {}

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Encode, decode and compute the loss terms; ``x`` is ``[batch, d_in]``."""
        pre = self.pre_acts(x)
        f = self.activation(pre)
        x_hat = self.decode(f)
        mse = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        return ForwardOutput(x_hat, f, {"mse": mse, **self.penalties(x, pre, f, x_hat)})

    # -- training-time bookkeeping ----------------------------------------------------
    @torch.no_grad()
    def update_firing(self, out: ForwardOutput | torch.Tensor) -> None:
        """Dead-latent tracking: reset the counter of latents that fired in this batch.

        ``out`` is a training forward's :class:`ForwardOutput` (its active pairs when it has
        them) or its latents ``f`` ``[batch, d_sae]``.
        """
        out = out if isinstance(out, ForwardOutput) else ForwardOutput(None, out)
        self.tokens_since_fired += out.n_rows
        self.tokens_since_fired[out.fired()] = 0

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        """Initialise ``b_dec`` to the mean of a first batch ``[batch, d_in]`` (a cheap geometric-median stand-in)."""
        self.b_dec.copy_(x.float().mean(0))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """First-batch initialisation, called by the trainer once before step 0; default: ``b_dec`` (:meth:`init_b_dec`).

        ``x`` ``[batch, d_in]``: normalised training inputs (a sequence SAE gets its rows' non-BOS tokens).
        Archs whose sparsity must start near a target extend it (JumpReLU thresholds, ``train/jumprelu.py``).
        """
        self.init_b_dec(x)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the decoder-gradient component along each unit-norm row (keeps Adam on the sphere)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            remove_parallel_grad_(self.W_dec.grad, self.W_dec)

    def optimizer_unit_rows(self) -> torch.Tensor | None:
        """``W_dec`` when the optimiser may keep the unit-norm constraint itself, else None.

        True of archs with ``unit_norm_decoder`` whose class keeps this base class's
        :meth:`remove_parallel_grad` and :meth:`normalize_decoder`: the trainer then hands ``W_dec`` to
        :class:`~.optim.Adam` (``unit_rows``), which runs the same projection and renormalisation around
        its step, fused with it on the CPU (issue 14). Archs that override either method keep them.
        """
        cls = type(self)
        base = cls.remove_parallel_grad is SAE.remove_parallel_grad and cls.normalize_decoder is SAE.normalize_decoder
        return self.W_dec if self.unit_norm_decoder and base else None

    def grad_sq_norms(self) -> dict[torch.Tensor, float]:
        """Squared L2 norms of parameters' current ``.grad`` that the backward already computed (the
        ``known`` argument of :meth:`.optim.Adam.clip_grad_norm_`; ``W_dec``'s is of its gradient projected
        off its rows); ``{}`` by default: the clip computes every norm itself.
        """
        return {}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (only for archs with ``unit_norm_decoder``)."""
        if self.unit_norm_decoder:
            normalize_rows_(self.W_dec)

    def after_step(self, step: int, steps: int) -> None:
        """Called by the trainer after optimiser step ``step`` (0-based) of ``steps``; default no-op.

        For SAEs with schedules or periodic bookkeeping (e.g. curricula, importance tracking).
        """

    def counters(self) -> dict[str, float]:
        """Mechanism counters written into every train-log line (``"counters"``), e.g. latents pruned.

        Each value is a plain float/int describing the mechanism's state or cumulative
        activity at log time (not averaged over the window), so a reader of the log can see
        that a mechanism a paper describes actually acted. Default: ``{}``. Subclasses extend
        the parent's dict.
        """
        return {}

    # -- checkpoints ------------------------------------------------------------------
    def extra_state(self) -> dict:
        """Training state kept in plain Python attributes (not buffers), for trainer checkpoints.

        Returns a dict of ints / floats / strings / CPU tensors (e.g. step counters, a generator state). Buffers and parameters
        are saved by ``state_dict`` and must not be repeated here. Default: ``{}``.
        Subclasses extend the parent's dict (``{**super().extra_state(), ...}``).
        """
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned; default: nothing to restore.

        Raises:
            KeyError: ``state`` lacks a key this class wrote (a checkpoint of another arch).
        """

    # -- saving -----------------------------------------------------------------------
    # Why SAELens cannot represent this arch; written to cfg.json when saelens_export() is None.
    saelens_unsupported: ClassVar[str] = "no SAELens export is declared for this arch"

    @torch.no_grad()
    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor]] | None:
        """The SAELens ``architecture`` and tensors whose inference equals this SAE's eval mode, or None.

        SAELens 6 (``sae_lens.SAE.load_from_disk``) loads a state dict strictly, so the
        tensors are exactly the ones its class expects: ``W_enc [d_in, d_sae]``,
        ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` (fp32, on the CPU),
        plus ``threshold [d_sae]`` for ``"jumprelu"``. Its rules, with
        ``pre = (x - b_dec) W_enc + b_enc``: ``standard`` encodes ``ReLU(pre)``, ``topk``
        ``ReLU(TopK(pre))``, ``jumprelu`` ``ReLU(pre) * (pre > threshold)``; all decode
        ``f W_dec + b_dec``. An arch whose extra parameters only reshape that computation
        (masks, gates) folds them into these tensors; the saved folder keeps its own
        tensors too (train/sae_io.py), so saestrata reloads it unchanged.

        Default: None (``saelens_unsupported`` says why); archs override it.
        """
        return None

    @torch.no_grad()
    def linear_tensors(self, gain: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Detached fp32 CPU copies of ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``; ``gain`` folded into the encoder.

        ``gain`` (``[d_sae]``, >= 0) multiplies latent ``i``'s encoder column and bias:
        ``ReLU(pre_i) * g_i = ReLU(pre_i * g_i)`` for ``g_i >= 0``, so an SAE encoding
        ``ReLU(pre) * gain`` becomes a plain ReLU SAE with the same latents and decoder.

        Raises:
            ValueError: ``gain`` has a negative entry (ReLU does not commute with it).
        """
        out = {name: getattr(self, name).detach().float().cpu().clone()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if gain is not None:
            gain = gain.detach().float().cpu()
            if (gain < 0).any():
                raise ValueError("a latent gain folded into the encoder must be >= 0")
            out["W_enc"] *= gain
            out["b_enc"] *= gain
        return out

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``x * scale`` take raw ``x``: the latents are unchanged.

        ``(s x - b_dec) W_enc = (x - b_dec/s)(s W_enc)`` and ``x_hat = (f W_dec + b_dec) / s``.
        Subclasses with input-space extra parameters must override and extend this.
        """
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale


def groups_from_ids(ids: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """``{f"{prefix}{g}": latent indices}`` for every group id present in ``ids`` (long ``[d_sae]``).

    Used by structured SAEs to implement ``latent_groups()`` for the per-group
    diagnostics of evaluate/diagnostics.py.
    """
    ids = ids.detach().cpu().long()
    return {f"{prefix}{int(g)}": (ids == g).nonzero().flatten() for g in ids.unique()}

