"""Benchmark: how harvest, commit, verify, reading, training and evaluation scale with the store (issue 12).

ONE store of the embedded wiki train split is harvested with the embedded Gemma 3 270M for
``--layers`` and grown through ``--sizes`` (tokens, rounded up to whole shards so the store
stays extensible, docs/store.md "Extension policy"): the harvester extends the finished
store of the previous size (same identity, larger ``--tokens``). Per size it records:

- harvest: tokens/s of that increment (model load and the one-time tokenizer fingerprint
  excluded), per-shard commit time (``StoreWriter._commit``, the marker write) and whole
  ``StoreWriter.write_shard`` time (data + marker), median and p90 over the increment's
  shards, the per-run fixed costs (``reopen``, ``extend``, ``records``, ``finish``) and the
  effective FLOP rate ``2 * block params * tokens / s``;
- ``store verify`` wall time (``saestrata.store.verify_store``: every committed chunk read);
- reader throughput: ``shuffled_batches`` (what training reads) over every usable token of
  one layer (about one epoch), best of ``--reader-repeats``, each on a freshly opened store;
- a short ``train`` (``--train-arch``, ``--train-steps`` batches) and ``evaluate`` of that SAE;
- peak memory of the harvest increment, the train and the evaluate, each in its own fresh
  interpreter (this script with ``--child``): ``VmHWM`` of /proc/self/status (includes the
  memory-mapped store pages a process touched) and ``RssAnon`` sampled every 20 ms
  (anonymous memory only);
- store size on disk and shard count (``saestrata.store.store_info``).

The timing wrappers are installed in the harvest child only (``unittest.mock.patch.object``
on ``StoreWriter``); the store format is untouched.

Resumable: every stage's result is written atomically to ``--work``/stages/size-N/, and
``--out``/size-N.json once the size is complete. A rerun skips sizes with a JSON, reuses
finished stages and lets the harvester resume a half-written store from its last committed
shard. The report (``--out``/README.md: table, flatness ratios, plots, commands, and an
extrapolation to Gemma-2-2B labelled "extrapolated, not measured") is regenerated from the
JSONs at the end of every run, or alone with ``--report-only``.

    .venv/bin/python bench/scaling.py                      # 9 layers (1,3,...,17), 100k/300k/900k tokens
    .venv/bin/python bench/scaling.py --layers 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17   # all 18 (~21 GB)
    .venv/bin/python bench/scaling.py --report-only        # redo README.md and the plots from the JSONs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent  # the repository root is the package ``saestrata``
DEFAULT_OUT = REPO / "docs" / "results" / "scaling"
DEFAULT_WORK = REPO / "scaling-work"
STAGES = ("harvest", "verify", "info", "reader", "train", "evaluate")
CHILD_STAGES = ("harvest", "train", "evaluate")

# Gemma-2-2B (HF google/gemma-2-2b config.json): the decoder blocks a harvest of all 26 layers runs.
GEMMA2_2B = {"name": "Gemma-2-2B", "d_model": 2304, "n_layers": 26, "d_ff": 9216, "n_heads": 8, "n_kv_heads": 4,
             "head_dim": 256, "vocab": 256_000}
# Dense bf16 Tensor Core peaks, FLOP/s (NVIDIA datasheets list the sparse figure; dense is half of it).
GPUS = (
    ("NVIDIA L4", 121e12, "NVIDIA L4 Tensor Core GPU datasheet: BF16 242 TFLOPS with sparsity -> 121 dense"),
    ("NVIDIA A100 SXM", 312e12, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
    ("NVIDIA H100 SXM", 989e12, "NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity "
                                "-> 989 dense"),
)
EXTRAPOLATION_TOKENS = (100_000_000, 1_000_000_000)


# ----------------------------------------------------------------------------- arguments and plan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``--help``); ``argv`` None reads ``sys.argv``."""
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Resumable: rerun the same command after an interruption. Sizes are measured in increasing order; "
               "the store in --work cannot shrink, so delete --work to measure smaller sizes again.")
    ap.add_argument("--layers", default="1,3,5,7,9,11,13,15,17", help="blocks harvested (comma-separated)")
    ap.add_argument("--sizes", default="100000,300000,900000",
                    help="store sizes in tokens, increasing; each is rounded up to whole shards")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="per-size JSONs, README.md and PNG plots")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="the store, SAEs and per-stage results")
    ap.add_argument("--model", default=None, help="model to harvest (default: the embedded Gemma 3 270M)")
    ap.add_argument("--device", default="cpu", help="device of harvest, train and evaluate")
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-rows", type=int, default=16, help="harvest rows per forward pass")
    ap.add_argument("--rows-per-chunk", type=int, default=8, help="harvest layout (the harvester's default)")
    ap.add_argument("--chunks-per-shard", type=int, default=8, help="harvest layout (the harvester's default)")
    ap.add_argument("--train-layer", type=int, default=None, help="layer read, trained and evaluated "
                    "(default: the middle one of --layers)")
    ap.add_argument("--train-arch", default="topk")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--train-batch", type=int, default=1024)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens (eval split) per evaluation")
    ap.add_argument("--eval-batch-rows", type=int, default=4)
    ap.add_argument("--reader-batch", type=int, default=1024)
    ap.add_argument("--reader-repeats", type=int, default=3, help="epochs timed; the best is kept")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the GPU rows")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars in the children")
    ap.add_argument("--report-only", action="store_true", help="only regenerate README.md and the plots")
    ap.add_argument("--child", choices=CHILD_STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def int_list(text: str, option: str) -> list[int]:
    """``"1,3,5"`` -> ``[1, 3, 5]``. Raises SystemExit (argparse style) on anything else."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"Error: {option} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"Error: {option} is empty")
    return values


def shard_tokens(args: argparse.Namespace) -> int:
    """Tokens per shard of the store this run writes (rows per chunk x chunks per shard x context)."""
    return args.rows_per_chunk * args.chunks_per_shard * args.context_length


def planned_sizes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """``[(requested tokens, planned tokens)]``: each size rounded up to whole shards, increasing.

    Raises:
        SystemExit: sizes not positive or not strictly increasing after rounding.
    """
    shard = shard_tokens(args)
    sizes = [(s, -(-s // shard) * shard) for s in int_list(args.sizes, "--sizes")]
    planned = [p for _, p in sizes]
    if min(planned) <= 0 or any(b <= a for a, b in zip(planned, planned[1:])):
        raise SystemExit(f"Error: --sizes must be positive and increasing in whole shards of {shard} tokens, "
                         f"got {planned}")
    return sizes


def size_name(tokens: int) -> str:
    """File stem of a size: ``size-000106496``."""
    return f"size-{tokens:09d}"


def log(message: str) -> None:
    """One progress line with the wall-clock time, flushed at once."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


# ----------------------------------------------------------------------------- child processes


class PeakMemory:
    """Context manager: this process' peak resident memory over the block (Linux /proc/self/status).

    ``result()`` gives ``peak_rss_mib`` (``VmHWM``: the kernel's high-water mark of the whole
    process, including file pages it mapped, e.g. the memory-mapped store) and
    ``peak_rss_anon_mib`` (``RssAnon`` sampled every ``interval`` s: anonymous memory only).
    Both 0 where /proc is missing.
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_anon_kib = interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def status_kib(field: str) -> int:
        """``field`` (e.g. ``VmHWM``) of /proc/self/status in KiB; 0 if unavailable."""
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_anon_kib = max(self.peak_anon_kib, self.status_kib("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_anon_kib = max(self.peak_anon_kib, self.status_kib("RssAnon"))

    def result(self) -> dict:
        """``{"peak_rss_mib", "peak_rss_anon_mib"}`` (MiB)."""
        return {"peak_rss_mib": self.status_kib("VmHWM") / 1024, "peak_rss_anon_mib": self.peak_anon_kib / 1024}


def _package_parent() -> Path:
    """The folder that holds the imported ``saestrata`` package (children must import the same copy)."""
    import saestrata

    return Path(saestrata.__file__).resolve().parent.parent


def run_stage(stage: str, spec: dict) -> dict:
    """Run one measurement (``harvest``, ``train`` or ``evaluate``) in a fresh interpreter; returns its result.

    The child is this script with ``--child STAGE --spec FILE``; it writes its result JSON to
    ``spec["result"]`` atomically. Its output (progress bars) goes to this process' terminal.

    Raises:
        RuntimeError: the child exited with an error or was killed (its output says why).
    """
    result = Path(spec["result"])
    spec_path = result.with_name(f"{stage}.spec.json")
    _write_json(spec_path, spec)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_package_parent()), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--spec", str(spec_path)]
    code = subprocess.run(cmd, env=env).returncode
    if code != 0 or not result.is_file():
        raise RuntimeError(f"the {stage} child process failed (exit code {code}); rerun the same command to resume")
    return json.loads(result.read_text())


def child_main(stage: str, spec_path: Path) -> int:
    """Body of ``--child``: run ``stage`` from its spec inside :class:`PeakMemory`, write the result JSON."""
    from saestrata.allocator import tune_allocator

    tune_allocator()  # as the CLI does: measure what users run
    spec = json.loads(spec_path.read_text())
    with PeakMemory() as mem:
        result = {"harvest": child_harvest, "train": child_train, "evaluate": child_evaluate}[stage](spec)
    result.update(mem.result())
    _write_json(spec["result"], result)
    return 0


def _timed(sink: dict[str, list[float]], cls: type, name: str):
    """A ``mock.patch.object`` that wraps ``cls.name`` (method or classmethod) to append its wall seconds to
    ``sink[name]``; the wrapped method behaves exactly as before (exceptions included)."""
    raw = inspect.getattr_static(cls, name)
    is_classmethod = isinstance(raw, classmethod)
    fn = raw.__func__ if is_classmethod else raw

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        """``fn(*args, **kwargs)``, its wall seconds appended to ``sink[name]`` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.setdefault(name, []).append(time.perf_counter() - t0)

    return mock.patch.object(cls, name, classmethod(timed) if is_classmethod else timed)


def _committed(store: Path) -> dict:
    """``{"tokens", "shards", "complete", "planned"}`` (committed tokens and shards, finished?, planned tokens)
    of a store folder; zeros when there is no store yet."""
    from saestrata.store import StoreError, store_info

    empty = {"tokens": 0, "shards": 0, "complete": False, "planned": 0}
    if not (store / "zarr.json").is_file():
        return empty
    try:
        info = store_info(store)
    except StoreError:
        return empty
    return {"tokens": int(info["tokens_committed"]), "shards": int(info["shards_committed"]),
            "complete": bool(info["complete"]), "planned": int(info["tokens_planned"])}


def child_harvest(spec: dict) -> dict:
    """Harvest (create, extend or resume) the store to ``spec["tokens"]``; time it and every shard commit.

    Returns:
        dict: ``tokens`` harvested by this process (committed after - before), ``seconds`` of the
        ``harvest()`` call, ``tokens_per_s``, ``shards_committed``, ``commit_s`` / ``write_shard_s``
        (per shard, seconds), ``fixed_s`` (``{method: seconds}`` of the per-run writer calls),
        ``resumed`` (shards of this size were already committed), ``params_run`` (parameters of
        the blocks the forward runs), ``flop_per_s``, ``model_load_s`` and environment facts.
    """
    import torch
    import zarr

    from saestrata.harvest.harvester import HarvestConfig, harvest, tokenizer_fingerprint
    from saestrata.harvest.model import EMBEDDED_MODEL, load_model
    from saestrata.store.writer import StoreWriter

    out, layers = Path(spec["store"]), spec["layers"]
    t0 = time.perf_counter()
    lm = load_model(spec["model"] or EMBEDDED_MODEL, spec["device"])
    tokenizer_fingerprint(lm.tokenizer)  # cached per tokenizer: a one-time cost, excluded as in bench/harvest.py
    load_s = time.perf_counter() - t0
    before = _committed(out)
    cfg = HarvestConfig(layers=layers, tokens=spec["tokens"], out=out, model=spec["model"] or EMBEDDED_MODEL,
                        context_length=spec["context_length"], batch_rows=spec["batch_rows"],
                        rows_per_chunk=spec["rows_per_chunk"], chunks_per_shard=spec["chunks_per_shard"],
                        device=spec["device"])
    sink: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        for name in ("_commit", "write_shard", "reopen", "extend", "records", "finish"):
            stack.enter_context(_timed(sink, StoreWriter, name))
        t0 = time.perf_counter()
        harvest(cfg, lm=lm, progress=spec["progress"])
        seconds = time.perf_counter() - t0
    after = _committed(out)
    if not after["complete"]:
        raise RuntimeError(f"{out} is not complete after the harvest")
    deepest = max(layers)
    params_run = sum(p.numel() for block in list(lm.layers)[: deepest + 1] for p in block.parameters())
    tokens = after["tokens"] - before["tokens"]
    return {
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if tokens else None,
        "shards_committed": after["shards"] - before["shards"], "store_tokens": after["tokens"],
        "resumed": before["tokens"] > spec["previous_tokens"],
        "commit_s": sink.get("_commit", []), "write_shard_s": sink.get("write_shard", []),
        "fixed_s": {k: sum(v) for k, v in sink.items() if k not in ("_commit", "write_shard")},
        "params_run": params_run, "blocks_run": deepest + 1,
        "flop_per_s": 2 * params_run * tokens / seconds if tokens else None,
        "model_load_s": load_s, "d_model": lm.d_model, "n_layers_model": lm.n_layers,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "zarr": zarr.__version__,
    }


def child_train(spec: dict) -> dict:
    """Train one SAE for ``spec["steps"]`` batches on the store (the trainer's own API); time it.

    Returns:
        dict: ``seconds`` of the ``train()`` call (store open, statistics, steps, save),
        ``tokens`` (steps x batch), ``tokens_per_s``, ``folder`` (the saved SAE).
    """
    from saestrata.train.trainer import SAESpec, TrainConfig, train

    run = Path(spec["run_dir"])
    shutil.rmtree(run, ignore_errors=True)  # a crashed earlier attempt
    cfg = TrainConfig(store=Path(spec["store"]), layer=spec["layer"], out=run,
                      specs=[SAESpec(spec["arch"], spec["arch"])], d_sae=spec["d_sae"], batch_size=spec["batch"],
                      tokens=spec["steps"] * spec["batch"], device=spec["device"], checkpoint_every=0)
    t0 = time.perf_counter()
    folders = train(cfg, progress=spec["progress"])
    seconds = time.perf_counter() - t0
    tokens = spec["steps"] * spec["batch"]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "folder": str(folders[spec["arch"]]), "arch": spec["arch"], "steps": spec["steps"],
            "batch": spec["batch"], "d_sae": spec["d_sae"], "layer": spec["layer"]}


