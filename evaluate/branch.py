"""Fast spliced evaluation (issue 14): branch splice and chunked head statistics.

evaluate/core.py's reference path (``evaluate_saes(..., reference=True)``, evaluate/splice.py)
runs ONE batched HF forward of ``n_groups * n`` rows (clean, zero-ablated per layer, one
group per SAE) through every block and the LM head, materialises the whole
``[n_groups * n, T, vocab]`` logits tensor (bf16, 262,144 columns on Gemma 3) and then
takes fp32 ``log_softmax`` chunk by chunk. This module computes the same numbers with less
work:

- **Branch splice** (:class:`BranchForward`): the clean rows run through the blocks once;
  at block ``L`` (``blocks.L.hook_resid_post``) every group that replaces the residual
  there (each SAE of that layer, the optional ``bos_kept`` ablation) branches off the
  clean output and only the blocks after ``L`` run on it. SAEs at the same layer share
  the prefix and the clean activation ``x`` they encode; SAEs of other layers join at
  their own layer. The forward follows ``Gemma3TextModel.forward`` (transformers 5.x):
  scaled embedding, one rotary table and one causal / sliding-window mask per layer type,
  the decoder blocks, the final RMSNorm (:func:`supports_branch` says whether a model has
  that structure; other models use the reference path).
- **SAEBench's zero ablation once per evaluation** (:meth:`BranchForward.zero_logits`):
  it zeros the residual at EVERY position, and nothing after it depends on the tokens
  (a decoder block sees only the residual, the rotary table and the causal mask, which
  depend on positions only; there is no padding mask). So its logits are a function of
  ``(layer, T)`` only: one row is run through the blocks after ``layer`` once and its
  ``[T, vocab]`` logits are reused for every batch. (On Gemma, which has no biases, that
  row is exactly zero and the ablated model predicts the uniform distribution.)
- **Chunked head statistics** (:func:`head_stats`): the final hidden states of all groups
  at the scored positions go through the LM head a block of ``pos_chunk`` positions times
  ``vocab_chunk`` vocabulary columns at a time. Each block of logits is used while it is
  in cache for every statistic (per-chunk max, sum of exp, the clean-weighted logit
  difference for KL, the target logit) and discarded; the chunk results are combined in
  float64. No ``[rows, T, vocab]`` tensor is ever materialised, positions whose input
  token is special (never scored) never reach the head, and the ablated group costs no
  head matmul.

Definitions (SAEBench ``sae_bench/evals/core/main.py``, see evaluate/core.py): with
``z_g`` the group's logits at a position (the LM head's bf16 output, optionally
soft-capped as HF does, then fp32), ``lse_g = log sum_v exp z_g,v``,
``CE_g = lse_g - z_g[target]`` and
``KL(p_clean || p_g) = sum_v p_v (z_clean,v - z_g,v) - lse_clean + lse_g`` with
``p = softmax(z_clean)`` normalised exactly (evaluate/core.py divides by ``sum_v p_v``
for the same reason). Masks are evaluate/core.py's, applied by its caller.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

BranchFn = Callable[[torch.Tensor], torch.Tensor]  # clean resid [n, T, d] -> group resid [n, T, d]


class OpTimer:
    """Wall-clock seconds and call counts per named op (the bench's profile table).

    ``with timer("head_matmul"): ...`` adds the block's wall time to that op. A disabled timer
    (``enabled=False``) costs one attribute check per block.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def table(self, total: float | None = None) -> str:
        """Plain-text table: op, calls, seconds, share of ``total`` (default: the sum of the ops)."""
        total = total or sum(self.seconds.values()) or 1.0
        lines = [f"{'op':<26}{'calls':>8}{'seconds':>10}{'share':>8}"]
        for name, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            lines.append(f"{name:<26}{self.calls[name]:>8}{sec:>10.2f}{100 * sec / total:>7.1f}%")
        return "\n".join(lines)


_NULL_TIMER = OpTimer(enabled=False)


def supports_branch(model: torch.nn.Module) -> bool:
    """True if ``model`` (an HF causal LM) has the Gemma 3 text structure :class:`BranchForward` replays.

    Needs ``model.model.{embed_tokens, layers, norm, rotary_emb}``, ``model.lm_head`` and
    ``config.layer_types``, and no bidirectional attention.
    """
    inner = getattr(model, "model", None)
    cfg = getattr(model, "config", None)
    return (all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and hasattr(model, "lm_head") and getattr(cfg, "layer_types", None) is not None
            and not getattr(cfg, "use_bidirectional_attention", False))


class BranchForward:
    """Clean forward with groups branching off at their layer (module docstring, "Branch splice").

    Args:
        model: the HF causal LM (``LoadedModel.model``), Gemma 3 text structure
            (:func:`supports_branch`).
        timer: per-op timings (``blocks``, ``branch``, ``final_norm``), optional.
    """

    def __init__(self, model: torch.nn.Module, timer: OpTimer | None = None):
        if not supports_branch(model):
            raise ValueError(f"{type(model).__name__} lacks the Gemma 3 structure branch splicing replays")
        self.model, self.inner, self.config = model, model.model, model.config
        self.timer = timer or _NULL_TIMER
        self._masks: dict = {}
        self._rope: dict = {}
        self._zero: dict = {}

    def _mask_and_rope(self, h: torch.Tensor):
        """``({layer_type: mask}, {layer_type: (cos, sin)})`` for a batch shaped like ``h`` ``[B, T, d]``, cached.

        Built by transformers' own ``create_causal_mask`` / ``create_sliding_window_causal_mask``
        and the model's ``rotary_emb``, as ``Gemma3TextModel.forward`` does without a cache.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        B, T = h.shape[:2]
        pos = torch.arange(T, device=h.device)[None]
        if (B, T) not in self._masks:
            kw = dict(config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos)
            self._masks[B, T] = {"full_attention": create_causal_mask(**kw),
                                 "sliding_attention": create_sliding_window_causal_mask(**kw)}
        if T not in self._rope:
            self._rope[T] = {t: self.inner.rotary_emb(h, pos, t) for t in set(self.config.layer_types)}
        return self._masks[B, T], self._rope[T], pos

    def _blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run decoder blocks ``[start, stop)`` on ``h`` ``[B, T, d]`` (model dtype)."""
        masks, rope, pos = self._mask_and_rope(h)
        types = self.config.layer_types
        with self.timer("blocks"):
            for i in range(start, stop):
                out = self.inner.layers[i](h, attention_mask=masks[types[i]], position_embeddings=rope[types[i]],
                                           position_ids=pos, cache=None)
                h = out[0] if isinstance(out, tuple) else out
        return h

    def run(self, input_ids: torch.Tensor, branches: dict[int, list[BranchFn]]) -> torch.Tensor:
        """Final-normed hidden states ``[(1 + n_branches) * n, T, d]`` (model dtype) of the clean rows and each branch.

        Args:
            input_ids: ``[n, T]`` long token ids on the model's device.
            branches: ``{layer: [fn, ...]}``; ``fn`` maps the clean residual after block
                ``layer`` ``[n, T, d]`` to the group's residual there (already masked: the
                caller decides which positions keep the clean value).

        Rows ``[0, n)`` are the clean group, then one group of ``n`` rows per branch in
        ascending layer order and list order within a layer (:meth:`group_order`).
        """
        n = input_ids.shape[0]
        with self.timer("embed"):
            h = self.inner.embed_tokens(input_ids)
        done = 0
        for layer in sorted(branches):
            h = self._blocks(h, done, layer + 1)
            done = layer + 1
            with self.timer("branch (SAE encode/decode)"):
                clean = h[:n]
                new = [fn(clean).to(h.dtype) for fn in branches[layer]]
            h = torch.cat([h, *new]) if new else h
        h = self._blocks(h, done, len(self.inner.layers))
        with self.timer("final_norm"):
            return self.inner.norm(h)

    @staticmethod
    def group_order(branches: dict[int, list]) -> list[tuple[int, int]]:
        """``[(layer, index in branches[layer])]`` of the branch groups in :meth:`run`'s row order (clean excluded)."""
        return [(layer, i) for layer in sorted(branches) for i in range(len(branches[layer]))]

    def zero_logits(self, layer: int, T: int, head: "Head") -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of SAEBench's zero ablation at ``layer`` (every position zeroed) for rows of length ``T``, cached.

        Returns ``(logits [T, vocab] fp32, lse [T] float64)``; the same for every batch (module
        docstring). Computed by running one zero row through blocks ``layer+1 ..`` and the head.
        """
        if (layer, T) not in self._zero:
            emb = self.inner.embed_tokens.weight
            h = torch.zeros(1, T, emb.shape[1], dtype=emb.dtype, device=emb.device)
            h = self.inner.norm(self._blocks(h, layer + 1, len(self.inner.layers)))[0]
            z = head.logits(h).float()
            self._zero[layer, T] = (z, torch.logsumexp(z.double(), -1))
        return self._zero[layer, T]


class Head:
    """The LM head of ``model`` as HF applies it: ``lm_head`` (no bias on Gemma), then soft-capping if configured.

    Args:
        model: the HF causal LM.
    """

    def __init__(self, model: torch.nn.Module):
        self.weight = model.lm_head.weight  # [vocab, d] in the model dtype (tied to the embedding on Gemma)
        self.bias = getattr(model.lm_head, "bias", None)
        self.cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(self, h: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Logits ``[..., hi - lo]`` in the model dtype of vocabulary columns ``[lo, hi)`` for ``h`` ``[..., d]``."""
        hi = self.weight.shape[0] if hi is None else hi
        z = F.linear(h, self.weight[lo:hi], None if self.bias is None else self.bias[lo:hi])
        if self.cap is not None:  # as Gemma3ForCausalLM.forward, in the logits' dtype
            z = torch.tanh(z / self.cap) * self.cap
        return z


def head_stats(head: Head, h: torch.Tensor, target: torch.Tensor, fixed: list[tuple[torch.Tensor, torch.Tensor]] = (),
               tpos: torch.Tensor | None = None, pos_chunk: int = 32, vocab_chunk: int = 4096,
               timer: OpTimer | None = None) -> dict[str, torch.Tensor]:
    """Per-position CE and KL(clean || group) of every group without materialising ``[P, vocab]`` logits per group.

    Args:
        head: the LM head.
        h: ``[G, P, d]`` final-normed hidden states (model dtype) of ``G`` groups at the same
            ``P`` scored positions; group 0 is the clean model.
        target: ``[P]`` long, the token each position predicts (any id where it is unused).
        fixed: extra groups given by precomputed logits instead of hidden states, each
            ``(logits [T, vocab] fp32, lse [T] float64)`` indexed by ``tpos`` (the zero
            ablation, :meth:`BranchForward.zero_logits`).
        tpos: ``[P]`` long, each position's index in the row (needed with ``fixed``).
        pos_chunk: positions per block (per group); the LM head runs on ``G * pos_chunk`` rows.
        vocab_chunk: vocabulary columns per block.
        timer: per-op timings (``head_matmul``, ``head_softmax_kl``, ``head_combine``).

    Returns:
        ``{"ce": [G + F, P], "kl": [G + F, P]}`` float64 (``kl[0]`` is 0, clean vs itself),
        groups ordered as ``h`` then ``fixed``. ``ce = lse - z[target]``; ``kl`` as in the
        module docstring, with ``p`` normalised exactly.
    """
    timer = timer or _NULL_TIMER
    G, P, _ = h.shape
    V = head.weight.shape[0]
    nf = len(fixed)
    ce = torch.empty(G + nf, P, dtype=torch.float64)
    kl = torch.zeros(G + nf, P, dtype=torch.float64)
    n_vc = -(-V // vocab_chunk)
    for p0 in range(0, P, pos_chunk):
        p1 = min(P, p0 + pos_chunk)
        pc = p1 - p0
        hb = h[:, p0:p1].reshape(G * pc, -1)
        tg = target[p0:p1]
        m = torch.empty(n_vc, G, pc)  # per-chunk max of each group's logits
        s = torch.empty(n_vc, G, pc)  # per-chunk sum of exp(z - m)
        d = torch.empty(n_vc, G - 1 + nf, pc)  # per-chunk sum of exp(z_clean - m_clean) * (z_clean - z_g)
        zt = torch.zeros(G, pc)  # target logits
        for c in range(n_vc):
            v0, v1 = c * vocab_chunk, min(V, (c + 1) * vocab_chunk)
            with timer("head_matmul"):
                z = head.logits(hb, v0, v1).float().view(G, pc, v1 - v0)
            with timer("head_softmax_kl"):
                mc = z.amax(-1)
                m[c] = mc
                e = torch.sub(z, mc[..., None])
                e.exp_()
                s[c] = e.sum(-1)
                ec = e[0]
                if G > 1:
                    d[c, : G - 1] = (z[:1] - z[1:]).mul_(ec).sum(-1)
                for j, (zf, _) in enumerate(fixed):
                    d[c, G - 1 + j] = (z[0] - zf[tpos[p0:p1], v0:v1]).mul_(ec).sum(-1)
                idx = tg - v0
                inside = (idx >= 0) & (idx < v1 - v0)
                if inside.any():
                    got = z.gather(-1, idx.clamp(0, v1 - v0 - 1).expand(G, pc)[..., None])[..., 0]
                    zt = torch.where(inside, got, zt)
        with timer("head_combine"):
            m64, s64, d64 = m.double(), s.double(), d.double()
            mx = m64.amax(0)  # [G, pc]
            w = torch.exp(m64 - mx)  # [n_vc, G, pc]
            lse = mx + torch.log((s64 * w).sum(0))  # [G, pc]
            s_clean = (s64[:, 0] * w[:, 0]).sum(0)  # [pc] = sum_v exp(z_clean - mx_clean)
            cross = (d64 * w[:, :1]).sum(0) / s_clean  # [G-1+nf, pc] = sum_v p_v (z_clean - z_g)
            ce[:G, p0:p1] = lse - zt.double()
            kl[1:G, p0:p1] = cross[: G - 1] + lse[1:] - lse[:1]
            for j, (zf, lse_f) in enumerate(fixed):
                tp = tpos[p0:p1]
                ce[G + j, p0:p1] = lse_f[tp] - zf[tp, tg].double()
                kl[G + j, p0:p1] = cross[G - 1 + j] + lse_f[tp] - lse[0]
    return {"ce": ce, "kl": kl}
