"""Helpers shared by the benchmark scripts (run as ``python bench/<name>.py``, so this is importable)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time in seconds of ``repeats`` calls of ``fn`` (the least-disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


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
