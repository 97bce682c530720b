"""Running top-k per segment, merged one batch at a time (memory ``O(n_segments x k)``).

One structure serves two purposes in :mod:`.collect`:

- the top-k activating tokens of every latent (segment = latent, score = activation);
- uniform reservoir samples per (latent, activation bin) (segment = latent x bin, score =
  an independent uniform random key: keeping the ``k`` largest keys of a stream is a uniform
  sample of ``k`` of its items without replacement, the "bottom-k sketch", Cohen & Kaplan 2007).

Each slot carries a payload (global token index, context window ...). Ties in score keep the
entry seen first (existing slots before a batch's candidates, candidates in batch order), so
the result is deterministic and equals a global stable sort of the whole stream.
"""

from __future__ import annotations

import torch


class SegmentTopK:
    """The ``k`` highest-scoring entries of each of ``n_segments`` segments, with payloads.

    Args:
        n_segments: number of segments (e.g. ``d_sae``).
        k: slots per segment.
        payload: ``{name: (trailing shape, dtype)}`` of what each slot carries, e.g.
            ``{"index": ((), torch.int64), "window": ((33,), torch.int32)}``.

    Attributes:
        scores: fp32 ``[n_segments, k]``, descending within a segment; ``-inf`` marks an empty slot.
        data: ``{name: [n_segments, k, *shape]}`` payload tensors (zeros in empty slots).
    """

    def __init__(self, n_segments: int, k: int, payload: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.n_segments, self.k = n_segments, k
        self.scores = torch.full((n_segments, k), -torch.inf)
        self.data = {name: torch.zeros((n_segments, k, *shape), dtype=dtype) for name, (shape, dtype) in payload.items()}

    def threshold(self) -> torch.Tensor:
        """fp32 ``[n_segments]``: the score a candidate must exceed to enter (the k-th best, ``-inf`` if not full)."""
        return self.scores[:, -1]

    def update(self, segment: torch.Tensor, score: torch.Tensor, payload: dict[str, torch.Tensor] | None = None,
               payload_fn=None) -> None:
        """Merge candidates into the running top-k.

        Args:
            segment: int64 ``[n]`` segment of each candidate, in ``[0, n_segments)``.
            score: fp32 ``[n]``.
            payload: ``{name: [n, *shape]}`` for every payload name; or None with ``payload_fn``.
            payload_fn: called with the bool mask ``[n]`` of candidates that pass the threshold,
                returning their payload ``{name: [m, *shape]}`` (so payloads are only built for
                the few candidates that can enter).
        """
        keep = score > self.threshold()[segment]  # cannot enter: filtered before any sort
        if not bool(keep.any()):
            return
        segment, score = segment[keep], score[keep]
        cand = payload_fn(keep) if payload_fn is not None else {n: v[keep] for n, v in payload.items()}
        touched, local = torch.unique(segment, return_inverse=True)  # sorted segment ids, [m], [n]
        m, k = len(touched), self.k
        # Existing slots of the touched segments first (they win ties), then candidates in order.
        all_local = torch.cat([torch.arange(m).repeat_interleave(k), local])
        all_score = torch.cat([self.scores[touched].reshape(-1), score])
        order = torch.argsort(all_score, descending=True, stable=True)
        order = order[torch.argsort(all_local[order], stable=True)]  # grouped by segment, score descending
        grouped = all_local[order]
        starts = torch.searchsorted(grouped, torch.arange(m))
        rank = torch.arange(len(order)) - starts[grouped]
        win = rank < k
        src, dst_seg, dst_rank = order[win], touched[grouped[win]], rank[win]
        self.scores[dst_seg, dst_rank] = all_score[src]
        for name, old in self.data.items():
            merged = torch.cat([old[touched].reshape(m * k, *old.shape[2:]), cand[name].to(old.dtype)])
            old[dst_seg, dst_rank] = merged[src]
