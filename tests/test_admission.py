"""The run-wide Scheduler: concurrency, RPM/TPM pacing, the shared pause, what the server says, estimates.

Timing tests run in real time on asyncio and measure with the loop clock; the pacing tests run on
an event loop whose clock jumps to the next timer, so minutes pass in milliseconds and every
window, one second or sixty, can be checked exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import selectors
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_openai import ChatOpenAI

from llm_enrich.flows.llm.endpoint import classify_openai_error
from llm_enrich.schemas.enriched import ERROR_COLUMN
from llm_enrich.transforms.admission import Scheduler, estimate_tokens
from llm_enrich.transforms.calls import CallContext, RetryPolicy
from llm_enrich.transforms.enrichment import EnrichSpec, enrich_frame
from llm_enrich.transforms.pacing import PACE
from llm_enrich.transforms.prompts import parse_template
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer, expected_answer

# -- helpers -----------------------------------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, when nothing is ready, moves a virtual clock forward instead of blocking."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if timeout is None and not ready:
            return super().select(None)
        # Like a real clock, every loop iteration takes a moment (1 us): float arithmetic can
        # otherwise re-check a waiter forever at one frozen instant.
        self.now += 1e-6 if ready or not timeout else max(timeout, 1e-6)
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps straight to the next timer (the scheduler reads loop.time())."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def run_virtual(main: Callable[[], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(main())


async def admit_all(scheduler: Scheduler, prompts: list[str]) -> list[float]:
    """Admit every prompt at once; return the loop time at which each one was let through, sorted."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def one(prompt: str) -> None:
        async with scheduler.admit(prompt):
            starts.append(loop.time())

    await asyncio.gather(*(one(p) for p in prompts))
    return sorted(starts)


def most_in_window(starts: list[float], window: float, weights: list[float] | None = None) -> float:
    """The largest total weight of starts inside any half-open window [t, t + window) beginning at a start."""
    weights = weights or [1.0] * len(starts)
    best, total, j = 0.0, 0.0, 0
    for i, t in enumerate(starts):
        while j < len(starts) and starts[j] < t + window:
            total += weights[j]
            j += 1
        best = max(best, total)
        total -= weights[i]
    return best


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll (yielding to the loop) until condition() holds; fail after the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.001)


def prompt_of(tokens: int) -> str:
    """A prompt whose estimate_tokens is exactly ``tokens`` (>= 5)."""
    text = "x" * (4 * (tokens - 4))
    assert estimate_tokens(text) == tokens
    return text


# -- (a) concurrency ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_concurrency", [1, 3, 8])
@pytest.mark.parametrize("rpm", [None, 100_000])
def test_in_flight_never_exceeds_max_concurrency(max_concurrency: int, rpm: int | None) -> None:
    async def main() -> tuple[int, Scheduler]:
        scheduler = Scheduler(max_concurrency=max_concurrency, rpm=rpm)
        in_flight = observed = 0

        async def one(i: int) -> None:
            nonlocal in_flight, observed
            async with scheduler.admit(f"prompt {i}"):
                in_flight += 1
                observed = max(observed, in_flight)
                await asyncio.sleep(random.uniform(0.01, 0.02))  # the request's own work
                in_flight -= 1
            await scheduler.succeeded()

        await asyncio.gather(*(one(i) for i in range(60)))
        return observed, scheduler

    observed, scheduler = asyncio.run(main())
    assert observed <= max_concurrency
    assert observed == max_concurrency  # really concurrent: the limit is reached, not just respected
    assert scheduler.peak_in_flight == observed


def test_without_limits_the_first_wave_is_four_and_successes_open_more_slots() -> None:
    async def main() -> None:
        scheduler = Scheduler(max_concurrency=10)
        assert scheduler.limit == 4
        gate = asyncio.Event()
        inside = 0

        async def one() -> None:
            nonlocal inside
            async with scheduler.admit("p"):
                inside += 1
                await gate.wait()

        tasks = [asyncio.create_task(one()) for _ in range(10)]
        await wait_until(lambda: inside == 4)
        for _ in range(20):
            await asyncio.sleep(0)
        assert inside == 4  # the other six wait for a slot
        await scheduler.succeeded()
        await scheduler.succeeded()
        await wait_until(lambda: inside == 6)  # each success opens one more slot (slow start)
        gate.set()
        await asyncio.gather(*tasks)
        assert scheduler.peak_in_flight == 6

    asyncio.run(main())


