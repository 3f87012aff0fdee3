"""The fake server's Files and Batch APIs and ``service_tier``, driven by the real ``openai`` SDK on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types import Batch

from tests.fakes.openai_server import Behaviour, FakeOpenAIServer, expected_answer, expected_object

FAST = {"batch_validating_seconds": 0.05, "batch_line_seconds": 0.0, "batch_finalizing_seconds": 0.05}
DONE = ("completed", "failed", "expired", "cancelled")
SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["a", "b", "c"]}, "score": {"type": "integer", "maximum": 9}},
    "required": ["label", "score"],
    "additionalProperties": False,
}


@contextmanager
def serving(**behaviour: Any) -> Iterator[tuple[FakeOpenAIServer, OpenAI]]:
    """A started server with fast batch timings (overridable) and an SDK client without retries."""
    with FakeOpenAIServer(Behaviour(**{**FAST, **behaviour})) as server:
        client = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10)
        yield server, client
        client.close()


def request(custom_id: str, prompt: str, model: str = "fake", **body: Any) -> dict[str, Any]:
    """One batch input line for a chat completion."""
    messages = [{"role": "user", "content": prompt}]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": messages, **body}}  # fmt: skip


def upload(client: OpenAI, lines: list[Any]) -> str:
    """Upload JSONL lines (dicts, or raw strings written as they are) as a batch input file."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=("input.jsonl", text.encode()), purpose="batch").id


def submit(client: OpenAI, lines: list[Any]) -> Batch:
    """Upload the lines and create a batch over them."""
    return client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"run": "test"},
    )  # fmt: skip


