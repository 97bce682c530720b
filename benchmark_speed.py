"""Stage ``speed`` of ``saestrata benchmark``: every variant's training throughput, timed in one run.

The matched table's "train tok/s" used to be the mean of each SAE's own step clock (``train_tokens_per_s``
in its cfg.json). Those SAEs trained over many sessions while tests, installs and kernel benchmarks shared
this 2-core machine, and some were stopped (SIGSTOP) mid-step while a benchmark ran: their clocks measure
the machine's load as much as the arch (seed000_hsae's L0-32 pair: 1,074 and 673 tok/s, its L0-64 pair
5,521 and 5,581; docs/results/benchmark_findings.md). This stage times every variant again, one after
another in one process, meant for an otherwise idle machine: for each variant, each of its two matched SAEs
whose L0s bracket 32 (the pair the matched table interpolates between; each SAE's ``job.json``: arch, hparams, lr,
target L0, controller start) trains again with the trainer
itself, on the benchmark's store, batch size, d_sae and schedule (``tokens_per_sae``), stopped after
``steps`` (200) steps (``TrainConfig.stop_after_step``, nothing saved), and the steps after the first ``warmup``
(150) are timed: a window of the bulk of a run, not its start. A run's first steps are unlike the rest (of
1,024 in the benchmark; 53-68 of the first 150 dense for the ReLU-type archs in the pass of 2026-12-06): the L1 / L0 penalties warm up over the first 5% of steps and L0 falls from ~d_sae / 2
to its target, so a ReLU SAE (``standard``) runs its dense step there and its pairs step afterwards (train/
standard.py; 4x apart), and latents start dying (AuxK acting) from step ~150 in the TopK family. Until the
twenty-seventh session the window was steps 10-59 (a run's start; ``speed.json``'s ``steps`` / ``warmup`` say which).

The report interpolates the two rates linearly in log L0 at 32 with the other columns' weights: a step's cost
depends on L0 (a ReLU SAE's pairs step, the TopK family's k), and until the twenty-ninth session the stage timed
only the SAE nearest 32, which put each variant at L0 24 or 40 (seed000_adaptive at 42 beside standard at 24).

Every SAE is timed in ``rounds`` (3) rounds over all of them; ``speed.json``'s ``saes`` keeps, per SAE, its
variant, ``tokens_per_s`` (the median of its rounds') and ``spread`` ((max - min) / median
of its rounds' rates: two whole passes on this machine, with < 1% of the CPUs taken by anything else, differed
by up to 13% for one variant), and per round the mean / median / 90th-percentile step time (ms) of the timed
steps, its ``tokens_per_s = batch_size / mean step`` (the mean, not the median, so that work a mechanism
does every few steps counts), ``others_cpu``, the share of the machine's CPU
time other processes (or the VM's host: steal) took while it trained (/proc/stat; ~0 on an idle machine), and
what the timed steps ran (:func:`window_state`: their mean L0, the SAE's counters at the window's start and end,
e.g. how many took a ReLU SAE's pairs step);
for the whole run the code fingerprint (today's code, which may differ from the code that trained the
matched SAEs), a hash of the compiled kernels' source (which the fingerprint, .py files only, misses),
torch's thread count, the CPU (:func:`cpu_model`: a rerun on another machine starts afresh rather than mix its
rounds with this one's) and the settings. Resumable: SAEs already timed with the same code, kernels, CPU and
settings are skipped. What it does not time: the steps after a run's first ``steps`` (more latents dying, seed
002's pruning after its warm-up) and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path

SPEED_FILE = "speed.json"
# What a round records; part of the settings, so rounds of an older format are timed again rather than kept
# beside new ones (2: each round's ``l0_timed`` and ``counters``, and the timed window really after ``warmup``
# steps: :func:`warmup_steps`; twenty-eighth session. 3: both SAEs bracketing L0 32, keyed by SAE name under
# ``saes``; twenty-ninth session).
SPEED_FORMAT = 3


def busy_seconds() -> float | None:
    """CPU seconds all processes of this machine have been busy (``/proc/stat``: every state but idle and
    iowait, VM steal included), or None off Linux. With this process's own CPU time it gives the share of the
    machine other work took during a timing (:func:`measure_speed`'s ``others_cpu``)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# The CPU features a matmul's speed depends on (sessions land on different machines, e.g. the AMD EPYC with AVX-512
# BF16 of DESIGN.md and the Intel Xeon with AMX of 2026-12-06; rates from two of them must never share a median).
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> str:
    """This machine's CPU as ``"<model name> (<flags>)"``: ``/proc/cpuinfo``'s model name and which of
    :data:`MATMUL_FLAGS` it reports (cloud model names such as "Intel(R) Xeon(R) Processor" say little alone);
    ``platform.processor()`` off Linux, "" where nothing is known."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in info.split("\n\n", 1)[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return f"{fields.get('model name', '')} ({' '.join(f for f in MATMUL_FLAGS if f in flags)})"


def step_seconds(log: list[dict], batch_size: int) -> list[float]:
    """Per-step wall times (s) from a train log written with ``log_every=1``.

    Each line's ``tokens_per_s`` is cumulative (``steps_done * batch_size / seconds``,
    ``write_log`` of saestrata/train/trainer.py), so the clock after step ``s`` is
    ``(s + 1) * batch_size / tokens_per_s`` and a step's time is the difference of two clocks.

    Raises:
        ValueError: the log does not have one line per step from step 0.
    """
    steps = [r["step"] for r in log]
    if steps != list(range(len(steps))):
        raise ValueError("speed: the train log must have one line per step from step 0 (log_every=1)")
    clocks = [(r["step"] + 1) * batch_size / r["tokens_per_s"] for r in log]
    return [b - a for a, b in zip([0.0] + clocks, clocks)]


def summarise(seconds: list[float], warmup: int, batch_size: int) -> dict:
    """Mean / median / p90 step (ms) of ``seconds[warmup:]`` and ``tokens_per_s`` = batch / mean step.

    Raises:
        ValueError: no step left after the warm-up.
    """
    timed = seconds[warmup:]
    if not timed:
        raise ValueError(f"speed: {len(seconds)} steps leave none after a warm-up of {warmup}")
    ms = sorted(1e3 * s for s in timed)
    mean = statistics.fmean(ms)
    return {"steps_timed": len(ms), "step_ms_mean": mean, "step_ms_median": statistics.median(ms),
            "step_ms_p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))], "tokens_per_s": batch_size / (mean / 1e3)}


def read_speed(out: Path) -> dict:
    """``out/speed.json`` (``{}`` when absent)."""
    path = out / SPEED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def measure_speed(bench, variants: list[str], steps: int = 200, warmup: int = 150, rounds: int = 3) -> dict:
    """Time each of ``variants`` ``rounds`` times (stage ``speed``, module docstring); returns ``speed.json``'s dict.

    Each variant is timed with the settings of its matched SAEs that bracket L0 32 (:meth:`~saestrata.benchmark.
    Benchmark.bracketing`, the two the matched table interpolates between), each SAE on its own, so the report can
    interpolate the rate at L0 32 as it does every other column. Round after round over all of them, so that a
    slow spell of the machine lands in one round of several SAEs rather than in every round of one; an SAE's
    ``tokens_per_s`` is the median of its rounds' (its ``rounds`` list keeps each). ``bench`` is the
    :class:`~saestrata.benchmark.Benchmark`; a variant without an evaluated matched SAE yet is skipped (named in the
    echo). Writes ``speed.json`` after each timing (atomically), and a rerun does only the missing rounds.

    Raises:
        StoreError and the trainer's errors (one-line messages) from training; ValueError from
        :func:`step_seconds` if a train log is not one line per step.
    """
    import torch

    from .benchmark import PUBLISHED_ONLY, ROOT, SWEEP_TARGET, _write_json

    cfg = bench.cfg
    native = (ROOT / "train" / "csrc" / "native.cpp").read_bytes()  # kernels change speed; the fingerprint is .py only
    settings = {"format": SPEED_FORMAT, "code": bench.code, "native": hashlib.sha256(native).hexdigest()[:16], "steps": steps,
                "warmup": warmup, "batch_size": cfg.batch_size, "d_sae": cfg.d_sae,
                "tokens_per_sae": cfg.tokens_per_sae, "layer": cfg.layer, "autocast": cfg.autocast,
                "device": cfg.device, "torch_threads": torch.get_num_threads(), "cpu": cpu_model()}
    data = read_speed(cfg.out)
    if {k: data.get(k) for k in settings} != settings:
        data = {**settings, "saes": {}}
    todo = []
    for v in variants:
        if v in PUBLISHED_ONLY:  # those have no matched row to fill
            continue
        names = bench.bracketing(v, SWEEP_TARGET)
        if not names:
            bench.echo(f"  speed {v}: no evaluated matched SAE yet, skipped")
        todo += [(v, n) for n in names]
    for r in range(rounds):
        for v, name in todo:
            timed = data["saes"].get(name, {}).get("rounds", [])
            if len(timed) > r:
                continue
            row = _time_sae(bench, name, steps, warmup)
            timed = timed + [row]
            rates = [t["tokens_per_s"] for t in timed]
            data["saes"][name] = {"variant": v, "arch": row["arch"], "rounds": timed,
                                  "tokens_per_s": statistics.median(rates),
                                  "spread": (max(rates) - min(rates)) / statistics.median(rates)}
            data["date"] = time.strftime("%Y-%m-%d")
            _write_json(cfg.out / SPEED_FILE, data)
            bench.echo(f"  speed {name} (round {r + 1}/{rounds}): {row['step_ms_mean']:.0f} ms/step (median "
                       f"{row['step_ms_median']:.0f}), {row['tokens_per_s']:,.0f} tok/s (other processes took "
                       f"{_share(row['others_cpu'])} of the CPUs meanwhile){_acted(row)}")
    return data


def sae_speed(data: dict, name: str) -> dict | None:
    """SAE ``name``'s entry of a ``speed.json`` dict (:func:`read_speed`): ``tokens_per_s`` (median of its rounds),
    ``spread``, ``rounds``; None when it was not timed (or the file predates format 3, which timed one SAE per
    variant and keyed it by variant)."""
    return data.get("saes", {}).get(name)


def _time_sae(bench, name: str, steps: int, warmup: int) -> dict:
    """One timing of matched SAE ``name``: its settings (``saes/<name>/job.json``), ``steps`` steps of its run's
    schedule, nothing saved."""
    from .benchmark import Job
    from .train.trainer import SAESpec, TrainConfig, train

    cfg = bench.cfg
    job = json.loads((cfg.out / "saes" / name / "job.json").read_text())
    job = Job(**{k: job[k] for k in Job.__dataclass_fields__ if k in job})
    run_dir = cfg.work / "speed" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = SAESpec("timed", job.arch, dict(job.hparams), job.lr, job.target_l0, job.seed, job.l0_start)
    tc = TrainConfig(store=bench.store, layer=cfg.layer, out=run_dir, specs=[spec], d_sae=cfg.d_sae,
                     batch_size=cfg.batch_size, tokens=job.tokens or cfg.tokens_per_sae, device=cfg.device,
                     checkpoint_every=0, log_every=1, stop_after_step=steps, autocast=cfg.autocast)
    busy0, own0, wall0 = busy_seconds(), time.process_time(), time.perf_counter()
    train(tc, progress=False)
    wall = time.perf_counter() - wall0
    others = None if busy0 is None else max(0.0, busy_seconds() - busy0 - (time.process_time() - own0))
    log = [json.loads(line) for line in (run_dir / "timed" / "train_log.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir, ignore_errors=True)
    seconds = step_seconds(log, cfg.batch_size)
    skip = warmup_steps(len(seconds), warmup)
    return {"arch": job.arch, "warmup": skip,
            "others_cpu": None if others is None else others / (wall * os.cpu_count()),
            **summarise(seconds, skip, cfg.batch_size), **window_state(log, skip)}


def warmup_steps(n: int, warmup: int) -> int:
    """Steps of a timing's ``n`` left untimed: ``warmup``, or half of them when ``warmup`` would leave none (a run
    that ended before ``steps``, as tiny test stores do). Until the twenty-eighth session this was ``min(warmup,
    n // 2)``, which for 200 steps and a warm-up of 150 timed steps 100-199, not the 150-199 speed.json's
    ``warmup`` said (each round's own ``warmup`` / ``steps_timed`` recorded the truth: 100 / 100)."""
    return warmup if warmup < n else n // 2


def window_state(log: list[dict], skip: int) -> dict:
    """What the timed steps ``log[skip:]`` ran: ``l0_timed``, their mean L0 (latents per token), and ``counters``,
    the SAE's mechanism counters (``SAE.counters``: cumulative ones such as ``sparse_steps``, states such as
    ``auxk_dead``) at the window's start (after step ``skip - 1``; ``{}`` when ``skip`` is 0) and end, so that
    speed.json shows which path was timed (e.g. standard's pairs step on 50 of 50 timed steps: ``sparse_steps``
    90 -> 140 in the pass of 2026-12-06).

    Raises:
        ValueError: ``skip`` leaves no logged step.
    """
    if not 0 <= skip < len(log):
        raise ValueError(f"speed: a warm-up of {skip} leaves none of {len(log)} logged steps")
    l0 = [r["l0"] for r in log[skip:] if "l0" in r]
    return {"l0_timed": statistics.fmean(l0) if l0 else None,
            "counters": {"start": log[skip - 1].get("counters", {}) if skip else {},
                         "end": log[-1].get("counters", {})}}


def _acted(row: dict) -> str:
    """``"; L0 31, pairs step on 50 of 50 timed steps"``-style tail of a timing's echo (empty when unknown); for seed
    000 / 001 the count of Grams the compiled kernel formed (``sparse_gram``)."""
    out = "" if row.get("l0_timed") is None else f"; L0 {row['l0_timed']:.0f}"
    start, end = row["counters"]["start"], row["counters"]["end"]
    if "sparse_steps" in end:
        out += f", pairs step on {end['sparse_steps'] - start.get('sparse_steps', 0)} of {row['steps_timed']} timed steps"
    if "sparse_gram" in end:  # seed 000 / 001 (train/sparse_gram.py): one or two Grams a step
        out += f", {end['sparse_gram'] - start.get('sparse_gram', 0):g} Grams from the code's non-zeros in the timed steps"
    return out


def _share(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"
