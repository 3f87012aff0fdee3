"""Admission control for one run's requests: pacing, concurrency, a shared pause, and what the server says.

* **Pacing** (GCRA: a leaky bucket with no burst). With an RPM or TPM limit each request is let
  through one emission interval after the previous one (for tokens, its reservation's share), at
  ``PACE`` of the limit. Providers may enforce a per-minute limit over one second (OpenAI: 60,000
  RPM as 1,000 a second): a client holding a second of budget and spending it at once draws 429s
  there, while an even pace a little under the limit fills no window, short or long. A late
  event loop makes good up to 5 ms of its lateness and never bursts after an idle spell.
* **Headroom the server reports.** Each response's ``x-ratelimit-remaining-*``, minus what was sent
  since that request, is credit that admits at once: a server enforcing over 60 seconds lets a
  short run go as fast as its concurrency. ``x-ratelimit-limit-*`` below what we were told wins,
  and without ``--rpm/--tpm`` the limits are learned from it. A 429 on a request the credit let
  through stops trusting the credit for a minute.
* **Concurrency** (AIMD with a slow start, ``+1`` per success until the first 429). A 429 about
  concurrency (no retry time, no rate-limit code: a server capping requests in flight) sets the
  limit just below the number in flight when that request went, so the server's cap is learned
  rather than halved past; a probe one above it goes after a doubling number of successes.
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

__all__ = ["PACE", "Admission", "Scheduler", "estimate_tokens"]

# Share of the limit we pace at, at most: the slack absorbs arrival jitter at a per-second window
# (50 a second at 99% leaves 10 ms per window). A rejected request costs a provider's window
# nothing, so a stray 429 is only retried; when 429s cluster (over about 0.7% of recent requests:
# a busy machine, a long network path, a server stricter than its headers) the pace drops 2%, and
# each success gives back _PACE_RECOVERY.
PACE = 0.99
_PACE_START, _PACE_FLOOR, _PACE_RECOVERY = 0.99, 0.8, 0.0001
_PRESSURE_DECAY, _PRESSURE_LIMIT = 0.995, 1.5
# Headroom kept in hand when spending what the server reports: two requests' worth plus a share
# of the most it ever reported (a window's capacity), against its clock and ours disagreeing.
_CREDIT_MARGIN, _CREDIT_SHARE = 2, 0.05
# Successes between probes one above a learned concurrency cap; doubles per failed probe.
_PROBE_EVERY, _PROBE_MAX = 200, 1600
# In slow start one more request in flight than ever before goes at most this often, so the 429
# of a server capping requests in flight (answered at once) stops the ramp one over the cap.
_RAMP_GAP = 0.025
_DISTRUST_SECONDS = 60.0
_CATCH_UP = 0.005
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
        # Processes sharing the provider's budget (Dask workers): the server's headers describe the
        # whole budget, of which this scheduler may take its share only.
        self.shared_by = max(1, shared_by)
        self.max_tokens = max_tokens
        self.rpm, self.tpm = rpm, tpm  # in force: what we were told, lowered by the server's headers
        # An outside limit shared with other processes (e.g. a Prefect global rate limit).
        self._before_send = before_send
        # With explicit limits the pacing shapes the run; without, start small and probe.
        start = max_concurrency if (rpm or tpm) else min(max_concurrency, 4)
        self.limit = float(min(initial_concurrency or start, max_concurrency))
        self._slow_start = not (rpm or tpm)
        self._base_pause = base_pause
        self._pace = _PACE_START
        self._queue: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._high = 0  # the most requests ever in flight at once
        self._ramp_at = -math.inf
        self._seq = 0
        self._tokens_seq = 0.0
        self._next_request = -math.inf  # GCRA theoretical arrival times
        self._next_tokens = -math.inf
        self._largest = 0  # the largest token reservation so far
        self._prompt_estimates = 0  # estimated prompt tokens of every admission
        self._token_bound = 0  # admissions that waited for the token pace
        self._paused_until = -math.inf
        self._last_decrease = -math.inf
        self._consecutive_429 = 0
        self._credit: dict[str, tuple[float, float]] = {}  # kind -> (remaining, our seq when it was sent)
        self._credit_seq: dict[str, int] = {}
        self._credit_peak: dict[str, float] = {}
        self._pressure = 0.0  # recent paced 429s, decaying per success
        self._distrust_until = -math.inf
        self._cap: int | None = None  # a concurrency cap learned from 429s
        self._since_probe = 0
        self._probe_every = _PROBE_EVERY
        self._probing = False
        self._token_ratio = 1.0
        self.rate_limited = 0
        self.rejections: Counter[str] = Counter()  # the 429s a response hook saw, by cause
        self.peak_in_flight = 0

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
            if self._probing and self._cap is not None and admission.in_flight >= self._cap:
                self._probing, self._probe_every = False, _PROBE_EVERY  # the probe held: a new cap
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
            if self._in_flight >= max(1, int(self.limit)):
                return  # a release pumps again
            now = loop.time()
            if self._slow_start and self._in_flight >= self._high and now < self._ramp_at:
                self._timer = loop.call_at(self._ramp_at, self._pump)
                return
            credit = self._credit_allows(waiter.reserved, now)
            ready = self._paused_until if credit else max(self._paused_until, self._pacing_ready())
            if ready > now:
                waiter.token_bound = bool(self.tpm) and ready == self._next_tokens
                self._timer = loop.call_at(ready, self._pump)
                return
            self._queue.popleft()
            waiter.future.set_result(self._grant(waiter, now, credit))

    def _pacing_ready(self) -> float:
        ready = -math.inf
        if self.rpm:
            ready = max(ready, self._next_request)
        if self.tpm:
            ready = max(ready, self._next_tokens)
        return ready

    def _grant(self, waiter: _Waiter, now: float, credit: bool) -> Admission:
        self._in_flight += 1
        if self._in_flight > self._high:
            self._high, self._ramp_at = self._in_flight, now + _RAMP_GAP
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        self._seq += 1
        self._tokens_seq += waiter.reserved
        self._prompt_estimates += waiter.estimated
        self._token_bound += waiter.token_bound
        # Credit-admitted requests advance the pace too, so the two never add up past a window.
        if self.rpm:
            self._next_request = _next_slot(self._next_request, now, 60.0 / (self.rpm * self._pace))
        if self.tpm:
            self._largest = max(self._largest, waiter.reserved)
            self._next_tokens = _next_slot(self._next_tokens, now, waiter.reserved * 60.0 / self._token_rate())
        return Admission(
            waiter.estimated, waiter.reserved, self._seq, self._tokens_seq, self._in_flight, via_credit=credit
        )

    def _token_rate(self) -> float:
        """Tokens a minute to pace at: a second's window also holds the request that starts it.

        Paced at R a second, a one-second window holds R plus one request's tokens; with requests
        a sizeable share of the per-second budget B (60,000 TPM is 1,000 a second, a request 70)
        the pace is B less the largest reservation, never under half of B.
        """
        assert self.tpm
        return max(self.tpm / 2, min(self.tpm * self._pace, self.tpm - 60.0 * self._largest))

    def _credit_allows(self, reserved: int, now: float) -> bool:
        """True when the server's last reported headroom, less what we sent since, covers this request."""
        if now < self._distrust_until or not (self.rpm or self.tpm):
            return False
        needs = {"requests": (self.rpm, 1.0, float(self._seq)), "tokens": (self.tpm, float(reserved), self._tokens_seq)}
        for kind, (limited, amount, sent) in needs.items():
            if not limited:
                continue
            if kind not in self._credit:
                return False
            remaining, sent_then = self._credit[kind]
            margin = _CREDIT_MARGIN * amount + _CREDIT_SHARE * self._credit_peak[kind]
            if remaining - (sent - sent_then) < amount + margin:
                return False
        return True

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
        self._learn_limits(headers)
        if admission is not None:
            for kind, sent in (("requests", admission.seq), ("tokens", admission.tokens_seq)):
                remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
                remaining = remaining / self.shared_by if remaining is not None else None
                if remaining is not None and admission.seq >= self._credit_seq.get(kind, 0):
                    self._credit[kind] = (remaining, sent)
                    self._credit_seq[kind] = admission.seq
                    self._credit_peak[kind] = max(self._credit_peak.get(kind, 0.0), remaining)
        if status == 429 and admission is not None:
            self._server_said_429(admission, headers, error or {})
        if self._loop is not None:
            self._pump()

    def _learn_limits(self, headers: Mapping[str, str]) -> None:
        for kind, attr in (("requests", "rpm"), ("tokens", "tpm")):
            told = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            told = told / self.shared_by if told is not None else None
            if told is not None and told >= 1 and (getattr(self, attr) is None or told < getattr(self, attr)):
                setattr(self, attr, int(told))

    def _server_said_429(self, admission: Admission, headers: Mapping[str, str], error: Mapping[str, Any]) -> None:
        code = str(error.get("code") or error.get("type") or "")
        if code in _OTHER_429_CODES:
            return  # quota and capacity are not our pace: the retry layer owns them
        wait = _retry_after(headers)
        assert self._loop is not None
        now = self._loop.time()
        self.rate_limited += 1
        if error.get("code") == "rate_limit_exceeded" or wait is not None:
            admission.rejected = "rate"
            if admission.via_credit:  # the headroom misled us, not the pace: stop trusting it for a while
                self.rejections["rate, sent on the server's headroom"] += 1
                self._distrust_until = now + _DISTRUST_SECONDS
                self._paused_until = max(self._paused_until, now + (wait or 0.0))
            else:
                self.rejections["rate, paced"] += 1
                self._rate_pause(wait, now)
            return
        admission.rejected = "concurrency"
        self.rejections["concurrency"] += 1
        # More than the server takes were in flight: its cap is below this request's count.
        cap = max(1, admission.in_flight - 1)
        if self._probing:  # the probe above the cap failed: wait twice as long for the next
            self._probing = False
            self._probe_every = min(_PROBE_MAX, self._probe_every * 2)
        self._cap = cap if self._cap is None else min(self._cap, cap)
        self.limit = float(max(1, min(int(self.limit), self._cap)))
        self._slow_start = False
        self._since_probe = 0

    def _rate_pause(self, wait: float | None, now: float) -> None:
        fresh = now >= self._last_decrease  # not one of the same burst's in-flight 429s
        if fresh:
            self._consecutive_429 += 1
        backoff = self._base_pause * 2 ** min(max(self._consecutive_429, 1) - 1, 6)
        self._paused_until = max(self._paused_until, now + (wait if wait is not None else backoff))
        if fresh:
            self._last_decrease = self._paused_until
            if self.rpm or self.tpm:  # paced: concurrency is not what is limited; maybe the pace is
                self._pressure += 1.0
                if self._pressure >= _PRESSURE_LIMIT:
                    self._pace, self._pressure = max(_PACE_FLOOR, self._pace * 0.98), 0.0
            else:
                self._slow_start = False
                self.limit = max(1.0, self.limit / 2)

    def reservation_note(self, output_tokens: int) -> str | None:
        """A hint when the TPM pace bound the run and replies were far shorter than ``max_tokens``."""
        if not self.tpm or not self._seq or self.max_tokens <= 0 or self._token_bound < self._seq / 2:
            return None
        replies = output_tokens / self._seq
        if self.max_tokens < 4 * max(replies, 1.0):
            return None
        prompt = self._prompt_estimates / self._seq
        suggest = max(16, 16 * math.ceil(2 * replies / 16))  # twice the average reply, in steps of 16
        faster = (prompt + self.max_tokens) / (prompt + suggest)
        return (
            f"--tpm bound this run through the reservation, not the answers: each request reserves its prompt "
            f"+ --max-tokens {self.max_tokens} (as OpenAI counts at admission), but replies averaged {replies:.0f} "
            f"tokens. --max-tokens {suggest} would let about {faster:.1f}x as many requests through per minute, "
            "if no answer needs more."
        )

    # -- what the retry layer reports ---------------------------------------------------------

    async def succeeded(self) -> None:
        """A reply came back: grow the limit (+1 per success in slow start, else +1 per window)."""
        self._consecutive_429 = 0
        self._pace = min(PACE, self._pace + _PACE_RECOVERY)  # creep back up after a slowdown
        self._pressure *= _PRESSURE_DECAY
        if self.limit >= self.max_concurrency:
            return
        if self._cap is not None and self.limit >= self._cap:
            self._since_probe += 1
            if self._since_probe < self._probe_every:
                return
            self._since_probe = 0
            self._cap += 1  # probe one above; a 429 there sets it back and doubles the wait
            self._probing = True
            self.limit = float(min(self.max_concurrency, self._cap))
        else:
            step = 1.0 if self._slow_start else 1.0 / max(self.limit, 1.0)
            self.limit = min(float(self.max_concurrency), self.limit + step)
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


def _next_slot(due: float, now: float, interval: float) -> float:
    """The pace's next slot after an admission at ``now`` of one that was due at ``due``.

    A timer fires up to a millisecond late (epoll rounds up) and a busy loop later still: a
    lateness up to _CATCH_UP keeps the schedule, or 1 ms per 20 ms would cost 5% of the rate;
    after an idle spell the schedule restarts from now, so there is no burst and no early slot.
    """
    return (due if now - due <= min(_CATCH_UP, interval / 2) else now) + interval


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's explicit retry time: retry-after-ms, else retry-after in seconds."""
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    return _number(headers.get("retry-after"))
