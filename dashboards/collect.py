"""Per-latent statistics and examples accumulated over one streaming pass (memory independent of the store).

:class:`LatentCollector` takes one batch of whole context rows at a time: the SAE's latents
``f [n, d_sae]`` plus the store's aligned ``token_ids``, ``doc_index`` and ``position``. It keeps,
per latent ``i``:

- the top-``k`` activating tokens with their context windows (:class:`.segtopk.SegmentTopK`,
  ``[d_sae, k]`` slots);
- a uniform reservoir of ``reservoir`` examples per fixed activation bin (``[d_sae * n_bins,
  reservoir]`` slots), from which :meth:`LatentCollector.quantile_examples` draws examples per
  activation-quantile interval (the SAE-Vis / Neuronpedia "activation quantile" panels, here over
  quantiles of the firing distribution rather than fractions of the max, which needs the max first);
- the firing count, the sum of activations and a histogram over fixed log-spaced bins.

Context windows are ``2 * context + 1`` tokens centred on the example and never leave its
context row (the model saw nothing outside it when computing the activation) nor its document
(``doc_index``); slots outside are ``token = -1``. The row is told by ``position`` (index in the
row). Because batches hold whole rows, a window never needs a neighbouring batch.

Tokens that are special (BOS, pad ... the store's ``special_token_ids``) are excluded from every
statistic and example: BOS carries residual norms orders of magnitude above other tokens
(store/reader.py); inside windows their activation is shown as 0.
"""

from __future__ import annotations

import math

import torch

from .segtopk import SegmentTopK

# Fixed log-spaced histogram bins: 4 per decade over [1e-3, 1e5); values outside go to the end bins.
HIST_LO, HIST_HI, HIST_PER_DECADE = -3, 5, 4
N_BINS = (HIST_HI - HIST_LO) * HIST_PER_DECADE


def bin_edges() -> torch.Tensor:
    """fp64 ``[N_BINS + 1]`` activation edges of the histogram bins (``10 ** (HIST_LO + j / HIST_PER_DECADE)``)."""
    return 10.0 ** (HIST_LO + torch.arange(N_BINS + 1, dtype=torch.float64) / HIST_PER_DECADE)


def bin_of(values: torch.Tensor) -> torch.Tensor:
    """int64 bin index of positive activations ``values`` (fp32 ``[n]``), clipped to ``[0, N_BINS)``."""
    idx = torch.floor((torch.log10(values.double()) - HIST_LO) * HIST_PER_DECADE).long()
    return idx.clamp_(0, N_BINS - 1)


