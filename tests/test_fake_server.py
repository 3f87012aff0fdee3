"""The fake OpenAI server behaves like a strict provider: proved over real HTTP on 127.0.0.1 with httpx."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.fakes.openai_server import Behaviour, FakeOpenAIServer, expected_answer, format_duration

LIMIT_HEADERS = [
    f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset") for kind in ("requests", "tokens")
]
DURATION = re.compile(r"^(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


@contextmanager
def serving(**behaviour: Any) -> Iterator[tuple[FakeOpenAIServer, httpx.Client]]:
    """A started server with this behaviour and a plain httpx client pointed at it."""
    with FakeOpenAIServer(Behaviour(**behaviour)) as server, httpx.Client(base_url=server.base_url, timeout=10) as c:
        yield server, c


def ask(client: httpx.Client, prompt: str, **extra: Any) -> httpx.Response:
    """POST one chat completion."""
    body = {"model": "fake", "messages": [{"role": "user", "content": prompt}], **extra}
    return client.post("/chat/completions", json=body, headers={"authorization": "Bearer sk-test"})


def error_of(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


def test_durations_are_written_as_openai_writes_them() -> None:
    assert [format_duration(s) for s in (0.02, 0.0001, 1, 1.5, 17.28, 360, 61.25)] == [
        "20ms", "1ms", "1s", "1.5s", "17.28s", "6m0s", "1m1.25s",
    ]  # fmt: skip


def test_a_normal_answer_is_derived_from_the_prompt_and_counted() -> None:
    with serving() as (server, client):
        reply = ask(client, "hello")
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == expected_answer("hello")
    assert reply.json()["choices"][0]["finish_reason"] == "stop"
    assert not any(h in reply.headers for h in LIMIT_HEADERS)  # no limits, no headers
    assert server.stats.kinds == {"ok": 1} and server.stats.statuses == {200: 1}


def test_quota_is_a_429_that_never_clears_and_has_no_retry_headers() -> None:
    with serving(rpm=1000) as (server, client):
        replies = [ask(client, "FAULT:quota") for _ in range(3)]
    for reply in replies:
        assert reply.status_code == 429
        assert reply.json() == {
            "error": {
                "message": "You exceeded your current quota, please check your plan and billing details.",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
        assert "retry-after" not in reply.headers and "retry-after-ms" not in reply.headers
    assert server.stats.kinds["quota"] == 3


def test_quota_runs_out_after_some_answers() -> None:
    with serving(quota_after=3) as (server, client):
        statuses = [ask(client, f"row {i}").status_code for i in range(6)]
        last = ask(client, "row 0")
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert error_of(last)["code"] == "insufficient_quota"
    assert server.stats.kinds == {"ok": 3, "quota": 4}


def test_unavailable_is_a_retryable_429_without_retry_headers() -> None:
    with serving() as (server, client):
        always = ask(client, "FAULT:unavailable")
        flaky = [ask(client, "FAULT:flakyunavailable:2") for _ in range(3)]
    assert always.status_code == 429 and error_of(always)["code"] == "resource_unavailable"
    assert "retry-after-ms" not in always.headers and "retry-after" not in always.headers
    assert [r.status_code for r in flaky] == [429, 429, 200]
    assert error_of(flaky[0])["code"] == "resource_unavailable"
    assert server.stats.kinds == {"unavailable": 1, "flakyunavailable": 2, "ok": 1}


def test_a_flagged_prompt_is_refused_the_same_way_every_time() -> None:
    with serving() as (server, client):
        replies = [ask(client, "FAULT:invalid_prompt") for _ in range(2)]
    for reply in replies:
        assert reply.status_code == 400
        error = error_of(reply)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_prompt")
        assert error["message"].startswith("Invalid prompt: your prompt was flagged as potentially violating")
    assert server.stats.kinds["invalid_prompt"] == 2


def test_a_bad_key_is_a_401_by_prompt_or_by_require_key() -> None:
    with serving() as (_, client):
        by_prompt = ask(client, "FAULT:badkey")
    with serving(require_key="sk-right") as (server, client):
        wrong = ask(client, "hello")
        right = client.post(
            "/chat/completions",
            json={"model": "fake", "messages": [{"role": "user", "content": "hello"}]},
            headers={"authorization": "Bearer sk-right"},
        )
    assert by_prompt.status_code == wrong.status_code == 401
    assert error_of(by_prompt)["code"] == error_of(wrong)["code"] == "invalid_api_key"
    assert right.status_code == 200
    assert server.stats.kinds == {"badkey": 1, "ok": 1}


@pytest.mark.parametrize(("fault", "share"), [("length", 2), ("content_filter", 4)])
def test_cut_replies_say_why_and_keep_their_usage(fault: str, share: int) -> None:
    prompt = f"FAULT:{fault} topic"
    with serving() as (server, client):
        reply = ask(client, prompt, max_tokens=7)
    choice = reply.json()["choices"][0]
    full = expected_answer(prompt)
    assert reply.status_code == 200 and choice["finish_reason"] == fault
    assert choice["message"]["content"] == full[: len(full) // share] != full
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert server.stats.kinds[fault] == 1


def test_trickle_sends_the_head_at_once_then_the_body_a_byte_at_a_time() -> None:
    with serving(trickle_interval=0.002) as (server, client):
        body = {"messages": [{"role": "user", "content": "FAULT:trickle"}]}
        with client.stream("POST", "/chat/completions", json=body) as r:
            length = int(r.headers["content-length"])
            chunks = list(r.iter_raw())
        assert r.status_code == 200
        assert sum(map(len, chunks)) == length and len(chunks) > 10  # arrived in many small pieces
        body = b"".join(chunks)
        assert expected_answer("FAULT:trickle").encode() in body
        assert server.stats.kinds["trickle"] == 1


def test_trickle_all_trickles_every_reply() -> None:
    with serving(trickle_all=True, trickle_interval=0.001) as (server, client):
        with client.stream("POST", "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}) as r:
            chunks = list(r.iter_raw())
    assert len(chunks) > 10 and expected_answer("x").encode() in b"".join(chunks)
    assert server.stats.kinds["ok"] == 1


def outcome_when_stopped(server: FakeOpenAIServer, prompt: str) -> tuple[BaseException | None, float]:
    """Start a request that would never finish, stop the server, and return what the client saw and when."""
    seen: dict[str, Any] = {}

    def call() -> None:
        try:
            with httpx.Client(timeout=30) as c:
                c.post(f"{server.base_url}/chat/completions", json={"messages": [{"role": "user", "content": prompt}]})
        except httpx.HTTPError as exc:
            seen["error"] = exc
        seen["at"] = time.monotonic()

    held = server.stats.in_flight
    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 5
    while server.stats.in_flight == held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats.in_flight == held + 1  # the request is being held
    stopped = time.monotonic()
    server.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    return seen.get("error"), seen["at"] - stopped


def test_hang_never_answers_until_the_server_stops() -> None:
    with serving() as (server, client):
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                "/chat/completions", json={"messages": [{"role": "user", "content": "FAULT:hang"}]}, timeout=0.3
            )
        error, after = outcome_when_stopped(server, "FAULT:hang")
    assert isinstance(error, httpx.RemoteProtocolError | httpx.ReadError)
    assert after < 5  # bounded by the stop, not by the client's 30 s timeout
    assert server.stats.kinds["hang"] == 2


def test_a_trickle_stops_when_the_server_stops() -> None:
    with serving(trickle_interval=0.5) as (server, _):
        error, after = outcome_when_stopped(server, "FAULT:trickle")
    assert isinstance(error, httpx.RemoteProtocolError | httpx.ReadError)
    assert after < 5


def test_reset_closes_the_connection_with_a_tcp_rst() -> None:
    with serving() as (server, client):
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)) as caught:
            ask(client, "FAULT:reset")
        assert ask(client, "after").status_code == 200  # the server itself is fine
    assert "reset" in str(caught.value).lower()
    assert server.stats.kinds["reset"] == 1 and server.stats.statuses["reset"] == 1


def test_every_response_carries_the_rate_limit_headers() -> None:
    with serving(rpm=120, tpm=10_000) as (_, client):
        ok = ask(client, "hello", max_tokens=100)
        refused = ask(client, "FAULT:400")
    for reply in (ok, refused):
        assert all(h in reply.headers for h in LIMIT_HEADERS)
        assert DURATION.match(reply.headers["x-ratelimit-reset-requests"])
        assert DURATION.match(reply.headers["x-ratelimit-reset-tokens"])
    assert ok.headers["x-ratelimit-limit-requests"] == "120"
    assert ok.headers["x-ratelimit-limit-tokens"] == "10000"
    assert ok.headers["x-ratelimit-remaining-requests"] == "119"
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 1 - 100)  # prompt + max_tokens reserved
    assert refused.headers["x-ratelimit-remaining-requests"] == "118"
    assert ok.headers["x-ratelimit-reset-requests"].endswith("s")


def test_over_the_rpm_is_a_rate_limit_429_with_a_wait() -> None:
    with serving(rpm=2) as (server, client):
        replies = [ask(client, f"row {i}") for i in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    error = error_of(replies[2])
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert re.search(r"Please try again in (\d+(\.\d+)?s|\d+ms)\.", error["message"])
    assert 55_000 <= int(replies[2].headers["retry-after-ms"]) <= 60_000  # the 60 s window's oldest admission
    assert replies[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert server.stats.kinds == {"ok": 2, "rate_limit_requests": 1}


def test_over_the_tpm_is_a_tokens_429_and_too_large_never_fits() -> None:
    with serving(tpm=100) as (server, client):
        first = ask(client, "short", max_tokens=60)
        second = ask(client, "short", max_tokens=60)
        huge = ask(client, "short", max_tokens=500)
    assert first.status_code == 200 and second.status_code == 429
    assert (error_of(second)["code"], error_of(second)["type"]) == ("rate_limit_exceeded", "tokens")
    assert "retry-after-ms" in second.headers
    assert huge.status_code == 429 and error_of(huge)["message"].startswith("Request too large")
    assert "retry-after-ms" not in huge.headers
    assert server.stats.kinds == {"ok": 1, "rate_limit_tokens": 1, "request_too_large": 1}


def test_a_short_sliding_window_admits_its_share_and_frees_it_as_it_slides() -> None:
    # 600 RPM over a 0.2 s window: 2 requests per window.
    with serving(rpm=600, window_seconds=0.2) as (server, client):
        statuses = [ask(client, f"a{i}").status_code for i in range(3)]
        wait_ms = int(ask(client, "a3").headers["retry-after-ms"])
        time.sleep(wait_ms / 1000 + 0.01)  # the window itself is what is under test
        after = ask(client, "a4").status_code
    assert statuses == [200, 200, 429]
    assert 0 < wait_ms <= 200
    assert after == 200
    assert server.stats.kinds["rate_limit_requests"] == 2


def test_a_token_bucket_admits_a_window_at_once_then_refills_at_the_rate() -> None:
    # 60 RPM over 10 s: a bucket of 10 requests refilled at 1 per second (slow enough for a busy machine).
    with serving(rpm=60, window_seconds=10.0, limit_algorithm="token_bucket") as (_, client):
        statuses = [ask(client, f"b{i}").status_code for i in range(11)]
        refused = ask(client, "b11")
    assert statuses[:10] == [200] * 10 and statuses[10] == 429
    assert 0 < int(refused.headers["retry-after-ms"]) <= 1000  # one request's worth of refill
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert DURATION.match(refused.headers["x-ratelimit-reset-requests"])


@pytest.mark.parametrize(("charge", "second_status"), [("reserve", 429), ("usage", 200)])
def test_tpm_charges_the_reservation_or_the_usage(charge: str, second_status: int) -> None:
    # A reservation of prompt + 60 tokens fills a 100-token window; the real reply is ~6 tokens.
    with serving(tpm=100, tpm_charge=charge) as (_, client):
        first = ask(client, "short", max_tokens=60)
        second = ask(client, "short", max_tokens=60)
    assert first.status_code == 200 and second.status_code == second_status
    used = 100 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert used == (61 if charge == "reserve" else 1 + first.json()["usage"]["completion_tokens"])


def test_requests_over_the_in_flight_cap_get_an_immediate_429() -> None:
    async def main(base_url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
            body = {"messages": [{"role": "user", "content": "x"}]}
            slow = [asyncio.create_task(c.post("/chat/completions", json=body)) for _ in range(2)]
            while server.stats.in_flight < 2:
                await asyncio.sleep(0.01)
            extra = await c.post("/chat/completions", json=body)
            return [extra, *await asyncio.gather(*slow)]

    with serving(latency=1.0, max_in_flight=2) as (server, _):
        extra, *slow = asyncio.run(main(server.base_url))
    assert extra.status_code == 429
    error = error_of(extra)
    assert (error["code"], error["type"]) == ("too_many_concurrent_requests", "requests")
    assert "retry-after-ms" not in extra.headers
    assert [r.status_code for r in slow] == [200, 200]
    assert server.stats.kinds == {"ok": 2, "concurrency": 1}
