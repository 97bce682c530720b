"""Capture ``blocks.L.hook_resid_post`` with forward hooks, stopping after the deepest layer.

The LM head of Gemma (262k vocab) costs more than its blocks (DESIGN.md, "Measured
on this machine"), so harvesting raises :class:`_StopForward` from the deepest
requested block's hook and never runs the later blocks, the final norm or the head.
"""

from __future__ import annotations

import torch

from .model import LoadedModel


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass early."""


def _hidden(output) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first element is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def residuals(lm: LoadedModel, token_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Residual stream after each block in ``layers`` for a batch of rows.

    Args:
        lm: the loaded model.
        token_ids: ``[batch, seq]`` int64 on any device (moved to the model's device).
        layers: block indices, validated by the caller.

    Returns:
        ``{layer: [batch, seq, d_model]}`` in the model dtype, on the model's device.
    """
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = _hidden(output).detach()
            if layer == deepest:
                raise _StopForward

        return hook

    for layer in layers:
        handles.append(lm.layers[layer].register_forward_hook(make_hook(layer)))
    try:
        lm.model(input_ids=token_ids.to(lm.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
