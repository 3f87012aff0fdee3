"""Stopping a run on request: Ctrl-C, SIGTERM (a Prefect cancel, systemd, Docker) or a fatal failure.

The first signal sets the run's ``StopSignal``: nothing more is sent, replies already in flight
get ``GRACE_SECONDS`` to land (they go to the cache), then everything still waiting on the run's
event loop is cancelled, the partition tasks end, staging is removed and the flow returns a
Cancelled state with one line saying what was kept. A second signal exits at once, after
stopping the child processes this run started (they would otherwise outlive it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from llm_enrich.flows.children import exit_now
from llm_enrich.schemas.errors import RunInterrupted
from llm_enrich.transforms.guards import StopSignal
from llm_enrich.transforms.outcome import CallStats

if TYPE_CHECKING:
    from llm_enrich.flows.plan.lanes import OutputRun
    from llm_enrich.flows.run.runtime import EventLoopThread

__all__ = [
    "GRACE_SECONDS",
    "describe_interruption",
    "drain_on_stop",
    "exit_now",
    "interrupt_on_signals",
    "received_signal",
    "run_signalled",
    "stop_on_signals",
]

GRACE_SECONDS = 5.0
"""How long replies already in flight may still land after a stop (bounded; then they are cancelled)."""

_received: list[int] = []
_unheeded: list[int] = []  # start-up signals whose KeyboardInterrupt may have been swallowed on the way
_signalled: list[list[int]] = []  # the signals of each run in progress in this process


def received_signal() -> int | None:
    """The first stop signal this process received (during a run, or while the command started), if any."""
    return _received[0] if _received else None


def interrupt_on_signals() -> None:
    """Outside a run (the command's start-up), SIGINT and SIGTERM end the process, so cleanup still runs.

    Each is noted first: an interrupt raised inside a library that swallows or wraps it (pydantic turns it
    into a serialization error, Prefect stores an unserializable parameter as a placeholder) is still seen,
    by the command's error handling and by the run, which then stops before its first request.
    """

    def handle(number: int, frame: FrameType | None) -> None:
        _received.append(number)
        _unheeded.append(number)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, handle)


@contextmanager
def stop_on_signals(stop: StopSignal) -> Iterator[None]:
    """While the block runs, SIGINT/SIGTERM stop the run gracefully; a second one exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    seen: list[int] = []  # this run's own: a notebook's earlier Ctrl-C must not make the next one fatal

    def handle(number: int, frame: FrameType | None) -> None:
        if seen:
            _exit_now(number)
        seen.append(number)
        _received.append(number)
        stop.set(f"interrupted by {signal.Signals(number).name}", signal_number=number)

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    _signalled.append(seen)
    if _unheeded:  # a start-up signal some library swallowed: the run stops before it sends anything
        handle(_unheeded[0], None)
        _unheeded.clear()
    try:
        yield
    finally:
        _signalled.remove(seen)
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_signalled() -> bool:
    """Whether the run in progress was already asked to stop by a signal (the next one exits at once)."""
    return any(_signalled)


def drain_on_stop(
    stop: StopSignal, loop: EventLoopThread, stats: list[CallStats], grace: float = GRACE_SECONDS
) -> None:
    """Once ``stop`` is set, let in-flight replies land for up to ``grace`` s, then cancel the loop's tasks."""

    async def drain() -> None:
        deadline = loop.loop.time() + grace
        while any(s.in_flight for s in stats) and loop.loop.time() < deadline:
            await asyncio.sleep(0.05)
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()

    def schedule() -> None:
        if loop.loop.is_closed():
            return
        try:
            loop.loop.call_soon_threadsafe(lambda: loop.loop.create_task(drain()))
        except RuntimeError:
            pass  # the loop closed meanwhile: nothing left to drain

    stop.on_set(schedule)


def _exit_now(number: int) -> None:
    """The second signal: stop our child processes and leave without any cleanup that could block."""
    os.write(2, b"\nstopped at once (second signal); a rerun of the same command finishes the job.\n")
    exit_now(128 + number)


def describe_interruption(err: RunInterrupted, runs: list[OutputRun], *, cached: bool) -> str:
    """One line: what was answered before the stop, where it is kept, and how to finish."""
    answered = sum(run.ctx.stats.answered for run in runs)
    asked = sum(run.tally.unique_todo for run in runs)
    kept = "kept in the cache" if cached else "not kept (`cache` = false)"
    if not asked and not answered:  # stopped before the survey counted anything to ask
        return f"{err.message} before the run sent anything; nothing was written. Rerun the same command."
    return (
        f"{err.message}: {answered:,} of {asked:,} prompts to ask were answered and are {kept}; the output was not "
        "written (a previous one is untouched). Rerun the same command to finish"
        + (" without paying for them again." if cached else ".")
    )
