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
  row is exactly zero and the ablated model predicts the uniform distribution; then the
  head matmul is skipped too.)
- **Chunked head statistics** (:func:`head_stats`): the final hidden states of all groups
  at the scored positions go through the LM head a block of positions (all groups
  together, ~1024 matmul rows: the CPU matmul's efficient size) times ``vocab_chunk``
  vocabulary columns at a time, into preallocated buffers. Each block of logits is used
  for every statistic (per-chunk max, sum of exp, the clean-weighted logit difference for
  KL, the target logit) and discarded; the chunk results are combined in float64. On the CPU
  the per-block statistics come from one compiled kernel (``head_block_stats`` in
  train/csrc/native.cpp: two passes per row while it is in cache, where torch's ops make ~8
  passes over the whole block through memory; measured 8 vs 71 ms per 1025 x 4096 fp32 block
  beside a 65 ms head matmul, shared machine), with the torch ops as fallback. No
  ``[rows, T, vocab]`` tensor is ever materialised, positions whose input token is special
  (never scored) never reach the head, the ablated group costs no head matmul, and groups
  with bitwise-equal hidden states go through the head once.

Measured (bench/eval_throughput.py --compare --rows 8 --repeats 3, 4 random SAEs at layer 8 of Gemma 3
270M, 2 cores, queue paused; docs/results/bench/README.md): float32 2.12x the reference's tokens/s (median
of five rounds, 1.98-2.46; 1.92x with torch's ops for the head statistics), bfloat16 1.79x. The floor is
the work itself: every SAE group still needs its full-vocabulary head matmul for its log-normaliser (the
head is 168M of the model's 268M weights; 58-63% of the fast path's time).

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
        return self.tail(h, done - 1)

    def tail(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, d]`` (model dtype) from the residual after block ``layer``.

        ``h``: ``[B, T, d]`` in the model dtype, ``blocks.{layer}.hook_resid_post`` of right-padded
        rows (causal attention: the padding never reaches earlier positions). Runs blocks
        ``layer+1 ..`` and the final norm, as :meth:`run` does after a branch; used to re-score
        cached prefixes (evaluate/unlearning.py).
        """
        h = self._blocks(h, layer + 1, len(self.inner.layers))
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
        When the final hidden states are exactly zero and the head has no bias (Gemma: no
        biases anywhere), the logits are exactly zero (soft-capping maps 0 to 0): then no head
        matmul runs and ``logits`` is None (:func:`head_stats` reads it as zeros), ``lse = ln(vocab)``.
        """
        if (layer, T) not in self._zero:
            emb = self.inner.embed_tokens.weight
            h = torch.zeros(1, T, emb.shape[1], dtype=emb.dtype, device=emb.device)
            h = self.inner.norm(self._blocks(h, layer + 1, len(self.inner.layers)))[0]
            if head.bias is None and not h.any():
                z = None
                lse = torch.full((T,), float(torch.tensor(float(head.weight.shape[0]), dtype=torch.float64).log()),
                                 dtype=torch.float64, device=h.device)
            else:
                z = head.logits(h).float()
                lse = torch.logsumexp(z.double(), -1)
            self._zero[layer, T] = (z, lse)
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

    def logits(self, h: torch.Tensor, lo: int = 0, hi: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[..., hi - lo]`` in the model dtype of vocabulary columns ``[lo, hi)`` for ``h`` ``[..., d]``.

        ``out``: a contiguous ``[rows, hi - lo]`` buffer of the model dtype to write into (``h`` 2-D).
        """
        hi = self.weight.shape[0] if hi is None else hi
        if out is None:
            z = F.linear(h, self.weight[lo:hi], None if self.bias is None else self.bias[lo:hi])
        else:
            z = torch.mm(h, self.weight[lo:hi].t(), out=out)
            if self.bias is not None:
                z += self.bias[lo:hi]
        if self.cap is not None:  # as Gemma3ForCausalLM.forward, in the logits' dtype
            if out is None:
                z = torch.tanh(z / self.cap) * self.cap
            else:
                z.div_(self.cap).tanh_().mul_(self.cap)
        return z


@torch.no_grad()
def head_stats(head: Head, h: torch.Tensor, target: torch.Tensor, fixed: list[tuple[torch.Tensor, torch.Tensor]] = (),
               tpos: torch.Tensor | None = None, pos_chunk: int | None = None, vocab_chunk: int = 4096,
               rows_per_block: int = 1024, timer: OpTimer | None = None) -> dict[str, torch.Tensor]:
    """Per-position CE and KL(clean || group) of every group without materialising ``[P, vocab]`` logits per group.

    Args:
        head: the LM head.
        h: ``[G, P, d]`` final-normed hidden states (model dtype) of ``G`` groups at the same
            ``P`` scored positions; group 0 is the clean model.
        target: ``[P]`` long, the token each position predicts (any id where it is unused).
        fixed: extra groups given by precomputed logits instead of hidden states, each
            ``(logits [T, vocab] fp32, lse [T] float64)`` indexed by ``tpos`` (the zero
            ablation, :meth:`BranchForward.zero_logits`); ``logits`` None means all zero.
        tpos: ``[P]`` long, each position's index in the row (needed with ``fixed``).
        pos_chunk: positions per block (default: the fewest blocks of at most ``rows_per_block``
            head rows, all of equal size).
        vocab_chunk: vocabulary columns per block.
        rows_per_block: with ``pos_chunk`` None, the LM head's matmul rows per block (all groups
            of a block of positions go through the head together). The head is a
            ``[rows, d] x [d, vocab_chunk]`` matmul; measured on Gemma 3 270M (2 cores, d 640,
            full vocabulary, CPU seconds per row): 512 x 8192 takes 1.9x (fp32) to 2.3x (bf16)
            less than 160 x 4096 (the previous blocks of 32 positions x 5 groups); from 512
            to 2048 rows and 512 to 8192 columns it is within ~20% (fp32 ~2.0-2.5 ms per row
            on an idle machine).
        timer: per-op timings (``head_matmul``, ``head_softmax_kl``, ``head_combine``).

    Groups whose hidden states are bitwise equal (an SAE that reconstructs exactly, a zero SAE
    and the ``bos_kept`` ablation) go through the head once and share their statistics:
    identical inputs give identical numbers (a matmul's rounding can depend on a row's place
    in the block) and the head work is not repeated.

    Returns:
        ``{"ce": [G + F, P], "kl": [G + F, P]}`` float64 (``kl[0]`` is 0, clean vs itself),
        groups ordered as ``h`` then ``fixed``. ``ce = lse - z[target]``; ``kl`` as in the
        module docstring, with ``p`` normalised exactly.
    """
    timer = timer or _NULL_TIMER
    G, P, _ = h.shape
    V = head.weight.shape[0]
    dev = h.device  # the head's device: every buffer lives there (CPU or CUDA)
    target = target.to(dev)
    tpos = None if tpos is None else tpos.to(dev)
    nf = len(fixed)
    with timer("head_combine"):
        uniq: list[int] = []  # groups that go through the head (first of each set of equal ones)
        src = []  # src[g]: index in uniq of group g's hidden states
        for g in range(G):
            j = next((j for j, u in enumerate(uniq) if torch.equal(h[g], h[u])), None)
            if j is None:
                j = len(uniq)
                uniq.append(g)
            src.append(j)
        hu = h[uniq] if len(uniq) < G else h
    U = len(uniq)
    if pos_chunk is None:
        n_blocks = -(-U * P // rows_per_block)
        pos_chunk = max(1, -(-P // n_blocks))
    pc_max = pos_chunk
    bufs: dict = {}  # (rows, columns) -> preallocated logits blocks (no fresh large allocation per block)
    f64 = dict(dtype=torch.float64, device=dev)
    ce_u = torch.empty(U, P, **f64)
    kl_u = torch.zeros(U, P, **f64)
    ce_f = torch.empty(nf, P, **f64)
    kl_f = torch.empty(nf, P, **f64)
    n_vc = -(-V // vocab_chunk)
    kernel = _head_kernel(hb_dtype=hu.dtype, fixed=fixed) if dev.type == "cpu" else None
    for p0 in range(0, P, pc_max):
        p1 = min(P, p0 + pc_max)
        pc = p1 - p0
        hb = hu[:, p0:p1].reshape(U * pc, -1)
        tg = target[p0:p1]
        tp = tpos[p0:p1] if nf else None
        m = torch.empty(n_vc, U, pc, **f64)  # per-chunk max of each group's logits
        s = torch.empty(n_vc, U, pc, **f64)  # per-chunk sum of exp(z - m)
        d = torch.empty(n_vc, U - 1 + nf, pc, **f64)  # per-chunk sum of exp(z_clean - m_clean) * (z_clean - z_g)
        zt = torch.zeros(U, pc, device=dev)  # target logits
        for c in range(n_vc):
            v0, v1 = c * vocab_chunk, min(V, (c + 1) * vocab_chunk)
            width = v1 - v0
            if (pc, width) not in bufs:
                raw = torch.empty(U * pc, width, dtype=hb.dtype, device=dev)
                bufs[pc, width] = (raw, raw if raw.dtype == torch.float32 or kernel else
                                   torch.empty(U * pc, width, device=dev),
                                   None if kernel else torch.empty(U, pc, width, device=dev))
            raw, z, e = bufs[pc, width]
            with timer("head_matmul"):
                head.logits(hb, v0, v1, out=raw)
                if z is not raw:
                    z.copy_(raw)
                z = z.view(U, pc, width)
            with timer("head_softmax_kl"):
                if kernel:
                    _block_stats_native(kernel, z, m[c], s[c], d[c], U)
                else:
                    _block_stats_torch(z, e, m[c], s[c], d[c], fixed, tp, v0, v1)
                idx = tg - v0
                inside = (idx >= 0) & (idx < v1 - v0)  # no `if inside.any()`: a host sync per chunk on CUDA
                got = z.gather(-1, idx.clamp(0, v1 - v0 - 1).expand(U, pc)[..., None])[..., 0].float()
                zt = torch.where(inside, got, zt)
        with timer("head_combine"):
            mx = m.amax(0)  # [U, pc]; m, s, d are float64 already
            w = torch.exp(m - mx)  # [n_vc, U, pc]
            lse = mx + torch.log((s * w).sum(0))  # [U, pc]
            s_clean = (s[:, 0] * w[:, 0]).sum(0)  # [pc] = sum_v exp(z_clean - mx_clean)
            cross = (d * w[:, :1]).sum(0) / s_clean  # [U-1+nf, pc] = sum_v p_v (z_clean - z_g)
            ce_u[:, p0:p1] = lse - zt.double()
            kl_u[1:, p0:p1] = cross[: U - 1] + lse[1:] - lse[:1]
            for j, (zf, lse_f) in enumerate(fixed):
                ce_f[j, p0:p1] = lse_f[tp] - (0.0 if zf is None else zf[tp, tg].double())
                kl_f[j, p0:p1] = cross[U - 1 + j] + lse_f[tp] - lse[0]
    with timer("head_combine"):
        return {"ce": torch.cat([ce_u[src], ce_f]), "kl": torch.cat([kl_u[src], kl_f])}


def prepare_kernels(device: torch.device) -> None:
    """Build the compiled head-statistics kernel now when ``device`` is the CPU (once per machine, ~1 min, then
    cached): called before evaluation's clock starts, so a first build is not counted as evaluation time."""
    if device.type == "cpu":
        from saestrata.train.native import load_native

        load_native()


def _head_kernel(hb_dtype: torch.dtype, fixed) -> object | None:
    """The compiled module when :func:`head_stats`' per-block statistics can run on it, else None.

    The kernel covers fp32 / bf16 logits on the CPU and fixed groups whose logits are all zero
    (SAEBench's zero ablation on a bias-free model); anything else takes the torch ops.
    """
    from saestrata.train.native import load_native  # the package's one compiled-extension loader

    if hb_dtype not in (torch.float32, torch.bfloat16) or any(zf is not None for zf, _ in fixed):
        return None
    return load_native()


def _block_stats_native(mod, z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, d: torch.Tensor, U: int) -> None:
    """One block's statistics (see :func:`_block_stats_torch`) from ``csrc/native.cpp``'s ``head_block_stats``.

    ``z`` ``[U, pc, width]`` fp32 or bf16 CPU logits; ``m``, ``s`` ``[U, pc]`` and ``d``
    ``[U - 1 + nf, pc]`` float64 are written. The kernel's ``d[0]`` is ``sum_v exp(z_clean - m_clean)
    z_clean``: the cross term of each all-zero fixed group.
    """
    mc, sc, dc = mod.head_block_stats(z)
    m.copy_(mc)
    s.copy_(sc)
    d[: U - 1] = dc[1:]
    d[U - 1:] = dc[:1]


def _block_stats_torch(z: torch.Tensor, e: torch.Tensor, m: torch.Tensor, s: torch.Tensor, d: torch.Tensor,
                       fixed, tp: torch.Tensor | None, v0: int, v1: int) -> None:
    """Per-position max ``m``, sum of ``exp(z - m)`` ``s`` and clean-weighted differences ``d`` of one block.

    ``z`` ``[U, pc, width]`` fp32 logits of vocabulary columns ``[v0, v1)`` (group 0 clean), ``e`` a
    scratch buffer of its shape; ``d[g - 1] = sum_v exp(z_clean - m_clean) (z_clean - z_g)`` for the
    ``U - 1`` groups, then one row per ``fixed`` group (its logits at rows ``tp``; None = all zero).
    """
    U = z.shape[0]
    mc = z.amax(-1)
    m.copy_(mc)
    torch.sub(z, mc[..., None], out=e)
    e.exp_()
    s.copy_(e.sum(-1))
    ec = e[0]
    if U > 1:  # e[1:] is no longer needed: reuse it for (z_clean - z_g) * p
        diff = torch.sub(z[:1], z[1:], out=e[1:])
        d[: U - 1] = diff.mul_(ec).sum(-1)
    for j, (zf, _) in enumerate(fixed):
        d[U - 1 + j] = (z[0] * ec if zf is None else (z[0] - zf[tp, v0:v1]).mul_(ec)).sum(-1)
