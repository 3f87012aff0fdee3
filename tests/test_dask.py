"""Partitions on a real Dask cluster (a scheduler and two worker processes on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from llm_enrich.flows.children import stop_process_group
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import enrich_table
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer
from tests.prefect_server import free_port

pytestmark = pytest.mark.usefixtures("prefect_backend")


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dask scheduler` and two `dask worker` processes; yields the scheduler address."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    processes = [
        subprocess.Popen(
            [*dask, "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
            env=env, stdout=open(logs / "scheduler.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
    ]  # fmt: skip
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard"]
    for n in range(2):
        processes.append(
            subprocess.Popen(
                [*worker, "--host", "127.0.0.1", "--name", f"w{n}"],
                env=env, stdout=open(logs / f"worker{n}.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            )
        )  # fmt: skip
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in processes:
            stop_process_group(process)


def test_a_job_on_a_dask_cluster_equals_the_single_machine_run(
    dask_cluster: str, fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    topics = [f"distributed topic {i}" for i in range(60)]
    source = tmp_path / "in.parquet"
    pl.DataFrame({"id": range(60), "topic": topics}).write_parquet(source)
    base = {
        "input_path": str(source), "base_url": fake_llm.base_url, "prompt": "Explain {topic}", "partition_rows": 6,
        "rpm": 600_000, "tpm": 50_000_000,
    }  # fmt: skip
    local = enrich_table(EnrichJob(**base, output_path=str(tmp_path / "local" / "out.parquet")))
    fake_llm.reset()
    spread = enrich_table(
        EnrichJob(**base, output_path=str(tmp_path / "dask" / "out.parquet"), dask_address=dask_cluster)
    )
    on_dask = pl.read_parquet(tmp_path / "dask" / "out.parquet")
    assert_frame_equal(on_dask, pl.read_parquet(tmp_path / "local" / "out.parquet"))
    assert on_dask["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    assert fake_llm.stats.requests == 60 and spread["requests"] == local["requests"] == 60
    # Each worker process appends its answers to a cache segment of its own: both did partitions.
    segments = list((tmp_path / "dask" / ".enrich-cache" / "v1").glob("seg-*.jsonl"))
    assert len(segments) == 2
    assert all(len(s.read_text().splitlines()) > 0 for s in segments)

    # The run's limits are split between the two workers, so together they stay under them.
    from distributed import Client

    with Client(dask_cluster, timeout=30) as client:
        limits = client.run(
            lambda: [(r.lanes[0].ctx.scheduler.rpm, r.lanes[0].ctx.scheduler.tpm) for r in _built_runtimes()]
        )
    assert sorted(v for per_worker in limits.values() for v in per_worker) == [(300_000, 25_000_000)] * 2


def _built_runtimes() -> list:  # type: ignore[type-arg]
    from llm_enrich.flows.run.workers import _BUILT

    return list(_BUILT.values())


def test_dask_local_runs_partitions_on_local_workers_under_the_flow_run(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    source = tmp_path / "in.parquet"
    pl.DataFrame({"id": range(30), "topic": [f"local dask {i}" for i in range(30)]}).write_parquet(source)
    job = EnrichJob(
        input_path=str(source), output_path=str(tmp_path / "out.parquet"), base_url=fake_llm.base_url,
        prompt="Explain {topic}", partition_rows=10, dask_local=2,
    )  # fmt: skip
    state = enrich_table(job, return_state=True)
    assert state.is_completed(), state.message
    assert pl.read_parquet(tmp_path / "out.parquet")["explanation"].null_count() == 0
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    # Each slice is a task run of this flow run, whichever worker process ran it.
    # Each slice is named by the input rows it holds.
    enriched = sorted((r.name, r.state_name) for r in runs if r.name.startswith("enrich rows"))
    assert enriched == [(f"enrich rows {a}-{a + 9}", "Completed") for a in (1, 11, 21)]


def test_a_prompt_repeated_across_workers_is_paid_once(
    dask_cluster: str, fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    topics = [f"shared topic {i % 5}" for i in range(60)]  # every slice holds every prompt
    source = tmp_path / "in.parquet"
    pl.DataFrame({"id": range(60), "topic": topics}).write_parquet(source)
    base = {"input_path": str(source), "base_url": fake_llm.base_url, "prompt": "Explain {topic}", "partition_rows": 6}
    local = enrich_table(EnrichJob(**base, output_path=str(tmp_path / "local" / "out.parquet")))
    fake_llm.reset()
    spread = enrich_table(
        EnrichJob(**base, output_path=str(tmp_path / "dask" / "out.parquet"), dask_address=dask_cluster)
    )
    assert fake_llm.stats.requests == spread["requests"] == 5
    assert spread["rows_deduplicated"] == local["rows_deduplicated"] == 55
    assert_frame_equal(
        pl.read_parquet(tmp_path / "dask" / "out.parquet"), pl.read_parquet(tmp_path / "local" / "out.parquet")
    )
