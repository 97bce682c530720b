"""Training the ReLU-type SAEs on their active pairs (issue 14): ``standard``, ``jumprelu``, seed 004's groups,
seed 000's importance masks, seed 001's grouped / hierarchical SAEs, seed 002's importance-tracking SAEs.

A ReLU SAE trained to L0 ~30 of thousands of latents spends four of the dense step's five
``[batch, d_in] x [d_in, d_sae]``-sized matmuls on zeros (the decode, its two gradients, the encoder's
weight gradient). Once a batch is sparse enough these archs run the TopK family's fused op
(:mod:`.fused`) instead: the (token, latent) pairs come from the encoder matmul
(:func:`.native.batch_topk_pairs` with every entry allowed: the ReLU's support, row-sorted, the sum
formed in fp32 as the dense path forms ``pre``), then one compiled forward (decode, error) and the
latent-grouped backward. Same maths as the dense path; tests/test_kernels.py compares losses and
gradients arch by arch. A batch with more than :data:`SPARSE_MAX_DENSITY` of its entries positive (a
run's first ~50-80 steps, while the sparsity penalty warms up and L0 falls from ~d_sae / 2) takes the
dense step, whose matmul then runs a second time (the pairs' count is known only after it).

:class:`PairsStepMixin` holds the switch, the dispatch and the ``sparse_steps`` counter (train log,
checkpoints); :class:`WeightedL1PairsMixin` is the whole pairs step of a ReLU SAE whose penalty is linear
in the activations, ``mean_b sum_i w_i f_i`` (``standard``: ``w = lambda ||W_dec[i]||``; seed 004: ``w`` per
group; seed000_adaptive: ``f = ReLU(pre) sigmoid(importance)``, a per-latent gain). :class:`DenseCodePairsMixin` is the pairs
step of a ReLU SAE whose penalties need the whole code (seeds 001 and 002): it hands them the code as a dense tensor whose
gradient joins the pairs' in the compiled backward. JumpReLU's step (thresholds and a straight-through window) is its own (:mod:`.jumprelu`).

Measured (``bench/relu_sparse.py``, d_in 640, d_sae 2048, batch 1024, fp32, layer 8 of the benchmark store,
L0 ~32): standard 101.7 -> 24.4 ms a step (4.17x), jumprelu 112.7 -> 28.4 ms (3.97x); on the dense code
(thirtieth session, docs/results/bench/relu_dense_code_2026-12-06.txt) seed001_static_hier 85.3 -> 42.1 ms (2.03x),
seed002-hierarchical 66.6 -> 21.9 ms (3.04x); seed003-tiered's decode from the non-zeros 67.3 -> 51.8 ms (1.30x).
"""

from __future__ import annotations

import torch

from .base import SAE, ForwardOutput
from .fused import encoder_mm, fused_available, fused_pairs_code, fused_pairs_l1
from .kernels import ActiveSet, decode_nonzeros
from .native import batch_topk_pairs

# Largest share of (token, latent) entries a step may have as pairs (else dense): the pairs step's work grows with
# their number, the dense step's does not. bench/relu_sparse.py --crossover (d_in 640, batch 1024, one step of each
# on a fresh SAE whose b_enc is shifted): standard fp32 d_sae 2048 pairs 2.37x faster at 12.3% positive, 1.67x at
# 22.6%, 0.89x at 48%; bf16 autocast d_sae 4096 1.60x at 11.5%; jumprelu fp32 d_sae 2048 2.16x at 14.8%.
SPARSE_MAX_DENSITY = 1 / 8


class PairsStepMixin:
    """The switch between the dense step and an arch's pairs step (put before :class:`~.base.SAE` in the bases).

    ``kernels``: ``"sparse"`` (the pairs step while training on the CPU with the compiled module, when the arch's
    :meth:`_pairs_forward` accepts the batch) or ``"dense"``; set by the arch from its ``kernels`` argument
    (:func:`.kernels.check_kernels`). ``sparse_steps`` counts the training forwards that ran on the pairs or, for
    archs that only decode their code from its non-zeros (:meth:`decode_code`), that did so (in the train log's
    counters and the checkpoint's extra state).
    """

    kernels: str = "dense"
    sparse_steps: int = 0

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """:meth:`SAE.forward`, or while training on the CPU with ``kernels="sparse"`` the pairs step when it applies."""
        if self.kernels == "sparse" and self.training and fused_available(self, x):
            out = self._pairs_forward(x)
            if out is not None:
                self.sparse_steps += 1
                return out
        return super().forward(x)

    def _pairs_forward(self, x: torch.Tensor) -> ForwardOutput | None:
        """The training forward on the batch's pairs, or None for the dense step (the arch's conditions). Default:
        None (archs whose own forward forms the code and only decodes it from its non-zeros, :meth:`decode_code`;
        e.g. seed 000's temporal SAE, whose token-wise :meth:`forward` stays the dense one)."""
        return None

    def decode_code(self, f: torch.Tensor) -> torch.Tensor:
        """``f @ W_dec + b_dec`` (the base :meth:`~.base.SAE.decode`) of a code ``f`` ``[batch, d_sae]`` computed
        densely (archs whose own forward forms the code: seed 003's tiers, seed 000's temporal SAE); in a CPU
        training forward with ``kernels="sparse"``, from its non-zeros when at most :data:`SPARSE_MAX_DENSITY` of
        it is non-zero (fp32; counted in ``sparse_steps``). ``f``'s zeros must pass no gradient back (those of a
        ReLU, or of a zero gate): :func:`.kernels.code_nonzeros`."""
        if self.kernels == "sparse" and self.training and f.device.type == "cpu":
            out = decode_nonzeros(f, self.W_dec, SPARSE_MAX_DENSITY)
            if out is not None:
                self.sparse_steps += 1
                return out + self.b_dec
        return self.decode(f)

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


