"""Is bf16 fast on this machine? bf16 vs fp32 time of one SAE-sized matmul, in one run.

``python bench/bf16_check.py [--rows 2048 --d-in 640 --d-sae 2048 --repeats 5]``

Prints torch's CPU capability, whether oneDNN has native bf16 (AVX-512 BF16 / AMX), and the
ratio bf16 time / fp32 time. Where the ratio is well above 1 (2026-12-01's machine: AVX2 only),
run the LM in float32 (``harvest --compute-dtype float32``, ``benchmark --lm-dtype float32``)
and train without autocast.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine


def time_linear(rows: int, d_in: int, d_out: int, dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of ``[rows, d_in] @ [d_in, d_out]`` (nn.Linear, no grad) in ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out, bias=False).to(dtype)
    x = torch.randn(rows, d_in, generator=gen).to(dtype)
    times = []
    with torch.no_grad():
        lin(x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            lin(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Parse the sizes, time both dtypes, print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(machine(), flush=True)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN native bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, threads {torch.get_num_threads()}")
    t32 = time_linear(a.rows, a.d_in, a.d_sae, torch.float32, a.repeats)
    t16 = time_linear(a.rows, a.d_in, a.d_sae, torch.bfloat16, a.repeats)
    print(f"[{a.rows}, {a.d_in}] x [{a.d_in}, {a.d_sae}]: fp32 {t32 * 1e3:.1f} ms, bf16 {t16 * 1e3:.1f} ms, "
          f"bf16/fp32 = {t16 / t32:.2f}x")


if __name__ == "__main__":
    main()
