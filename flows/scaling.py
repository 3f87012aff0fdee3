"""Where partition tasks run when a job scales out: an existing Dask cluster or a local one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from flows.job import EnrichJob

__all__ = ["count_workers", "dask_runner", "workers_report_here"]


@contextmanager
def workers_report_here() -> Iterator[None]:
    """Local Dask workers started in this block report to this run's Prefect API.

    Without it, each worker process of a run on a temporary Prefect server would start a server of
    its own (hundreds of MB each), and its task runs would not show under the flow run.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    previous = os.environ.get("PREFECT_API_URL")
    if url.startswith(("http://", "https://")) and previous is None:
        os.environ["PREFECT_API_URL"] = url  # spawned workers copy the environment as they start
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)


def dask_runner(job: EnrichJob):  # type: ignore[no-untyped-def]
    """A prefect-dask task runner for the job's dask_address, or a local cluster of dask_local workers."""
    from prefect_dask import DaskTaskRunner

    if job.dask_address:
        return DaskTaskRunner(address=job.dask_address)
    # One thread per worker process: each worker runs one partition at a time with its own
    # event loop and scheduler (the run's --rpm/--tpm are split between workers, see README).
    cluster = {
        "n_workers": job.dask_local, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }  # fmt: skip
    return DaskTaskRunner(cluster_kwargs=cluster)


def count_workers(job: EnrichJob) -> int:
    """How many worker processes share the run's rate limits."""
    if not job.dask_address:
        return max(1, job.dask_local)
    from distributed import Client

    with Client(job.dask_address, timeout=30) as client:
        return max(1, len(client.scheduler_info()["workers"]))
