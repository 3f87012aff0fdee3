"""A real `prefect server start` on a free 127.0.0.1 port with its own PREFECT_HOME."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from llm_enrich.flows.children import stop_process_group

__all__ = ["DEPLOYMENT", "api", "free_port", "running_prefect_server", "stop_process_group", "trigger", "wait_for"]

DEPLOYMENT = "enrich-table/nightly"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition, *, timeout: float, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll until condition() is truthy and return its value; fail after the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def running_prefect_server(home: Path) -> Iterator[str]:
    """Start the server, wait until healthy, yield its API URL, always stop it."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    log = open(home / "server.log", "wb")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: process.poll() is not None or _healthy(api_url), timeout=180, what="prefect server")
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        yield api_url
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


def read_deployment(client: Any) -> Any:
    try:
        return client.read_deployment_by_name(DEPLOYMENT)
    except Exception:  # noqa: BLE001 - not registered yet
        return None


def trigger(url: str, job: dict[str, Any]) -> Any:
    """Start a custom run the way the UI does, and wait for it to finish."""
    with temporary_settings(updates={PREFECT_API_URL: url}):
        return run_deployment(DEPLOYMENT, parameters={"job": job}, timeout=300, poll_interval=1)
