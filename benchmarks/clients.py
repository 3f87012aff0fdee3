"""The two clients a request scenario compares, each run against one load of the fake server.

``run_ours`` drives ``transforms.enrichment.enrich_frame_async`` (our scheduler, retries and
dedup); ``run_reference`` drives plain LangChain ``(prompt | ChatOpenAI).batch``. Both return a
``RunResult`` with the server's own measurements, set against the scenario's theoretical ``Limit``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from benchmarks.common import TEMPLATE, ServerProcess, render, unique_prompts
from llm_enrich.flows.llm.endpoint import ModelSettings, build_chat_model, classify_openai_error
from llm_enrich.flows.plan.lanes import CallSettings, build_context
from llm_enrich.schemas.enriched import ERROR_COLUMN
from llm_enrich.transforms.calls import Failure
from llm_enrich.transforms.enrichment import AnswerMemo, EnrichSpec, enrich_frame_async
from llm_enrich.transforms.prompts import parse_template
from tests.fakes.openai_server import count_tokens, expected_answer

__all__ = ["Limit", "Load", "RunResult", "run_ours", "run_reference", "theoretical_limit"]


@dataclass(frozen=True)
class Load:
    """One request scenario: the rows, the server's behaviour and our concurrency."""

    name: str
    title: str
    rows: int
    unique: int
    latency: float = 0.2
    rpm: int | None = None
    tpm: int | None = None
    rate_500: float = 0.0
    rate_malformed: float = 0.0
    concurrency: int = 32
    max_tokens: int = 16
    ratio_target: float | None = None
    # How the server enforces: over which window, by which algorithm, charging TPM how, capping what.
    window_seconds: float = 60.0
    limit_algorithm: str = "sliding"
    tpm_charge: str = "reserve"
    max_in_flight: int | None = None
    tell_limits: bool = True  # give our scheduler the rpm/tpm (--rpm/--tpm), or nothing

    def behaviour(self) -> dict[str, Any]:
        return {
            "latency": self.latency,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "rate_500": self.rate_500,
            "rate_malformed": self.rate_malformed,
            "window_seconds": self.window_seconds,
            "limit_algorithm": self.limit_algorithm,
            "tpm_charge": self.tpm_charge,
            "max_in_flight": self.max_in_flight,
        }


@dataclass
class Limit:
    """The theoretical limit of a request scenario and which term binds."""

    seconds: float
    binding: str
    terms: dict[str, float]
    unique: int
    tokens: int


def theoretical_limit(unique_prompts: list[str], load: Load) -> Limit:
    """max(U*L/C, U/(RPM/60), T/(TPM/60)) with T as the server counts tokens."""
    u = len(unique_prompts)
    tokens = sum(count_tokens(p) + load.max_tokens for p in unique_prompts)
    concurrency = min(load.concurrency, load.max_in_flight or load.concurrency)
    terms = {"latency": u * load.latency / concurrency}
    if load.rpm:
        terms["rpm"] = u / (load.rpm / 60)
    if load.tpm:
        terms["tpm"] = tokens / (load.tpm / 60)
    binding = max(terms, key=lambda k: terms[k])
    return Limit(terms[binding], binding, terms, u, tokens)


@dataclass
class RunResult:
    """One run (ours or the reference) of a request scenario."""

    rows: int
    phase_s: float | None
    wall_s: float
    ratio: float | None
    server_requests: int
    rate_limited_429: int
    statuses: dict[str, int]
    unique_prompts_seen: int
    rows_lost: int
    rows_with_error: int
    retries: int | None = None
    client_requests: int | None = None
    extra_requests: int | None = None
    max_in_flight_server: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def _server_numbers(stats: dict[str, Any], limit: Limit) -> dict[str, Any]:
    phase = stats["last"] - stats["first"] if stats["first"] is not None and stats["last"] is not None else None
    return {
        "phase_s": phase,
        "ratio": (phase / limit.seconds) if phase is not None and limit.seconds > 0 else None,
        "server_requests": stats["requests"],
        "rate_limited_429": stats["statuses"].get("429", 0),
        "statuses": stats["statuses"],
        "unique_prompts_seen": len(stats["prompts"]),
        "max_in_flight_server": stats["max_in_flight"],
    }


