"""The batched transform against a real HTTP server: alignment, per-row faults, retries, dedup."""

from __future__ import annotations

import random

import polars as pl
import pytest
from langchain_openai import ChatOpenAI
from polars.testing import assert_frame_equal

from llm_enrich.flows.llm.endpoint import classify_openai_error
from llm_enrich.schemas.enriched import ERROR_COLUMN, INPUT_TOKENS_COLUMN, added_columns
from llm_enrich.schemas.errors import EndpointRejected, TemplateError
from llm_enrich.transforms.calls import CallContext, RetryPolicy
from llm_enrich.transforms.enrichment import EnrichSpec, enrich_frame
from llm_enrich.transforms.outcome import CallStats
from llm_enrich.transforms.prompts import parse_template
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer, expected_answer


def chat(server: FakeOpenAIServer, *, timeout: float = 10.0) -> ChatOpenAI:
    """The real client, pointed at the fake server, with SDK retries off as in production."""
    return ChatOpenAI(
        model="fake-model",
        base_url=server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=timeout,
        use_responses_api=False,
    )


def spec(template: str = "Explain {topic}", *, system: str | None = None, concurrency: int = 8) -> EnrichSpec:
    return EnrichSpec(
        template=parse_template(template), output_column="answer", system=system, max_concurrency=concurrency
    )


def ctx(retries: int = 4, stats: CallStats | None = None) -> CallContext:
    policy = RetryPolicy(max_retries=retries, base_delay=0.005, max_delay=0.05, classify=classify_openai_error)
    return CallContext(policy=policy, stats=stats or CallStats())


def test_every_row_gets_its_own_answer_in_input_order(fake_llm: FakeOpenAIServer) -> None:
    fake_llm.behaviour.latency = 0.002
    topics = [f"topic {i} {random.random()}" for i in range(300)]
    frame = pl.DataFrame({"id": list(range(300)), "topic": topics, "extra": [i * 2 for i in range(300)]})
    out = enrich_frame(frame, spec(system="Be brief.", concurrency=32), chat(fake_llm))
    assert_frame_equal(out.select(frame.columns), frame)
    assert out.columns == ["id", "topic", "extra", *added_columns("answer")]
    assert out["answer"].to_list() == [expected_answer(f"Explain {t}", "Be brief.") for t in topics]
    assert out[ERROR_COLUMN].null_count() == 300
    assert fake_llm.stats.max_in_flight > 1  # really concurrent


def test_one_failing_row_never_fails_the_batch(fake_llm: FakeOpenAIServer) -> None:
    topics = ["ok 1", "bad FAULT:400", "ok 2", "always FAULT:500", "ok 3"]
    out = enrich_frame(pl.DataFrame({"topic": topics}), spec(), chat(fake_llm), ctx=ctx(3))
    ok = {i: expected_answer(f"Explain {topics[i]}") for i in (0, 2, 4)}
    assert out["answer"].to_list() == [ok[0], None, ok[2], None, ok[4]]
    errors = out[ERROR_COLUMN].to_list()
    assert errors[1] == "HTTP 400: injected 400 (after 1 attempt)"
    assert errors[3] == "HTTP 500: injected 500 (after 4 attempts)"
    # A 400 is not retried; a 500 is retried max_retries times.
    assert fake_llm.stats.prompts["Explain bad FAULT:400"] == 1
    assert fake_llm.stats.prompts["Explain always FAULT:500"] == 4


@pytest.mark.parametrize(
    ("fault", "attempts"),
    [
        ("FAULT:flaky500:2", 3),
        ("FAULT:flaky429:3", 4),
        ("FAULT:flakymalformed:2", 3),
        ("FAULT:flakyempty:1", 2),
        ("FAULT:flakydrop:2", 3),
    ],
)
def test_transient_failures_are_retried_until_answered(fake_llm: FakeOpenAIServer, fault: str, attempts: int) -> None:
    stats = CallStats()
    out = enrich_frame(pl.DataFrame({"topic": [fault]}), spec(), chat(fake_llm), ctx=ctx(5, stats))
    assert out["answer"].to_list() == [expected_answer(f"Explain {fault}")]
    assert out[ERROR_COLUMN].to_list() == [None]
    assert fake_llm.stats.prompts[f"Explain {fault}"] == attempts
    assert (stats.requests, stats.retries) == (attempts, attempts - 1)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("FAULT:empty", "the model returned an empty reply (after 3 attempts)"),
        ("FAULT:malformed", "malformed response body"),
        ("FAULT:drop", "connection failed"),
        ("FAULT:422", "HTTP 422: injected 422 (after 1 attempt)"),
    ],
)
def test_persistent_faults_end_as_that_rows_error(fake_llm: FakeOpenAIServer, fault: str, message: str) -> None:
    out = enrich_frame(pl.DataFrame({"topic": ["fine", fault]}), spec(), chat(fake_llm), ctx=ctx(2))
    assert out["answer"][0] == expected_answer("Explain fine")
    assert out["answer"][1] is None
    assert message in out[ERROR_COLUMN][1]


