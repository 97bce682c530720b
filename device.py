"""Device resolution shared by every stage (DESIGN.md, "Devices")."""

from __future__ import annotations

import platform

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


def native_bf16(device: torch.device) -> bool:
    """True if ``device`` runs bf16 matmuls in hardware, so bf16 is faster than fp32 there.

    CUDA: compute capability 8 or more (Ampere and newer) of ``device`` itself; ROCm: True.
    x86 CPU: AVX-512 BF16 or AMX tiles (torch's own cpuinfo checks). Arm CPU: oneDNN's bf16
    support, which on Arm means the BF16 instructions. Other devices: False. Why it matters:
    without them oneDNN emulates bf16, and a ``[2048, 640] x [640, 2048]`` matmul ran 4.97x
    slower in bf16 than in fp32 (``bench/bf16_check.py``, AMD EPYC with AVX2 only, 2026-12-06;
    5.28x on the first session's AVX2 machine), while AVX-512 BF16 / AMX machines ran it
    9-25x faster in bf16 (README, "Numerics are one setting").
    """
    if device.type == "cuda":  # this device's, not the current one's (torch.cuda.is_bf16_supported asks that)
        return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    if any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")):
        return True
    return platform.machine().lower() in ("aarch64", "arm64") and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fast_dtype(dtype: str, device: torch.device) -> str:
    """The dtype to compute in when ``dtype`` is wanted: ``float32`` in place of ``bfloat16`` where
    :func:`native_bf16` is False, else ``dtype`` itself (dtype names as in ``torch``: ``"bfloat16"``)."""
    return "float32" if dtype == "bfloat16" and not native_bf16(device) else dtype
