"""Where partition tasks run when a job scales out: an existing Dask cluster or a local one.

A local cluster's processes end with the run (success, failure or a stop signal): the cluster is
closed within ``CLOSE_SECONDS``, any worker process still there is terminated, then killed, and the
multiprocessing resource tracker the cluster made this process start is stopped and waited for.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import TYPE_CHECKING, Any

from llm_enrich.flows.job import ScaleFields

if TYPE_CHECKING:
    import psutil
    from prefect_dask.task_runners import DaskTaskRunner

__all__ = [
    "CLOSE_SECONDS",
    "KILL_SECONDS",
    "count_workers",
    "dask_runner",
    "end_processes",
    "stop_resource_tracker",
    "workers_report_here",
]

CLOSE_SECONDS = 30.0
"""How long a local Dask cluster may take to close before its worker processes are killed."""
KILL_SECONDS = 5.0
"""How long a straggling process gets after SIGTERM, and again after SIGKILL."""

# How multiprocessing's spawn start method marks the processes it starts (the Dask workers).
_SPAWNED = ("multiprocessing.spawn", "--multiprocessing-fork")


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


@contextmanager
def dask_runner(job: ScaleFields) -> Iterator[DaskTaskRunner]:
    """A started prefect-dask runner on the job's dask_address, or on a local cluster of dask_local workers."""
    from prefect_dask.task_runners import DaskTaskRunner

    if job.dask_address:
        with DaskTaskRunner(address=job.dask_address) as runner:
            yield runner
        return
    # One thread per worker process: each worker runs one partition at a time with its own
    # event loop and scheduler (the run's --rpm/--tpm are split between workers, see README).
    cluster = {
        "n_workers": job.dask_local, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }  # fmt: skip
    with _ending_local_processes() as spawned:
        runner = spawned.runner = DaskTaskRunner(cluster_kwargs=cluster)
        runner.__enter__()  # type: ignore[no-untyped-call]  # the cluster itself starts on the first submit
        try:
            yield runner
        finally:
            _close_bounded(runner, CLOSE_SECONDS)


class _Spawned:
    """The worker processes a local cluster starts: found when needed, as this process's new spawned children."""

    def __init__(self, before: set[int], *, tracker_was_running: bool) -> None:
        self.before = before  # PIDs taken only when they are to be ended, so none can have been reused
        self.tracker_was_running = tracker_was_running
        self.runner: DaskTaskRunner | None = None

    def end(self, *, grace: float = KILL_SECONDS) -> None:
        """End them (SIGTERM, then SIGKILL after ``grace`` s), then the resource tracker if they made us start it."""
        end_processes(_spawned_children(self.before), grace=grace)
        if not self.tracker_was_running:
            stop_resource_tracker(timeout=max(grace, 0.5))

    def kill_now(self) -> None:
        """SIGKILL them and the tracker at once, with no nanny left to start new workers meanwhile."""
        from distributed.core import Status

        cluster = getattr(self.runner, "_cluster", None)
        for nanny in list(getattr(cluster, "workers", {}).values()):
            nanny.status = Status.closing  # a nanny restarts a worker that dies unless it is closing
        for pid in _spawned_children(self.before):
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not self.tracker_was_running:
            stop_resource_tracker(timeout=1.0, for_good=True)  # it releases the semaphores the workers leaked


@contextmanager
def _ending_local_processes() -> Iterator[_Spawned]:
    """Whatever the block spawns through multiprocessing ends when the block is left, or at a second signal."""
    from multiprocessing import resource_tracker

    running = getattr(resource_tracker._resource_tracker, "_fd", None) is not None
    spawned = _Spawned(_children(), tracker_was_running=running)
    try:
        with _second_signal_ends(spawned):
            yield spawned
    finally:
        spawned.end()