def run_ours(load: Load, topics: list[str], limit: Limit, retry_base_delay: float) -> RunResult:
    """enrich_frame_async with our CallContext and Scheduler, against a fresh server."""
    frame = pl.DataFrame({"topic": topics})
    spec = EnrichSpec(template=parse_template(TEMPLATE), output_column="answer", max_concurrency=load.concurrency)
    failures: Counter[str] = Counter()

    def classify(exc: BaseException) -> Failure:
        failure = classify_openai_error(exc)
        failures[failure.message[:90]] += 1
        return failure

    # The product's own builder: what --rpm/--tpm/--max-tokens/--retry-base-delay give a run.
    settings = CallSettings(
        retry_base_delay=retry_base_delay, rpm=load.rpm if load.tell_limits else None,
        tpm=load.tpm if load.tell_limits else None, max_tokens=load.max_tokens, max_error_rate=1.0,
    )  # fmt: skip
    ctx = build_context(settings, None, max_concurrency=load.concurrency, classify=classify)
    scheduler = ctx.scheduler
    assert scheduler is not None

    async def go(base_url: str) -> tuple[pl.DataFrame, float]:
        # The client belongs to this event loop: created inside it, closed before it ends.
        # The product's own builder; the scheduler reads every response as flows/run/runtime.py wires it.
        settings = ModelSettings(
            model="fake", base_url=base_url, api_key=SecretStr("sk-test"), timeout=30, max_tokens=load.max_tokens,
            max_concurrency=load.concurrency,
        )  # fmt: skip
        model, client = build_chat_model(settings)
        client.event_hooks["response"].append(scheduler.on_response)
        try:
            started = time.perf_counter()
            out = await enrich_frame_async(frame, spec, model, ctx=ctx, memo=AnswerMemo())
            return out, time.perf_counter() - started
        finally:
            await client.aclose()

    with ServerProcess(**load.behaviour()) as server:
        out, wall = asyncio.run(go(server.base_url))
        stats = server.stats()
    answers = out.get_column("answer").to_list()
    lost = sum(1 for t, a in zip(topics, answers, strict=True) if a != expected_answer(render(t)))
    errors = out.get_column(ERROR_COLUMN).drop_nulls()
    cs = ctx.stats
    sample = unique_prompts(topics)[0]
    details = {
        "rows_deduplicated": cs.rows_deduplicated,
        "client_rate_limited": cs.rate_limited,
        "scheduler_rate_limited": scheduler.rate_limited,
        "scheduler_peak_in_flight": scheduler.peak_in_flight,
        "scheduler_final_limit": scheduler.limit,
        "scheduler_rpm_tpm_in_force": (scheduler.rpm, scheduler.tpm),
        "scheduler_rejections": dict(scheduler.rejections),
        "scheduler_pace": scheduler._pace,
        "scheduler_token_ratio": scheduler._token_ratio,
        # What one request reserves in our TPM bucket at the end vs what the server counts.
        "tpm_reserved_per_request": scheduler.estimate(sample) if load.tpm else None,
        "tpm_counted_per_request": count_tokens(sample) + load.max_tokens,
        "failed_attempts": failures.most_common(5),
        "error_samples": Counter(errors.to_list()).most_common(3),
    }
    return RunResult(
        rows=len(topics),
        wall_s=wall,
        rows_lost=lost,
        rows_with_error=errors.len(),
        retries=cs.retries,
        client_requests=cs.requests,
        extra_requests=stats["requests"] - limit.unique - cs.retries,
        details=details,
        **_server_numbers(stats, limit),
    )


def run_reference(load: Load, topics: list[str], limit: Limit) -> RunResult:
    """Plain LangChain: prompt | ChatOpenAI with the SDK's own retries, batch(max_concurrency=32)."""
    with ServerProcess(**load.behaviour()) as server:
        llm = ChatOpenAI(
            model="fake",
            base_url=server.base_url,
            api_key="sk-test",
            max_retries=6,
            timeout=30,
            use_responses_api=False,
            max_tokens=load.max_tokens,
        )
        chain = ChatPromptTemplate.from_messages([("human", TEMPLATE)]) | llm
        started = time.perf_counter()
        results = chain.batch(
            [{"topic": t} for t in topics], config={"max_concurrency": load.concurrency}, return_exceptions=True
        )
        wall = time.perf_counter() - started
        stats = server.stats()
    failures: Counter[str] = Counter()
    lost = 0
    for topic, result in zip(topics, results, strict=True):
        if isinstance(result, BaseException):
            failures[type(result).__name__] += 1
            lost += 1
        elif result.content != expected_answer(render(topic)):
            lost += 1
    return RunResult(
        rows=len(topics),
        wall_s=wall,
        rows_lost=lost,
        rows_with_error=sum(failures.values()),
        details={"exceptions": dict(failures)},
        **_server_numbers(stats, limit),
    )
