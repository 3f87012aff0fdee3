"""The child processes a run starts (the local model, a temporary Prefect server), and how they end.

Each child runs in its own session, so stopping it stops its whole process group; every wait on
one has a deadline. ``exit_now`` is the last resort of a second Ctrl-C: kill them, leave at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_enrich.schemas.errors import EnrichError

__all__ = [
    "exit_now",
    "forget_child",
    "free_port",
    "remember_child",
    "run_child",
    "stop_process_group",
    "wait_healthy",
]

_CHILDREN: set[subprocess.Popen[bytes]] = set()


def remember_child(process: subprocess.Popen[bytes]) -> None:
    """A child process (own session) to kill if the user insists on exiting at once."""
    _CHILDREN.add(process)


def forget_child(process: subprocess.Popen[bytes]) -> None:
    """The child has been stopped the normal way."""
    _CHILDREN.discard(process)


def exit_now(code: int) -> None:
    """Kill the child processes this run started, then exit without waiting for anything else.

    For when waiting is what would hang: Prefect's background workers retry an API that is gone
    for minutes at interpreter exit.
    """
    for process in list(_CHILDREN):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def wait_healthy(
    process: subprocess.Popen[bytes], url: str, *, timeout: float, log: Path, error: type[EnrichError], what: str
) -> None:
    """Poll ``url`` until it answers 200; raise ``error`` if the child exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
            raise error(f"{what} exited with code {process.returncode} while starting: {tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise error(f"{what} did not become healthy within {timeout:.0f} s.")


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM a child started in its own session, SIGKILL it after ``grace`` s; never wait unbounded."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass  # a zombie the kernel will reap with us; nothing is left running


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a child server to listen on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def run_child(
    command: list[str], *, health_url: str, timeout: float, error: type[EnrichError], what: str, log_prefix: str,
    env: dict[str, str] | None = None, grace: float = 10.0, while_starting: Callable[[], object] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """Start a server in its own session, wait until ``health_url`` answers, and always stop it and its log.

    ``while_starting`` runs here between the start and the wait: work that overlaps the child's start-up.
    """
    log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    remember_child(process)
    try:
        if while_starting is not None:
            while_starting()
        wait_healthy(process, health_url, timeout=timeout, log=Path(log.name), error=error, what=what)
        yield process
    finally:
        stop_process_group(process, grace=grace)
        forget_child(process)
        log.close()
        Path(log.name).unlink(missing_ok=True)
