"""``saestrata harvest --workers N`` / ``--scheduler ADDRESS``: shard writers on a dask.distributed cluster.

Division of labour (the commit protocol of store/writer.py, DESIGN.md's measured
zarr facts): this process keeps the :class:`StoreWriter` -- the store's lock, the
text order and the commit record -- and hands each uncommitted shard's packed rows
to exactly one worker. A worker loads the model once per process, runs the forward
pass, writes that shard's files with :func:`write_uncommitted_shard` and returns
its statistics record; only then does this process commit the shard. No two
workers touch the same shard file, and only this process writes metadata, so a
crash anywhere loses at most uncommitted shards, which a resume rewrites.

Shards are committed as they finish (out of order); the final store does not
depend on which worker wrote what, so it is bit-identical to a one-process harvest
as long as the forward pass is (same device and dtype; tests/test_harvest_parallel.py).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..cluster import dask_client
from ..store import StoreError, StoreWriter
from ..store.format import committed_tokens
from ..store.writer import write_uncommitted_shard
from .model import LoadedModel, load_model

# In-flight shards per worker: one computing, one queued, so workers never idle on the scheduler.
_QUEUE_PER_WORKER = 2


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs besides the rows: picklable, identical for every shard of one harvest.

    ``weights_hash`` is the hash in the store identity: a worker that loads different
    weights for ``model`` (another cache, another revision) refuses to write.
    ``threads`` is the torch intra-op thread count per worker (0 = leave torch's default).
    """

    store: str
    model: str
    device: str
    dtype: str
    layers: tuple[int, ...]
    hooks: tuple[str, ...]
    batch_rows: int
    bos: int
    weights_hash: str
    threads: int
    compute_dtype: str | None = None  # HarvestConfig.compute_dtype (None: ``dtype``)
    storage_options: dict | None = None  # fsspec/s3fs options when ``store`` is an object-store URL


_WORKER_MODELS: dict[tuple, LoadedModel] = {}


def _worker_model(task: ShardTask) -> LoadedModel:
    """The model for ``task``, loaded once per worker process and checked against the store identity."""
    key = (task.model, task.device, task.compute_dtype or task.dtype)
    if key not in _WORKER_MODELS:
        if task.threads:
            import torch

            torch.set_num_threads(task.threads)
        _WORKER_MODELS[key] = load_model(*key)
    lm = _WORKER_MODELS[key]
    if lm.weights_hash != task.weights_hash:
        raise StoreError(
            f"worker {os.uname().nodename} loaded different weights for {task.model!r} than the store records "
            f"({lm.weights_hash} vs {task.weights_hash}): give every worker the same model files"
        )
    return lm


def harvest_shard(task: ShardTask, shard: int, rows: list) -> dict:
    """Worker side: forward ``rows`` (list of ``packing.Row``), write shard ``shard`` uncommitted.

    Returns:
        the shard's statistics record (``{hook: [n, norm_sum, sq_sum, max_abs]}``), for the committer.

    Raises:
        FloatingPointError: NaN/Inf activations (nothing of the shard is written).
        StoreError: different weights than the store identity, or a write the store refuses.
    """
    from .harvester import shard_payload

    lm = _worker_model(task)
    acts, aligned, record = shard_payload(lm, rows, list(task.layers), list(task.hooks), task.batch_rows,
                                          task.bos, shard, task.dtype)
    write_uncommitted_shard(task.store, shard, acts, aligned, storage_options=task.storage_options)
    return record


def write_pending_parallel(
    writer: StoreWriter, cfg, lm: LoadedModel, layers: list[int], hooks: list[str], progress: bool
) -> None:
    """Harvest every uncommitted shard of ``writer`` on dask workers; commit each as it finishes.

    Args:
        writer: the open store (this process keeps its lock and commit record).
        cfg: the ``HarvestConfig`` (``workers``, ``scheduler``, model, device, dtype, ...).
        lm: the model loaded here (its tokenizer packs the rows; its weights hash checks the workers').
        layers, hooks: validated layer indices and their hook names.
        progress: show a tqdm bar.

    Raises:
        the first worker error (FloatingPointError, StoreError, ...) after the other in-flight
        shards finished and were committed; StoreError if a shard file is missing at commit.
    """
    from distributed import as_completed

    from .harvester import pending_jobs, truncate_plan

    n_workers = cfg.workers or 0
    task = ShardTask(
        store=writer.loc.identity(), storage_options=writer.loc.storage_options or None, model=cfg.model, device=cfg.device, dtype=cfg.dtype,
        compute_dtype=cfg.compute_dtype, layers=tuple(layers), hooks=tuple(hooks),
        batch_rows=int(writer.group.attrs.get("batch_rows", cfg.batch_rows)),
        bos=lm.tokenizer.bos_token_id, weights_hash=lm.weights_hash,
        threads=max(1, (os.cpu_count() or 1) // n_workers) if n_workers and not cfg.scheduler else 0,
    )
    bar = tqdm(total=writer.n_tokens, unit="tok", desc=f"harvest {cfg.split} (dask)", disable=not progress)
    bar.update(committed_tokens(dict(writer.group.attrs), writer.committed))
    run = uuid.uuid4().hex[:8]
    errors: list[BaseException] = []
    with dask_client(n_workers, cfg.scheduler) as client:
        limit = _QUEUE_PER_WORKER * max(1, len(client.scheduler_info().get("workers", {})) or n_workers)
        futures = as_completed()
        shard_of: dict[str, tuple[int, int]] = {}

        def settle(fut) -> None:
            """Commit one finished shard (or keep its error for the end) and advance the bar."""
            shard, n = shard_of.pop(fut.key)
            try:
                record = fut.result()
            except Exception as err:  # keep committing the others; raise the first error at the end
                errors.append(err)
                return
            writer.commit_shard(shard, record)
            bar.update(n)

        for job in pending_jobs(writer, cfg, lm):
            if errors:
                break
            if job.truncate_to is not None:
                for fut in futures:  # resizing while workers write is unsafe (DESIGN.md): drain first
                    settle(fut)
                truncate_plan(writer, cfg, job.truncate_to)
                if not job.rows:
                    break
            fut = client.submit(harvest_shard, task, job.shard, job.rows, key=f"saestrata-{run}-shard-{job.shard}",
                                pure=False)
            shard_of[fut.key] = (job.shard, len(job.rows) * cfg.context_length)
            futures.add(fut)
            while futures.count() >= limit:
                settle(next(futures))
        for fut in futures:
            settle(fut)
    bar.close()
    if errors:
        raise errors[0]