def positive_pairs(sae: SAE, x: torch.Tensor, shift: torch.Tensor | None = None):
    """``(mm, rows, cols, vals)``: the encoder matmul ``(x - b_dec) W_enc`` (no autograd, autocast's dtype) and the
    row-sorted entries of ``pre = mm + b_enc - shift`` that are > 0 (long ``[N]``, long ``[N]``, fp32 ``[N]``; the
    sum in fp32 as torch's promotion forms the dense ``pre``), or None when there are more than
    :data:`SPARSE_MAX_DENSITY` of them (or the compiled module is missing)."""
    mm = encoder_mm(x, sae)
    b_enc = sae.b_enc.detach()
    picked = batch_topk_pairs(mm, b_enc if shift is None else b_enc - shift, mm.numel())  # n = every entry
    if picked is None or picked[1].numel() > SPARSE_MAX_DENSITY * mm.numel():
        return None
    return (mm, *picked)


class WeightedL1PairsMixin(PairsStepMixin):
    """The pairs step of a ReLU SAE whose penalty is ``l1 = mean_b sum_i w_i f_i`` (:func:`.fused.fused_pairs_l1`).

    Subclasses give ``w`` (:meth:`pair_l1_weights`; it may carry a gradient, e.g. through ``W_dec``'s norms), may
    gate the latents by a positive per-latent gain (:meth:`pair_gain`: ``f = ReLU(pre) * gain``) and may look at
    each pairs step's code (:meth:`record_pairs`, e.g. per-group counters). Their ``activation`` must be that
    (gained) ReLU and their ``penalties`` that ``l1`` alone (the dense step's).
    """

    def pair_l1_weights(self) -> torch.Tensor:
        """fp32 ``[d_sae]`` each latent's L1 weight this step (the trainer's ``sparsity_scale`` included)."""
        raise NotImplementedError

    def pair_gain(self) -> torch.Tensor | None:
        """fp32 ``[d_sae]`` > 0 multiplying each latent's ReLU (may carry a gradient), or None (default: none)."""
        return None

    def record_pairs(self, act: ActiveSet, vals: torch.Tensor) -> None:
        """Called with a training batch's pairs and activations (fp32 ``[N]`` > 0, detached); default: nothing."""

    def _pairs_forward(self, x: torch.Tensor) -> ForwardOutput | None:
        """Decode, squared error and weighted L1 of the pairs with ``pre > 0`` (None when the batch is dense)."""
        picked = positive_pairs(self, x)
        if picked is None:
            return None
        mm, rows, cols, vals = picked
        act = ActiveSet(rows, cols, *mm.shape)
        gain = self.pair_gain()
        mse, l1, x_hat = fused_pairs_l1(x, self, act, vals, self.pair_l1_weights(), gain)
        f = vals if gain is None else vals * gain.detach().float()[cols]
        self.record_pairs(act, f)
        return ForwardOutput(x_hat, None, {"mse": mse, "l1": l1}, active=act, values=f,
                             f_dtype=torch.promote_types(mm.dtype, self.b_enc.dtype), sq_error=mse.detach())


class DenseCodePairsMixin(PairsStepMixin):
    """The pairs step of a plain ReLU SAE whose penalties read the code ``f`` in any way (seed 001's Eq. 4 Gram,
    group statistics, InfoNCE): the reconstruction runs on the pairs with ``pre > 0`` (:func:`.fused.fused_pairs_code`),
    the penalties get the dense code it hands out, and their gradient reaches the encoder through the pairs inside
    the compiled backward. It saves the decode and its gradients and the encoder's weight-gradient matmul; what
    the penalties themselves cost stays.

    The arch's ``activation`` must be ``ReLU(pre)``, or that with some latents switched off (:meth:`pair_shift`), and
    its ``penalties(x, pre, f, x_hat)`` must read neither ``pre`` (None here: an arch needing a few of its columns forms
    them itself) nor ``x_hat``'s gradient (``x_hat`` is detached here); ``x`` and ``f`` as in the dense step.
    """

    def pair_shift(self) -> torch.Tensor | None:
        """fp32 ``[d_sae]`` subtracted from ``pre`` before the pairs are picked (``inf``: the latent is off, as a
        pruned latent of seed 002), or None (default: none)."""
        return None

    def _pairs_forward(self, x: torch.Tensor) -> ForwardOutput | None:
        """Decode and squared error of the pairs with ``pre > 0``, the penalties on their dense code (None when
        the batch is dense)."""
        picked = positive_pairs(self, x, self.pair_shift())
        if picked is None:
            return None
        mm, rows, cols, vals = picked
        act = ActiveSet(rows, cols, *mm.shape)
        mse, x_hat, f = fused_pairs_code(x, self, act, vals)
        return ForwardOutput(x_hat, f, {"mse": mse, **self.penalties(x, None, f, x_hat)}, active=act, values=vals,
                             sq_error=mse.detach())


__all__ = ["DenseCodePairsMixin", "PairsStepMixin", "SPARSE_MAX_DENSITY", "WeightedL1PairsMixin", "positive_pairs"]