@contextmanager
def _second_signal_ends(spawned: _Spawned) -> Iterator[None]:
    """While a run's stop handlers are installed, a second signal first ends the cluster's processes.

    flows.stopping exits at once (os._exit) on a second SIGINT/SIGTERM; the workers would follow only
    when they notice, and the resource tracker after them, both outliving the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    from llm_enrich.flows.run.stopping import run_signalled

    def chained(previous: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], Any]:
        def handle(number: int, frame: FrameType | None) -> Any:
            if run_signalled():  # the second one: the run's handler exits at once
                spawned.kill_now()
            return previous(number, frame)

        return handle

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    installed = {n: signal.signal(n, chained(h)) for n, h in previous.items() if callable(h)}
    try:
        yield
    finally:
        for number in installed:
            signal.signal(number, previous[number])


def _children() -> set[int]:
    import psutil

    with suppress(psutil.Error):
        return {p.pid for p in psutil.Process().children(recursive=True)}
    return set()


def _spawned_children(before: set[int]) -> set[int]:
    """New descendants of this process started by multiprocessing, with their own descendants."""
    import psutil

    found: set[int] = set()
    with suppress(psutil.Error):
        for child in psutil.Process().children(recursive=False):
            if child.pid in before:
                continue
            with suppress(psutil.Error):
                if any(mark in part for part in child.cmdline() for mark in _SPAWNED):
                    found.add(child.pid)
                    found.update(p.pid for p in child.children(recursive=True))
    return found


def _close_bounded(runner: DaskTaskRunner, timeout: float) -> None:
    """Close the runner (client, then cluster) in a thread, waiting at most ``timeout`` s for it."""

    def close() -> None:
        with suppress(Exception):  # a failed close leaves processes behind: they are killed next
            runner.__exit__(None, None, None)

    closing = threading.Thread(target=close, name="close-dask-cluster", daemon=True)
    closing.start()
    closing.join(timeout)


def end_processes(pids: set[int], *, grace: float = KILL_SECONDS) -> list[int]:
    """SIGTERM these processes, SIGKILL those still there after ``grace`` s; the PIDs that would not end."""
    import psutil

    procs: list[psutil.Process] = []
    for pid in pids:
        with suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    alive = [p for p in procs if _running(p)]
    for step in ("terminate", "kill"):
        for proc in alive:
            with suppress(psutil.Error):
                getattr(proc, step)()
        # wait_procs reaps our own children, so none is left a zombie
        alive = [p for p in psutil.wait_procs(alive, timeout=grace)[1] if _running(p)]
        if not alive:
            break
    return [p.pid for p in alive]


def _running(proc: psutil.Process) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def stop_resource_tracker(*, timeout: float = KILL_SECONDS, for_good: bool = False) -> None:
    """Stop this process's multiprocessing resource tracker and wait (bounded) until it has exited.

    The tracker exits once every copy of its pipe is closed; left alone it would do so only after
    this process has exited, outliving the run. Multiprocessing starts a new one if needed again,
    unless ``for_good`` (this process is about to exit): then what it would be told goes to /dev/null.
    """
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    with tracker._lock:  # type: ignore[attr-defined]
        fd, pid = getattr(tracker, "_fd", None), getattr(tracker, "_pid", None)
        if fd is None:
            return
        with suppress(OSError):
            os.close(fd)  # end of file on its pipe: it releases what leaked and exits
        # A finalizer that unregisters a semaphore would otherwise start a new tracker on its way out.
        tracker._fd, tracker._pid = (os.open(os.devnull, os.O_WRONLY) if for_good else None), None  # type: ignore[attr-defined]
    if pid is not None:
        _reap(pid, timeout)


def _reap(pid: int, timeout: float) -> None:
    """Wait for a child to exit, SIGKILL it after ``timeout`` s (it ignores SIGINT and SIGTERM)."""
    deadline = time.monotonic() + timeout
    while True:  # bounded: past the deadline the child is SIGKILLed and reaped
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not ours to wait for, or already reaped
        if done:
            return
        if time.monotonic() >= deadline:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)  # SIGKILL cannot be ignored: this returns at once
            return
        time.sleep(0.02)


def count_workers(job: ScaleFields) -> int:
    """How many worker processes share the run's rate limits."""
    if not job.dask_address:
        return max(1, job.dask_local)
    from distributed import Client

    with Client(job.dask_address, timeout=30) as client:  # type: ignore[no-untyped-call]
        return max(1, len(client.scheduler_info()["workers"]))
