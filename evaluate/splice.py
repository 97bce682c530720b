"""Splice a replacement into the residual stream with a forward hook.

The hook rewrites the output of block ``layer`` (``blocks.L.hook_resid_post``).
Rows of the batch are split into groups, each with its own replacement, so the
clean, SAE-spliced and zero-ablated passes run as ONE batched forward (the three
groups see identical inputs up to ``layer``). Positions flagged in ``keep`` (special
tokens such as BOS) keep their original activation in every group, as SAEBench
does with ``exclude_special_tokens_from_reconstruction``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

Replacement = Callable[[torch.Tensor], torch.Tensor] | None  # [n, T, d] -> [n, T, d]; None = unchanged


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def splice(layers, layer: int, groups: list[Replacement], keep: torch.Tensor) -> Iterator[None]:
    """Within the context, block ``layer``'s output is rewritten group by group.

    Args:
        layers: the model's decoder blocks (``model.model.layers``).
        layer: block index whose output (resid_post) is replaced.
        groups: one replacement per equal slice of the batch; ``None`` leaves it clean.
            A batch of ``len(groups) * n`` rows gives rows ``[g*n, (g+1)*n)`` to group ``g``.
        keep: ``[n, T]`` bool, True where the original activation is kept (special tokens).

    Raises:
        ValueError: batch size not divisible by the number of groups.
    """

    def hook(_module, _inputs, output):
        h = _hidden(output)
        n = h.shape[0] // len(groups)
        if n * len(groups) != h.shape[0]:
            raise ValueError(f"batch of {h.shape[0]} rows is not {len(groups)} equal groups")
        parts = []
        for g, fn in enumerate(groups):
            chunk = h[g * n : (g + 1) * n]
            if fn is not None:
                new = fn(chunk).to(chunk.dtype)
                chunk = torch.where(keep[..., None].to(chunk.device), chunk, new)
            parts.append(chunk)
        return _with_hidden(output, torch.cat(parts))

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_replacement(sae, record: dict | None = None) -> Replacement:
    """Replacement ``h -> sae(h)`` computed in fp32; stores ``x``, ``x_hat``, ``f`` (flattened) in ``record``."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1]).float()
        f = sae.encode(x)
        x_hat = sae.decode(f)
        if record is not None:
            record.update(x=x, x_hat=x_hat, f=f)
        return x_hat.reshape(h.shape)

    return fn


def zero_replacement(h: torch.Tensor) -> torch.Tensor:
    """Zero ablation of the residual stream."""
    return torch.zeros_like(h)
