"""The per-run machinery shared by partition tasks: one event loop, model, scheduler, memo."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine
from concurrent.futures import CancelledError
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import httpx2
import pandera.polars as pa
from langchain_core.language_models import BaseChatModel

from llm_enrich.flows.cache.files import AnswerStore
from llm_enrich.flows.job import EndpointFields
from llm_enrich.flows.llm.endpoint import Endpoint, ModelSettings, build_chat_model
from llm_enrich.transforms.calls import CallContext
from llm_enrich.transforms.enrichment import AnswerMemo, EnrichSpec

__all__ = [
    "EventLoopThread",
    "Lane",
    "Runtime",
    "build_lane",
    "close_client",
    "forget_runtime",
    "lookup_runtime",
    "register_runtime",
]

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


def build_lane(
    job: EndpointFields, spec: EnrichSpec, ctx: CallContext, endpoint: Endpoint, *, base_url: str | None,
    cache: AnswerStore | None,
) -> tuple[Lane, httpx2.AsyncClient]:  # fmt: skip
    """One output's model client and memo (answers go to the cache as they arrive); close the client."""
    settings = ModelSettings.of(
        job, endpoint, base_url=base_url, model=spec.identity.model, max_concurrency=spec.max_concurrency
    )
    model, http = build_chat_model(settings)
    if ctx.scheduler is not None:
        # The scheduler reads every response's x-ratelimit-* headers and why a 429 came.
        http.event_hooks["response"].append(ctx.scheduler.on_response)
    memo = AnswerMemo()
    if cache is not None:
        memo.on_answer = partial(cache.append, model=spec.identity.model)
    return Lane(spec, model, ctx, memo), http


@dataclass(frozen=True)
class Lane:
    """One output's way through a partition: its spec, model, call context and memo."""

    spec: EnrichSpec
    model: BaseChatModel
    ctx: CallContext
    memo: AnswerMemo


@dataclass
class Runtime:
    """Everything a partition task needs that cannot be a Prefect parameter."""

    lanes: list[Lane]
    loop: EventLoopThread
    secret: str | None = field(default=None, repr=False)  # redacted from error messages
    cache: AnswerStore | None = None
    schema: pa.DataFrameSchema | None = None  # the input schema, which each slice's output extends
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    answers_loaded: bool = False  # on a Dask worker: the memo holds the first phase's answers


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


def close_client(loop: EventLoopThread, http: httpx2.AsyncClient) -> None:
    """Close one lane's HTTP client on the run's loop (best effort: a stop's drain may cancel it)."""
    # A stopping run's drain cancels every task on the loop, this close included if it lands then;
    # the CancelledError must not replace the error that stopped the run.
    with suppress(CancelledError):
        loop.run(http.aclose())
