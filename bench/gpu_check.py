"""GPU readiness: the demo on CUDA, each stage's tokens/s beside the bf16 matmul peak measured in the same run.

``python bench/gpu_check.py [--out gpu-check-out] [--train-tokens 98304] [--steps 600]``
(or ``bash bench/gpu_check.sh``, which runs it with the project's venv). Installs nothing.

Prints, per stage, tokens/s and the share of the measured bf16 peak its matmuls would use:
``achieved FLOP/s / peak``, with FLOPs per token counted as

- harvest: ``2 * P`` (``P`` = parameters of the blocks up to the deepest harvested layer; the
  harvest stops its forward there and never runs the 262k-row head);
- train: ``12 * d_in * d_sae`` per token per SAE (encoder and decoder, forward and backward,
  dense-equivalent: a TopK SAE's sparse decoder does less, so its share is an upper bound on work);
- evaluate: ``2 * P_all * (2 + n_saes)`` (clean and zero-ablation passes plus one spliced pass
  per SAE, the whole model with its head).

Without CUDA it says so and exits 0 (nothing to measure): tests/test_device.py runs it that way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def bf16_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Best FLOP/s of an ``[n, n] @ [n, n]`` bf16 matmul on ``device`` (synchronised timing)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def block_params(lm, upto: int | None = None) -> int:
    """Parameters of the decoder blocks ``0..upto`` (all when None) plus, when None, embeddings and head."""
    layers = lm.layers if upto is None else lm.layers[: upto + 1]
    n = sum(p.numel() for layer in layers for p in layer.parameters())
    if upto is None:
        n += sum(p.numel() for p in lm.model.get_output_embeddings().parameters())
    return n


def main() -> int:
    """Run the demo on CUDA and print the table; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    p.add_argument("--train-tokens", type=int, default=98_304)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--layers", default="4,8")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing to measure (this check is for GPU machines)")
        return 0
    from saestrata.demo import DemoConfig, run_demo
    from saestrata.harvest.model import load_model

    device = torch.device("cuda")
    peak = bf16_peak(device)
    print(f"{torch.cuda.get_device_name(device)}: bf16 matmul peak {peak / 1e12:.1f} TFLOP/s (measured, 8192^3)")
    layers = [int(x) for x in a.layers.split(",")]
    cfg = DemoConfig(out=a.out, train_tokens=a.train_tokens, steps=a.steps, layers=layers, device="cuda")
    rows = run_demo(cfg, echo=lambda _: None)
    timings = json.loads((a.out / "summary.json").read_text())["timings"]
    lm = load_model(device="cuda")
    flops = {"harvest": 2 * block_params(lm, max(layers)),
             "train": 12 * lm.d_model * cfg.d_sae,
             "evaluate": 2 * block_params(lm) * (2 + len(rows))}
    rates = {"harvest": timings.get("harvest_tokens_per_s"),
             "train": sum(r["train_tokens_per_s"] for r in rows) / len(rows),
             "evaluate": rows[0]["eval_tokens_per_s"]}
    print("| stage | tokens/s | FLOP/token | share of bf16 peak |\n|---|---|---|---|")
    for stage, rate in rates.items():
        if rate is None:
            print(f"| {stage} | (store reused: delete {a.out} to time it) | | |")
            continue
        print(f"| {stage} | {rate:,.0f} | {flops[stage]:.3g} | {rate * flops[stage] / peak:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