def child_evaluate(spec: dict) -> dict:
    """Evaluate the SAE of ``spec["sae"]`` on ``spec["tokens"]`` held-out tokens (``evaluate_saes``); time it.

    Returns:
        dict: ``seconds`` (evaluation, model load excluded), ``model_load_s``, ``tokens``,
        ``tokens_per_s`` and three headline metrics as a sanity check.
    """
    from saestrata.evaluate.core import EvalConfig, evaluate_saes
    from saestrata.harvest.model import EMBEDDED_MODEL, load_model

    model = spec["model"] or EMBEDDED_MODEL
    t0 = time.perf_counter()
    lm = load_model(model, spec["device"])
    load_s = time.perf_counter() - t0
    cfg = EvalConfig(tokens=spec["tokens"], batch_rows=spec["batch_rows"], model=model, device=spec["device"])
    t0 = time.perf_counter()
    (result,) = evaluate_saes([Path(spec["sae"])], cfg, lm=lm, progress=spec["progress"])
    seconds = time.perf_counter() - t0
    m = result["eval_result_metrics"]
    return {"seconds": seconds, "model_load_s": load_s, "tokens": spec["tokens"],
            "tokens_per_s": spec["tokens"] / seconds,
            "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
            "explained_variance": m["reconstruction_quality"]["explained_variance"], "l0": m["sparsity"]["l0"]}


