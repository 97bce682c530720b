"""Device resolution shared by every stage (DESIGN.md, "Devices")."""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; any other string is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (a CPU tensor, any shape and dtype) on ``device``, values unchanged.

    On CUDA the host copy is pinned (page-locked) and the transfer is ``non_blocking``, so
    the copy of the next batch overlaps the GPU's work on this one (PyTorch's "pinned memory"
    guidance: a non-blocking copy from pageable memory is synchronous). Elsewhere a plain
    ``.to``. Ops queued later on the same CUDA stream see the finished copy, so callers need
    no synchronisation.
    """
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
