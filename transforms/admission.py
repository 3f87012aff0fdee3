"""Admission control for one run's requests: pacing, concurrency, a shared pause, and what the server says.

* **Pacing** at ``PACE`` of the RPM/TPM in force (GCRA, no burst), and the **headroom the server
  reports** in ``x-ratelimit-*`` spent as credit that admits at once: ``transforms.pacing``.
* **Concurrency** (AIMD with a slow start, and a cap learned from 429s about concurrency):
  ``transforms.concurrency``.
* **One shared pause.** A 429 about rate pauses everybody until the server's ``retry-after`` (or
  our backoff), so one 429 does not become hundreds. Paced, it never halves concurrency, which is
  not what is limited; 429s that cluster slow the pace by 2% at a time.
* Token estimates are corrected by the prompt tokens the server reports.

Responses reach the scheduler through ``Scheduler.on_response`` (an HTTP client's response hook);
without it everything but the header-driven parts still works.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from llm_enrich.transforms.concurrency import Concurrency
from llm_enrich.transforms.pacing import Pacing, retry_delay

__all__ = ["Admission", "Scheduler", "estimate_tokens"]

_OTHER_429_CODES = ("insufficient_quota", "resource_unavailable", "capacity_exceeded", "overloaded")

_CURRENT: ContextVar[Admission | None] = ContextVar("llm_enrich_admission", default=None)
_HANDLED: ContextVar[bool] = ContextVar("llm_enrich_429_handled", default=False)


def estimate_tokens(text: str) -> int:
    """A provider-independent prompt token estimate: about four characters a token."""
    return max(1, math.ceil(len(text) / 4)) + 4


@dataclass
class Admission:
    """One admitted request; report the server's token count with ``settle``."""

    estimated_prompt_tokens: int
    reserved: int
    seq: int = 0  # requests admitted so far, this one included
    tokens_seq: float = 0.0  # tokens reserved so far, this one included
    in_flight: int = 0  # requests in flight when this one went, itself included
    via_credit: bool = False
    rejected: str | None = field(default=None, repr=False)  # "rate" / "concurrency" once a hook saw a 429

    def __post_init__(self) -> None:
        self.actual_prompt_tokens: int | None = None

    def settle(self, prompt_tokens: int | None) -> None:
        """Record the prompt tokens the server counted."""
        self.actual_prompt_tokens = prompt_tokens


@dataclass
class _Waiter:
    future: asyncio.Future[Admission]
    estimated: int
    reserved: int
    token_bound: bool = False  # it waited for the token pace, not for anything else