# ----------------------------------------------------------------------------- in-process stages


def measure_verify(store: Path) -> dict:
    """Wall seconds of ``verify_store`` (the ``store verify`` command's function) on the whole store.

    Raises:
        RuntimeError: the store fails verification (names the first problem).
    """
    from saestrata.store import verify_store

    t0 = time.perf_counter()
    report = verify_store(store)
    seconds = time.perf_counter() - t0
    if not report.ok:
        raise RuntimeError(f"{store} failed verification: {report.problems[0]}")
    return {"seconds": seconds, "shards_checked": report.shards_checked,
            "nonfinite": sum(report.nonfinite.values())}


def measure_info(store: Path) -> dict:
    """``store_info`` of the store: tokens, shards, bytes on disk (every file) and bytes per token."""
    from saestrata.store import store_info

    info = store_info(store)
    return {k: info[k] for k in ("tokens_committed", "shards_committed", "n_shards", "bytes_on_disk",
                                 "bytes_per_token", "d_model", "layers", "complete")}


def measure_reader(store_path: Path, layer: int, batch: int, repeats: int) -> dict:
    """Tokens/s of ``shuffled_batches`` over every usable (non-BOS) token of ``layer``: about one epoch.

    Each repeat opens the store afresh (so its first touch of every chunk checks the crc32c, as
    a training run's first epoch does), reads ``usable // batch`` batches of ``[batch, d_model]``
    and closes the iterator; the best repeat is kept.
    """
    from saestrata.store import ActivationStore, shuffled_batches

    store = ActivationStore(store_path)
    hook = store.hook_for_layer(layer)
    shard = int(store.attrs["shard_tokens"])
    usable = sum(int(store.not_bos(lo, min(lo + shard, store.n_tokens)).sum())
                 for lo in range(0, store.n_tokens, shard))
    n_batches = max(1, usable // batch)
    best = math.inf
    for r in range(repeats):
        it = shuffled_batches(ActivationStore(store_path), hook, batch, seed=r)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        best = min(best, time.perf_counter() - t0)
        it.close()
    return {"layer": layer, "hook": hook, "batch": batch, "batches": n_batches, "tokens": n_batches * batch,
            "usable_tokens": usable, "seconds": best, "tokens_per_s": n_batches * batch / best, "repeats": repeats}


# ----------------------------------------------------------------------------- one size


def _write_json(path, data) -> None:
    from saestrata.atomic import write_json_atomic

    write_json_atomic(path, data)


def cached_stage(folder: Path, name: str, fn, valid=lambda result: True) -> dict:
    """The result of stage ``name`` of one size: read from ``folder/name.json`` if a run already finished it
    (and ``valid(result)``), else ``fn()`` timed and written there atomically with the load average."""
    path = folder / f"{name}.json"
    if path.is_file():
        result = json.loads(path.read_text())
        if valid(result):
            log(f"  {name}: done earlier, reused")
            return result
    load = os.getloadavg()
    t0 = time.perf_counter()
    result = fn()
    result = {**result, "stage_wall_s": time.perf_counter() - t0, "load_avg_before": load,
              "load_avg_after": os.getloadavg()}
    _write_json(path, result)
    return result


def _pcts(seconds: list[float]) -> dict:
    """``{"n", "median_ms", "p90_ms", "max_ms"}`` of per-shard times (None when empty)."""
    import numpy as np

    if not seconds:
        return {"n": 0, "median_ms": None, "p90_ms": None, "max_ms": None}
    x = np.asarray(seconds) * 1e3
    return {"n": len(x), "median_ms": float(np.median(x)), "p90_ms": float(np.percentile(x, 90)),
            "max_ms": float(x.max())}


def measure_size(args: argparse.Namespace, requested: int, tokens: int, previous: int, argv: list[str]) -> dict:
    """Every measurement of one store size (resuming finished stages); the record written to its JSON.

    Raises:
        RuntimeError: a child failed, the store failed verification, or the store already holds
            more tokens than this size (sizes must be measured in increasing order).
    """
    from saestrata.benchmark_speed import cpu_model

    store, folder = args.work / "store.zarr", args.work / "stages" / size_name(tokens)
    layers = int_list(args.layers, "--layers")
    layer = args.train_layer if args.train_layer is not None else layers[len(layers) // 2]
    progress = not args.no_progress

    def store_is_this_size(result) -> bool:
        """True when the store is complete at the token count a cached stage ``result`` was measured on."""
        now = _committed(store)
        return now["complete"] and now["tokens"] == result["store_tokens"]

    def harvest():
        """Grow the store to ``tokens`` in a child process; its measurements dict.

        Raises:
            RuntimeError: the store already plans more tokens (sizes are measured in increasing order).
        """
        now = _committed(store)
        if now["planned"] > tokens:
            raise RuntimeError(f"{store} already plans {now['planned']:,} tokens, more than size {tokens:,}: sizes "
                               f"are measured in increasing order; delete {args.work} to measure this size again")
        log(f"  harvest to {tokens:,} tokens (store holds {now['tokens']:,} committed), layers {args.layers}")
        return run_stage("harvest", {
            "result": str(folder / "harvest.child.json"), "store": str(store), "tokens": tokens, "layers": layers,
            "previous_tokens": previous, "model": args.model, "device": args.device,
            "context_length": args.context_length, "batch_rows": args.batch_rows,
            "rows_per_chunk": args.rows_per_chunk, "chunks_per_shard": args.chunks_per_shard, "progress": progress})

    folder.mkdir(parents=True, exist_ok=True)
    h = cached_stage(folder, "harvest", harvest, valid=store_is_this_size)
    log(f"  harvest: {h['tokens']:,} tokens in {h['seconds']:.1f} s = "
        f"{(h['tokens_per_s'] or 0):,.0f} tok/s, {h['shards_committed']} shards committed"
        f"{' (resumed)' if h['resumed'] else ''}, peak RSS {h['peak_rss_mib']:.0f} MiB")
    v = cached_stage(folder, "verify", lambda: measure_verify(store))
    log(f"  verify: {v['seconds']:.2f} s, {v['shards_checked']} shards")
    info = cached_stage(folder, "info", lambda: measure_info(store))
    r = cached_stage(folder, "reader", lambda: measure_reader(store, layer, args.reader_batch, args.reader_repeats))
    log(f"  reader: {r['tokens_per_s']:,.0f} tok/s over {r['tokens']:,} tokens of layer {layer}")
    t = cached_stage(folder, "train", lambda: run_stage("train", {
        "result": str(folder / "train.child.json"), "store": str(store), "layer": layer, "arch": args.train_arch,
        "steps": args.train_steps, "batch": args.train_batch, "d_sae": args.d_sae, "device": args.device,
        "run_dir": str(args.work / "runs" / size_name(tokens)), "progress": progress}))
    log(f"  train: {t['tokens_per_s']:,.0f} tok/s ({t['steps']} steps), peak RSS {t['peak_rss_mib']:.0f} MiB")
    e = cached_stage(folder, "evaluate", lambda: run_stage("evaluate", {
        "result": str(folder / "evaluate.child.json"), "sae": t["folder"], "model": args.model, "device": args.device,
        "tokens": args.eval_tokens, "batch_rows": args.eval_batch_rows, "progress": progress}))
    log(f"  evaluate: {e['tokens_per_s']:,.1f} tok/s, ce_loss_score {e['ce_loss_score']:.3f}, "
        f"peak RSS {e['peak_rss_mib']:.0f} MiB")
    return {
        "size_requested": requested, "tokens": info["tokens_committed"], "shards": info["shards_committed"],
        "store_bytes": info["bytes_on_disk"], "bytes_per_token": info["bytes_per_token"],
        "layers": layers, "d_model": info["d_model"], "context_length": args.context_length,
        "shard_tokens": shard_tokens(args), "model": args.model or "gemma-3-270m (embedded)",
        "device": args.device,
        "harvest": {**{k: v_ for k, v_ in h.items() if k not in ("commit_s", "write_shard_s")},
                    "commit": _pcts(h["commit_s"]), "write_shard": _pcts(h["write_shard_s"])},
        "verify": {**v, "bytes_per_s": info["bytes_on_disk"] / v["seconds"]},
        "reader": r, "train": t, "evaluate": e,
        "command": "python bench/scaling.py " + shlex.join(argv),
        "git": _git_head(), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _git_head() -> str | None:
    """Short commit of the benchmark's code (``+dirty`` with uncommitted changes), None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------- report


def load_records(out: Path) -> list[dict]:
    """Every ``size-*.json`` of ``out``, by token count."""
    return sorted((json.loads(p.read_text()) for p in out.glob("size-*.json")), key=lambda r: r["tokens"])


def block_params(cfg: dict) -> int:
    """Parameters of a Gemma-2 decoder stack (attention, MLP, 4 RMSNorms per block), embedding excluded."""
    d, q, kv = cfg["d_model"], cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"]
    per_block = d * q + 2 * d * kv + q * d + 3 * d * cfg["d_ff"] + 4 * d
    return cfg["n_layers"] * per_block


def extrapolation(records: list[dict], mfu: float) -> dict:
    """Gemma-2-2B at 100M and 1B tokens, on paper: bytes, shards, harvest hours per GPU and for this run's CPU.

    Harvest FLOPs = 2 x (parameters of the 26 blocks) x tokens (the harvester stops after the deepest
    block; the embedding is a lookup and the head never runs; attention scores are left out, ~2% at
    context 128). GPU hours use the dense bf16 peak x ``mfu``; the CPU row uses this run's measured
    FLOP rate (all harvest increments: total FLOPs / total seconds). Shards: the store's default
    layout (``HarvestConfig``'s defaults: rows per chunk x chunks per shard x context length, 8,192
    tokens). Commit and verify totals use the median
    commit time and the verify bytes/s of the largest store measured.
    """
    from saestrata.harvest.harvester import HarvestConfig

    cfg, p = GEMMA2_2B, block_params(GEMMA2_2B)
    timed = [r["harvest"] for r in records if r["harvest"].get("flop_per_s")]
    cpu_rate = (sum(h["flop_per_s"] * h["seconds"] for h in timed) / sum(h["seconds"] for h in timed)
                if timed else None)
    defaults = {f.name: f.default for f in dataclasses.fields(HarvestConfig)}
    shard = defaults["rows_per_chunk"] * defaults["chunks_per_shard"] * defaults["context_length"]
    commit_ms = records[-1]["harvest"]["commit"]["median_ms"] if records else None
    verify_rate = records[-1]["verify"]["bytes_per_s"] if records else None
    rows = []
    for tokens in EXTRAPOLATION_TOKENS:
        flops = 2 * p * tokens
        layer_bytes = tokens * cfg["d_model"] * 2
        row = {"tokens": tokens, "flops": flops, "bytes_per_layer": layer_bytes,
               "bytes_all_layers": layer_bytes * cfg["n_layers"], "shards": -(-tokens // shard),
               "hours": {name: flops / (peak * mfu) / 3600 for name, peak, _ in GPUS}}
        if cpu_rate:
            row["hours"]["this run's CPU (measured rate)"] = flops / cpu_rate / 3600
        row["write_gb_per_s"] = {name: tokens * cfg["n_layers"] * cfg["d_model"] * 2 / (h * 3600) / 1e9
                                 for name, h in row["hours"].items()}
        if commit_ms:
            row["commit_hours"] = row["shards"] * commit_ms / 1e3 / 3600
        if verify_rate:
            row["verify_hours"] = row["bytes_all_layers"] / verify_rate / 3600
        rows.append(row)
    return {"params": p, "cpu_flop_per_s": cpu_rate, "shard_tokens": shard, "rows": rows, "mfu": mfu}


def _fmt(x, spec: str = ",.0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _ratio(records: list[dict], get) -> str:
    """``largest / smallest`` of a measured quantity (``get(record)``), as ``1.07x``."""
    a, b = get(records[0]), get(records[-1])
    return "-" if not a or b is None else f"{b / a:.2f}x"


def write_plots(records: list[dict], out: Path) -> list[str]:
    """``commit_time.png``, ``peak_memory.png``, ``throughput.png`` in ``out`` (matplotlib, Agg); their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["tokens"] for r in records]
    nan = float("nan")

    def y(get) -> list[float]:
        """``get(record)`` per record, None (not measured) as NaN (a gap in the line)."""
        return [nan if (v := get(r)) is None else v for r in records]

    def save(fig, ax, name: str, ylabel: str, logy: bool = False) -> str:
        """Label, scale and write one plot to ``out/name``; returns the file name."""
        ax.set_xlabel("store size (tokens)")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.set_ylim(bottom=None if logy else 0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return name

    names = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("median_ms", "commit (marker) median", "o-"), ("p90_ms", "commit p90", "o--")):
        ax.plot(x, y(lambda r: r["harvest"]["commit"][key]), style, label=label)
    ax.plot(x, y(lambda r: r["harvest"]["write_shard"]["median_ms"]), "s-", label="write_shard (data + commit) median")
    ax.set_title("per-shard commit time vs store size")
    names.append(save(fig, ax, "commit_time.png", "ms per shard", logy=True))

    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in ("harvest", "train", "evaluate"):
        line, = ax.plot(x, [r[stage]["peak_rss_mib"] for r in records], "o-", label=f"{stage} VmHWM")
        ax.plot(x, [r[stage]["peak_rss_anon_mib"] for r in records], "x--", color=line.get_color(),
                label=f"{stage} RssAnon peak")
    ax.set_title("peak memory vs store size (one fresh process each)")
    names.append(save(fig, ax, "peak_memory.png", "MiB"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y(lambda r: r["harvest"]["tokens_per_s"]), "o-", label="harvest (increment)")
    ax.plot(x, [r["reader"]["tokens_per_s"] for r in records], "o-", label="reader, shuffled batches, 1 layer")
    ax.plot(x, [r["train"]["tokens_per_s"] for r in records], "o-", label=f"train ({records[0]['train']['arch']})")
    ax.plot(x, [r["evaluate"]["tokens_per_s"] for r in records], "o-", label="evaluate")
    ax.plot(x, [r["tokens"] / r["verify"]["seconds"] for r in records], "o-", label="store verify (all layers)")
    ax.set_title("throughput vs store size")
    names.append(save(fig, ax, "throughput.png", "tokens/s", logy=True))
    return names


def render_report(records: list[dict], plots: list[str], mfu: float) -> str:
    """README.md text: commands, machine, table, flatness ratios, plots, extrapolation (labelled as such)."""
    first, last = records[0], records[-1]
    lines = [
        "# Scaling: measured, not assumed (issue 12)", "",
        "Generated by `bench/scaling.py` from the `size-*.json` files in this folder (one per store size); "
        "rerun the script (or `--report-only`) instead of editing it.", "",
        "Command(s) that produced the JSONs (run from the repository root):", "",
        *[f"    {c}" for c in dict.fromkeys(r["command"] for r in records)], "",
        f"Machine: {last.get('cpu') or 'unknown CPU'}, {last.get('cpus')} logical CPUs, torch "
        f"{last['harvest'].get('torch')} ({last['harvest'].get('torch_threads')} threads), zarr "
        f"{last['harvest'].get('zarr')}, code {last.get('git')}, device {last['device']}. 1-minute load average "
        "before each harvest: " + ", ".join(f"{r['harvest']['load_avg_before'][0]:.1f}" for r in records)
        + " (the machine should be idle: anything above ~0.5 means other work shared the cores).", "",
        f"Store: {last['model']}, layers {','.join(map(str, last['layers']))} (d_model {last['d_model']}, bf16), "
        f"embedded wiki train split, context {last['context_length']}, {last['shard_tokens']:,} tokens per shard. "
        "ONE store grown through the sizes: each harvest row is the increment from the previous size.", "",
        "## Table", "",
        "| tokens | shards | store GiB | harvest tok/s | commit ms median / p90 | write_shard ms median | "
        "verify s (MB/s) | reader tok/s | train tok/s | eval tok/s | peak RSS MiB harvest / train / evaluate | "
        "peak anon MiB harvest / train / evaluate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        h, c, w = r["harvest"], r["harvest"]["commit"], r["harvest"]["write_shard"]
        lines.append(
            f"| {r['tokens']:,} | {r['shards']:,} | {r['store_bytes'] / 2**30:.2f} | "
            f"{_fmt(h['tokens_per_s'])} ({h['tokens']:,} new{', resumed' if h['resumed'] else ''}) | "
            f"{_fmt(c['median_ms'], '.2f')} / {_fmt(c['p90_ms'], '.2f')} | {_fmt(w['median_ms'], '.1f')} | "
            f"{r['verify']['seconds']:.2f} ({r['verify']['bytes_per_s'] / 1e6:,.0f}) | "
            f"{r['reader']['tokens_per_s']:,.0f} | {r['train']['tokens_per_s']:,.0f} | "
            f"{r['evaluate']['tokens_per_s']:,.1f} | "
            f"{r['harvest']['peak_rss_mib']:,.0f} / {r['train']['peak_rss_mib']:,.0f} / "
            f"{r['evaluate']['peak_rss_mib']:,.0f} | {r['harvest']['peak_rss_anon_mib']:,.0f} / "
            f"{r['train']['peak_rss_anon_mib']:,.0f} / {r['evaluate']['peak_rss_anon_mib']:,.0f} |")
    lines += ["", f"## Flat? largest / smallest store ({last['tokens']:,} / {first['tokens']:,} tokens = "
              f"{last['tokens'] / first['tokens']:.1f}x the data)", "",
              "| quantity | ratio |", "|---|---|"]
    flat = (
        ("commit time per shard, median", lambda r: r["harvest"]["commit"]["median_ms"]),
        ("commit time per shard, p90", lambda r: r["harvest"]["commit"]["p90_ms"]),
        ("write_shard time per shard, median", lambda r: r["harvest"]["write_shard"]["median_ms"]),
        ("harvest tokens/s", lambda r: r["harvest"]["tokens_per_s"]),
        ("reader tokens/s", lambda r: r["reader"]["tokens_per_s"]),
        ("verify seconds per token", lambda r: r["verify"]["seconds"] / r["tokens"]),
        ("peak RSS harvest (VmHWM)", lambda r: r["harvest"]["peak_rss_mib"]),
        ("peak RSS train (VmHWM)", lambda r: r["train"]["peak_rss_mib"]),
        ("peak RSS evaluate (VmHWM)", lambda r: r["evaluate"]["peak_rss_mib"]),
        ("peak anonymous memory harvest", lambda r: r["harvest"]["peak_rss_anon_mib"]),
        ("peak anonymous memory train", lambda r: r["train"]["peak_rss_anon_mib"]),
    )
    lines += [f"| {name} | {_ratio(records, get)} |" for name, get in flat]
    fixed = ", ".join(f"{k} {v:.2f} s" for k, v in last["harvest"]["fixed_s"].items())
    lines += ["", f"Per-run fixed costs of the last harvest (writer calls made once per harvest, not per shard): "
              f"{fixed or 'none'}.", "", "## Plots", "", *[f"![{p}]({p})" for p in plots], "",
              "## What is measured", "",
              "- **harvest tok/s**: tokens committed by that increment / wall time of `harvest()` (text packing, "
              "forward stopped after the deepest block, bf16 conversion, statistics, Zarr writes with crc32c, "
              "commits, `finish`); model load and the one-time tokenizer fingerprint excluded.",
              "- **commit**: `StoreWriter._commit` (the commit-marker write, temp file + fsync + rename + fsync of "
              "the folder) per shard of the increment; **write_shard**: the whole `StoreWriter.write_shard` "
              "(every array's shard data + the commit). Timed by wrapping the methods in the harvest process; "
              "the store is unchanged.",
              "- **verify**: `saestrata.store.verify_store` (what `saestrata store verify` runs): every committed "
              "chunk of every array read through zarr (crc32c), shard files and indexes, NaN/Inf. Page cache not "
              "dropped: the store was just written, so reads may be served from memory.",
              f"- **reader**: `shuffled_batches` of layer {last['reader']['layer']} (batches of "
              f"{last['reader']['batch']}, BOS excluded) over every usable token once, store opened afresh per "
              "repeat (crc32c on first touch), best of the repeats.",
              f"- **train**: `saestrata.train.trainer.train`, {last['train']['arch']} d_sae {last['train']['d_sae']}, "
              f"{last['train']['steps']} steps of {last['train']['batch']} tokens, wall of the call incl. store "
              "open and save; **evaluate**: `evaluate_saes` of that SAE on "
              f"{last['evaluate']['tokens']:,} eval-split tokens (model load excluded). Its cost does not depend "
              "on the store: it reads text, not the store.",
              "- **peak memory**: each of harvest / train / evaluate runs in a fresh interpreter; VmHWM is the "
              "kernel's resident high-water mark (includes memory-mapped store pages the process touched), "
              "RssAnon peak is sampled every 20 ms (anonymous memory: buffers, model, tensors).", ""]
    lines += render_extrapolation(extrapolation(records, mfu))
    return "\n".join(lines) + "\n"


def render_extrapolation(ex: dict) -> list[str]:
    """The "extrapolated, not measured" section for Gemma-2-2B."""
    cfg = GEMMA2_2B
    hours_keys = list(ex["rows"][0]["hours"])
    lines = [
        "## Gemma-2-2B at 100M and 1B tokens: EXTRAPOLATED, NOT MEASURED", "",
        f"On paper, from {cfg['name']}'s configuration (d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
        f"d_ff {cfg['d_ff']}, {cfg['n_heads']} heads / {cfg['n_kv_heads']} KV heads of {cfg['head_dim']}): "
        f"{ex['params'] / 1e9:.3f}B parameters in its 26 blocks (embedding excluded: a lookup; the head never runs "
        "in a harvest). Harvest FLOPs = 2 x block parameters x tokens (attention scores left out). GPU hours = "
        f"FLOPs / (dense bf16 peak x MFU {ex['mfu']:.0%}, an assumption: a forward-only pass at batch sizes "
        "that fill the GPU typically reaches 30-50%). The CPU row divides by this run's measured harvest FLOP "
        f"rate ({_fmt(ex['cpu_flop_per_s'] and ex['cpu_flop_per_s'] / 1e9, ',.3g')} GFLOP/s: 2 x parameters of "
        "the blocks run x tokens / s), which assumes the 2B model runs at the same FLOP rate. Shards at the "
        f"store's default layout ({ex['shard_tokens']:,} tokens, the harvester's default rows per chunk x chunks "
        "per shard x context length).", "",
        "Peaks assumed (dense bf16 Tensor Core):", "",
        *[f"- {name}: {peak / 1e12:,.0f} TFLOP/s ({src})" for name, peak, src in GPUS], "",
        "| | " + " | ".join(f"{t / 1e6:,.0f}M tokens" for t in EXTRAPOLATION_TOKENS) + " |",
        "|---|" + "---|" * len(EXTRAPOLATION_TOKENS),
        "| bytes per layer (bf16, raw) | " + " | ".join(f"{r['bytes_per_layer'] / 1e9:,.1f} GB" for r in ex["rows"]) + " |",
        f"| bytes, all {cfg['n_layers']} layers | " + " | ".join(f"{r['bytes_all_layers'] / 1e12:,.1f} TB"
                                                          for r in ex["rows"]) + " |",
        f"| shards of {ex['shard_tokens']:,} tokens | " + " | ".join(f"{r['shards']:,}" for r in ex["rows"]) + " |",
        "| harvest FLOPs | " + " | ".join(f"{r['flops']:.2e}" for r in ex["rows"]) + " |",
    ]
    for key in hours_keys:
        lines.append(f"| harvest hours, {key} (store write rate needed) | " + " | ".join(
            f"{r['hours'][key]:,.1f} h ({r['write_gb_per_s'][key]:,.2f} GB/s)" for r in ex["rows"]) + " |")
    if "commit_hours" in ex["rows"][0]:
        lines.append("| total commit time at the largest store's median per shard | " + " | ".join(
            f"{r['commit_hours'] * 60:,.1f} min" for r in ex["rows"]) + " |")
    if "verify_hours" in ex["rows"][0]:
        lines.append("| `store verify` at the largest store's verify MB/s | " + " | ".join(
            f"{r['verify_hours']:,.1f} h" for r in ex["rows"]) + " |")
    lines += ["", "Bytes are raw activations; the measured stores add crc32c, shard indexes and the aligned "
              "token arrays (see bytes per token above). The GPU rows only hold if the store can be written at "
              "the rate shown (all 26 layers); otherwise the disk or network, not the GPU, sets the time.", ""]
    return lines


def write_report(out: Path, mfu: float) -> Path | None:
    """Regenerate ``out/README.md`` and the plots from the JSONs; None when there is no JSON yet."""
    from saestrata.atomic import write_text_atomic

    records = load_records(out)
    if not records:
        log(f"no size-*.json in {out} yet: no report")
        return None
    plots = write_plots(records, out)
    path = write_text_atomic(out / "README.md", render_report(records, plots, mfu))
    log(f"report: {path} ({len(records)} sizes) and {', '.join(plots)}")
    return path


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Measure every size not measured yet, then write the report. Returns the exit code (0 ok, 1 failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return 0 if write_report(args.out, args.mfu) else 1
    sizes = planned_sizes(args)
    shard = shard_tokens(args)
    log(f"scaling: layers {args.layers}, sizes {', '.join(f'{p:,}' for _, p in sizes)} tokens "
        f"({shard:,}-token shards), store {args.work / 'store.zarr'}, results {args.out}")
    previous = 0
    try:
        for requested, tokens in sizes:
            path = args.out / f"{size_name(tokens)}.json"
            if path.is_file():
                log(f"size {tokens:,}: measured earlier ({path.name}), skipped")
                previous = json.loads(path.read_text())["tokens"]
                continue
            log(f"size {tokens:,} tokens ({tokens // shard:,} shards; requested {requested:,})")
            record = measure_size(args, requested, tokens, previous, argv)
            _write_json(path, record)
            log(f"size {tokens:,}: done -> {path}")
            if record["tokens"] < tokens:  # the text source ran out: a larger size cannot be harvested
                log(f"the text source ran out at {record['tokens']:,} tokens: larger sizes skipped")
                break
            previous = record["tokens"]
    except (RuntimeError, OSError) as err:
        print(f"Error: {err}", file=sys.stderr, flush=True)
        write_report(args.out, args.mfu)
        return 1
    write_report(args.out, args.mfu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