def test_initial_concurrency_above_the_maximum_is_capped() -> None:
    async def main() -> int:
        scheduler = Scheduler(max_concurrency=2, initial_concurrency=5)
        gate = asyncio.Event()

        async def one() -> None:
            async with scheduler.admit("p"):
                await gate.wait()

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        for _ in range(20):
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        return scheduler.peak_in_flight

    assert asyncio.run(main()) <= 2


# -- (b) requests per minute: an even pace, no burst ------------------------------------------


def interval(per_minute: int) -> float:
    """Seconds between two admissions at the scheduler's starting pace."""
    return 60.0 / (per_minute * Scheduler(max_concurrency=1)._pace)


@pytest.mark.parametrize("rpm", [1, 5, 90, 600, 3000])
def test_rpm_is_paced_evenly_so_no_window_short_or_long_holds_more_than_its_share(rpm: int) -> None:
    n = min(3 * rpm + 1, 400)  # up to three minutes' worth

    async def main() -> list[float]:
        return await admit_all(Scheduler(max_concurrency=n, rpm=rpm), ["p"] * n)

    starts = run_virtual(main)
    # A provider enforcing per second (OpenAI: 60,000 RPM as 1,000 a second) sees no burst...
    assert most_in_window(starts, 1.0 - 1e-9) <= math.floor(rpm / 60 * PACE) + 1
    # ...and one enforcing over a minute never more than the RPM.
    assert most_in_window(starts, 60.0 - 1e-6) <= rpm
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 60.0 / rpm * 0.999  # never faster than the limit
    # The budget is used, not wasted: within 2% of the limit.
    assert starts[-1] - starts[0] <= (n - 1) * 60.0 / rpm / 0.98


def test_a_late_loop_makes_up_a_few_milliseconds_but_never_bursts() -> None:
    rpm = 3000  # one every 20 ms

    async def main() -> list[float]:
        scheduler = Scheduler(max_concurrency=100, rpm=rpm)
        loop = asyncio.get_running_loop()
        starts: list[float] = []

        async def one() -> None:
            async with scheduler.admit("p"):
                starts.append(loop.time())
                if len(starts) % 10 == 0:  # the loop was busy for 4 ms: the virtual clock jumps
                    loop._jumping.now += 0.004  # type: ignore[attr-defined]

        await asyncio.gather(*(one() for _ in range(200)))
        return sorted(starts)

    starts = run_virtual(main)
    assert most_in_window(starts, 1.0 - 1e-9) <= math.floor(rpm / 60 * PACE) + 1
    # Every 10th admission was 4 ms late; the pace made it good instead of losing 2% of the rate.
    assert starts[-1] - starts[0] <= 199 * interval(rpm) + 0.005


# -- (c) tokens per minute: prompt + max_tokens reserved at admission --------------------------


async def admit_sized(scheduler: Scheduler, sizes: list[int]) -> list[tuple[float, int]]:
    """Admit one prompt of each estimated size at once; return (start time, tokens reserved), sorted."""
    loop = asyncio.get_running_loop()
    starts: list[tuple[float, int]] = []

    async def one(size: int) -> None:
        async with scheduler.admit(prompt_of(size)) as admission:
            starts.append((loop.time(), admission.reserved))

    await asyncio.gather(*(one(size) for size in sizes))
    return sorted(starts)


def test_tpm_reserves_the_prompt_plus_max_tokens_and_binds_when_tighter() -> None:
    tpm, n, max_tokens = 60_000, 25, 90

    async def main() -> list[tuple[float, int]]:
        scheduler = Scheduler(max_concurrency=n, rpm=100_000, tpm=tpm, max_tokens=max_tokens)
        assert scheduler.estimate(prompt_of(10)) == 100  # 10 prompt tokens + max_tokens
        return await admit_sized(scheduler, [10] * n)

    starts = run_virtual(main)
    assert {k for _, k in starts} == {100}
    times = [t for t, _ in starts]
    # Tokens bind (100 per request of 1,000 a second), not requests: evenly, and no second holds
    # more than its 1,000 tokens although a window also holds the request that starts it.
    assert most_in_window(times, 1.0 - 1e-9, [100.0] * n) <= tpm / 60
    assert times[-1] - times[0] == pytest.approx((n - 1) * 100 / (tpm / 60 - 100))


