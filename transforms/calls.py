"""One model call per prompt, with the run's only retry loop.

Who owns which failure (so attempts never multiply silently):

* The OpenAI SDK's own retries are switched off (``max_retries=0`` where the model is built),
  so every HTTP attempt is one we count.
* ``ask_model`` here owns retries for everything transient: 429, 408/409, 5xx, timeouts,
  dropped connections, malformed bodies and empty replies, up to ``RetryPolicy.max_retries``,
  with exponential backoff, jitter, and the server's ``retry-after`` when it gives one.
* A 429 also pauses the whole run's Scheduler (transforms.admission), so in-flight
  neighbours do not each discover the limit on their own.
* A 400/422 (bad request, context too long) fails its row at once with the server's message.
* A 401/403/404 (bad key, no access, unknown model) or an exhausted quota aborts the job:
  every row would fail. It sets the run's ``StopSignal``, so nothing else is sent.
* ``RetryPolicy.attempt_timeout`` is a deadline for a whole attempt (connect, headers and the
  whole body): the HTTP client's own timeouts apply per read, and a body that trickles in a
  byte at a time would otherwise keep a request open forever.
* A ``StopSignal`` (Ctrl-C, SIGTERM, a cancel, a fatal failure) is checked before every
  attempt: once it is set nothing more is sent, and replies in flight are still kept.
* Prefect task retries (flows/) only cover infrastructure failures around a partition,
  never rows: a row that carries an error is a finished row.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.runnables import Runnable

from llm_enrich.schemas.errors import EndpointRejected, RunInterrupted, UserError
from llm_enrich.transforms.admission import Scheduler, estimate_tokens
from llm_enrich.transforms.costs import Budget, Price
from llm_enrich.transforms.failures import AttemptDeadline, Classifier, Failure, classify_generic
from llm_enrich.transforms.guards import ErrorRate, StopSignal
from llm_enrich.transforms.outcome import CallStats, Outcome
from llm_enrich.transforms.replies import (
    InvalidStructuredReply,
    cached_tokens,
    finish_reason,
    incomplete,
    plain_text,
    structured_text,
    usage,
)

__all__ = [
    "AttemptDeadline",
    "CallContext",
    "Failure",
    "Reachability",
    "RetryPolicy",
    "ask_model",
    "budget_refusal",
    "reserve_attempt",
]


# Our own generator: retry loops run in background threads, and drawing from the global one there
# would disturb (and be disturbed by) other code's seeded randomness.
_JITTER = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """Retry settings for transient failures; delays in seconds."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    attempt_timeout: float | None = None
    classify: Classifier = classify_generic

    def delay(self, retry_number: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, never shorter than the server asked for."""
        backoff = min(self.max_delay, self.base_delay * 2**retry_number)
        jittered = backoff * _JITTER.uniform(0.5, 1.0)
        return float(max(jittered, retry_after or 0.0))


@dataclass
class Reachability:
    """Stops a run whose endpoint never answered: N connection failures in a row and no success.

    Without it a dead --base-url costs every row its full retry schedule (minutes per row);
    once anything has been answered, outages are ridden out with retries as usual.
    """

    threshold: int = 20
    answered: bool = False
    failures_in_a_row: int = 0

    def record(self, *, ok: bool, unreachable: bool = False) -> bool:
        """Count an attempt; True when the run should stop."""
        if ok:
            self.answered, self.failures_in_a_row = True, 0
            return False
        self.failures_in_a_row = self.failures_in_a_row + 1 if unreachable else 0
        return not self.answered and self.failures_in_a_row >= self.threshold


@dataclass
class CallContext:
    """What every call of a run shares: retry policy, counters, scheduler, budget."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    stats: CallStats = field(default_factory=CallStats)
    scheduler: Scheduler | None = None
    budget: Budget | None = None
    price: Price | None = None
    max_tokens: int = 0
    reachability: Reachability = field(default_factory=Reachability)
    stop: StopSignal = field(default_factory=StopSignal)
    on_truncated: Literal["keep", "error"] = "keep"
    errors: ErrorRate = field(default_factory=ErrorRate)


async def ask_model(
    model: Runnable[Any, Any], messages: Sequence[BaseMessage], ctx: CallContext, *, structured: bool = False
) -> Outcome:
    """Send one prompt, retrying transient failures; never raises for a row's failure.

    With ``structured`` the model is a ``with_structured_output(..., include_raw=True)`` runnable;
    a reply that does not match the schema is asked again once, with the validation error.
    """
    policy, stats = ctx.policy, ctx.stats
    messages = list(messages)
    corrected = False
    text_for_estimate = "\n".join(str(m.content) for m in messages)
    outcome = Outcome()
    for attempt in range(policy.max_retries + 1):
        ctx.stop.check()
        reserved = reserve_attempt(ctx, text_for_estimate)
        if reserved is None:
            outcome.error = budget_refusal(ctx)
            return outcome
        outcome.attempts = attempt + 1
        stats.add(requests=1, retries=1 if attempt else 0)
        tokens, cached = (0, 0), 0
        try:
            try:
                if ctx.scheduler is None:
                    reply = await _invoke(model, messages, ctx)
                    tokens = usage(reply["raw"] if structured else reply)
                    cached = cached_tokens(reply["raw"] if structured else reply)
                else:
                    async with ctx.scheduler.admit(text_for_estimate) as admission:
                        ctx.stop.check()  # the stop may have come while waiting for a slot
                        reply = await _invoke(model, messages, ctx)
                        tokens = usage(reply["raw"] if structured else reply)
                        cached = cached_tokens(reply["raw"] if structured else reply)
                        admission.settle(tokens[0] or None)
            finally:
                _settle(ctx, reserved, tokens, cached)
            cached = min(cached, tokens[0])  # a part of the input: never more (a row's column shows it)
            stats.add(tokens=tokens)
            stats.bump(cached_input_tokens=cached)
            outcome.input_tokens += tokens[0]
            outcome.output_tokens += tokens[1]
            outcome.cached_input_tokens += cached
            if (verdict := incomplete(reply, ctx, structured=structured)) is not None:
                # A filtered or cut-off reply comes back the same when asked again: not retried.
                outcome.error = verdict
                return outcome
            outcome.truncated = finish_reason(reply["raw"] if structured else reply) == "length"
            if outcome.truncated:
                stats.bump(truncated=1)
            text = structured_text(reply) if structured else plain_text(reply)
            if ctx.scheduler is not None:
                await ctx.scheduler.succeeded()
            ctx.reachability.record(ok=True)
            outcome.text, outcome.error = text, None
            stats.bump(answered=1)
            return outcome
        except (asyncio.CancelledError, RunInterrupted, EndpointRejected):
            raise
        except InvalidStructuredReply as exc:
            outcome.error = f"the reply does not match the output schema: {exc}"
            if corrected or attempt == policy.max_retries:
                break
            corrected = True
            messages = [*messages, HumanMessage(_CORRECTION.format(error=exc))]
            continue
        except Exception as exc:  # noqa: BLE001 - every failure is classified: retried, the row's, or fatal
            failure = policy.classify(exc)
            if failure.timed_out:
                stats.bump(timeouts=1)
            if failure.kind == "fatal":
                stats.aborted = (
                    failure.message
                    if isinstance(exc, UserError) or failure.explained
                    else f"the LLM endpoint refused the request ({failure.message}); check the API key, "
                    "the model name (`model`) and the base URL (`base_url`)."
                )
                ctx.stop.set(stats.aborted, fatal=True)
                raise EndpointRejected(stats.aborted) from _portable(exc)
            if ctx.reachability.record(ok=False, unreachable=failure.unreachable):
                stats.aborted = (
                    f"could not reach the LLM endpoint: {ctx.reachability.failures_in_a_row} attempts in a row "
                    f"failed and none has ever succeeded ({failure.message}). Check `base_url` / "
                    "OPENAI_BASE_URL and that the server is running."
                )
                ctx.stop.set(stats.aborted, fatal=True)
                raise EndpointRejected(stats.aborted) from _portable(exc)
            if failure.rate_limited:
                stats.bump(rate_limited=1)
                if ctx.scheduler is not None:
                    await ctx.scheduler.rate_limited_by_server(failure.retry_after)
            outcome.error = failure.message
            if failure.kind == "row" or attempt == policy.max_retries:
                break
            await asyncio.sleep(policy.delay(attempt, failure.retry_after))
    tries = f"after {outcome.attempts} attempt{'s' if outcome.attempts > 1 else ''}"
    outcome.error = f"{outcome.error} ({tries})"
    return outcome


def _portable(exc: BaseException) -> Exception:
    """The cause as a plain exception: a library's own may not unpickle where a Dask task's error lands."""
    return RuntimeError(f"{type(exc).__name__}: {exc}")


async def _invoke(model: Runnable[Any, Any], messages: list[BaseMessage], ctx: CallContext) -> Any:
    """One HTTP attempt under the whole-attempt deadline, counted while in flight."""
    stats, limit = ctx.stats, ctx.policy.attempt_timeout
    stats.bump(in_flight=1)
    try:
        async with asyncio.timeout(limit):
            return await model.ainvoke(messages)
    except TimeoutError as exc:
        raise AttemptDeadline(f"no complete reply within `timeout` {limit:g} s") from exc
    finally:
        stats.bump(in_flight=-1)


_CORRECTION = (
    "Your previous answer was rejected because it does not match the required schema: {error}. "
    "Answer again, following the schema exactly."
)


def reserve_attempt(ctx: CallContext, text: str) -> float | None:
    """Reserve the worst-case cost of one attempt (prompt + max_tokens); None when the budget refuses."""
    if ctx.budget is None or ctx.price is None:
        return 0.0
    worst = ctx.price.cost(estimate_tokens(text), ctx.max_tokens)
    return worst if ctx.budget.try_reserve(worst) else None


def budget_refusal(ctx: CallContext) -> str:
    """A row's error when the budget refused its request."""
    limit = ctx.budget.limit_usd if ctx.budget is not None else 0.0
    return (
        f"not sent: the `max_cost` budget of ${limit:g} would be exceeded; rerun with a higher `max_cost` to continue"
    )


def _settle(ctx: CallContext, reserved: float, tokens: tuple[int, int], cached: int = 0) -> None:
    if ctx.budget is not None and ctx.price is not None:
        ctx.budget.settle(reserved, ctx.price.cost(*tokens, cached))
