"""The flex tier and prompt caching: passed through, priced and counted, against the fake server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.job import FLEX_TIMEOUT, EnrichJob
from llm_enrich.transforms.costs import DEFAULT_PRICES
from tests.conftest import REPO
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("prefect_backend")


@pytest.fixture(autouse=True)
def _prefect_url(prefect_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def enrich(server: FakeOpenAIServer, source: Path, out: Path, *extra: str, cache: Path | None = None) -> dict:
    """Run the real CLI and return its summary (no response cache unless ``cache`` names one)."""
    summary = out.parent / "summary.json"
    caching = ["--cache-dir", str(cache)] if cache is not None else ["--no-cache"]
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "-o", str(out), "--base-url",
         server.base_url, "--model", "gpt-4o-mini", "--summary-json", str(summary), *caching, *extra],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(summary.read_text())


def test_flex_is_sent_priced_at_half_and_capacity_429s_are_retried_not_paced(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": range(1, 41), "topic": [f"topic {i}" for i in range(40)]}).write_csv(source)
    with FakeOpenAIServer(Behaviour(flex_unavailable_rate=0.3)) as server:
        summary = enrich(server, source, tmp_path / "out.parquet", "--service-tier", "flex", "--max-retries", "8",
                         "--retry-base-delay", "0.01")  # fmt: skip
        tiers = {body.get("service_tier") for body in server.stats.bodies}
        refused = server.stats.statuses[429]
    assert tiers == {"flex"}
    assert summary["rows_ok"] == 40 and summary["rows_failed"] == 0
    assert refused > 0 and summary["retries"] >= refused
    assert summary["rate_limited"] == 0, "capacity is not our pace: no rate-limit pause, no AIMD cut"
    listed = DEFAULT_PRICES["gpt-4o-mini"]
    full = listed.cost(summary["input_tokens"], summary["output_tokens"])
    assert summary["cost_usd"] == pytest.approx(full / 2, rel=1e-3)


def test_flex_waits_longer_for_a_reply_unless_told_otherwise() -> None:
    assert EnrichJob(service_tier="flex").reply_timeout == FLEX_TIMEOUT == 900
    assert EnrichJob(service_tier="flex", timeout=20).reply_timeout == 20
    assert EnrichJob().reply_timeout == 60
    # A job rebuilt from its dump (a deployment's parameters, enrich_frame) keeps the flex default.
    assert EnrichJob.model_validate(EnrichJob(service_tier="flex").model_dump()).reply_timeout == 900


# Static instructions first, the row's value last: every prompt shares a 1,024-token prefix.
SYSTEM = "You write encyclopedia entries. " + "Follow the house style carefully. " * 150
CACHING = ("--system", SYSTEM, "--prompt-cache-key", "entries", "--max-concurrency", "1")


def test_prompt_cache_key_is_sent_and_cached_tokens_are_counted(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    pl.DataFrame({"id": range(1, 11), "topic": [f"topic {i}" for i in range(10)]}).write_csv(source)
    summary = enrich(fake_llm, source, out, *CACHING)
    assert {body.get("prompt_cache_key") for body in fake_llm.stats.bodies} == {"entries"}
    assert summary["requests"] == 10
    assert summary["cached_input_tokens"] == 9 * 1024, "the first request writes the cache, the other nine read it"
    # Cached input costs gpt-4o-mini's cached-input price ($0.075 per 1M, half of $0.15).
    tokens_in, tokens_out, cached = summary["input_tokens"], summary["output_tokens"], 9 * 1024
    paid = ((tokens_in - cached) * 0.15 + cached * 0.075 + tokens_out * 0.60) / 1e6
    assert summary["cost_usd"] == pytest.approx(paid, abs=1e-6)
    assert summary["cost_usd"] < (tokens_in * 0.15 + tokens_out * 0.60) / 1e6
    # Each row shows what its own request read from the prompt cache; the column adds up to the summary.
    frame = pl.read_parquet(out)
    assert frame.schema["enrich_cached_tokens"] == pl.Int64
    assert frame["enrich_cached_tokens"].to_list() == [0] + [1024] * 9
    assert frame["enrich_cached_tokens"].sum() == summary["cached_input_tokens"]
    assert (frame["enrich_cached_tokens"] <= frame["enrich_input_tokens"]).all()
    assert frame["enrich_input_tokens"].sum() == summary["input_tokens"]


def test_a_row_that_reused_an_identical_prompt_shows_no_cached_tokens(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    topics = ["topic 0", "topic 1", "topic 0", "topic 2", "topic 1"]
    pl.DataFrame({"id": range(5), "topic": topics}).write_csv(source)
    summary = enrich(fake_llm, source, out, *CACHING)
    assert summary["requests"] == 3 and summary["rows_deduplicated"] == 2
    assert summary["cached_input_tokens"] == 2 * 1024
    frame = pl.read_parquet(out)
    # Tokens, cached ones too, show on the first row of a prompt; its repeats paid nothing.
    assert frame["enrich_cached_tokens"].to_list() == [0, 1024, 0, 1024, 0]
    assert frame["enrich_input_tokens"][2] == frame["enrich_input_tokens"][4] == 0
    assert frame["enrich_cached_tokens"].sum() == summary["cached_input_tokens"]


def test_an_answer_from_the_response_cache_keeps_its_cached_tokens(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source, cache = tmp_path / "in.csv", tmp_path / "cache"
    pl.DataFrame({"id": range(1, 6), "topic": [f"topic {i}" for i in range(5)]}).write_csv(source)
    enrich(fake_llm, source, tmp_path / "first.parquet", *CACHING, cache=cache)
    # Another output, so nothing comes from a previous output: every answer is the cache's.
    again = enrich(fake_llm, source, tmp_path / "second.parquet", *CACHING, cache=cache)
    assert again["requests"] == 0 and again["rows_cached"] == 5 and again["cached_input_tokens"] == 0
    first, second = pl.read_parquet(tmp_path / "first.parquet"), pl.read_parquet(tmp_path / "second.parquet")
    # Like the input and output tokens, a reused answer shows what it cost when it was asked.
    assert second["enrich_cached_tokens"].to_list() == first["enrich_cached_tokens"].to_list() == [0] + [1024] * 4
    assert second["enrich_input_tokens"].to_list() == first["enrich_input_tokens"].to_list()


def test_an_output_written_before_the_cached_token_column_is_reused(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    pl.DataFrame({"id": range(1, 6), "topic": [f"topic {i}" for i in range(5)]}).write_csv(source)
    enrich(fake_llm, source, out, *CACHING)
    # What an older version wrote: every column but enrich_cached_tokens (and no footer).
    older = pl.read_parquet(out).drop("enrich_cached_tokens")
    older.write_parquet(out)
    again = enrich(fake_llm, source, out, *CACHING)
    assert again["requests"] == 0 and again["rows_cached"] == 5, "every answer reused from the previous output"
    frame = pl.read_parquet(out)
    assert frame.columns == [*older.columns[:-1], "enrich_cached_tokens", "enrich_key"]
    assert frame["enrich_cached_tokens"].to_list() == [0] * 5, "an older output read nothing from the cache"
    assert frame.drop("enrich_cached_tokens").equals(older)
