"""Prefect operations against a real `prefect server`: serve, trigger like the UI, artifacts, limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort

from llm_enrich.flows.children import stop_process_group
from llm_enrich.flows.deployment import deployment_parameters
from llm_enrich.flows.job import EnrichJob
from llm_enrich.schemas.errors import ConfigError
from tests.conftest import DATA, REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer
from tests.prefect_server import DEPLOYMENT, api, trigger, wait_for


def test_the_deployment_offers_the_job_as_a_form(prefect_server: str, served: Path) -> None:
    with api(prefect_server) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    schema = deployment.parameter_openapi_schema
    fields = schema["definitions"]["EnrichJob"]["properties"]
    assert {"input_path", "prompt", "output_column", "max_concurrency", "rpm", "api_key_secret"} <= set(fields)
    assert all(field.get("description") for field in fields.values())
    assert fields["max_concurrency"]["minimum"] == 1 and fields["max_concurrency"]["maximum"] == 512
    # What a normal run needs comes first; every label is for people, with the bounds in sight.
    assert list(fields)[:6] == ["input_path", "output_path", "prompt", "output_column", "input_schema", "model"]
    assert fields["rpm"]["title"] == "Provider limits: Requests per minute (RPM)"
    assert all("_" not in field["title"] for field in fields.values())
    assert fields["max_concurrency"]["description"].endswith("Allowed: 1 to 512.")
    # No field takes an API key (prompt_cache_key is a routing hint for the provider's prompt cache).
    keyed = {name for name in fields if "key" in name and "secret" not in name and "env" not in name}
    assert keyed == {"prompt_cache_key"}
    assert deployment.parameters["job"]["input_path"] == str(DATA / "topics.csv")
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1


def test_a_custom_run_completes_and_publishes_its_report(
    prefect_server: str, served: Path, served_llm: FakeOpenAIServer
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
    assert {"enrich-summary", "enrich-sample", "enrich-progress", "enrich-output"} <= set(by_key)
    assert "rows ok / failed | 30 / 0" in by_key["enrich-summary"].data
    assert by_key["enrich-progress"].data == 100.0
    assert by_key["enrich-progress"].description == "30 of 30 rows answered or failed"
    assert f"file://{out}" in by_key["enrich-output"].data
    # The sample is for reading: no 64-hex key, no token counts.
    assert "enrich_key" not in by_key["enrich-sample"].data and "tokens" not in by_key["enrich-sample"].data
    with api(prefect_server) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    names = {task.name for task in tasks}
    assert {"enrich rows 1-7", "enrich rows 8-14", "enrich rows 29-30"} <= names, names


def test_bad_input_fails_the_run_with_the_message_and_writes_nothing(prefect_server: str, served: Path) -> None:
    out = served / "never.parquet"
    run = trigger(prefect_server, {"input_path": str(DATA / "topics_bad.csv"), "output_path": str(out)})
    assert run.state.is_failed()
    assert "7 of 9 rows fail the input schema" in run.state.message
    assert not out.exists()


def test_a_user_table_runs_from_the_form_with_the_defaults(
    prefect_server: str, served: Path, served_llm: FakeOpenAIServer
) -> None:
    descriptions = ["two red mugs", "a blue teapot", "six spoons"]
    source, out = served / "orders.csv", served / "orders.parquet"
    pl.DataFrame({"order_id": [7, 8, 9], "description": descriptions}).write_csv(source)
    # Only what a user fills in on the form; input_schema keeps its default.
    job = {"input_path": str(source), "output_path": str(out), "prompt": "Summarize {description}"}
    run = trigger(prefect_server, job)
    assert run.state.is_completed(), run.state.message
    answers = pl.read_parquet(out)["explanation"].to_list()
    assert answers == [expected_answer(f"Summarize {d}") for d in descriptions]

    def run_logs() -> list[str] | None:
        with api(prefect_server) as client:
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), sort=LogSort.TIMESTAMP_ASC
            )
        found = [log.message for log in logs]
        return found if any(m.startswith("wrote ") for m in found) else None

    # The served process ships its logs in the background: wait until the last one is in.
    logs = wait_for(run_logs, timeout=60, what="the run's logs")
    ours = [m for m in logs if m.startswith(("input schema:", "loaded "))]
    assert ours[0].startswith("input schema: 'template' (the template's columns description, present and non-null)")
    assert "input_schema 'auto'" in ours[0] and ours[1].startswith("loaded 3 rows")


def test_a_prefect_rate_limit_is_taken_per_request(
    prefect_server: str, served: Path, served_llm: FakeOpenAIServer
) -> None:
    with api(prefect_server) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name="llm-requests", limit=20, slot_decay_per_second=20.0)
        )
    served_llm.reset()
    out = served / "limited.parquet"
    base = {"input_path": str(DATA / "topics.csv"), "output_path": str(out), "cache": False}
    run = trigger(prefect_server, {**base, "prefect_rate_limit": "llm-requests"})
    assert run.state.is_completed(), run.state.message
    assert served_llm.stats.requests == 30 and pl.read_parquet(out).height == 30

    missing = trigger(prefect_server, {**base, "output_path": str(served / "x.parquet"), "prefect_rate_limit": "nope"})
    assert missing.state.is_failed() and "prefect gcl create nope" in missing.state.message


def test_enrich_deploy_registers_a_work_pool_deployment(prefect_server: str, tmp_path: Path) -> None:
    with api(prefect_server) as client:
        client.create_work_pool(WorkPoolCreate(name="test-process", type="process"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp_path / "home"),
    }
    command = [
        sys.executable,
        "-m",
        "llm_enrich.flows.cli",
        "deploy",
        "--pool",
        "test-process",
        "--name",
        "pooled",
        "--cron",
        "",
        "--on-overlap",
        "cancel-new",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "prefect worker start --pool test-process" in " ".join(result.stdout.split())
    with api(prefect_server) as client:
        deployment = client.read_deployment_by_name("enrich-table/pooled")
    assert deployment.work_pool_name == "test-process"
    assert deployment.entrypoint == "flows/pipeline.py:enrich_table"
    assert deployment.parameters["job"]["input_path"] == "data/topics.csv"
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
    # The deployment says what it runs and where its key comes from.
    assert "data/topics.csv" in deployment.description and "OPENAI_API_KEY" in deployment.description


def test_a_process_worker_runs_the_pool_deployment(
    prefect_server: str, served_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    with api(prefect_server) as client:
        client.create_work_pool(WorkPoolCreate(name="worker-process", type="process"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))},
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    command = [
        sys.executable,
        "-m",
        "llm_enrich.flows.cli",
        "deploy",
        "--pool",
        "worker-process",
        "--name",
        "on-pool",
        "--cron",
        "",
    ]
    subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=True)
    out = tmp_path / "pooled.parquet"
    job = {"input_path": str(DATA / "topics.csv"), "output_path": str(out), "base_url": served_llm.base_url}
    with api(prefect_server) as client:
        deployment = client.read_deployment_by_name("enrich-table/on-pool")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"job": job})
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "worker-process", "--type", "process"],
        cwd=tmp_path, env=env, stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:

        def finished() -> bool:
            with api(prefect_server) as client:
                return client.read_flow_run(run.id).state.is_final()

        wait_for(finished, timeout=300, interval=1, what="the work-pool flow run")
    finally:
        stop_process_group(worker)
    with api(prefect_server) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), (state.message, (tmp_path / "worker.log").read_text()[-3000:])
    frame = pl.read_parquet(out)
    assert frame.height == 30
    assert frame["explanation"][0] == expected_answer("Explain this topic in two sentences: 인공지능")


def test_storage_settings_are_stored_in_clear_and_credentials_are_refused() -> None:
    job = EnrichJob(output_path="o.parquet", storage_options={"aws_region": "eu-west-1"})
    assert deployment_parameters(job)["job"]["storage_options"] == {"aws_region": "eu-west-1"}
    with_key = EnrichJob(output_path="o.parquet", storage_options={"aws_secret_access_key": "s3cr3t-value"})
    with pytest.raises(ConfigError, match="worker's environment") as caught:
        deployment_parameters(with_key)
    assert "s3cr3t-value" not in str(caught.value)


def test_a_cancel_from_the_ui_ends_the_run_cancelled_and_writes_nothing(
    prefect_server: str, served: Path, served_llm: FakeOpenAIServer
) -> None:
    import time

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    source, out = served / "many.csv", served / "cancelled" / "out.parquet"
    pl.DataFrame({"id": list(range(150)), "topic": [f"cancel me {i}" for i in range(150)]}).write_csv(source)
    served_llm.reset()
    served_llm.behaviour.latency = 0.3
    try:
        job = {"input_path": str(source), "output_path": str(out), "max_concurrency": 2, "partition_rows": 50}
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            run = run_deployment(DEPLOYMENT, parameters={"job": job}, timeout=0)
        wait_for(lambda: served_llm.stats.completions >= 5, timeout=120, what="the run to start answering")
        with api(prefect_server) as client:
            client.set_flow_run_state(run.id, Cancelling(), force=True)
            began = time.monotonic()
            final = wait_for(
                lambda: (s := client.read_flow_run(run.id).state) is not None and s.is_final() and s,
                timeout=90, what="the run to end",
            )  # fmt: skip
        assert final.is_cancelled(), final
        assert time.monotonic() - began < 60
        assert served_llm.stats.completions < 150
        assert not out.exists()
        assert [p.name for p in out.parent.iterdir() if p.name != ".enrich-cache"] == []
    finally:
        served_llm.behaviour.latency = 0.0