def wait(client: OpenAI, batch_id: str, until: tuple[str, ...] = DONE, timeout: float = 5.0) -> Batch:
    """Poll a batch until its status is one of ``until``."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until or time.monotonic() > deadline:
            return batch
        time.sleep(0.01)


def jsonl(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """The records of an output or error file (none for no file)."""
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


def test_a_batch_round_trip_answers_every_line_in_a_shuffled_order() -> None:
    prompts = {f"row-{i}": f"prompt number {i}" for i in range(20)}
    with serving(rpm=1, batch_line_seconds=0.01, batch_finalizing_seconds=0.2) as (server, client):
        batch = submit(client, [request(cid, prompt) for cid, prompt in prompts.items()])
        assert batch.status == "validating" and batch.id.startswith("batch_") and batch.metadata == {"run": "test"}
        seen = [wait(client, batch.id, ("in_progress",)).status, wait(client, batch.id, ("finalizing",)).status]
        done = wait(client, batch.id)
        records = jsonl(client, done.output_file_id)
        listed = client.batches.list(limit=1)
    assert seen == ["in_progress", "finalizing"] and done.status == "completed"
    assert done.error_file_id is None and done.errors is None
    assert done.request_counts is not None and done.request_counts.model_dump() == {
        "total": 20, "completed": 20, "failed": 0,
    }  # fmt: skip
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.usage is not None and done.usage.total_tokens > 0
    order = [r["custom_id"] for r in records]
    assert sorted(order) == sorted(prompts) and order != list(prompts)  # map by custom_id, never by position
    for record in records:
        assert record["id"].startswith("batch_req_") and record["error"] is None
        assert record["response"]["status_code"] == 200
        message = record["response"]["body"]["choices"][0]["message"]
        assert message["content"] == expected_answer(prompts[record["custom_id"]])
    assert [b.id for b in listed.data] == [batch.id] and listed.has_more is False
    stats = server.stats
    assert (stats.files_uploaded, stats.batches_created, stats.batch_lines_answered) == (1, 1, 20)
    assert set(stats.batch_custom_ids.values()) == {1} and stats.batches[0]["status"] == "completed"
    assert not stats.admissions  # batches have their own pool: the online limits (rpm=1) never saw them


def test_an_invalid_input_file_fails_validation_naming_each_line() -> None:
    lines = [
        request("ok", "fine"),
        '{"custom_id": "broken", ',
        {k: v for k, v in request("x", "no id").items() if k != "custom_id"},
        request("ok", "duplicate"),
        {**request("url", "wrong url"), "url": "/v1/embeddings"},
        request("other", "second model", model="fake-2"),
    ]
    with serving() as (server, client):
        done = wait(client, submit(client, lines).id)
    assert done.status == "failed" and done.failed_at and done.output_file_id is None
    assert done.errors is not None and done.errors.data is not None
    found = [(e.line, e.code, e.param) for e in done.errors.data]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_url", "url"),
        (6, "mismatched_model", "body.model"),
    ]
    assert done.request_counts is not None and done.request_counts.total == 0
    assert server.stats.batch_lines_answered == 0


def test_the_enqueued_token_limit_refuses_a_batch_until_the_first_one_completes() -> None:
    lines = [request(f"r{i}", "x" * 400) for i in range(5)]  # 100 tokens each: 500 a batch
    with serving(batch_enqueued_tokens=800, batch_line_seconds=0.05) as (server, client):
        first = submit(client, lines)
        refused = wait(client, submit(client, lines).id)
        assert client.batches.retrieve(first.id).status in ("validating", "in_progress")
        assert wait(client, first.id).status == "completed"
        later = wait(client, submit(client, lines).id)
    assert refused.status == "failed" and refused.errors is not None and refused.errors.data is not None
    [error] = refused.errors.data
    assert error.code == "token_limit_exceeded"
    assert error.message == (
        "Enqueued token limit reached for fake in organization org-fake. Limit: 800 enqueued tokens. "
        "Please try again once some in_progress batches have been completed."
    )
    assert later.status == "completed"
    assert server.stats.max_enqueued_tokens == 500 and server.stats.batch_lines_answered == 10


def test_an_expired_batch_returns_the_finished_lines_and_lists_the_rest_as_expired() -> None:
    lines = [request(f"r{i}", f"p{i}") for i in range(10)]
    with serving(batch_line_seconds=0.05, batch_expire_seconds=0.25) as (server, client):
        done = wait(client, submit(client, lines).id)
        finished, errors = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
    assert done.status == "expired" and done.expired_at
    assert 0 < len(finished) < 10 and len(finished) + len(errors) == 10
    assert {r["custom_id"] for r in finished} | {r["custom_id"] for r in errors} == {f"r{i}" for i in range(10)}
    assert all(r["response"] is None and r["error"]["code"] == "batch_expired" for r in errors)
    assert server.stats.batch_lines_answered == len(finished)  # an expired batch bills what it finished


def test_cancelling_keeps_the_finished_lines() -> None:
    lines = [request(f"r{i}", f"p{i}") for i in range(10)]
    with serving(batch_line_seconds=0.04, batch_finalizing_seconds=0.1) as (_, client):
        batch = submit(client, lines)
        deadline = time.monotonic() + 3
        while client.batches.retrieve(batch.id).request_counts.completed < 2 and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        cancelling = client.batches.cancel(batch.id)
        done = wait(client, batch.id)
        finished, errors = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert done.status == "cancelled" and done.cancelled_at
    assert 2 <= len(finished) < 10 and len(finished) + len(errors) == 10
    assert all(r["error"]["code"] == "batch_cancelled" for r in errors)


def test_a_failing_line_goes_to_the_error_file_and_the_rest_still_complete() -> None:
    lines = [
        request("good", "fine"),
        request("flagged", "FAULT:invalid_prompt"),
        request("broken", "FAULT:500"),
        request("cut", "FAULT:length", max_tokens=7),
        request("filtered", "FAULT:content_filter"),
    ]
    with serving() as (server, client):
        done = wait(client, submit(client, lines).id)
        outputs = {r["custom_id"]: r for r in jsonl(client, done.output_file_id)}
        errors = {r["custom_id"]: r for r in jsonl(client, done.error_file_id)}
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 2)
    assert set(outputs) == {"good", "cut", "filtered"} and set(errors) == {"flagged", "broken"}
    flagged = errors["flagged"]
    assert flagged["error"] is None and flagged["response"]["status_code"] == 400
    assert flagged["response"]["body"]["error"]["code"] == "invalid_prompt"
    assert errors["broken"]["response"]["status_code"] == 500
    finish = {cid: r["response"]["body"]["choices"][0]["finish_reason"] for cid, r in outputs.items()}
    assert finish == {"good": "stop", "cut": "length", "filtered": "content_filter"}
    assert outputs["cut"]["response"]["body"]["usage"]["completion_tokens"] == 7
    assert server.stats.batch_lines_answered == 3


def test_structured_outputs_work_through_a_batch() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "row", "strict": True, "schema": SCHEMA}}
    tools = [{"type": "function", "function": {"name": "row", "parameters": SCHEMA}}]
    lines = [request("json", "classify me", response_format=response_format), request("tool", "call", tools=tools)]
    with serving() as (_, client):
        done = wait(client, submit(client, lines).id)
        outputs = {r["custom_id"]: r["response"]["body"] for r in jsonl(client, done.output_file_id)}
    content = outputs["json"]["choices"][0]["message"]["content"]
    assert json.loads(content) == expected_object(SCHEMA, "classify me")
    call = outputs["tool"]["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == expected_object(SCHEMA, "call")


def test_flex_requests_echo_their_tier_and_are_counted() -> None:
    with serving() as (server, client):
        flex = client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}], service_tier="flex"
        )
        auto = client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}], service_tier="auto"
        )
        plain = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hi"}], extra_body={"service_tier": "cheap"}
            )
    assert (flex.service_tier, auto.service_tier, plain.service_tier) == ("flex", "default", None)
    assert flex.choices[0].message.content == expected_answer("hi")
    assert bad.value.code == "invalid_value" and bad.value.param == "service_tier"
    assert server.stats.flex_requests == 1


def test_flex_capacity_shortage_is_a_retryable_429_resource_unavailable() -> None:
    def ask(client: OpenAI, prompt: str) -> str:
        try:
            client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": prompt}], service_tier="flex"
            )
        except openai.RateLimitError as exc:
            assert exc.code == "resource_unavailable" and "retry-after" not in exc.response.headers
            return "429"
        return "ok"

    with serving(flex_unavailable_rate=1.0) as (server, client):
        assert ask(client, "always") == "429"
        assert client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}]).choices
    assert server.stats.flex_requests == 1 and server.stats.kinds["flex_unavailable"] == 1
    with serving(flex_unavailable_rate=0.5) as (_, client):
        outcomes = [ask(client, f"row {i}") for i in range(40)]
    assert 5 < outcomes.count("429") < 35  # a share, chosen per (prompt, attempt)


def test_files_and_batches_are_as_strict_as_the_provider() -> None:
    with serving(require_key="sk-right", batch_max_bytes=1000, batch_max_requests=3) as (_, client):
        wrong = OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.files.create(file=("input.jsonl", b"{}\n"), purpose="batch")
        with pytest.raises(openai.AuthenticationError):
            wrong.batches.list()
        right = OpenAI(base_url=client.base_url, api_key="sk-right", max_retries=0)
        with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
            right.files.create(file=("input.txt", b"{}\n"), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="File is too large"):
            right.files.create(file=("input.jsonl", b"x" * 1001), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="at most 3"):
            submit(right, [json.dumps(request(f"r{i}", "p")) for i in range(4)])
        with pytest.raises(openai.NotFoundError):
            right.batches.retrieve("batch_missing")
        file_id = upload(right, [request("r", "p")])
        assert right.files.retrieve(file_id).bytes == len(json.dumps(request("r", "p"))) + 1
        assert right.files.delete(file_id).deleted
        with pytest.raises(openai.NotFoundError):
            right.files.content(file_id)
        with pytest.raises(openai.BadRequestError, match="Cannot find file"):
            right.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        for handle in (wrong, right):
            handle.close()
