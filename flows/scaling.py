"""Where partition tasks run when a job scales out: an existing Dask cluster or a local one."""

from __future__ import annotations

from flows.job import EnrichJob

__all__ = ["count_workers", "dask_runner"]


def dask_runner(job: EnrichJob):  # type: ignore[no-untyped-def]
    """A prefect-dask task runner for the job's dask_address, or a local cluster of dask_local workers."""
    from prefect_dask import DaskTaskRunner

    if job.dask_address:
        return DaskTaskRunner(address=job.dask_address)
    # One thread per worker process: each worker runs one partition at a time with its own
    # event loop and scheduler (the run's --rpm/--tpm are split between workers, see README).
    cluster = {"n_workers": job.dask_local, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster)


def count_workers(job: EnrichJob) -> int:
    """How many worker processes share the run's rate limits."""
    if not job.dask_address:
        return max(1, job.dask_local)
    from distributed import Client

    with Client(job.dask_address, timeout=30) as client:
        return max(1, len(client.scheduler_info()["workers"]))