@pytest.mark.parametrize("sizes", [[34], [5, 34, 20, 50], [80], [250], [600, 7], [34, 250, 5, 1000, 80]])
def test_no_window_holds_more_tokens_than_its_share(sizes: list[int]) -> None:
    tpm = 6_000  # 100 tokens a second; some requests here are bigger than a whole second's budget
    requests = sizes * max(2, 3 * tpm // sum(sizes) // 10)
    random.Random(7).shuffle(requests)

    async def main() -> list[tuple[float, int]]:
        return await admit_sized(Scheduler(max_concurrency=len(requests), tpm=tpm), requests)

    starts = run_virtual(main)
    assert sorted(k for _, k in starts) == sorted(requests)  # every one got through, big ones too
    times, tokens = [t for t, _ in starts], [float(k) for _, k in starts]
    per_second = tpm / 60
    if max(sizes) <= per_second / 2:  # a per-second server can take these: it never sees too many
        assert most_in_window(times, 1.0 - 1e-6, tokens) <= per_second
    for window in (1.0, 60.0):  # bigger ones: never more than the share plus that one request
        assert most_in_window(times, window - 1e-6, tokens) <= per_second * window * PACE + max(sizes)
    # The budget is used: never slower than half the limit, never faster than the pace.
    before_last = sum(tokens) - tokens[-1]
    assert before_last / (per_second * PACE) * 0.999 <= times[-1] <= before_last / (per_second / 2) * 1.001


def test_a_run_bound_by_max_tokens_reservations_says_so_and_suggests_a_value() -> None:
    async def main(max_tokens: int, rpm: int | None) -> Scheduler:
        scheduler = Scheduler(max_concurrency=50, rpm=rpm, tpm=60_000, max_tokens=max_tokens)
        await admit_sized(scheduler, [10] * 40)
        return scheduler

    bound = run_virtual(lambda: main(256, None))
    note = bound.reservation_note(output_tokens=40 * 9)  # replies of 9 tokens against 256 reserved
    assert note is not None
    assert "`max_tokens` = 256" in note and "averaged 9 tokens" in note and "`max_tokens` = 32" in note
    assert "about 6.3x" in note  # (10 + 256) / (10 + 32)
    assert bound.reservation_note(output_tokens=40 * 200) is None  # the replies need the room
    requests_bound = run_virtual(lambda: main(256, 60))  # one a second: the RPM binds, not tokens
    assert requests_bound.reservation_note(output_tokens=40 * 9) is None


# -- (d) the shared pause ----------------------------------------------------------------------

PAUSE = 0.5
EPSILON = 0.002


def test_a_429_pauses_everyone_who_arrives_during_the_pause() -> None:
    async def main() -> tuple[float, list[float]]:
        scheduler = Scheduler(max_concurrency=8)
        t429 = time.monotonic()
        await scheduler.rate_limited_by_server(PAUSE)
        starts: list[float] = []

        async def one(arrive_after: float) -> None:
            await asyncio.sleep(arrive_after)  # arrival time, not a wait for work
            async with scheduler.admit("p"):
                starts.append(time.monotonic())

        await asyncio.wait_for(asyncio.gather(*(one(d) for d in (0, 0, 0.1, 0.3, 0.45))), timeout=5)
        return t429, starts

    t429, starts = asyncio.run(main())
    assert len(starts) == 5
    assert min(starts) >= t429 + PAUSE - EPSILON
    assert max(starts) <= t429 + PAUSE + 0.25  # and they do go once it ends


def test_a_429_also_holds_back_requests_already_waiting_for_a_slot() -> None:
    async def main() -> tuple[float, list[float]]:
        scheduler = Scheduler(max_concurrency=2)
        gate = asyncio.Event()
        starts: list[float] = []

        async def holder() -> None:
            async with scheduler.admit("holder"):
                await gate.wait()

        async def waiter() -> None:
            async with scheduler.admit("waiter"):
                starts.append(time.monotonic())

        holders = [asyncio.create_task(holder()) for _ in range(2)]
        await wait_until(lambda: scheduler.peak_in_flight == 2)
        waiters = [asyncio.create_task(waiter()) for _ in range(3)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert starts == []  # queued behind the two holders
        t429 = time.monotonic()
        await scheduler.rate_limited_by_server(PAUSE)
        gate.set()  # slots free up during the pause
        await asyncio.wait_for(asyncio.gather(*holders, *waiters), timeout=5)
        return t429, starts

    t429, starts = asyncio.run(main())
    assert len(starts) == 3
    assert min(starts) >= t429 + PAUSE - EPSILON


def test_a_429_also_holds_back_requests_waiting_in_the_rate_bucket() -> None:
    async def main() -> tuple[float, list[float]]:
        scheduler = Scheduler(max_concurrency=20, rpm=600)  # 10 at once, then one every ~0.1 s
        starts: list[float] = []

        async def one() -> None:
            async with scheduler.admit("p"):
                starts.append(time.monotonic())

        tasks = [asyncio.create_task(one()) for _ in range(13)]
        await wait_until(lambda: len(starts) == 10)
        t429 = time.monotonic()
        await scheduler.rate_limited_by_server(PAUSE)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        return t429, sorted(starts)

    t429, starts = asyncio.run(main())
    assert len(starts) == 13
    assert all(s >= t429 + PAUSE - EPSILON for s in starts[10:])


def test_after_a_pause_requests_restart_at_the_pace_not_in_one_burst() -> None:
    rpm, n, pause = 600, 12, 0.5  # one every ~0.1 s

    async def main() -> tuple[float, list[float]]:
        scheduler = Scheduler(max_concurrency=n, rpm=rpm)
        t429 = time.monotonic()
        await scheduler.rate_limited_by_server(pause)
        starts: list[float] = []

        async def one() -> None:
            async with scheduler.admit("p"):
                starts.append(time.monotonic())

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout=10)
        return t429, sorted(starts)

    t429, starts = asyncio.run(main())
    assert starts[0] >= t429 + pause - EPSILON
    # Requests queued during the pause must not go at once when it ends: they follow at the pace.
    assert sum(s < starts[0] + 0.05 for s in starts) == 1
    assert starts[-1] - starts[0] >= (n - 1) * 60 / rpm * 0.95


def test_without_retry_after_the_pause_is_the_base_backoff_doubling_per_consecutive_429() -> None:
    base = 0.1

    async def main() -> tuple[float, float, float]:
        scheduler = Scheduler(max_concurrency=4, base_pause=base)
        t0 = time.monotonic()
        await scheduler.rate_limited_by_server(None)
        async with scheduler.admit("p"):
            first = time.monotonic() - t0
        t1 = time.monotonic()
        await scheduler.rate_limited_by_server(None)  # no success in between: the next pause doubles
        async with scheduler.admit("p"):
            second = time.monotonic() - t1
        await scheduler.succeeded()
        t2 = time.monotonic()
        await scheduler.rate_limited_by_server(None)  # a success reset the backoff
        async with scheduler.admit("p"):
            third = time.monotonic() - t2
        return first, second, third

    first, second, third = asyncio.run(main())
    assert base - EPSILON <= first < base + 0.08
    assert 2 * base - EPSILON <= second < 2 * base + 0.08
    assert base - EPSILON <= third < base + 0.08


def test_one_burst_of_429s_without_retry_after_pauses_for_one_backoff() -> None:
    base = 0.05

    async def main() -> float:
        scheduler = Scheduler(max_concurrency=8, base_pause=base)
        for _ in range(7):  # seven requests sent together all come back 429, no retry-after
            await scheduler.rate_limited_by_server(None)
        t0 = time.monotonic()
        async with asyncio.timeout(1.0):
            async with scheduler.admit("p"):
                return time.monotonic() - t0

    assert asyncio.run(main()) < 4 * base


# -- (e) AIMD ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "limit"),
    [
        ({"max_concurrency": 32}, 4),
        ({"max_concurrency": 2}, 2),
        ({"max_concurrency": 32, "rpm": 100}, 32),
        ({"max_concurrency": 32, "tpm": 10_000}, 32),
        ({"max_concurrency": 32, "initial_concurrency": 7}, 7),
    ],
)
def test_starting_limit(kwargs: dict[str, int], limit: int) -> None:
    assert Scheduler(**kwargs).limit == limit


