"""``saestrata train --workers N`` / ``--scheduler ADDRESS``: the SAEs of one run spread over dask workers.

Each SAE is one task: a one-SAE pass (:func:`~.trainer.train` with ``specs=[spec]``) in its own
folder ``<out>/.tasks/<name>/``, moved to ``<out>/<name>`` when it finishes. A token SAE gets the
same batches whatever shares its pass (``trainer._feed``; tests/test_fairness.py), so an SAE
trained alone on a worker is bit-identical to the same SAE trained in a one-process pass with the
same seed and torch thread count (tests/test_train_distributed.py). Every worker reads the shared
store itself (the store is memory-mapped per process; workers on other machines need the same path).

Failures: a task whose worker process dies is rescheduled by dask on another worker (its
``allowed-failures``), a task that raises is retried ``retries`` times; a retry resumes the
task's checkpoint (``checkpoint_every``) when the workers share the filesystem. A task that still
fails is reported by name once the others have finished and been saved -- never silently lost.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ..cluster import dask_client
from .checkpoint import checkpoint_path
from .trainer import TrainConfig, train

TASKS_DIR = ".tasks"
FAULT_ENV = "SAESTRATA_FAULT"  # test-only: "train-worker-exit:NAME" (once) / "train-worker-exit-always:NAME"


class DistributedTrainingError(RuntimeError):
    """Some SAEs of a distributed run failed on every attempt; the others are saved."""


def _fault(cfg: TrainConfig) -> None:
    """Test-only: kill this worker process while it trains the named SAE (once, or on every attempt)."""
    spec = os.environ.get(FAULT_ENV, "")
    name = cfg.specs[0].name
    marker = Path(cfg.out) / ".fault-fired"
    if spec == f"train-worker-exit-always:{name}" or (spec == f"train-worker-exit:{name}" and not marker.exists()):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)


def train_task(cfg: TrainConfig, threads: int) -> str:
    """Worker side: train the one SAE of ``cfg`` (resuming its checkpoint if an earlier attempt left one).

    Args:
        cfg: a :class:`TrainConfig` with exactly one spec and its own ``out``.
        threads: torch intra-op threads for this process (0 = leave torch's default).

    Returns:
        the saved SAE folder (str), or "" when ``cfg.stop_after_step`` interrupted it.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    _fault(cfg)
    folders = train(replace(cfg, resume=checkpoint_path(cfg.out).exists()), progress=False)
    return str(folders.get(cfg.specs[0].name, ""))


def train_distributed(cfg: TrainConfig, workers: int = 0, scheduler: str | None = None, threads: int = 0,
                      retries: int = 1, progress: bool = True) -> dict[str, Path]:
    """Train every SAE of ``cfg.specs`` as its own dask task; returns ``{name: folder}`` like :func:`train`.

    Args:
        cfg: the run (``cfg.out`` is the run directory; each SAE ends in ``cfg.out / name``).
        workers: local worker processes to start (ignored with ``scheduler``).
        scheduler: address of an existing dask scheduler (its workers must see ``cfg.store`` and ``cfg.out``).
        threads: torch threads per task (0: ``cpu_count // workers`` on a local cluster, torch's default on
            a remote one). Bit-identity with a one-process run needs the same thread count there.
        retries: extra attempts for a task that raises.
        progress: a tqdm bar over SAEs (one line per finished SAE).

    Raises:
        ValueError: no specs, or neither ``workers`` nor ``scheduler``.
        DistributedTrainingError: SAEs that failed on every attempt (named), after the others were saved.
    """
    from distributed import as_completed

    if not cfg.specs:
        raise ValueError("no SAE to train")
    if not workers and not scheduler:
        raise ValueError("train_distributed needs --workers N (N >= 1) or --scheduler ADDRESS")
    if not threads and not scheduler:
        threads = max(1, (os.cpu_count() or 1) // workers)
    out, tasks = Path(cfg.out), Path(cfg.out) / TASKS_DIR
    run = uuid.uuid4().hex[:8]
    saved: dict[str, Path] = {}
    failed: dict[str, BaseException] = {}
    bar = tqdm(total=len(cfg.specs), unit="SAE", desc="train (dask)", disable=not progress)
    with dask_client(workers, scheduler) as client:
        names = {}
        for spec in cfg.specs:
            task_cfg = replace(cfg, specs=[spec], out=tasks / spec.name, resume=False)
            fut = client.submit(train_task, task_cfg, threads, key=f"saestrata-train-{run}-{spec.name}",
                                retries=retries, pure=False)
            names[fut.key] = (spec.name, fut)
        for fut in as_completed([f for _, f in names.values()]):
            name = names[fut.key][0]
            try:
                folder = fut.result()
            except Exception as err:  # keep saving the others; report every failure at the end
                failed[name] = err
                bar.write(f"{name}: failed on the workers ({type(err).__name__}: {err})")
                continue
            if folder:
                os.replace(folder, out / name)
                shutil.rmtree(tasks / name, ignore_errors=True)
                saved[name] = out / name
            bar.set_postfix_str(f"{name} done")
            bar.update()
    bar.close()
    if tasks.exists() and not any(tasks.iterdir()):
        tasks.rmdir()
    if failed:
        first = next(iter(failed.values()))
        raise DistributedTrainingError(
            f"{len(failed)} of {len(cfg.specs)} SAEs failed on the workers ({', '.join(failed)}; first: "
            f"{type(first).__name__}: {first}); the other {len(saved)} are saved in {out}, the failed ones' "
            f"checkpoints (if any) in {tasks}")
    return saved
