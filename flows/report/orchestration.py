"""The Prefect API a run reports to: a temporary server of our own, bounded clients, best-effort records.

The data work must not depend on the orchestration API staying up:

* Without ``PREFECT_API_URL`` the CLI starts a temporary server itself, in its own session, so the
  terminal's Ctrl-C (sent to the whole foreground process group) reaches only the run, which then
  stops gracefully and can still record its final state. Prefect's own temporary server shares the
  group and dies first, leaving the run to retry a dead API.
* Every Prefect client call is bounded: a few retries and a request timeout (``bound_prefect_client``).
* Our own records (artifacts, progress) are best effort (``best_effort``): after the first failure they
  are skipped for the rest of the run with one warning, and the run goes on to write its output.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from llm_enrich.flows.children import free_port, run_child
from llm_enrich.schemas.errors import RuntimeFailure

__all__ = [
    "API_RETRIES",
    "API_TIMEOUT_SECONDS",
    "SERVER_STARTUP_SECONDS",
    "begin_records",
    "best_effort",
    "bound_prefect_client",
    "records_incomplete",
    "temporary_prefect_server",
]

API_RETRIES = 4
API_TIMEOUT_SECONDS = 30
SERVER_STARTUP_SECONDS = 90.0
_STOP_SECONDS = 5.0

T = TypeVar("T")
_log = logging.getLogger("llm_enrich.orchestration")
_lost: list[str] = []
_lost_lock = threading.Lock()


def bound_prefect_client() -> None:
    """Bounded Prefect client retries and request timeout, unless the operator chose their own."""
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(API_RETRIES))
    os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", str(API_TIMEOUT_SECONDS))
    # No network but the LLM endpoint and the Prefect API: Prefect's usage telemetry (server and SDK) is off
    # unless the operator turns it on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def best_effort(call: Callable[[], T], what: str) -> T | None:
    """Run a Prefect API call that only records; on failure note it once and go on."""
    with _lost_lock:
        if _lost:
            return None
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - a record we could not make must never fail the run
        with _lost_lock:
            first = not _lost
            _lost.append(f"{what}: {type(exc).__name__}: {exc}")
        if first:
            _log.warning(
                "the Prefect API did not take the %s (%s); the run goes on, but its records in Prefect are incomplete.",
                what,
                exc,
            )
        return None


def begin_records() -> None:
    """A new run: try the Prefect API for its records again."""
    with _lost_lock:
        _lost.clear()


def records_incomplete() -> str | None:
    """Why this process's Prefect records are incomplete, if they are."""
    with _lost_lock:
        return _lost[0] if _lost else None


@contextmanager
def temporary_prefect_server(
    home: Path | None = None, *, while_starting: Callable[[str], object] | None = None
) -> Iterator[str]:
    """A throwaway Prefect server on a free 127.0.0.1 port, in its own session; yields its API URL.

    ``while_starting(api_url)`` runs while the server starts (its imports take about 3.5 s): the CLI
    imports the flow meanwhile, on the other core, instead of after.
    """
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise RuntimeFailure("Prefect is not installed; run 'make run' to set up the environment.")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    with run_child(
        command, env=env, health_url=f"{api_url}/health", timeout=SERVER_STARTUP_SECONDS, error=RuntimeFailure,
        what="the temporary Prefect server (start one with `prefect server start` and set PREFECT_API_URL)",
        log_prefix="llm-enrich-prefect-", grace=_STOP_SECONDS,
        while_starting=None if while_starting is None else lambda: while_starting(api_url),
    ):  # fmt: skip
        try:
            yield api_url
        finally:
            _drain_prefect_workers()  # while the server is still up


def _drain_prefect_workers() -> None:
    """Send Prefect's buffered logs and events while the server is still up (bounded), not at exit after it."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=_STOP_SECONDS)
        except Exception:  # noqa: BLE001 - records are best effort; the run's outcome is already decided
            pass
