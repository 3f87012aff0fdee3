"""Never paying twice: cache, incremental reruns, resume after SIGKILL, budget, estimate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import enrich_table
from llm_enrich.schemas.enriched import ERROR_COLUMN, INPUT_TOKENS_COLUMN, KEY_COLUMN
from tests.conftest import REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer

pytestmark = pytest.mark.usefixtures("prefect_backend")


def table(path: Path, topics: list[str]) -> Path:
    pl.DataFrame({"id": list(range(len(topics))), "topic": topics}).write_parquet(path)
    return path


def job(server: FakeOpenAIServer, source: Path, out: Path, **overrides: object) -> EnrichJob:
    values: dict[str, object] = {
        "input_path": str(source),
        "output_path": str(out),
        "base_url": server.base_url,
        "prompt": "Explain {topic}",
        "partition_rows": 16,
        "retry_base_delay": 0.01,
    }
    return EnrichJob(**{**values, **overrides})


def test_an_unchanged_rerun_makes_zero_requests(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = table(tmp_path / "in.parquet", [f"topic {i}" for i in range(40)])
    first = enrich_table(job(fake_llm, source, tmp_path / "out.parquet"))
    before = pl.read_parquet(tmp_path / "out.parquet")
    second = enrich_table(job(fake_llm, source, tmp_path / "out.parquet"))
    assert first["requests"] == 40 and second["requests"] == 0
    assert second["rows_cached"] == 40 and fake_llm.stats.requests == 40
    assert_frame_equal(pl.read_parquet(tmp_path / "out.parquet"), before)


def test_the_cache_alone_serves_a_new_output_path(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = table(tmp_path / "in.parquet", ["a", "b", "c"])
    enrich_table(job(fake_llm, source, tmp_path / "one.parquet", cache_dir=str(tmp_path / "cache")))
    summary = enrich_table(job(fake_llm, source, tmp_path / "two.parquet", cache_dir=str(tmp_path / "cache")))
    assert summary["requests"] == 0 and summary["rows_cached"] == 3


def test_anything_that_shapes_the_answer_invalidates_it(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = table(tmp_path / "in.parquet", ["a", "b"])
    out = tmp_path / "out.parquet"
    enrich_table(job(fake_llm, source, out))
    for change in ({"system": "Be brief."}, {"temperature": 0.5}, {"max_tokens": 17}, {"model": "gpt-4o"}):
        summary = enrich_table(job(fake_llm, source, out, **change))
        assert summary["requests"] == 2, change


def test_an_appended_and_edited_table_asks_only_for_new_and_changed_rows(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    source = tmp_path / "table.parquet"
    table(source, [f"topic {i}" for i in range(30)])
    enrich_table(job(fake_llm, source, source, in_place=True, output_path=None))
    grown = pl.read_parquet(source)
    edited = grown.with_columns(
        pl.when(pl.col("id") == 5).then(pl.lit("topic five, edited")).otherwise(pl.col("topic")).alias("topic")
    )
    extra = pl.DataFrame({"id": [30, 31], "topic": ["brand new", "also new"]})
    # Upstream appends rows (with empty answer columns) and edits one topic in place.
    pl.concat([edited, extra], how="diagonal").write_parquet(source)
    fake_llm.reset()
    summary = enrich_table(job(fake_llm, source, source, in_place=True, output_path=None, cache=False))
    assert fake_llm.stats.requests == 3
    assert set(fake_llm.stats.prompts) == {"Explain topic five, edited", "Explain brand new", "Explain also new"}
    assert summary["rows_cached"] == 29
    out = pl.read_parquet(source)
    assert out.height == 32
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in out["topic"]]


def test_failed_rows_are_retried_on_a_rerun_unless_told_not_to(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = table(tmp_path / "in.parquet", ["ok", "FAULT:flaky500:2"])
    out = tmp_path / "out.parquet"
    first = enrich_table(job(fake_llm, source, out, max_retries=1))
    assert first["rows_failed"] == 1
    kept = enrich_table(job(fake_llm, source, out, max_retries=1, retry_failed=False))
    assert kept["requests"] == 0 and kept["rows_failed"] == 1
    retried = enrich_table(job(fake_llm, source, out, max_retries=1))
    assert retried["requests"] == 1 and retried["rows_failed"] == 0
    assert pl.read_parquet(out)["explanation"][1] == expected_answer("Explain FAULT:flaky500:2")


def test_refresh_cache_asks_again_and_no_cache_writes_nothing(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = table(tmp_path / "in.parquet", ["a", "b"])
    out = tmp_path / "out.parquet"
    enrich_table(job(fake_llm, source, out))
    assert enrich_table(job(fake_llm, source, out, refresh_cache=True))["requests"] == 2
    other = tmp_path / "other" / "out.parquet"
    enrich_table(job(fake_llm, source, other, cache=False))
    assert not (other.parent / ".enrich-cache").exists()


def test_duplicates_across_partitions_are_sent_once_and_charged_once(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    topics = [f"t{i % 7}" for i in range(70)]
    source = table(tmp_path / "in.parquet", topics)
    summary = enrich_table(job(fake_llm, source, tmp_path / "out.parquet", partition_rows=5, partition_workers=4))
    assert fake_llm.stats.requests == 7 and summary["rows_deduplicated"] == 63
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    charged = out.filter(pl.col(INPUT_TOKENS_COLUMN) > 0)
    assert charged["id"].to_list() == list(range(7))  # the first row of each prompt carries the cost
    assert out[INPUT_TOKENS_COLUMN].sum() == summary["input_tokens"]


def test_the_budget_stops_sending_and_a_rerun_continues(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = table(tmp_path / "in.parquet", [f"topic number {i}" for i in range(30)])
    out = tmp_path / "out.parquet"
    # $1,000 per million tokens: each request reserves about (9 + 16) tokens -> $0.025 at worst.
    priced = {"input_price": 1000.0, "output_price": 1000.0, "max_tokens": 16, "max_concurrency": 2}
    summary = enrich_table(job(fake_llm, source, out, max_cost=0.2, **priced))
    assert 0 < summary["requests"] < 30
    assert summary["cost_usd"] <= 0.2
    frame = pl.read_parquet(out)
    not_sent = frame.filter(pl.col(ERROR_COLUMN).str.starts_with("not sent: the `max_cost` budget"))
    assert not_sent.height == 30 - summary["requests"] and not_sent["explanation"].null_count() == not_sent.height
    again = enrich_table(job(fake_llm, source, out, max_cost=10.0, **priced))
    assert again["requests"] == not_sent.height and again["rows_failed"] == 0


def test_estimate_counts_without_sending(
    fake_llm: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_backend: str
) -> None:
    source = table(tmp_path / "in.parquet", ["a", "b", "a", "c"])
    out = tmp_path / "out.parquet"
    enrich_table(job(fake_llm, source, out, max_tokens=100))
    pl.DataFrame({"id": range(6), "topic": ["a", "b", "a", "c", "new", "new"]}).write_parquet(source)
    fake_llm.reset()
    report = tmp_path / "estimate.json"
    args = ["estimate", str(source), "-o", str(out), "--base-url", fake_llm.base_url, "--prompt",
            "Explain {topic}", "--model", "gpt-4o-mini", "--max-tokens", "100",
            "--summary-json", str(report)]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_backend}
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    estimate = json.loads(report.read_text())
    assert (estimate["rows_cached"], estimate["rows_to_ask"], estimate["unique_prompts"]) == (4, 2, 1)
    assert estimate["max_output_tokens"] == 100
    assert estimate["estimated_cost_usd"] == pytest.approx(
        (estimate["estimated_input_tokens"] * 0.15 + 100 * 0.60) / 1e6, abs=1e-6
    )
    assert fake_llm.stats.requests == 0
    assert "nothing was sent" in result.stdout
    # Both prices, so the choice of mode is an informed one: batch and flex cost half the list price.
    assert estimate["online_cost_usd"] == estimate["estimated_cost_usd"]
    assert estimate["batch_cost_usd"] == pytest.approx(estimate["online_cost_usd"] / 2, abs=1e-6)
    batch = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", *args, "--mode", "batch"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert batch.returncode == 0, batch.stderr
    in_batch = json.loads(report.read_text())
    assert in_batch["estimated_cost_usd"] == in_batch["batch_cost_usd"] == estimate["batch_cost_usd"]
    assert f"online prices ${estimate['online_cost_usd']:.4f}" in " ".join(batch.stdout.split())


def test_a_run_killed_with_sigkill_resumes_without_paying_twice(
    fake_llm: FakeOpenAIServer, tmp_path: Path, prefect_backend: str
) -> None:
    topics = [f"resumable topic {i}" for i in range(120)]
    source = table(tmp_path / "in.parquet", topics)
    out = tmp_path / "out.parquet"
    fake_llm.behaviour.latency = 0.05
    args = [sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "-o", str(out),
            "--base-url", fake_llm.base_url, "--prompt", "Explain {topic}", "--schema", "template",
            "--max-concurrency", "4", "--partition-rows", "10"]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_backend}
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while fake_llm.stats.completions < 40 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    answered_before = fake_llm.stats.completions
    assert 40 <= answered_before < 120, "the run must be killed mid-way"
    assert not out.exists()  # nothing half-written

    fake_llm.reset()
    resumed = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # Only rows that were not answered before the kill (at most the 4 in flight more) are asked.
    assert fake_llm.stats.requests <= 120 - answered_before + 4
    frame = pl.read_parquet(out)
    assert frame["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]

    clean = tmp_path / "clean.parquet"
    clean_args = [*args[: args.index("-o") + 1], str(clean), *args[args.index("-o") + 2 :], "--no-cache"]
    subprocess.run(clean_args, env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    assert_frame_equal(frame, pl.read_parquet(clean))
    assert frame[KEY_COLUMN].n_unique() == 120
