"""A dask.distributed client for the stages that spread work over processes (harvest shards, training sweeps)."""

from __future__ import annotations

import logging


def dask_client(workers: int, scheduler: str | None):
    """A ``distributed.Client``: connected to ``scheduler``, or on a new LocalCluster of ``workers`` processes.

    The local cluster has one dask thread per worker process (each task sets its own torch
    intra-op threads) and its scheduler/nanny INFO logs silenced (noise next to progress bars).

    Raises:
        OSError / TimeoutError: from ``distributed`` when ``scheduler`` cannot be reached.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    return Client(cluster)
