"""Is bf16 fast on this machine? bf16 vs fp32 time of one SAE-sized matmul, in one run.

``python bench/bf16_check.py [--rows 2048 --d-in 640 --d-sae 2048 --repeats 5] [--stages --rounds 3]``

Prints torch's CPU capability, whether the device has native bf16 matmuls
(:func:`saestrata.device.native_bf16`: AVX-512 BF16 / AMX), and the ratio bf16 time / fp32
time. Where the ratio is well above 1 (AVX2-only machines), the CLI's ``auto`` defaults compute
in float32 (``harvest --compute-dtype``, ``evaluate --dtype``, ``train --autocast``).

``--stages`` times, arms interleaved over ``--rounds``, what those defaults choose between on the
embedded Gemma 3 270M: the harvest forward (16 rows x 128 tokens through block 8, tok/s), the
evaluation forward (4 rows x 128 tokens with the 262k-vocab head, tok/s) with the LM loaded in bf16
vs fp32, and one TopK training step (d_in 640, d_sae 4096, k 32, batch 1024: the trainer's own slot)
with vs without bf16 autocast. Token ids are random (speed does not depend on the text).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import auto_dtype, interleaved, machine, rate
from saestrata.device import native_bf16


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


def _lm_arms(repeats: int) -> dict:
    """Arms timing the harvest forward and the evaluation forward of the embedded LM in bf16 and fp32 (tok/s)."""
    from saestrata.harvest.hooks import residuals
    from saestrata.harvest.model import load_model

    gen = torch.Generator().manual_seed(0)
    arms = {}
    for dtype in ("bfloat16", "float32"):
        lm = load_model(device="cpu", dtype=dtype)
        vocab = lm.model.config.get_text_config().vocab_size
        harvest_ids = torch.randint(1, vocab, (16, 128), generator=gen)
        eval_ids = torch.randint(1, vocab, (4, 128), generator=gen)

        def run_harvest(lm=lm, ids=harvest_ids):
            """Harvest's forward: ``{8: [16, 128, 640]}`` residuals in ``lm``'s dtype, stopped after block 8."""
            return residuals(lm, ids, [8])

        def run_eval(lm=lm, ids=eval_ids):
            """Evaluation's clean forward: ``[4, 128, vocab]`` logits in ``lm``'s dtype, no autograd."""
            with torch.no_grad():
                return lm.model(ids).logits

        arms[f"harvest forward {dtype}"] = lambda f=run_harvest: rate(f, repeats, 16 * 128)
        arms[f"evaluate forward {dtype}"] = lambda f=run_eval: rate(f, repeats, 4 * 128)
    return arms


def _train_arms(repeats: int) -> dict:
    """Arms timing one TopK step of the trainer's own slot with and without bf16 autocast (steps/s)."""
    from topk_profile import _slot

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 640, generator=gen)  # unit-variance entries: row norm ~sqrt(d_in), as the trainer scales
    arms = {}
    for autocast in (True, False):
        slot, counter = _slot("topk", 640, 4096, 32, x), iter(range(10**9))  # each slot counts its own steps
        name = "train step " + ("bf16 autocast" if autocast else "float32")
        arms[name] = lambda s=slot, a=autocast, c=counter: rate(lambda: s.step(x, next(c), a), repeats, 1)
    return arms


def stages(rounds: int, repeats: int) -> None:
    """Print each stage's bf16 and fp32 rates (median of ``rounds`` interleaved rounds) and their ratio."""
    arms = {**_lm_arms(repeats), **_train_arms(repeats)}
    got = {name: statistics.median(v) for name, v in interleaved(arms, rounds).items()}
    auto = auto_dtype()
    print(f"auto picks {auto} here; medians of {rounds} interleaved rounds of {repeats} calls")
    for stage in ("harvest forward", "evaluate forward"):
        b, f = got[f"{stage} bfloat16"], got[f"{stage} float32"]
        print(f"{stage:18s} bf16 {b:9.1f} tok/s  fp32 {f:9.1f} tok/s  fp32/bf16 = {f / b:.2f}x")
    b, f = got["train step bf16 autocast"], got["train step float32"]
    print(f"{'topk train step':18s} bf16 {1e3 / b:9.1f} ms     fp32 {1e3 / f:9.1f} ms     fp32/bf16 speed = {f / b:.2f}x")


def main() -> None:
    """Parse the sizes, time both dtypes, print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stages", action="store_true", help="also time harvest / evaluate forwards and a TopK step")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --stages")
    a = p.parse_args()
    print(machine(), flush=True)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {native_bf16(torch.device('cpu'))}, threads {torch.get_num_threads()}")
    t32 = time_linear(a.rows, a.d_in, a.d_sae, torch.float32, a.repeats)
    t16 = time_linear(a.rows, a.d_in, a.d_sae, torch.bfloat16, a.repeats)
    print(f"[{a.rows}, {a.d_in}] x [{a.d_in}, {a.d_sae}]: fp32 {t32 * 1e3:.1f} ms, bf16 {t16 * 1e3:.1f} ms, "
          f"bf16/fp32 = {t16 / t32:.2f}x", flush=True)
    if a.stages:
        stages(a.rounds, a.repeats)


if __name__ == "__main__":
    main()
