"""Shared fixtures: a clean environment, the fake OpenAI server, and a Prefect test backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tests.fakes.openai_server import Behaviour, FakeOpenAIServer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"

# Variables that would send a test to a real provider or change how Prefect behaves.
_SCRUBBED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_ORG_ID", "PREFECT_API_URL")


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
