"""Process-level memory allocator settings for CPU training and evaluation (no torch import)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt(3) parameter numbers (<malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Larger than any buffer a training or evaluation step allocates (a [1024, 16384] fp32 code is 64 MiB).
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int: the largest value it can hold


def tune_allocator() -> bool:
    """Make glibc keep freed large buffers for reuse instead of handing them back to the OS.

    PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap
    threshold with a fresh ``mmap`` and trims freed memory at the heap top, so each SAE step
    (several [batch, d_sae] temporaries of 16-64 MiB) re-faults its memory page by page:
    measured ~14,000 minor page faults per TopK step (d_in 640, d_sae 4096, batch 1024, with
    ``resource.getrusage``); with the mmap threshold at 1 GiB and the trim threshold at 2 GiB
    the same step faults ~270 times. ``bench/one_pass.py --allocator`` (4 SAEs x 100 steps in
    one ``saestrata train`` process): process wall 35.2 -> 27.2 s (1.29x), the SAEs' own step
    clocks 1.12x (README "Benchmarks"). The price: up to 2 GiB of freed heap stays mapped.

    Process-wide, so the entry points call it (the CLI and ``bench/``), not the library
    functions. ``SAESTRATA_MALLOC=system`` keeps glibc's defaults.

    Returns:
        True when both settings were applied; False off Linux, without glibc's ``mallopt``,
        when opted out, or when glibc refused a value (never raises: an optimisation only).
    """
    if os.environ.get("SAESTRATA_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["tune_allocator"]