def test_slow_start_doubles_per_window_then_a_429_halves_and_growth_turns_additive() -> None:
    async def main() -> None:
        s = Scheduler(max_concurrency=64)
        for expected in (8, 16, 32):
            for _ in range(int(s.limit)):  # one window: as many replies as the limit
                await s.succeeded()
            assert s.limit == expected
        await s.rate_limited_by_server(0.05)
        assert s.limit == 16
        for _ in range(5):  # more 429s from the same burst do not halve again
            await s.rate_limited_by_server(0.05)
        assert s.limit == 16
        assert s.rate_limited == 6
        async with s.admit("p"):  # waits out the pause
            pass
        for _ in range(16):  # congestion avoidance: about +1 per window, not doubling
            await s.succeeded()
        assert 16.5 < s.limit < 17.5
        await s.rate_limited_by_server(0.02)  # a new pause: halves again
        assert 8 < s.limit < 9

    asyncio.run(main())


def test_limit_never_drops_below_one_nor_rises_above_max_concurrency() -> None:
    async def main() -> None:
        s = Scheduler(max_concurrency=5)
        for _ in range(10):
            await s.rate_limited_by_server(0.0)
        assert s.limit == 1
        async with s.admit("p"):  # one slot still lets work through
            pass
        for _ in range(200):
            await s.succeeded()
        assert s.limit == 5

    asyncio.run(main())