class Scheduler:
    """Decides when each request may go; shared by all partitions of a run on one event loop."""

    def __init__(
        self,
        *,
        max_concurrency: int,
        rpm: int | None = None,
        tpm: int | None = None,
        max_tokens: int = 0,
        initial_concurrency: int | None = None,
        base_pause: float = 1.0,
        before_send: Callable[[], Awaitable[None]] | None = None,
        shared_by: int = 1,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.shared_by = max(1, shared_by)  # processes sharing the provider's budget (Dask workers)
        self.max_tokens = max_tokens
        self.pacing = Pacing(rpm=rpm, tpm=tpm, shared_by=self.shared_by)
        # An outside limit shared with other processes (e.g. a Prefect global rate limit).
        self._before_send = before_send
        self.concurrency = Concurrency(
            max_concurrency=max_concurrency, initial=initial_concurrency, paced=bool(rpm or tpm)
        )
        self._base_pause = base_pause
        self._queue: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._paused_until = -math.inf
        self._last_decrease = -math.inf
        self._consecutive_429 = 0
        self._token_ratio = 1.0
        self.rate_limited = 0
        self.rejections: Counter[str] = Counter()  # the 429s a response hook saw, by cause
        self.peak_in_flight = 0

    @property
    def limit(self) -> float:
        """Requests that may be in flight at once, as learned so far."""
        return self.concurrency.limit

    @property
    def rpm(self) -> int | None:
        """Requests a minute in force: what we were told, lowered by the server's headers."""
        return self.pacing.rpm

    @property
    def tpm(self) -> int | None:
        """Tokens a minute in force: what we were told, lowered by the server's headers."""
        return self.pacing.tpm

    @property
    def _pace(self) -> float:
        """The share of the limits paced at now (read by tests and benchmarks)."""
        return self.pacing.pace

    # -- estimates ----------------------------------------------------------------------------

    def estimate(self, prompt: str) -> int:
        """Tokens to reserve for a prompt: corrected prompt estimate plus max_tokens."""
        return self._corrected(estimate_tokens(prompt)) + self.max_tokens

    def _corrected(self, raw: int) -> int:
        # The epsilon keeps a learned 4.0000000001 from rounding up to 5 tokens.
        return max(1, math.ceil(raw * self._token_ratio - 1e-6))

    def _learn_ratio(self, estimated: int, actual: int) -> None:
        ratio = actual / max(estimated, 1)
        self._token_ratio = min(4.0, max(0.25, 0.9 * self._token_ratio + 0.1 * ratio))

    # -- admission ----------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, prompt: str) -> AsyncIterator[Admission]:
        """Wait for the pause, a concurrency slot and the pacing (or the server's headroom); then send."""
        raw = estimate_tokens(prompt)
        estimated = self._corrected(raw)
        self._loop = asyncio.get_running_loop()
        waiter = _Waiter(self._loop.create_future(), estimated, estimated + self.max_tokens)
        self._queue.append(waiter)
        self._pump()
        try:
            admission = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release()  # granted in the same instant as the cancel
            raise
        token = _CURRENT.set(admission)
        try:
            if self._before_send is not None:
                await self._before_send()
            # A pause may have started while we waited for the outside limit.
            while (wait := self._paused_until - self._loop.time()) > 0:
                await asyncio.sleep(wait)
            yield admission
            self.concurrency.answered(admission.in_flight)
            if admission.actual_prompt_tokens:
                # Learn against the raw estimate, or the ratio would correct its own correction.
                self._learn_ratio(raw, admission.actual_prompt_tokens)
        finally:
            _CURRENT.reset(token)
            # Tell rate_limited_by_server (same task, next) that a hook already handled this 429.
            _HANDLED.set(admission.rejected is not None)
            self._release()

    def _release(self) -> None:
        self._in_flight -= 1
        self._pump()

    def _pump(self) -> None:
        """Admit waiters from the head of the queue while everything allows; else set a timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        while self._queue and loop is not None:
            waiter = self._queue[0]
            if waiter.future.done():  # cancelled while waiting
                self._queue.popleft()
                continue
            if self.concurrency.full(self._in_flight):
                return  # a release pumps again
            now = loop.time()
            if (ramp_at := self.concurrency.ramp_wait(self._in_flight, now)) is not None:
                self._timer = loop.call_at(ramp_at, self._pump)
                return
            credit = self.pacing.credit_allows(waiter.reserved, now)
            ready = self._paused_until if credit else max(self._paused_until, self.pacing.ready())
            if ready > now:
                waiter.token_bound = self.pacing.token_bound(ready)
                self._timer = loop.call_at(ready, self._pump)
                return
            self._queue.popleft()
            waiter.future.set_result(self._grant(waiter, now, credit))

    def _grant(self, waiter: _Waiter, now: float, credit: bool) -> Admission:
        self._in_flight += 1
        self.concurrency.granted(self._in_flight, now)
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        # Credit-admitted requests advance the pace too, so the two never add up past a window.
        seq, tokens_seq = self.pacing.admitted(
            now, waiter.reserved, estimated=waiter.estimated, token_bound=waiter.token_bound
        )
        return Admission(waiter.estimated, waiter.reserved, seq, tokens_seq, self._in_flight, via_credit=credit)

    # -- what the server says -----------------------------------------------------------------

    async def on_response(self, response: Any) -> None:
        """An HTTP client response hook (httpx ``event_hooks``): pass headers and a 429's error to ``observe``."""
        error = None
        if response.status_code == 429:
            try:
                await response.aread()
                body = response.json()
                error = body.get("error") if isinstance(body, dict) else None
            except ValueError:
                error = None
        self.observe(response.status_code, response.headers, error if isinstance(error, dict) else None)

    def observe(self, status: int, headers: Mapping[str, str], error: Mapping[str, Any] | None = None) -> None:
        """Learn from one response of the current admission: limits, headroom, and why a 429 came."""
        admission = _CURRENT.get()
        self.pacing.learn(headers, (admission.seq, admission.tokens_seq) if admission is not None else None)
        if status == 429 and admission is not None:
            self._server_said_429(admission, headers, error or {})
        if self._loop is not None:
            self._pump()

    def _server_said_429(self, admission: Admission, headers: Mapping[str, str], error: Mapping[str, Any]) -> None:
        code = str(error.get("code") or error.get("type") or "")
        if code in _OTHER_429_CODES:
            return  # quota and capacity are not our pace: the retry layer owns them
        wait = retry_delay(headers)
        assert self._loop is not None
        now = self._loop.time()
        self.rate_limited += 1
        if error.get("code") == "rate_limit_exceeded" or wait is not None:
            admission.rejected = "rate"
            if admission.via_credit:  # the headroom misled us, not the pace: stop trusting it for a while
                self.rejections["rate, sent on the server's headroom"] += 1
                self.pacing.distrust(now)
                self._paused_until = max(self._paused_until, now + (wait or 0.0))
            else:
                self.rejections["rate, paced"] += 1
                self._rate_pause(wait, now)
            return
        admission.rejected = "concurrency"
        self.rejections["concurrency"] += 1
        self.concurrency.capped(admission.in_flight)

    def _rate_pause(self, wait: float | None, now: float) -> None:
        fresh = now >= self._last_decrease  # not one of the same burst's in-flight 429s
        if fresh:
            self._consecutive_429 += 1
        backoff = self._base_pause * 2 ** min(max(self._consecutive_429, 1) - 1, 6)
        self._paused_until = max(self._paused_until, now + (wait if wait is not None else backoff))
        if fresh:
            self._last_decrease = self._paused_until
            if self.pacing.limited:  # paced: concurrency is not what is limited; maybe the pace is
                self.pacing.pressed()
            else:
                self.concurrency.halved()

    def reservation_note(self, output_tokens: int) -> str | None:
        """A hint when the TPM pace bound the run and replies were far shorter than ``max_tokens``."""
        return self.pacing.reservation_note(output_tokens, self.max_tokens)

    # -- what the retry layer reports ---------------------------------------------------------

    async def succeeded(self) -> None:
        """A reply came back: grow the limit (+1 per success in slow start, else +1 per window)."""
        self._consecutive_429 = 0
        self.pacing.eased()
        if self.concurrency.grown():
            self._pump()

    async def rate_limited_by_server(self, retry_after: float | None) -> None:
        """A 429: everybody pauses; unpaced, the limit halves at most once per pause."""
        if _HANDLED.get():
            _HANDLED.set(False)  # the response hook already acted on this one
            return
        self._loop = self._loop or asyncio.get_running_loop()
        self.rate_limited += 1
        self._rate_pause(retry_after, self._loop.time())
        self._pump()
