"""Splice a replacement into the residual stream with a forward hook (evaluation's reference path).

``evaluate_saes`` uses this module when called with ``reference=True`` (or for a model
without the Gemma 3 structure); its default path is evaluate/branch.py, which branches the
groups off one clean forward instead of running every group through every block.

The hook rewrites the output of block ``layer`` (``blocks.L.hook_resid_post``).
Rows of the batch are split into groups, each with its own replacement, so the
clean pass, the zero-ablated pass of each layer and the spliced pass of each SAE
run as ONE batched forward (a group differs from the clean one only from its
layer on), and the clean and ablated passes are shared by every SAE. Positions flagged in ``keep`` (special
tokens such as BOS) keep their original activation in the groups listed in
``keep_groups`` (default: every group). evaluate/core.py lists the SAE groups there, as
SAEBench's ``exclude_special_tokens_from_reconstruction`` does, and leaves SAEBench's
zero-ablation group out: its ``standard_zero_ablate_hook`` zeros every position, BOS included
(sae_bench/evals/core/main.py, ``get_recons_loss``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Collection, Iterator

import torch

Replacement = Callable[[torch.Tensor], torch.Tensor] | None  # [n, T, d] -> [n, T, d]; None = unchanged


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def splice(layers, plan: dict[int, list[Replacement]], keep: torch.Tensor,
           keep_groups: Collection[int] | None = None) -> Iterator[None]:
    """Within the context, the outputs of the blocks in ``plan`` are rewritten group by group.

    Args:
        layers: the model's decoder blocks (``model.model.layers``).
        plan: ``{layer: [replacement per group]}``; every list has one entry per group
            (``None`` leaves that group unchanged at that layer). A batch of
            ``n_groups * n`` rows gives rows ``[g*n, (g+1)*n)`` to group ``g``.
        keep: ``[n, T]`` bool, True where the original activation is kept (special tokens).
        keep_groups: indices of the groups in which ``keep`` applies; the replacement of
            any other group rewrites every position. None (default): every group.

    Raises:
        ValueError: the lists differ in length, the batch is not ``n_groups`` equal slices,
            or ``keep_groups`` names a group outside ``[0, n_groups)``.
    """
    n_groups = {len(groups) for groups in plan.values()}
    if len(n_groups) != 1:
        raise ValueError("every layer of a splice plan needs one entry per group")
    (n_groups,) = n_groups
    keep_groups = set(range(n_groups)) if keep_groups is None else set(keep_groups)
    if not keep_groups <= set(range(n_groups)):
        raise ValueError(f"keep_groups {sorted(keep_groups)} outside the plan's {n_groups} groups")

    def make_hook(groups: list[Replacement]):
        """A forward hook applying ``groups[g]`` to rows ``[g*n, (g+1)*n)`` of the block's output."""

        def hook(_module, _inputs, output):
            """Replace each group's hidden states ``[n, T, d_model]`` in ``output`` (None = left clean)."""
            h = _hidden(output)
            n = h.shape[0] // n_groups
            if n * n_groups != h.shape[0]:
                raise ValueError(f"batch of {h.shape[0]} rows is not {n_groups} equal groups")
            parts = []
            for g, fn in enumerate(groups):
                chunk = h[g * n : (g + 1) * n]
                if fn is not None:
                    new = fn(chunk).to(chunk.dtype)
                    chunk = torch.where(keep[..., None].to(chunk.device), chunk, new) if g in keep_groups else new
                parts.append(chunk)
            return _with_hidden(output, torch.cat(parts))

        return hook

    handles = [layers[layer].register_forward_hook(make_hook(groups)) for layer, groups in plan.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def sae_replacement(sae, record: dict | None = None, rows: dict | None = None) -> Replacement:
    """Replacement ``h [n, T, d] -> sae(h)`` computed in fp32; stores ``x``, ``x_hat``, ``f`` (flattened) in ``record``.

    Token SAEs see the ``n*T`` tokens flattened. Sequence SAEs (``sae.needs_sequences``,
    e.g. seed 000's temporal SAE) see ``h`` as whole rows plus the document boundaries
    of the current batch, which the caller writes into the mutable ``rows`` dict before
    each forward: ``rows["doc_index"]`` ``[n, T]`` int, optionally ``rows["valid"]``
    ``[n, T]`` bool (False on special tokens, which then give no context).

    The returned function raises ValueError for a sequence SAE when ``rows`` lacks a
    ``doc_index`` of shape ``[n, T]``: boundaries are never guessed.
    """

    def fn(h: torch.Tensor) -> torch.Tensor:
        """``h [n, T, d_model]`` -> the SAE's reconstruction, same shape and dtype (records metrics)."""
        if getattr(sae, "needs_sequences", False):
            doc_index, valid = _row_context(rows, h)
            f = sae.encode_seq(h.float(), doc_index, valid).flatten(0, 1)
        else:
            f = sae.encode(h.reshape(-1, h.shape[-1]).float())
        x = h.reshape(-1, h.shape[-1]).float()
        x_hat = sae.decode(f)
        if record is not None:
            record.update(x=x, x_hat=x_hat, f=f)
        return x_hat.reshape(h.shape)

    return fn


def _row_context(rows: dict | None, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(doc_index [n, T], valid [n, T] | None)`` on ``h``'s device from the caller's ``rows`` dict."""
    doc_index = (rows or {}).get("doc_index")
    if doc_index is None or tuple(doc_index.shape) != tuple(h.shape[:2]):
        got = None if doc_index is None else tuple(doc_index.shape)
        raise ValueError(f"a sequence SAE needs rows['doc_index'] of shape {tuple(h.shape[:2])}, got {got}")
    valid = rows.get("valid")
    return doc_index.to(h.device), None if valid is None else valid.to(h.device)


def zero_replacement(h: torch.Tensor) -> torch.Tensor:
    """Zero ablation of the residual stream ``[n, T, d] -> zeros``; which positions it reaches is the
    caller's ``keep_groups`` choice in :func:`splice`."""
    return torch.zeros_like(h)