@settings(max_examples=60, deadline=None)
@given(max_concurrency=st.integers(1, 40), events=st.lists(st.sampled_from(["ok", "429"]), max_size=80))
def test_aimd_limit_stays_in_bounds(max_concurrency: int, events: list[str]) -> None:
    async def main() -> None:
        s = Scheduler(max_concurrency=max_concurrency)
        for event in events:
            before = s.limit
            if event == "ok":
                await s.succeeded()
                assert s.limit >= before
            else:
                await s.rate_limited_by_server(0.0)  # a zero pause ends at once, so each 429 halves
                assert s.limit == max(1.0, before / 2)
            assert 1 <= s.limit <= max_concurrency

    asyncio.run(main())


# -- (f) token estimates -----------------------------------------------------------------------


def test_estimates_grow_when_the_server_counts_more_tokens() -> None:
    prompt = "a prompt of some length " * 8
    raw = estimate_tokens(prompt)

    async def main() -> list[int]:
        s = Scheduler(max_concurrency=4, max_tokens=50)
        seen = [s.estimate(prompt)]
        for _ in range(6):
            async with s.admit(prompt) as admission:
                admission.settle(2 * raw)
            seen.append(s.estimate(prompt))
        async with s.admit(prompt) as admission:
            assert admission.reserved == seen[-1]
            admission.settle(None)  # no usage reported: nothing learned
        assert s.estimate(prompt) == seen[-1]
        with pytest.raises(RuntimeError):
            async with s.admit(prompt) as admission:
                admission.settle(100 * raw)
                raise RuntimeError("the request failed")  # a failed request teaches nothing
        assert s.estimate(prompt) == seen[-1]
        return seen

    seen = asyncio.run(main())
    assert seen[0] == raw + 50
    assert all(b > a for a, b in itertools.pairwise(seen))
    assert seen[-1] <= 2 * raw + 50


def test_estimates_converge_to_what_the_server_counts() -> None:
    prompt = "a prompt of some length " * 8
    actual = 2 * estimate_tokens(prompt)  # the server always counts twice our raw estimate

    async def main() -> int:
        s = Scheduler(max_concurrency=4)
        for _ in range(200):
            async with s.admit(prompt) as admission:
                admission.settle(actual)
        return s.estimate(prompt)

    # Learned against the raw estimate; against the corrected one it would settle at sqrt(2) x raw.
    assert asyncio.run(main()) == pytest.approx(actual, rel=0.05)


