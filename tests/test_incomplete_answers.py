"""Cut-off and filtered answers are never silent: finish_reason length / content_filter, refusals, flagged prompts."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import enrich_table
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer

pytestmark = pytest.mark.usefixtures("prefect_backend")

TOPICS = ["whole", "FAULT:length", "FAULT:content_filter", "FAULT:invalid_prompt"]


def run(server: FakeOpenAIServer, folder: Path, **overrides: object) -> tuple[dict, pl.DataFrame]:
    source = folder / "in.csv"
    if not source.exists():
        pl.DataFrame({"id": list(range(len(TOPICS))), "topic": TOPICS}).write_csv(source)
    values: dict[str, object] = {
        "input_path": str(source), "output_path": str(folder / "out.parquet"), "base_url": server.base_url,
        "prompt": "{topic}", "retry_base_delay": 0.01, "max_tokens": 32,
    }  # fmt: skip
    values.update(overrides)
    summary = enrich_table(EnrichJob(**values))
    return summary, pl.read_parquet(values["output_path"])


def test_a_cut_off_answer_is_kept_flagged_and_a_filtered_one_is_an_error_not_retried(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    summary, out = run(fake_llm, tmp_path)
    rows = out.to_dicts()
    assert rows[0]["explanation"] == expected_answer("whole") and rows[0]["enrich_truncated"] is False
    cut = rows[1]
    assert cut["explanation"] == expected_answer("FAULT:length")[: len(expected_answer("FAULT:length")) // 2]
    assert cut["enrich_truncated"] is True and cut["enrich_error"] is None
    assert rows[2]["explanation"] is None and "content filter" in rows[2]["enrich_error"]
    assert "not retried" in rows[2]["enrich_error"]
    assert rows[3]["explanation"] is None and "flagged" in rows[3]["enrich_error"]
    assert summary["rows_truncated"] == 1 and summary["rows_failed"] == 2
    # Neither the filter nor the flagged prompt is asked twice: the same prompt gets the same verdict.
    assert fake_llm.stats.prompts["FAULT:content_filter"] == 1 and fake_llm.stats.prompts["FAULT:invalid_prompt"] == 1
    # A rerun reuses the cut-off answer from the output (still flagged), and asks the failed ones again.
    fake_llm.reset()
    again, out = run(fake_llm, tmp_path)
    assert "FAULT:length" not in fake_llm.stats.prompts and "whole" not in fake_llm.stats.prompts
    assert fake_llm.stats.prompts["FAULT:content_filter"] == 1  # failures are never cached
    assert out["enrich_truncated"].to_list() == [False, True, False, False]
    assert again["rows_truncated"] == 1


def test_on_truncated_error_makes_the_cut_off_answer_the_rows_error(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    summary, out = run(fake_llm, tmp_path, on_truncated="error")
    cut = out.row(1, named=True)
    assert cut["explanation"] is None and "cut off at max_tokens (32)" in cut["enrich_error"]
    assert summary["rows_failed"] == 3 and fake_llm.stats.prompts["FAULT:length"] == 1


def test_a_cut_off_structured_answer_is_an_error_that_says_why(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    _, out = run(fake_llm, tmp_path, output_schema="summary:str", output_prefix="ai_")
    cut = out.row(1, named=True)
    assert cut["ai_summary"] is None
    assert "cut off at max_tokens (32) before the structured answer was complete" in cut["enrich_error"]
    assert fake_llm.stats.prompts["FAULT:length"] == 1  # no correction retry: it would be cut again


def test_a_broken_prompt_stops_the_run_early_naming_the_error(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "flagged.csv"
    topics = [f"FAULT:invalid_prompt {i}" if i % 10 else f"fine {i}" for i in range(300)]
    pl.DataFrame({"id": list(range(300)), "topic": topics}).write_csv(source)
    values = {
        "input_path": str(source), "output_path": str(tmp_path / "out.parquet"), "base_url": fake_llm.base_url,
        "prompt": "{topic}", "max_concurrency": 4,
    }  # fmt: skip
    state = enrich_table(EnrichJob(**values), return_state=True)
    assert state.is_failed() and state.name == "Invalid"
    assert "rows failed, more than max_error_rate (0.5)" in state.message
    assert "HTTP 400" in state.message and "flagged" in state.message
    assert not (tmp_path / "out.parquet").exists()
    sent = fake_llm.stats.requests
    assert 50 <= sent < 80  # stopped soon after the first 50 rows, not after 300
    # The answers it got are kept: a rerun without the check asks only for the rest.
    fake_llm.reset()
    summary = enrich_table(EnrichJob(**values, max_error_rate=1.0))
    assert fake_llm.stats.prompts.total() == 300 - sum(1 for t in topics[:sent] if t.startswith("fine"))
    assert summary["rows_failed"] == 270
