"""Running top-k per segment, merged one batch at a time (memory ``O(n_segments x k)``).

One structure serves two purposes in :mod:`.collect`:

- the top-k activating tokens of every latent (segment = latent, score = activation);
- uniform reservoir samples per (latent, activation bin) (segment = latent x bin, score =
  an independent uniform random key: keeping the ``k`` largest keys of a stream is a uniform
  sample of ``k`` of its items without replacement, the "bottom-k sketch", Cohen & Kaplan 2007).

Each slot carries a payload (global token index, context window ...). Ties in score keep the
entry seen first (an arrival counter per slot), so the result is deterministic and equals a
global stable sort of the whole stream.
"""

from __future__ import annotations

import torch


class SegmentTopK:
    """The ``k`` highest-scoring entries of each of ``n_segments`` segments, with payloads.

    Slots are kept unsorted: a merge only writes the slots whose entry is evicted, so a batch
    costs a sort of the touched segments' scores plus payload writes for the new winners (not a
    rewrite of every touched slot). :meth:`sorted` orders them for reading.

    Args:
        n_segments: number of segments (e.g. ``d_sae``).
        k: slots per segment.
        payload: ``{name: (trailing shape, dtype)}`` of what each slot carries, e.g.
            ``{"index": ((), torch.int64), "window": ((33,), torch.int32)}``.

    Attributes:
        scores: fp32 ``[n_segments, k]`` in slot order (not sorted); ``-inf`` marks an empty slot.
        data: ``{name: [n_segments, k, *shape]}`` payload tensors (zeros in empty slots).
    """

    def __init__(self, n_segments: int, k: int, payload: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.n_segments, self.k = n_segments, k
        self.scores = torch.full((n_segments, k), -torch.inf)
        self.seq = torch.zeros((n_segments, k), dtype=torch.int64)  # arrival order: ties go to the earlier entry
        self.n_seen = 0
        self.data = {name: torch.zeros((n_segments, k, *shape), dtype=dtype) for name, (shape, dtype) in payload.items()}

    def threshold(self) -> torch.Tensor:
        """fp32 ``[n_segments]``: the score a candidate must exceed to enter (the k-th best, ``-inf`` if not full)."""
        return self.scores.min(dim=1).values

    def update(self, segment: torch.Tensor, score: torch.Tensor, payload: dict[str, torch.Tensor] | None = None,
               payload_fn=None) -> None:
        """Merge candidates (in arrival order) into the running top-k.

        Args:
            segment: int64 ``[n]`` segment of each candidate, in ``[0, n_segments)``.
            score: fp32 ``[n]``.
            payload: ``{name: [n, *shape]}`` for every payload name; or None with ``payload_fn``.
            payload_fn: called with the int64 positions (into the ``n`` candidates) of those that
                enter, returning their payload ``{name: [len(positions), *shape]}``: payloads are
                only built for the few winners.
        """
        first, n_all = self.n_seen, len(score)
        self.n_seen += n_all
        pos = torch.nonzero(score > self.threshold()[segment]).flatten()  # the others cannot enter
        if not len(pos):
            return
        seg, sc = segment[pos], score[pos]
        # Group the candidates by segment, best first, arrival order among equals (a stable sort).
        order = torch.argsort(sc, descending=True, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
        seg, sc, pos = seg[order], sc[order], pos[order]
        touched, counts = torch.unique_consecutive(seg, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.repeat_interleave(torch.arange(len(touched)), counts)
        rank = torch.arange(len(seg)) - starts[local]
        top = rank < self.k  # at most k candidates per segment can enter
        local, rank, sc, pos = local[top], rank[top], sc[top], pos[top]
        # One row per touched segment: its slots in arrival order, then its best candidates (arrival
        # order among equal scores too); a stable sort of each row by score picks the k winners.
        m, k = len(touched), self.k
        slot_order = torch.argsort(self.seq[touched], dim=1)
        row = torch.full((m, 2 * k), -torch.inf)
        row[:, :k] = self.scores[touched].gather(1, slot_order)
        row[local, k + rank] = sc
        best = torch.argsort(row, dim=1, descending=True, stable=True)
        kept = torch.zeros((m, 2 * k), dtype=torch.bool).scatter_(1, best[:, :k], True)
        freed = torch.nonzero(~kept[:, :k])  # [f, 2] (row, column): old slots pushed out, row-major
        won = torch.nonzero(kept[:, k:])  # [f, 2]: winning candidates, row-major: pairs with ``freed``
        if not len(won):
            return
        cand_at = torch.full((m, k), -1, dtype=torch.int64)
        cand_at[local, rank] = torch.arange(len(local))
        cand = cand_at[won[:, 0], won[:, 1]]
        dst_seg, dst_slot = touched[freed[:, 0]], slot_order[freed[:, 0], freed[:, 1]]
        winners = pos[cand]
        self.scores[dst_seg, dst_slot] = sc[cand]
        self.seq[dst_seg, dst_slot] = first + winners
        data = payload_fn(winners) if payload_fn is not None else {n: v[winners] for n, v in payload.items()}
        for name, tensor in self.data.items():
            tensor[dst_seg, dst_slot] = data[name].to(tensor.dtype)

    def sorted(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(scores, data)`` with each segment's slots by decreasing score, equal scores in arrival order.

        Empty slots (``-inf``) come last. This is the order of a global stable sort of the stream.
        """
        order = torch.argsort(self.seq, dim=1)
        order = order.gather(1, torch.argsort(self.scores.gather(1, order), dim=1, descending=True, stable=True))
        data = {name: v.gather(1, order.reshape(*order.shape, *([1] * (v.dim() - 2))).expand_as(v))
                for name, v in self.data.items()}
        return self.scores.gather(1, order), data
