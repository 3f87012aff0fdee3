"""Shared fixtures: a clean environment, the fake OpenAI server, and a Prefect test backend."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from hypothesis import settings

from tests.fakes.openai_server import Behaviour, FakeOpenAIServer
from tests.prefect_server import api, read_deployment, running_prefect_server, stop_process_group, wait_for

# Property tests check what holds, not how fast: hypothesis' per-example deadline would make them
# timed tests that fail when other work shares the two cores. Derandomized: CI runs the same examples each time.
settings.register_profile("suite", deadline=None, derandomize=True, database=None)
settings.load_profile("suite")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"

# Variables that would send a test to a real provider or change how Prefect behaves.
_SCRUBBED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_ORG_ID", "PREFECT_API_URL")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Expose each phase's report on the test item (the browser test screenshots on failure)."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep os.environ free of credentials and endpoints for every test."""
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_llm() -> Iterator[FakeOpenAIServer]:
    """A fresh fake OpenAI-compatible server on 127.0.0.1."""
    with FakeOpenAIServer(Behaviour()) as server:
        yield server


@pytest.fixture(scope="session")
def prefect_backend() -> Iterator[str]:
    """A temporary Prefect server for the whole session; yields its API URL."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def topics_csv(tmp_path: Path) -> Path:
    """A small valid topics table with an extra column."""
    path = tmp_path / "topics.csv"
    pl.DataFrame(
        {
            "id": [3, 1, 2, 10, 7],
            "topic": ["인공지능", "머신러닝", "딥러닝", "Black holes", "Photosynthesis"],
            "note": ["a", None, "c", "d", "e"],
        }
    ).write_csv(path)
    return path


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as api_url:
        yield api_url


@pytest.fixture(scope="session")
def served_llm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="session")
def served(
    prefect_server: str, served_llm: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
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
        "OPENAI_BASE_URL": served_llm.base_url,
    }
    log = open(workdir / "serve.log", "wb")
    command = [sys.executable, "-m", "llm_enrich.flows.cli", "serve", "--config", str(config), "--cron", ""]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with api(prefect_server) as client:
            wait_for(lambda: read_deployment(client), timeout=120, what="the served deployment")
        yield workdir
    finally:
        stop_process_group(process)
        log.close()
