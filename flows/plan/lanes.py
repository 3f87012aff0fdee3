"""A job's lanes, one per output (the primary answer column and any extra ones): spec, known answers, call context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from llm_enrich.flows.cache.files import AnswerStore, default_cache_dir, open_cache
from llm_enrich.flows.job import CostFields, EnrichJob
from llm_enrich.flows.llm.endpoint import Endpoint, classify_openai_error, redacting
from llm_enrich.flows.plan.known_answers import LaneColumns, Tally, build_known, load_previous
from llm_enrich.flows.plan.specs import build_spec, check_structured_fields
from llm_enrich.schemas.enriched import (
    bookkeeping_names,
)
from llm_enrich.schemas.errors import ConfigError
from llm_enrich.transforms.admission import Scheduler
from llm_enrich.transforms.calls import CallContext, RetryPolicy
from llm_enrich.transforms.costs import BATCH_DISCOUNT, DEFAULT_PRICES, Budget, Price, price_for
from llm_enrich.transforms.enrichment import EnrichSpec
from llm_enrich.transforms.failures import Classifier
from llm_enrich.transforms.guards import ErrorRate

__all__ = [
    "CallSettings",
    "OutputRun",
    "PlannedCall",
    "build_context",
    "is_discounted",
    "plan_calls",
    "plan_outputs",
    "resolve_price",
    "share_limits",
]


@dataclass
class OutputRun:
    """One answer column: its single-output job, spec, settled keys, column names, price and counters."""

    job: EnrichJob
    spec: EnrichSpec
    known: pl.DataFrame
    names: dict[str, str]
    price: Price | None
    ctx: CallContext
    lane: LaneColumns
    tally: Tally = field(default_factory=Tally)
    # Requests made before the price changed (batch lines before a batch deadline): their cost, tokens.
    earlier_cost: float | None = 0.0
    earlier_tokens: tuple[int, int, int] = (0, 0, 0)  # input, output, cached input

    @property
    def cost_usd(self) -> float | None:
        """What this output's requests cost in this run (cached input at the cached-input price)."""
        if self.price is None or self.earlier_cost is None:
            return None
        now = self._tokens()
        return self.earlier_cost + self.price.cost(
            *(n - before for n, before in zip(now, self.earlier_tokens, strict=True))
        )

    def reprice(self, price: Price | None) -> None:
        """Requests from now on cost ``price`` (and count so against the budget); those before keep theirs."""
        self.earlier_cost = self.cost_usd
        self.earlier_tokens = self._tokens()
        self.price = self.ctx.price = price

    def _tokens(self) -> tuple[int, int, int]:
        stats = self.ctx.stats
        return stats.input_tokens, stats.output_tokens, stats.cached_input_tokens


def plan_outputs(
    job: EnrichJob, input_columns: list[str], endpoint: Endpoint
) -> tuple[list[OutputRun], AnswerStore | None]:
    """Spec and settled answers for every output; they share one scheduler and budget (and the cache)."""
    runs: list[OutputRun] = []
    cache = open_cache(job.cache_dir or default_cache_dir(job.destination), job.storage()) if job.cache else None
    cached = cache.load() if cache is not None and not job.refresh_cache else None
    taken = list(input_columns)
    for number, call in enumerate(plan_calls(job, endpoint)):
        single, spec = call.job, call.spec
        check_structured_fields(spec, taken)
        names = bookkeeping_names(single.output_column, primary=number == 0)
        taken += [single.output_column, *names.values()]
        if spec.structured is not None:
            taken += [f"{spec.structured.prefix}{n}" for n in spec.structured.model.model_fields]
        if len(set(taken)) != len(taken):
            raise ConfigError(f"output '{single.output_column}' would overwrite another column; rename it.")
        previous = (
            None if job.refresh_cache else load_previous(job.destination, single.output_column, names, job.storage())
        )
        known = build_known(cached, previous, retry_failed=job.retry_failed)
        runs.append(OutputRun(single, spec, known, names, call.price, call.ctx, LaneColumns.of(number)))
    return runs, cache


