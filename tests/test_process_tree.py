"""Nothing outlives the run: the real CLI's process tree, listed while it runs, is gone when it exits."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context, resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path

import polars as pl
import psutil
import pytest

from llm_enrich.flows.run.scaling import _ending_local_processes
from tests.conftest import REPO
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer

ROWS = 60
RUN_SECONDS = 240  # the longest one run may take here before the test gives up on it


@dataclass
class Watched:
    """A finished CLI run: its exit code, output, every process seen in its tree, and those that outlived it."""

    returncode: int
    output: str
    tree: dict[int, psutil.Process] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    outlived: list[str] = field(default_factory=list)
    signalled: list[float] = field(default_factory=list)  # when each SIGTERM was sent (time.time())

    def alive(self) -> list[str]:
        """The processes of the tree that still run (psutil checks that a pid was not reused)."""
        return [f"{pid} {self.names[pid]}" for pid, proc in self.tree.items() if _running(proc)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _environment(tmp_path: Path, prefect_api: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def run_watched(
    tmp_path: Path,
    base_url: str,
    *extra: str,
    prefect_api: str | None,
    stop_when: Callable[[], bool] | None = None,
    signals: int = 1,
) -> Watched:
    """Run `enrich run` in its own session, list its tree every 50 ms; once stop_when() holds, SIGTERM it
    ``signals`` times, 0.3 s apart.

    What still runs at the instant the CLI exits outlived it: the exit is seen through a pidfd before the
    CLI is reaped, so even a process that would end a few milliseconds later is caught.
    """
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": range(ROWS), "topic": [f"tree topic {i}" for i in range(ROWS)]}).write_csv(source)
    command = [
        sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "--output", str(tmp_path / "out.parquet"),
        "--base-url", base_url, "--partition-rows", "20", "--retry-base-delay", "0.05", *extra,
    ]  # fmt: skip
    log = tmp_path / "cli.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=_environment(tmp_path, prefect_api), stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        watched = Watched(returncode=-1, output="")
        root = psutil.Process(process.pid)
        pidfd = os.pidfd_open(process.pid)
        exited = select.poll()
        exited.register(pidfd, select.POLLIN)  # readable once the CLI has exited
        deadline = time.monotonic() + RUN_SECONDS
        next_signal = 0.0
        signals = signals if stop_when is not None else 0
        try:
            while not exited.poll(50):
                assert time.monotonic() < deadline, f"the run took over {RUN_SECONDS} s"
                with contextlib.suppress(psutil.Error):
                    for child in root.children(recursive=True):
                        watched.tree.setdefault(child.pid, child)
                        with contextlib.suppress(psutil.Error):  # the latest: a fork shows its parent's until exec
                            if name := " ".join(child.cmdline())[:120]:  # a zombie's is empty
                                watched.names[child.pid] = name
                if signals and (stop_when is None or stop_when()) and time.monotonic() >= next_signal:
                    process.send_signal(signal.SIGTERM)
                    watched.signalled.append(time.time())
                    stop_when, signals, next_signal = None, signals - 1, time.monotonic() + 0.3
            for pid in watched.tree:
                watched.names.setdefault(pid, "?")
            watched.outlived = watched.alive()  # the CLI is not even reaped yet
            watched.returncode = process.wait(timeout=30)
            watched.output = log.read_text(errors="replace")
            return watched
        finally:
            os.close(pidfd)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            for proc in watched.tree.values():  # never leak into the other tests, whatever failed
                if _running(proc):
                    with contextlib.suppress(psutil.Error):
                        proc.kill()


def _tail(watched: Watched) -> str:
    return "\n".join(watched.output.strip().splitlines()[-15:])


def _created(watched: Watched, pid: int) -> float:
    """When a process of the tree started (time.time()), cached by psutil when the process was first seen."""
    try:
        return watched.tree[pid].create_time()
    except psutil.Error:
        return 0.0


def _dask_processes(watched: Watched) -> list[str]:
    return [name for name in watched.names.values() if "multiprocessing" in name]


@pytest.fixture
def fake_llm() -> Iterator[FakeOpenAIServer]:
    """The fake OpenAI server, slow enough that a run can be stopped half-way."""
    with FakeOpenAIServer(Behaviour(latency=0.1)) as server:
        yield server


def test_a_dask_local_run_ends_its_workers_and_the_resource_tracker(
    fake_llm: FakeOpenAIServer, prefect_backend: str, tmp_path: Path
) -> None:
    watched = run_watched(tmp_path, fake_llm.base_url, "--dask-local", "2", prefect_api=prefect_backend)
    assert watched.returncode == 0, _tail(watched)
    # The workers and the tracker were really there, as children of the CLI.
    assert any("resource_tracker" in name for name in _dask_processes(watched)), watched.names
    assert sum("spawn_main" in name for name in _dask_processes(watched)) >= 2, watched.names
    assert watched.outlived == [] and watched.alive() == []


def test_a_plain_run_with_its_own_prefect_server_leaves_nothing(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    watched = run_watched(tmp_path, fake_llm.base_url, prefect_api=None)  # a temporary Prefect server of its own
    assert watched.returncode == 0, _tail(watched)
    assert watched.outlived == [] and watched.alive() == []


def test_a_failed_dask_run_leaves_nothing(prefect_backend: str, tmp_path: Path) -> None:
    refused = "http://127.0.0.1:9/v1"  # the discard port: nothing listens, every connection is refused
    watched = run_watched(tmp_path, refused, "--dask-local", "2", "--max-retries", "0", prefect_api=prefect_backend)
    assert watched.returncode not in (0, None), _tail(watched)
    assert _dask_processes(watched), watched.names
    assert watched.outlived == [] and watched.alive() == []


def test_a_dask_run_stopped_by_sigterm_half_way_leaves_nothing(
    fake_llm: FakeOpenAIServer, prefect_backend: str, tmp_path: Path
) -> None:
    watched = run_watched(
        tmp_path, fake_llm.base_url, "--dask-local", "2", "--max-concurrency", "2", prefect_api=prefect_backend,
        stop_when=lambda: fake_llm.stats.completions >= 6,
    )  # fmt: skip
    assert watched.returncode == 128 + signal.SIGTERM, _tail(watched)
    assert "interrupted by SIGTERM" in watched.output
    assert watched.outlived == [] and watched.alive() == []


def test_a_second_sigterm_exits_at_once_and_still_leaves_nothing(
    fake_llm: FakeOpenAIServer, prefect_backend: str, tmp_path: Path
) -> None:
    watched = run_watched(
        tmp_path, fake_llm.base_url, "--dask-local", "2", "--max-concurrency", "2", prefect_api=prefect_backend,
        stop_when=lambda: fake_llm.stats.completions >= 6, signals=2,
    )  # fmt: skip
    assert watched.returncode == 128 + signal.SIGTERM, _tail(watched)
    assert "stopped at once (second signal)" in watched.output
    # No nanny started a new worker once the second signal asked for the old ones to be killed. (A worker
    # Dask restarted earlier, under load, is its own business; that it is gone too is checked below.)
    assert len(watched.signalled) == 2
    started_after = {
        pid: name
        for pid, name in watched.names.items()
        if "spawn_main" in name and _created(watched, pid) > watched.signalled[1]
    }
    assert started_after == {}, {
        pid: (name, _created(watched, pid) - watched.signalled[1]) for pid, name in watched.names.items()
    }
    assert watched.outlived == [] and watched.alive() == []


def _ignore_sigterm_and_wait(ready: Connection) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.send("ready")
    time.sleep(120)


def test_a_worker_that_ignores_sigterm_is_killed_and_the_tracker_this_block_started_is_stopped() -> None:
    tracker_before = resource_tracker._resource_tracker._pid
    started = time.monotonic()
    with _ending_local_processes():
        receive, send = get_context("spawn").Pipe(duplex=False)
        worker = get_context("spawn").Process(target=_ignore_sigterm_and_wait, args=(send,), daemon=True)
        worker.start()
        assert receive.poll(60), "the worker never started"
        tracker = resource_tracker._resource_tracker._pid
        assert tracker is not None
    assert time.monotonic() - started < 60
    assert not psutil.pid_exists(worker.pid) or psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE
    if tracker_before is None:  # only a tracker this block started is stopped, and it is waited for
        assert not psutil.pid_exists(tracker)
        assert resource_tracker._resource_tracker._pid is None
    else:
        assert resource_tracker._resource_tracker._pid == tracker_before
