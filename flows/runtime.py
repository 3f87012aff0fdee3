"""The per-run machinery shared by partition tasks: one event loop, one model, one gate."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from langchain_core.language_models import BaseChatModel

from transforms.calls import CallStats
from transforms.enrichment import EnrichSpec

__all__ = ["EventLoopThread", "Runtime", "lookup_runtime", "register_runtime"]

T = TypeVar("T")


class EventLoopThread:
    """An asyncio loop in a daemon thread, so sync partition tasks share one set of connections."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="enrich-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop and wait for its result from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Cancel what is left, stop the loop and join the thread."""

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.loop.close()


@dataclass
class Runtime:
    """Everything a partition task needs that cannot be a Prefect parameter."""

    spec: EnrichSpec
    model: BaseChatModel
    loop: EventLoopThread
    gate: asyncio.Semaphore
    stats: CallStats = field(default_factory=CallStats)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


_RUNTIMES: dict[str, Runtime] = {}
_LOCK = threading.Lock()


def register_runtime(runtime: Runtime) -> str:
    """Make a runtime findable by key from task threads; returns the key."""
    with _LOCK:
        _RUNTIMES[runtime.key] = runtime
    return runtime.key


def lookup_runtime(key: str) -> Runtime:
    """The runtime a partition task runs with."""
    with _LOCK:
        return _RUNTIMES[key]


def forget_runtime(key: str) -> None:
    """Drop a finished run's runtime."""
    with _LOCK:
        _RUNTIMES.pop(key, None)