def test_before_send_gates_every_request_after_the_buckets() -> None:
    async def main() -> list[str]:
        events: list[str] = []
        outside = asyncio.Semaphore(0)  # e.g. a limit shared with other processes

        async def before_send() -> None:
            events.append("asked")
            await outside.acquire()

        scheduler = Scheduler(max_concurrency=4, rpm=100_000, before_send=before_send)

        async def one(i: int) -> None:
            async with scheduler.admit("p"):
                events.append(f"sent {i}")

        tasks = [asyncio.create_task(one(i)) for i in range(3)]
        await wait_until(lambda: events.count("asked") == 3)
        assert not any(e.startswith("sent") for e in events)  # nobody goes before the outside says so
        outside.release()
        await wait_until(lambda: sum(e.startswith("sent") for e in events) == 1)
        outside.release()
        outside.release()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        return events

    events = asyncio.run(main())
    assert events.count("asked") == 3 and sum(e.startswith("sent") for e in events) == 3


# -- (g) what the server says: headroom, limits, and why a 429 came --------------------------

HEADROOM = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "20"}
RATE_429 = {"code": "rate_limit_exceeded", "type": "requests", "message": "Please try again in 50ms."}


def test_headroom_the_server_reports_is_spent_at_once_and_no_further() -> None:
    async def main() -> list[float]:
        scheduler = Scheduler(max_concurrency=100, rpm=60)  # paced: one a second
        loop = asyncio.get_running_loop()
        async with scheduler.admit("first"):
            scheduler.observe(200, HEADROOM)  # what the response hook passes on
        t0 = loop.time()
        return [t - t0 for t in await admit_all(scheduler, ["p"] * 20)]

    starts = run_virtual(main)
    # 20 left after the first request; 17 of them are spent at once, a margin of 2 + 5% kept...
    assert sum(t < 0.01 for t in starts) == 17
    # ...and the pace counts them as sent, so the next one waits its turn behind all of them.
    assert starts[17] >= 17


def test_a_429_on_headroom_stops_trusting_it() -> None:
    async def main() -> tuple[Scheduler, list[float]]:
        scheduler = Scheduler(max_concurrency=100, rpm=60)
        async with scheduler.admit("first"):
            scheduler.observe(200, HEADROOM)
        async with scheduler.admit("on headroom") as admission:
            assert admission.via_credit
            error = {"code": "rate_limit_exceeded", "type": "requests"}
            scheduler.observe(429, {**HEADROOM, "retry-after-ms": "20"}, error)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        return scheduler, [t - t0 for t in await admit_all(scheduler, ["p"] * 3)]

    scheduler, starts = run_virtual(main)
    assert starts[1] - starts[0] >= 0.99  # paced again, whatever the headers say
    assert scheduler.rejections == {"rate, sent on the server's headroom": 1}
    assert scheduler.limit == 100  # concurrency was not the problem


@pytest.mark.parametrize(("told", "header", "in_force"), [(600, "60", 60), (None, "120", 120), (60, "600", 60)])
def test_the_lower_of_our_limit_and_the_servers_is_in_force(told: int | None, header: str, in_force: int) -> None:
    scheduler = Scheduler(max_concurrency=4, rpm=told)
    scheduler.observe(200, {"x-ratelimit-limit-requests": header, "x-ratelimit-limit-tokens": "90000"})
    assert (scheduler.rpm, scheduler.tpm) == (in_force, 90_000)


