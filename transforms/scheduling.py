"""Admission control for one run's requests: concurrency, RPM/TPM budgets and a shared backoff.

aiolimiter does the bucket arithmetic. What no library does is written here:

* one pause shared by every request: after a 429 nobody sends until the server's
  ``retry-after`` (or our backoff) has passed, so one 429 does not become hundreds;
* adaptive concurrency (AIMD with a slow start): the in-flight limit grows while replies come
  back and halves on a 429, at most once per pause, never above ``max_concurrency``;
* token estimates corrected by what the server reports, so TPM budgets track real usage.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

__all__ = ["Admission", "Scheduler", "estimate_tokens"]

# A bucket holds one second of budget; the drip is slowed by that much so that no sliding
# 60-second window ever sees more than the limit (burst + 60 s of drip == limit).
_BURST_SECONDS = 1.0


def estimate_tokens(text: str) -> int:
    """A provider-independent prompt token estimate: about four characters a token."""
    return max(1, math.ceil(len(text) / 4)) + 4


def _bucket(per_minute: int) -> AsyncLimiter:
    burst = max(1.0, per_minute * _BURST_SECONDS / 60.0)
    rate_per_second = max(per_minute - burst, 1.0) / 60.0
    return AsyncLimiter(burst, burst / rate_per_second)


@dataclass
class Admission:
    """One admitted request; report the server's token count with ``settle``."""

    estimated_prompt_tokens: int
    reserved: int

    def __post_init__(self) -> None:
        self.actual_prompt_tokens: int | None = None

    def settle(self, prompt_tokens: int | None) -> None:
        """Record the prompt tokens the server counted."""
        self.actual_prompt_tokens = prompt_tokens


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
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_tokens = max_tokens
        self.rpm, self.tpm = rpm, tpm
        # An outside limit shared with other processes (e.g. a Prefect global rate limit).
        self._before_send = before_send
        self._rpm = _bucket(rpm) if rpm else None
        self._tpm = _bucket(tpm) if tpm else None
        # With explicit limits the buckets pace the run; without, start small and probe.
        start = max_concurrency if (rpm or tpm) else min(max_concurrency, 4)
        self.limit = float(min(initial_concurrency or start, max_concurrency))
        self._slow_start = not (rpm or tpm)
        self._in_flight = 0
        self._changed: asyncio.Condition | None = None
        self._paused_until = 0.0
        self._last_decrease = 0.0
        self._base_pause = base_pause
        self._consecutive_429 = 0
        self._token_ratio = 1.0
        self.rate_limited = 0
        self.peak_in_flight = 0

    @property
    def _cond(self) -> asyncio.Condition:
        # Created lazily so it binds to the loop that runs the requests.
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def estimate(self, prompt: str) -> int:
        """Tokens to reserve for a prompt: corrected prompt estimate plus max_tokens."""
        return self._corrected(estimate_tokens(prompt)) + self.max_tokens

    def _corrected(self, raw: int) -> int:
        # The epsilon keeps a learned 4.0000000001 from rounding up to 5 tokens.
        return max(1, math.ceil(raw * self._token_ratio - 1e-6))

    @asynccontextmanager
    async def admit(self, prompt: str) -> AsyncIterator[Admission]:
        """Wait for the pause, a concurrency slot and the RPM/TPM budget; then send."""
        raw = estimate_tokens(prompt)
        estimated = self._corrected(raw)
        reserved = estimated + self.max_tokens
        async with self._cond:
            while True:
                wait = self._paused_until - time.monotonic()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._cond.wait(), timeout=wait)
                    except TimeoutError:
                        pass
                    continue
                if self._in_flight < int(self.limit):
                    break
                await self._cond.wait()
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            if self._rpm is not None:
                await self._rpm.acquire(1)
            if self._tpm is not None:
                await self._acquire_tokens(reserved)
            if self._before_send is not None:
                await self._before_send()
            # A pause may have started while we waited for the buckets.
            while (wait := self._paused_until - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            admission = Admission(estimated, reserved)
            yield admission
            if admission.actual_prompt_tokens:
                # Learn against the raw estimate, or the ratio would correct its own correction.
                self._learn_ratio(raw, admission.actual_prompt_tokens)
        finally:
            async with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    async def _acquire_tokens(self, amount: int) -> None:
        assert self._tpm is not None
        # A request larger than the bucket is taken in bucket-sized pieces.
        remaining = float(amount)
        while remaining > 0:
            piece = min(remaining, self._tpm.max_rate)
            await self._tpm.acquire(piece)
            remaining -= piece

    def _learn_ratio(self, estimated: int, actual: int) -> None:
        ratio = actual / max(estimated, 1)
        self._token_ratio = min(4.0, max(0.25, 0.9 * self._token_ratio + 0.1 * ratio))

    async def succeeded(self) -> None:
        """A reply came back: grow the limit (doubling in slow start, else +1 per window)."""
        self._consecutive_429 = 0
        if self.limit >= self.max_concurrency:
            return
        step = 1.0 if self._slow_start else 1.0 / max(self.limit, 1.0)
        async with self._cond:
            self.limit = min(float(self.max_concurrency), self.limit + step)
            self._cond.notify_all()

    async def rate_limited_by_server(self, retry_after: float | None) -> None:
        """A 429: everybody pauses; the limit halves at most once per pause."""
        now = time.monotonic()
        self.rate_limited += 1
        async with self._cond:
            fresh = now >= self._last_decrease  # not one of the same burst's in-flight 429s
            if fresh:
                self._consecutive_429 += 1
            backoff = self._base_pause * 2 ** min(max(self._consecutive_429, 1) - 1, 6)
            pause = retry_after if retry_after is not None else backoff
            self._paused_until = max(self._paused_until, now + pause)
            if fresh:
                self._slow_start = False
                self.limit = max(1.0, self.limit / 2)
                self._last_decrease = self._paused_until
            self._cond.notify_all()