class LatentCollector:
    """Streaming per-latent bookkeeping; call :meth:`update` per batch, then read the attributes.

    Args:
        d_sae: number of latents.
        context_length: tokens per context row of the store (for the row test of windows).
        top_k: top examples kept per latent.
        context: tokens shown on each side of an example.
        reservoir: examples kept per (latent, histogram bin).
        special_ids: token ids excluded from statistics (BOS ...).
        seed: seed of the reservoir keys.

    Attributes:
        n_tokens: tokens counted (special tokens excluded).
        top: :class:`SegmentTopK` ``[d_sae, top_k]``: scores = activations, payload ``index``
            (int64 global token index), ``tokens`` (int32 ``[2C+1]``), ``acts`` (fp32 ``[2C+1]``);
            read it sorted with :meth:`top_examples`.
        fire_count: int64 ``[d_sae]`` tokens with ``f_i > 0``.
        act_sum: fp64 ``[d_sae]`` sum of ``f_i`` over counted tokens.
        hist: int64 ``[d_sae, N_BINS]`` firing activations per bin.
    """

    def __init__(self, d_sae: int, context_length: int, top_k: int = 20, context: int = 16, reservoir: int = 2,
                 special_ids: tuple[int, ...] = (), seed: int = 0):
        self.d_sae, self.T, self.k, self.C = d_sae, context_length, top_k, context
        self.width = 2 * context + 1
        payload = {"index": ((), torch.int64), "value": ((), torch.float32), "tokens": ((self.width,), torch.int32),
                   "acts": ((self.width,), torch.float32)}
        self.top = SegmentTopK(d_sae, top_k, payload)
        self.samples = SegmentTopK(d_sae * N_BINS, reservoir, payload)
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.int32)
        self.n_tokens = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.hist = torch.zeros(d_sae * N_BINS, dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, f: torch.Tensor, start: int, token_ids, doc_index, position) -> None:
        """Add one batch of whole rows.

        Args:
            f: ``[n, d_sae]`` latents (CPU) of tokens ``start .. start + n``.
            start: global index of the first token.
            token_ids, doc_index, position: ``[n]`` aligned store arrays (numpy or torch).
        """
        tok = torch.as_tensor(token_ids).to(torch.int32)
        doc = torch.as_tensor(doc_index).to(torch.int64)
        pos = torch.as_tensor(position).to(torch.int64)
        counted = ~torch.isin(tok, self.special) if len(self.special) else torch.ones(len(tok), dtype=torch.bool)
        f = f.float()
        self.n_tokens += int(counted.sum())
        # One pass over the dense latents: flat indices of the non-zeros (built-in archs give f >= 0).
        flat = torch.nonzero(f.reshape(-1)).flatten()
        vals = f.reshape(-1)[flat]
        rows, lats = flat // self.d_sae, flat % self.d_sae
        keep = counted[rows] & (vals > 0)  # special tokens: no statistic, no example (0 in windows)
        rows, lats, vals = rows[keep], lats[keep], vals[keep]
        self.fire_count += torch.bincount(lats, minlength=self.d_sae)
        self.act_sum += torch.bincount(lats, weights=vals.double(), minlength=self.d_sae)
        cells = lats * N_BINS + bin_of(vals)
        self.hist += torch.bincount(cells, minlength=self.d_sae * N_BINS)
        windows = _Windows(f, tok, doc, pos, counted, self.C, self.T)

        def payload(which: torch.Tensor) -> dict[str, torch.Tensor]:
            """Index, value and context window of the non-zeros ``which`` (int64 positions)."""
            r, lat = rows[which], lats[which]
            win_tok, win_act = windows.at(r, lat)
            return {"index": r + start, "value": vals[which], "tokens": win_tok, "acts": win_act}

        self.top.update(lats, vals, payload_fn=payload)
        keys = torch.rand(len(vals), generator=self.gen)
        self.samples.update(cells, keys, payload_fn=payload)

    # -- results ------------------------------------------------------------------------
    def top_examples(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(scores fp32 [d_sae, k], payload)``: each latent's top examples by decreasing activation.

        Equal activations keep store order (lower token index first); empty slots (score ``-inf``) last.
        """
        return self.top.sorted()

    def density(self) -> torch.Tensor:
        """fp64 ``[d_sae]``: fraction of counted tokens on which each latent fires."""
        return self.fire_count.double() / max(self.n_tokens, 1)

    def mean_firing(self) -> torch.Tensor:
        """fp64 ``[d_sae]``: mean activation over the tokens where the latent fires (NaN if it never does)."""
        return self.act_sum / self.fire_count.double()

    def mean_all(self) -> torch.Tensor:
        """fp64 ``[d_sae]``: mean activation over all counted tokens (zeros included)."""
        return self.act_sum / max(self.n_tokens, 1)

    def histogram(self) -> torch.Tensor:
        """int64 ``[d_sae, N_BINS]`` firing counts per bin (:func:`bin_edges`)."""
        return self.hist.reshape(self.d_sae, N_BINS)

    def quantile_examples(self, n_intervals: int = 5, per_interval: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
        """Examples per activation-quantile interval of each latent, from the per-bin reservoirs.

        Interval ``q`` of latent ``i`` holds the bins whose middle lies between quantiles
        ``q / n_intervals`` and ``(q + 1) / n_intervals`` of its firing distribution (resolution:
        one histogram bin, a quarter decade). Within an interval, reservoir samples are drawn
        without replacement with weight ``bin count / samples kept in the bin``, so the drawn set
        approximates a uniform sample of the interval's tokens.

        Returns:
            ``{"index" int64, "value" fp32, "tokens" int32 [.., 2C+1], "acts" fp32 [.., 2C+1]}``, each
            ``[d_sae, n_intervals, per_interval, ...]`` (``index = -1`` marks an empty slot), and
            ``"bounds"`` fp32 ``[d_sae, n_intervals, 2]`` (activation range of the interval's bins;
            NaN for an empty interval). Highest interval last.
        """
        d, s = self.d_sae, self.samples.k
        gen = torch.Generator().manual_seed(seed)
        hist = self.histogram().double()
        edges = bin_edges().float()
        total = hist.sum(1, keepdim=True)
        cum_mid = (hist.cumsum(1) - hist / 2) / total.clamp_min(1)
        interval = (cum_mid * n_intervals).long().clamp_(0, n_intervals - 1)  # [d, N_BINS]
        scores = self.samples.scores.reshape(d, N_BINS, s)
        kept = torch.isfinite(scores)
        out = {name: torch.zeros(d, n_intervals, per_interval, *v.shape[2:], dtype=v.dtype)
               for name, v in self.samples.data.items()}
        out["index"].fill_(-1)
        bounds = torch.full((d, n_intervals, 2), math.nan)
        data = {name: v.reshape(d, N_BINS * s, *v.shape[2:]) for name, v in self.samples.data.items()}
        for i in torch.nonzero(total[:, 0] > 0).flatten().tolist():
            n_kept = kept[i].sum(1).double()  # [N_BINS]
            for q in range(n_intervals):
                bins = torch.nonzero((interval[i] == q) & (hist[i] > 0)).flatten()
                if not len(bins):
                    continue
                bounds[i, q] = torch.stack([edges[bins.min()], edges[bins.max() + 1]])
                slot = (bins[:, None] * s + torch.arange(s)).flatten()
                ok = kept[i].reshape(-1)[slot]
                slot = slot[ok]
                if not len(slot):
                    continue
                weight = (hist[i, slot // s] / n_kept[slot // s]).float()
                take = slot[torch.multinomial(weight, min(per_interval, len(slot)), generator=gen)]
                take = take[torch.argsort(data["value"][i, take], descending=True)]
                for name in out:
                    out[name][i, q, : len(take)] = data[name][i, take]
        out["bounds"] = bounds
        return out


class _Windows:
    """Context windows of a batch of whole rows: ``at(rows, latents)`` -> token ids and that latent's activations."""

    def __init__(self, f: torch.Tensor, tok: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor,
                 counted: torch.Tensor, context: int, context_length: int):
        self.f, self.tok, self.doc, self.pos, self.counted = f, tok, doc, pos, counted
        self.offsets = torch.arange(-context, context + 1)
        self.T = context_length

    def at(self, rows: torch.Tensor, lats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens int32 [m, 2C+1], acts fp32 [m, 2C+1])`` around batch rows ``rows`` for latents ``lats``.

        A slot is inside when its position stays in ``[0, context_length)`` of the same row and its
        ``doc_index`` equals the centre's; outside slots get token -1 and activation 0, and special
        tokens (not ``counted``) activation 0.
        """
        where = rows[:, None] + self.offsets  # [m, W]
        in_row = (self.pos[rows][:, None] + self.offsets >= 0) & (self.pos[rows][:, None] + self.offsets < self.T)
        in_row &= (where >= 0) & (where < len(self.tok))
        safe = where.clamp(0, len(self.tok) - 1)
        inside = in_row & (self.doc[safe] == self.doc[rows][:, None])
        tokens = torch.where(inside, self.tok[safe], torch.full_like(safe, -1, dtype=torch.int32))
        acts = torch.where(inside & self.counted[safe], self.f[safe, lats[:, None]], torch.zeros((), dtype=self.f.dtype))
        return tokens.to(torch.int32), acts.float()