def test_timeouts_are_retried_then_reported(fake_llm: FakeOpenAIServer) -> None:
    fake_llm.behaviour.slow_seconds = 5
    out = enrich_frame(
        pl.DataFrame({"topic": ["quick", "FAULT:slow"]}), spec(), chat(fake_llm, timeout=0.3), ctx=ctx(1)
    )
    assert out["answer"][0] == expected_answer("Explain quick")
    assert out[ERROR_COLUMN][1] == "the request timed out (raise `timeout` for slow models) (after 2 attempts)"


def test_null_cells_fail_their_row_without_a_request(fake_llm: FakeOpenAIServer) -> None:
    out = enrich_frame(pl.DataFrame({"topic": ["a", None]}), spec(), chat(fake_llm))
    assert out[ERROR_COLUMN][1] == "column 'topic' is null in this row; no request was sent"
    assert fake_llm.stats.requests == 1


def test_identical_prompts_are_sent_once_and_fanned_out(fake_llm: FakeOpenAIServer) -> None:
    topics = ["same", "other", "same", "same", "other"]
    out = enrich_frame(pl.DataFrame({"topic": topics}), spec(), chat(fake_llm))
    assert fake_llm.stats.requests == 2
    assert out["answer"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    # Tokens are charged to the first row that asked, so the column sums to what was paid.
    assert out[INPUT_TOKENS_COLUMN].to_list()[2:] == [0, 0, 0]
    assert out[INPUT_TOKENS_COLUMN][0] > 0 and out[INPUT_TOKENS_COLUMN][1] > 0


def test_a_rejected_key_aborts_the_job(fake_llm: FakeOpenAIServer) -> None:
    fake_llm.behaviour.require_key = "sk-right"
    with pytest.raises(EndpointRejected, match="HTTP 401"):
        enrich_frame(pl.DataFrame({"topic": [f"t{i}" for i in range(50)]}), spec(concurrency=2), chat(fake_llm))
    assert fake_llm.stats.requests < 50  # stops early instead of failing every row


def test_a_template_naming_a_missing_column_fails_before_any_request(fake_llm: FakeOpenAIServer) -> None:
    with pytest.raises(TemplateError, match="'title'"):
        enrich_frame(pl.DataFrame({"topic": ["a"]}), spec("Explain {title}"), chat(fake_llm))
    assert fake_llm.stats.requests == 0


def test_many_rows_under_random_faults_lose_nothing_and_misalign_nothing() -> None:
    """The issue's acceptance scenario: 2,000 rows, 2% 500s and 1% malformed bodies."""
    behaviour = Behaviour(rate_500=0.02, rate_malformed=0.01)
    topics = [f"topic number {i}" for i in range(2000)]
    with FakeOpenAIServer(behaviour) as server:
        stats = CallStats()
        out = enrich_frame(pl.DataFrame({"topic": topics}), spec(concurrency=32), chat(server), ctx=ctx(6, stats))
        assert out.height == 2000
        assert out["answer"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
        assert out[ERROR_COLUMN].null_count() == 2000
        assert stats.retries > 0
        assert stats.requests == server.stats.requests == 2000 + stats.retries


def test_without_retries_faults_become_errors_but_stay_aligned() -> None:
    behaviour = Behaviour(rate_500=0.05, rate_malformed=0.05)
    topics = [f"t{i}" for i in range(400)]
    with FakeOpenAIServer(behaviour) as server:
        out = enrich_frame(pl.DataFrame({"topic": topics}), spec(concurrency=16), chat(server), ctx=ctx(0))
    answered = out.filter(pl.col("answer").is_not_null())
    failed = out.filter(pl.col(ERROR_COLUMN).is_not_null())
    assert answered.height + failed.height == 400
    assert 0 < failed.height < 100
    assert all(a == expected_answer(f"Explain {t}") for t, a in answered.select("topic", "answer").iter_rows())
