"""Benchmark: 4 SAEs trained in ONE pass over a store vs 4 separate runs (issue 4, target >= 1.5x).

Both arms train the same four SAEs (standard, topk, batchtopk, matryoshka) for the
same steps on the same store. The arms run ``--rounds`` times, interleaved (one pass,
side by side, separate, one pass, ...), and the ratio is taken of the median seconds:
single runs on this shared VM vary by 30% from one minute to the next. The one-pass arm
runs twice: SAEs stepped one after another (the default) and side by side in threads
(``--sae-threads 0``). Each arm also reports the SAEs' own step clocks (forward,
backward, clip, Adam; the trainer's ``train_tokens_per_s``) so the cost outside the
steps (reading, setup, saving), the only cost a shared pass can save, is visible.
Run on an idle machine:

    .venv/bin/python bench/one_pass.py --store demo-out/store-train --layer 8 --steps 100

``--processes`` adds the arms as users run them: one ``saestrata train --arch a,b,c,d``
process vs four ``saestrata train --arch a`` processes (each paying Python, torch and
store start-up).

``--allocator`` instead times one ``saestrata train`` process of the four SAEs with the
allocator settings the CLI applies (saestrata/allocator.py) against one with
``SAESTRATA_MALLOC=system`` (glibc's defaults), interleaved, and compares the SAEs' step clocks:

    .venv/bin/python bench/one_pass.py --store demo-out/store-train --layer 8 --steps 100 --allocator

``--kernels`` instead times one topk SAE on the dense and on the sparse training kernels
(train/kernels.py), both trained in the same pass on the same batches, each timed by
the trainer's own per-SAE step clock (forward, backward, clip, Adam; data loading and
metrics excluded), and prints each mean step against the 5-matmul roofline and against one
encoder matmul in the SAEs' matmul dtype (bf16 where native, else fp32) and in fp32 (issue 14's
measure, target <= 2.0x):

    .venv/bin/python bench/one_pass.py --store demo-out/store-train --layer 8 --steps 100 --kernels
    .venv/bin/python bench/one_pass.py ... --kernels --dead-window-tokens 20480   # AuxK on from step 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import auto_dtype, interleaved, machine

from saestrata.allocator import tune_allocator
from saestrata.train.trainer import SAESpec, TrainConfig, train

ARCHS = ["standard", "topk", "batchtopk", "matryoshka"]


ONE, THREADS, SEPARATE = "one pass, one after another (default)", "one pass, side by side (threads)", "4 separate runs"
ONE_CLI, SEPARATE_CLI = "1 CLI process, 4 SAEs", "4 CLI processes, 1 SAE each"


def _run(store: Path, layer: int, specs: list[SAESpec], steps: int, d_sae: int, out: Path, **cfg) -> float:
    """Wall seconds of one in-process ``train`` call."""
    t0 = time.perf_counter()
    train(TrainConfig(store=store, layer=layer, out=out, specs=specs, d_sae=d_sae, tokens=steps * 1024,
                      log_every=10**9, **cfg), progress=False)
    return time.perf_counter() - t0


def _step_seconds(out: Path, names: list[str], steps: int) -> float:
    """Sum over SAEs of the time their own steps took (from ``train_tokens_per_s`` in each cfg.json)."""
    return sum(steps * 1024 / json.loads((out / n / "cfg.json").read_text())["saestrata"]["train_tokens_per_s"]
               for n in names)


@dataclass
class _Arm:
    """One way of training the four SAEs; ``run()`` returns wall seconds and records the step clocks."""

    jobs: list[list[str]]  # arch lists, one per train call
    out: Path
    args: argparse.Namespace
    cli: bool = False
    cfg: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # extra environment of the CLI processes
    step_seconds: list[float] = field(default_factory=list)

    def run(self) -> float:
        """Train every job once (in this process or as CLI processes); wall seconds. Appends the step clocks."""
        t0, steps = time.perf_counter(), self.args.steps
        for i, archs in enumerate(self.jobs):
            out = self.out / str(i)
            if self.cli:
                subprocess.run([str(Path(sys.executable).parent / "saestrata"), "train", "--store", str(self.args.store),
                                "--layer", str(self.args.layer), "--arch", ",".join(archs), "--out", str(out),
                                "--tokens", str(steps * 1024), "--d-sae", str(self.args.d_sae),
                                "--checkpoint-every", "0"], check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, **self.env})
            else:
                _run(self.args.store, self.args.layer, [SAESpec(a, a) for a in archs], steps, self.args.d_sae, out,
                     checkpoint_every=0, **self.cfg)
        wall = time.perf_counter() - t0
        self.step_seconds.append(sum(_step_seconds(self.out / str(i), archs, steps)
                                     for i, archs in enumerate(self.jobs)))
        return wall


def _arms(args: argparse.Namespace, tmp: Path) -> dict[str, _Arm]:
    """The arms to time: in-process one pass (two steppings) and separate runs, plus CLI processes."""
    arms = {ONE: _Arm([ARCHS], tmp / "one", args),
            THREADS: _Arm([ARCHS], tmp / "threads", args, cfg={"sae_threads": 0}),
            SEPARATE: _Arm([[a] for a in ARCHS], tmp / "separate", args)}
    if args.processes:
        arms[ONE_CLI] = _Arm([ARCHS], tmp / "one-cli", args, cli=True)
        arms[SEPARATE_CLI] = _Arm([[a] for a in ARCHS], tmp / "separate-cli", args, cli=True)
    return arms


def _unit_dtype() -> str:
    """The dtype of the roofline's unit matmul: the one the SAEs' matmuls ran in (the trainer's default autocast:
    bf16 where the CPU has native bf16 matmuls, else fp32). A bf16 unit on an AVX2-only CPU was meaningless: there
    ``[1024, 640] @ [640, 4096]`` in bf16 took 10.3 s (torch 2.13's slow path for a row-major right operand, which no
    SAE takes: a topk SAE's ``pre_acts`` under autocast took 293 ms) against 40.6 ms in fp32 (AMD Zen 3, 2026-12-07)."""
    return auto_dtype()


def _matmul_seconds(batch: int, d_in: int, d_sae: int, reps: int = 10, dtype: str = "bfloat16") -> float:
    """Best time of one ``[batch, d_in] @ [d_in, d_sae]`` matmul in ``dtype`` on this machine (the roofline unit)."""
    import torch

    a, b = torch.randn(batch, d_in).to(getattr(torch, dtype)), torch.randn(d_in, d_sae).to(getattr(torch, dtype))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def _kernels(args) -> None:
    """Mean step of one topk SAE, dense vs sparse kernels, and each against the 5-matmul roofline."""
    specs = [SAESpec(f"topk-{kernels}", "topk", {"kernels": kernels}) for kernels in ("dense", "sparse")]
    with tempfile.TemporaryDirectory() as tmp:
        _run(args.store, args.layer, specs, args.steps, args.d_sae, Path(tmp),
             dead_window_tokens=args.dead_window_tokens, checkpoint_every=0, sae_threads=1)
        steps_ms, final = {}, {}
        for spec in specs:
            meta = json.loads((Path(tmp) / spec.name / "cfg.json").read_text())["saestrata"]
            steps_ms[spec.name] = 1024 / meta["train_tokens_per_s"] * 1e3
            final[spec.name] = meta["final_train_metrics"]
            dead = final[spec.name]["dead_frac"]
    unit = _unit_dtype()
    mm = _matmul_seconds(1024, 640, args.d_sae, dtype=unit) * 1e3
    mm32 = mm if unit == "float32" else _matmul_seconds(1024, 640, args.d_sae, dtype="float32") * 1e3  # weights' dtype
    import torch

    print(f"{torch.get_num_threads()} thread(s); {unit} matmul 1024x640x{args.d_sae}: {mm:.1f} ms; "
          f"5-matmul roofline {5 * mm:.1f} ms "
          f"(final dead fraction {dead:.3f}, AuxK {'on' if dead > 0 else 'off'})")
    for name, ms in steps_ms.items():
        print(f"{name:12s} mean step {ms:7.1f} ms = {ms / (5 * mm):.2f}x the 5-matmul roofline "
              f"(last batch: fvu {final[name]['fvu']:.4f}, auxk {final[name].get('auxk', 0.0):.4f})")
    print(f"sparse / dense step time: {steps_ms['topk-sparse'] / steps_ms['topk-dense']:.2f}")
    # Issue 14's measure: the step against ONE dense encoder matmul (target <= 2.0x).
    fp32 = "" if unit == "float32" else f", {steps_ms['topk-sparse'] / mm32:.2f}x the fp32 matmul ({mm32:.1f} ms)"
    print(f"sparse step / one encoder matmul: {steps_ms['topk-sparse'] / mm:.2f}x the {unit} matmul{fp32}")


def _allocator(args) -> None:
    """SAE step clocks of one CLI process with the tuned allocator vs glibc's defaults (median of rounds)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arms = {"tuned (CLI default)": _Arm([ARCHS], tmp / "tuned", args, cli=True),
                "SAESTRATA_MALLOC=system": _Arm([ARCHS], tmp / "system", args, cli=True,
                                                env={"SAESTRATA_MALLOC": "system"})}
        print(f"2 arms x {args.rounds} rounds, interleaved; one process, 4 SAEs x {args.steps} steps", flush=True)
        wall = interleaved({name: arm.run for name, arm in arms.items()}, args.rounds)
    clocks = {name: statistics.median(arm.step_seconds) for name, arm in arms.items()}
    for name, arm in arms.items():
        print(f"{name:24s}: SAE step clocks {clocks[name]:6.1f} s (rounds: "
              f"{', '.join(f'{t:.1f}' for t in arm.step_seconds)}); process wall {statistics.median(wall[name]):.1f} s")
    print(f"speed-up of the SAE steps, system / tuned: {clocks['SAESTRATA_MALLOC=system'] / clocks['tuned (CLI default)']:.2f}x")


def main() -> None:
    """Print seconds for both arms and their ratio (``--kernels``: dense vs sparse topk steps)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every arm (median kept)")
    ap.add_argument("--processes", action="store_true", help="also time 1 vs 4 `saestrata train` processes")
    ap.add_argument("--kernels", action="store_true", help="time one topk SAE on dense vs sparse kernels")
    ap.add_argument("--allocator", action="store_true", help="time the CLI with vs without its malloc settings")
    ap.add_argument("--dead-window-tokens", type=int, default=250_000,
                    help="with --kernels: tokens without firing before AuxK trains a latent")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args()
    print(machine(), flush=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # 1 thread is far less noisy on a shared machine
    if args.kernels:
        _kernels(args)
        return
    if args.allocator:
        _allocator(args)
        return
    tokens = len(ARCHS) * args.steps * 1024
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arms = _arms(args, tmp)
        # Untimed warm-up: the first train call of a process pays one-off costs (oneDNN kernels, page cache).
        _run(args.store, args.layer, [SAESpec(a, a) for a in ARCHS], 2, args.d_sae, tmp / "warm-up", checkpoint_every=0)
        print(f"{len(arms)} arms x {args.rounds} rounds, interleaved; {args.steps} steps of 1024 tokens per SAE, "
              f"d_sae {args.d_sae}", flush=True)
        seconds = interleaved({name: arm.run for name, arm in arms.items()}, args.rounds)
    for name, arm in arms.items():
        med = statistics.median(seconds[name])
        steps = f"; SAE step clocks {statistics.median(arm.step_seconds):6.1f} s" if arm.step_seconds else ""
        print(f"{name:42s}: {med:7.1f} s median of {', '.join(f'{t:.1f}' for t in seconds[name])}"
              f"  ({tokens / med:,.0f} SAE-tokens/s{steps})")
    ratio = lambda a, b: statistics.median(seconds[a]) / statistics.median(seconds[b])  # noqa: E731
    print(f"speed-up, separate / one pass: {ratio(SEPARATE, ONE):.2f}x (target >= 1.5x); "
          f"separate / side by side: {ratio(SEPARATE, THREADS):.2f}x")
    if args.processes:
        print(f"speed-up as CLI processes, 4 processes / 1: {ratio(SEPARATE_CLI, ONE_CLI):.2f}x")
    # A dense SAE step is ~5 matmuls of this shape (enc fwd, dec fwd, 3 for the two backward passes).
    unit = _unit_dtype()
    mm = _matmul_seconds(1024, 640, args.d_sae, dtype=unit)
    step = statistics.median(arms[ONE].step_seconds) / (len(ARCHS) * args.steps)
    print(f"{unit} matmul 1024x640x{args.d_sae}: {mm * 1e3:.1f} ms ({2 * 1024 * 640 * args.d_sae / mm / 1e9:.0f} GFLOP/s)")
    print(f"mean SAE step    : {step * 1e3:.1f} ms = {step / (5 * mm):.1f}x the 5-matmul roofline")


if __name__ == "__main__":
    tune_allocator()  # as the CLI does: the benches measure what users run
    main()
