"""The per-run machinery shared by partition tasks: one event loop, model, scheduler, memo."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import httpx
import pandera.polars as pa
from langchain_core.language_models import BaseChatModel

from llm_enrich.flows.cache import AnswerStore
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm import Endpoint, build_chat_model, classify_openai_error, redacting
from llm_enrich.schemas.errors import ConfigError
from llm_enrich.transforms.calls import CallContext, RetryPolicy
from llm_enrich.transforms.costs import DEFAULT_PRICES, Budget, Price, price_for
from llm_enrich.transforms.enrichment import AnswerMemo, EnrichSpec
from llm_enrich.transforms.guards import ErrorRate
from llm_enrich.transforms.scheduling import Scheduler

__all__ = [
    "EventLoopThread",
    "Lane",
    "Runtime",
    "build_context",
    "build_lane",
    "forget_runtime",
    "lookup_runtime",
    "register_runtime",
    "share_limits",
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


def resolve_price(job: EnrichJob, model_name: str, *, local: bool) -> Price | None:
    """The job's price override, else the shipped table; the bundled model is free."""
    if local:
        return Price(0.0, 0.0)
    listed = price_for(model_name, DEFAULT_PRICES)
    if job.input_price is None and job.output_price is None:
        return listed
    return Price(
        job.input_price if job.input_price is not None else (listed.input_per_million if listed else 0.0),
        job.output_price if job.output_price is not None else (listed.output_per_million if listed else 0.0),
    )


def build_context(
    job: EnrichJob, price: Price | None, *, max_concurrency: int, secret: str | None = None, shared_by: int = 1
) -> CallContext:
    """Retry policy, scheduler and budget for one run, from the job (``shared_by`` processes share the limits)."""
    return CallContext(
        policy=RetryPolicy(
            max_retries=job.max_retries,
            base_delay=job.retry_base_delay,
            attempt_timeout=job.timeout,
            classify=redacting(classify_openai_error, secret),
        ),
        scheduler=Scheduler(
            max_concurrency=max_concurrency,
            rpm=job.rpm,
            tpm=job.tpm,
            max_tokens=job.max_tokens,
            base_pause=max(job.retry_base_delay, 0.05),
            before_send=_prefect_rate_limit(job.prefect_rate_limit) if job.prefect_rate_limit else None,
            shared_by=shared_by,
        ),
        budget=Budget(job.max_cost) if job.max_cost is not None else None,
        on_truncated=job.on_truncated,
        errors=ErrorRate(limit=job.max_error_rate),
        price=price,
        max_tokens=job.max_tokens,
    )


def _prefect_rate_limit(name: str) -> Callable[[], Awaitable[None]]:
    """Take one slot of a Prefect global rate limit per request (strict: a missing limit fails)."""
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, rate_limit

    async def take() -> None:
        try:
            await rate_limit(name, occupy=1, strict=True)
        except ConcurrencySlotAcquisitionError as exc:
            raise ConfigError(
                f"the Prefect rate limit '{name}' (prefect_rate_limit) does not exist or cannot be taken; "
                f"create it with `prefect gcl create {name} --limit N --slot-decay-per-second N/60`."
            ) from exc

    return take


def share_limits(ctx: CallContext, first: CallContext) -> None:
    """Outputs in one process share the first one's scheduler, budget, reachability and stop; counters stay apart."""
    ctx.scheduler, ctx.budget, ctx.reachability = first.scheduler, first.budget, first.reachability
    ctx.stop, ctx.errors = first.stop, first.errors


def build_lane(
    job: EnrichJob, spec: EnrichSpec, ctx: CallContext, endpoint: Endpoint, *, base_url: str | None,
    cache: AnswerStore | None,
) -> tuple[Lane, httpx.AsyncClient]:  # fmt: skip
    """One output's model client and memo (answers go to the cache as they arrive); close the client."""
    model, http = build_chat_model(
        job, endpoint, base_url=base_url, model_name=spec.identity.model, max_concurrency=spec.max_concurrency
    )
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