def test_workers_sharing_a_budget_take_their_share_of_what_the_headers_say() -> None:
    async def main() -> tuple[Scheduler, list[float]]:
        scheduler = Scheduler(max_concurrency=100, shared_by=2)  # told nothing, one of two workers
        loop = asyncio.get_running_loop()
        async with scheduler.admit("first"):
            scheduler.observe(200, {"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "40"})
        t0 = loop.time()
        return scheduler, [t - t0 for t in await admit_all(scheduler, ["p"] * 30)]

    scheduler, starts = run_virtual(main)
    assert scheduler.rpm == 60  # half the limit
    assert sum(t < 0.01 for t in starts) == 17  # half the headroom (20), less the margin


def test_a_rate_429_pauses_everyone_briefly_and_keeps_concurrency_and_pace() -> None:
    async def main() -> tuple[Scheduler, float]:
        scheduler = Scheduler(max_concurrency=32, rpm=6000)
        pace = scheduler._pace
        loop = asyncio.get_running_loop()
        async with scheduler.admit("p"):
            scheduler.observe(429, {"retry-after-ms": "50"}, RATE_429)
            t429 = loop.time()
        await scheduler.rate_limited_by_server(0.05)  # what the retry layer does next: counted once
        async with scheduler.admit("next"):
            waited = loop.time() - t429
        assert scheduler._pace == pace  # one stray 429 costs the window nothing: only retried
        return scheduler, waited

    scheduler, waited = asyncio.run(main())
    assert 0.05 - EPSILON <= waited < 0.5
    assert scheduler.limit == 32
    assert scheduler.rate_limited == 1 and scheduler.rejections == {"rate, paced": 1}


def test_clustered_rate_429s_slow_the_pace_and_successes_restore_it() -> None:
    async def main() -> list[float]:
        scheduler = Scheduler(max_concurrency=32, rpm=60_000)
        paces = [scheduler._pace]
        for _ in range(2):  # two pauses in a row: more than the jitter of a busy machine
            async with scheduler.admit("p"):
                scheduler.observe(429, {"retry-after-ms": "1"}, RATE_429)
            await asyncio.sleep(0.002)
        paces.append(scheduler._pace)
        for _ in range(500):
            await scheduler.succeeded()
        paces.append(scheduler._pace)
        return paces

    start, slowed, restored = asyncio.run(main())
    assert slowed == pytest.approx(start * 0.98)
    assert restored == PACE


@pytest.mark.parametrize("code", ["insufficient_quota", "resource_unavailable"])
def test_quota_and_capacity_429s_are_not_the_schedulers_business(code: str) -> None:
    async def main() -> Scheduler:
        scheduler = Scheduler(max_concurrency=8)
        async with scheduler.admit("p"):
            scheduler.observe(429, {}, {"code": code, "type": code})
        async with asyncio.timeout(1):
            async with scheduler.admit("next"):  # no pause
                pass
        return scheduler

    scheduler = asyncio.run(main())
    assert scheduler.limit == 4 and scheduler.rate_limited == 0 and not scheduler.rejections


# -- end to end against the fake server --------------------------------------------------------


def chat(server: FakeOpenAIServer, scheduler: Scheduler | None = None) -> ChatOpenAI:
    """The real client, pointed at the fake server, with SDK retries off as in production.

    With a scheduler, its response hook is wired as flows/run/runtime.py wires it.
    """
    hooks = {"response": [scheduler.on_response]} if scheduler is not None else {}
    return ChatOpenAI(
        model="fake-model",
        base_url=server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=10,
        use_responses_api=False,
        http_async_client=httpx.AsyncClient(timeout=10, event_hooks=hooks) if scheduler is not None else None,
    )


def spec(concurrency: int = 8) -> EnrichSpec:
    return EnrichSpec(template=parse_template("Explain {topic}"), output_column="answer", max_concurrency=concurrency)


@pytest.mark.parametrize("algorithm", ["sliding", "token_bucket"])
def test_a_run_held_to_an_rpm_enforced_per_second_loses_nothing(algorithm: str) -> None:
    rows, rpm = 12, 300  # 5 a second, enforced over each second
    topics = [f"paced topic {i}" for i in range(rows)]
    scheduler = Scheduler(max_concurrency=8, rpm=rpm)
    policy = RetryPolicy(max_retries=6, base_delay=0.01, classify=classify_openai_error)
    behaviour = Behaviour(latency=0.01, rpm=rpm, window_seconds=1.0, limit_algorithm=algorithm)  # type: ignore[arg-type]
    with FakeOpenAIServer(behaviour) as server:
        out = enrich_frame(
            pl.DataFrame({"topic": topics}), spec(), chat(server), ctx=CallContext(policy=policy, scheduler=scheduler)
        )
        assert out["answer"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
        assert out[ERROR_COLUMN].null_count() == rows
        # Paced just under the limit: at most one 429 when a busy machine delays one arrival by
        # the few milliseconds of slack (the bursts of a one-second bucket drew one per second).
        assert server.stats.statuses[429] <= 1
        assert server.stats.requests <= rows + 1


class TightProviderServer(FakeOpenAIServer):
    """A provider enforcing 5 requests per one-second window (tighter than we were told: nothing),
    optionally without any retry-after or x-ratelimit-reset header."""

    send_retry_after = True

    def handle(self, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, str], bytes | None]:
        status, headers, payload = super().handle(body, auth)
        if not self.send_retry_after:
            headers = {k: v for k, v in headers.items() if not k.startswith(("retry-after", "x-ratelimit"))}
        return status, headers, payload


@pytest.mark.parametrize(("send_retry_after", "most_429s"), [(True, 12), (False, 24)])
def test_a_provider_tighter_than_we_were_told_is_survived_with_few_429s(send_retry_after: bool, most_429s: int) -> None:
    rows, retries = 12, 6
    topics = [f"crowded topic {i}" for i in range(rows)]
    # Without retry-after the pause is our own backoff; keep it short so the test stays fast.
    scheduler = Scheduler(max_concurrency=8, base_pause=0.2)
    policy = RetryPolicy(max_retries=retries, base_delay=0.05, classify=classify_openai_error)
    server = TightProviderServer(Behaviour(latency=0.0, rpm=300, window_seconds=1.0))
    server.send_retry_after = send_retry_after
    with server:
        out = enrich_frame(
            pl.DataFrame({"topic": topics}), spec(), chat(server), ctx=CallContext(policy=policy, scheduler=scheduler)
        )
        assert out["answer"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
        assert out[ERROR_COLUMN].null_count() == rows
        rejected = server.stats.statuses[429]
    assert rejected > 0  # the provider really pushed back
    assert scheduler.rate_limited == rejected
    # Each row alone would retry until it got through: with rows x retries of budget and no shared
    # pause this run sees 40+ 429s and loses rows; the shared pause keeps it to a few per row at most.
    assert rejected <= most_429s < rows * retries
    assert scheduler.limit < 8  # and the run learned to send less at once


def test_a_servers_concurrency_cap_is_learned_from_its_429s_not_halved_past() -> None:
    rows, cap = 40, 3
    topics = [f"capped topic {i}" for i in range(rows)]
    scheduler = Scheduler(max_concurrency=16)  # told nothing
    policy = RetryPolicy(max_retries=6, base_delay=0.01, classify=classify_openai_error)
    with FakeOpenAIServer(Behaviour(latency=0.03, max_in_flight=cap)) as server:
        out = enrich_frame(
            pl.DataFrame({"topic": topics}),
            spec(16),
            chat(server, scheduler),
            ctx=CallContext(policy=policy, scheduler=scheduler),
        )
        assert out["answer"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
        rejected = server.stats.kinds["concurrency"]
    assert scheduler.limit == cap  # the cap itself: not 1 or 2 after halving
    # The ramp adds one request in flight per 10 ms, so it stops within a 429's round trip of the
    # cap: one over it on an idle machine, a few when the machine is busy.
    assert 1 <= rejected <= 6
    assert scheduler.rejections == {"concurrency": rejected}


def test_reset_headers_are_a_wait_only_for_a_429_without_a_retry_time() -> None:
    def retry_after(status: int, headers: dict[str, str]) -> float | None:
        response = httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://127.0.0.1/v1"))
        kind = openai.RateLimitError if status == 429 else openai.InternalServerError
        return classify_openai_error(kind("injected", response=response, body=None)).retry_after

    # Every response carries them; on a 60 s window they say up to a minute until the budget is full.
    reset = {"x-ratelimit-reset-requests": "59s", "x-ratelimit-remaining-requests": "2000"}
    assert retry_after(500, reset) is None  # a 500 is retried after the backoff, not in a minute
    assert retry_after(429, {**reset, "retry-after-ms": "20"}) == pytest.approx(0.02)
    assert retry_after(429, reset) == pytest.approx(59)
