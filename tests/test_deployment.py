"""Prefect operations against a real `prefect server`: serve, trigger like the UI, artifacts, limits."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import DATA, REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer
from tests.prefect_server import running_prefect_server, stop_process_group, wait_for

DEPLOYMENT = "enrich-table/nightly"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as api_url:
        yield api_url


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="module")
def served(prefect_server: str, llm: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`enrich serve` running in its own process, serving the deployment with a sample job."""
    workdir = tmp_path_factory.mktemp("served")
    config = workdir / "job.toml"
    config.write_text(
        f'input_path = "{DATA / "topics.csv"}"\noutput_path = "{workdir / "default.parquet"}"\npartition_rows = 10\n'
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))},
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OPENAI_BASE_URL": llm.base_url,
    }
    log = open(workdir / "serve.log", "wb")
    command = [sys.executable, "-m", "flows.cli", "serve", "--config", str(config), "--cron", ""]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with api(prefect_server) as client:
            wait_for(lambda: _deployment(client), timeout=120, what="the served deployment")
        yield workdir
    finally:
        stop_process_group(process)
        log.close()


def api(url: str):  # type: ignore[no-untyped-def]
    """A sync Prefect client for the real server (context manager)."""

    class _Client:
        def __enter__(self):  # type: ignore[no-untyped-def]
            self._settings = temporary_settings(updates={PREFECT_API_URL: url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc: object) -> None:
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Client()


def _deployment(client: Any) -> Any:
    try:
        return client.read_deployment_by_name(DEPLOYMENT)
    except Exception:  # noqa: BLE001 - not registered yet
        return None


def trigger(url: str, job: dict[str, Any]) -> Any:
    """Start a custom run the way the UI does, and wait for it to finish."""
    with temporary_settings(updates={PREFECT_API_URL: url}):
        return run_deployment(DEPLOYMENT, parameters={"job": job}, timeout=300, poll_interval=1)


def test_the_deployment_offers_the_job_as_a_form(prefect_server: str, served: Path) -> None:
    with api(prefect_server) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    schema = deployment.parameter_openapi_schema
    fields = schema["definitions"]["EnrichJob"]["properties"]
    assert {"input_path", "prompt", "output_column", "max_concurrency", "rpm", "api_key_secret"} <= set(fields)
    assert all(field.get("description") for field in fields.values())
    assert fields["max_concurrency"]["minimum"] == 1 and fields["max_concurrency"]["maximum"] == 512
    assert not any("key" in name and "secret" not in name and "env" not in name for name in fields)
    assert deployment.parameters["job"]["input_path"] == str(DATA / "topics.csv")
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1


def test_a_custom_run_completes_and_publishes_its_report(
    prefect_server: str, served: Path, llm: FakeOpenAIServer
) -> None:
    out = served / "custom.parquet"
    job = {
        "input_path": str(DATA / "topics.csv"),
        "output_path": str(out),
        "output_column": "summary",
        "partition_rows": 7,
    }
    run = trigger(prefect_server, job)
    assert run.state.is_completed(), run.state.message
    frame = pl.read_parquet(out)
    assert "summary" in frame.columns
    assert frame["summary"][0] == expected_answer("Explain this topic in two sentences: 인공지능")
    with api(prefect_server) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert {"enrich-summary", "enrich-sample", "enrich-progress"} <= set(by_key)
    assert "rows ok / failed | 30 / 0" in by_key["enrich-summary"].data
    assert by_key["enrich-progress"].data == 100.0


def test_bad_input_fails_the_run_with_the_message_and_writes_nothing(prefect_server: str, served: Path) -> None:
    out = served / "never.parquet"
    run = trigger(prefect_server, {"input_path": str(DATA / "topics_bad.csv"), "output_path": str(out)})
    assert run.state.is_failed()
    assert "7 of 9 rows fail the input schema" in run.state.message
    assert not out.exists()


def test_a_prefect_rate_limit_is_taken_per_request(prefect_server: str, served: Path, llm: FakeOpenAIServer) -> None:
    with api(prefect_server) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name="llm-requests", limit=20, slot_decay_per_second=20.0)
        )
    llm.reset()
    out = served / "limited.parquet"
    base = {"input_path": str(DATA / "topics.csv"), "output_path": str(out), "cache": False}
    run = trigger(prefect_server, {**base, "prefect_rate_limit": "llm-requests"})
    assert run.state.is_completed(), run.state.message
    assert llm.stats.requests == 30 and pl.read_parquet(out).height == 30

    missing = trigger(prefect_server, {**base, "output_path": str(served / "x.parquet"), "prefect_rate_limit": "nope"})
    assert missing.state.is_failed() and "prefect gcl create nope" in missing.state.message