@dataclass(frozen=True)
class PlannedCall:
    """One output's single-output job, spec, price and call context: what a lane is built from."""

    job: EnrichJob
    spec: EnrichSpec
    price: Price | None
    ctx: CallContext


def plan_calls(job: EnrichJob, endpoint: Endpoint, *, shared_by: int = 1) -> list[PlannedCall]:
    """Every output's spec, price and context, sharing the first one's limits: the flow and Dask workers alike."""
    calls: list[PlannedCall] = []
    for single in job.output_jobs():
        spec = build_spec(single, endpoint)
        discounted = is_discounted(single.mode, single.service_tier)
        price = resolve_price(single, spec.identity.model, local=endpoint.local, discounted=discounted)
        settings = CallSettings.of(single)
        ctx = build_context(settings, price, max_concurrency=spec.max_concurrency, secret=endpoint.secret,
                            shared_by=shared_by)  # fmt: skip
        if calls:
            share_limits(ctx, calls[0].ctx)
        calls.append(PlannedCall(single, spec, price, ctx))
    return calls


def is_discounted(mode: str, service_tier: str | None) -> bool:
    """The one rule for the shipped prices: the Batch API and the flex tier pay half."""
    return mode == "batch" or service_tier == "flex"


def resolve_price(costs: CostFields, model_name: str, *, local: bool, discounted: bool) -> Price | None:
    """The job's price override, else the shipped table (halved when ``discounted``: batch, flex); local is free.

    A price given in the job is what the user pays, so it is never discounted.
    """
    if local:
        return Price(0.0, 0.0)
    listed = price_for(model_name, DEFAULT_PRICES)
    if listed is not None and discounted:
        listed = listed.discounted(BATCH_DISCOUNT)
    if costs.input_price is None and costs.output_price is None:
        return listed
    return Price(
        costs.input_price if costs.input_price is not None else (listed.input_per_million if listed else 0.0),
        costs.output_price if costs.output_price is not None else (listed.output_per_million if listed else 0.0),
    )


@dataclass(frozen=True)
class CallSettings:
    """What one output's calls obey: retries and deadline, the provider's limits, budget, truncation, error rate."""

    max_retries: int = 6
    retry_base_delay: float = 1.0
    reply_timeout: float = 60.0
    rpm: int | None = None
    tpm: int | None = None
    max_tokens: int = 256
    max_cost: float | None = None
    on_truncated: Literal["keep", "error"] = "keep"
    max_error_rate: float = 0.5
    prefect_rate_limit: str | None = None

    @classmethod
    def of(cls, job: EnrichJob) -> CallSettings:
        """The settings a job gives its calls (read once, here)."""
        return cls(
            max_retries=job.max_retries, retry_base_delay=job.retry_base_delay, reply_timeout=job.reply_timeout,
            rpm=job.rpm, tpm=job.tpm, max_tokens=job.max_tokens, max_cost=job.max_cost,
            on_truncated=job.on_truncated, max_error_rate=job.max_error_rate, prefect_rate_limit=job.prefect_rate_limit,
        )  # fmt: skip


def build_context(
    settings: CallSettings, price: Price | None, *, max_concurrency: int, secret: str | None = None,
    shared_by: int = 1, classify: Classifier = classify_openai_error,
) -> CallContext:  # fmt: skip
    """Retry policy, scheduler and budget for one output (``shared_by`` processes share the limits)."""
    s = settings
    return CallContext(
        policy=RetryPolicy(
            max_retries=s.max_retries,
            base_delay=s.retry_base_delay,
            attempt_timeout=s.reply_timeout,
            classify=redacting(classify, secret),
        ),
        scheduler=Scheduler(
            max_concurrency=max_concurrency,
            rpm=s.rpm,
            tpm=s.tpm,
            max_tokens=s.max_tokens,
            base_pause=max(s.retry_base_delay, 0.05),
            before_send=_prefect_rate_limit(s.prefect_rate_limit) if s.prefect_rate_limit else None,
            shared_by=shared_by,
        ),
        budget=Budget(s.max_cost) if s.max_cost is not None else None,
        on_truncated=s.on_truncated,
        errors=ErrorRate(limit=s.max_error_rate),
        price=price,
        max_tokens=s.max_tokens,
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
