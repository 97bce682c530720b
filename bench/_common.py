"""Helpers shared by the benchmark scripts (run as ``python bench/<name>.py``, so this is importable)."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def machine() -> str:
    """One line naming what a timing ran on: the CPU (model + matmul flags, ``saestrata.benchmark_speed.cpu_model``),
    torch's version and thread count. Sessions land on different machines (an AMD EPYC with AVX-512 BF16, an Intel
    Xeon with AMX): ratios against a bf16 matmul differ ~4x between them, so every bench output says which."""
    import torch

    from saestrata.benchmark_speed import cpu_model

    return f"machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def auto_dtype() -> str:
    """``"bfloat16"`` or ``"float32"``: what the CLI's ``auto`` dtypes pick on this CPU (``harvest --compute-dtype``,
    ``evaluate --dtype``, ``train``'s autocast): bf16 only where its matmuls are native (saestrata.device.fast_dtype),
    so a bench times what users run."""
    import torch

    from saestrata.device import fast_dtype

    return fast_dtype("bfloat16", torch.device("cpu"))


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time in seconds of ``repeats`` calls of ``fn`` (the least-disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 0) -> float:
    """Median wall time of ``reps`` calls of ``fn`` (after ``warmup`` untimed calls), in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def rate(fn: Callable[[], object], calls: int, items_per_call: int) -> float:
    """Items/s (e.g. tokens/s) of ``calls`` calls of ``fn``, after one untimed warm-up call (maps, threads, cache)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls * items_per_call / (time.perf_counter() - t0)


def interleaved(arms: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every arm once per round, arms interleaved (A B C A B C ...); ``{name: [result per round]}``.

    Interleaving spreads the slow phases of a noisy shared machine over every arm, so the
    arms' medians (or bests) compare like with like. Each arm times itself and returns its
    figure (seconds, or a rate).
    """
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            times[name].append(arm())
    return times


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (or of ``path`` itself when it is a file)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(timeout: float = 600.0) -> tuple[subprocess.Popen, str]:
    """moto's S3 server as a subprocess on a free loopback port; ``(process, endpoint URL)``.

    Its own process (``python -m moto.server``), so it does not share the benchmark's GIL.
    The caller kills it (``proc.kill(); proc.wait()``). Importing moto takes seconds on an
    idle machine and minutes under ``nice 19`` on a loaded one, hence the long ``timeout``.

    Raises:
        RuntimeError: the server exited, or did not accept connections within ``timeout`` seconds.
    """
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} (is moto[server] installed?)")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"moto server did not accept connections within {timeout:.0f} s")
