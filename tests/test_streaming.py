"""Bounded memory: the table goes through the flow one slice at a time, staged beside the output."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import INVALID_STATE, enrich_table
from llm_enrich.flows.plan import survey
from llm_enrich.schemas.enriched import ERROR_COLUMN, INPUT_TOKENS_COLUMN
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer

pytestmark = pytest.mark.usefixtures("prefect_backend")


def job(server: FakeOpenAIServer, source: Path, out: Path, **overrides: object) -> EnrichJob:
    values: dict[str, object] = {
        "input_path": str(source),
        "output_path": str(out),
        "base_url": server.base_url,
        "prompt": "Explain {topic}",
        "partition_rows": 3,
        "partition_workers": 2,
        "retry_base_delay": 0.01,
    }
    values.update(overrides)
    return EnrichJob(**values)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "staging" in p.name or p.name.endswith(".tmp"))


@pytest.mark.parametrize("rows_per_pass", [2_000_000, 3], ids=["one pass", "hash buckets"])
def test_a_duplicate_id_in_another_slice_is_caught_with_its_row_numbers(
    fake_llm: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows_per_pass: int
) -> None:
    monkeypatch.setattr(survey, "_ROWS_PER_PASS", rows_per_pass)
    source = tmp_path / "in.csv"
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 2, 10]  # id 2 is on rows 2 and 9, three slices apart
    pl.DataFrame({"id": ids, "topic": [f"t{i}" for i in range(10)]}).write_csv(source)
    out = tmp_path / "out.parquet"
    state = enrich_table(job(fake_llm, source, out), return_state=True)
    assert state.name == INVALID_STATE
    assert "2 of 10 rows fail" in state.message
    assert "row 2: column 'id' must be unique" in state.message
    assert "row 9: column 'id' must be unique" in state.message
    assert not out.exists() and fake_llm.stats.requests == 0
    assert leftovers(tmp_path) == []

    summary = enrich_table(job(fake_llm, source, out, on_invalid="quarantine"))
    assert (summary["rows_valid"], summary["rows_rejected"]) == (8, 2)
    assert pl.read_parquet(out)["id"].to_list() == [1, 3, 4, 5, 6, 7, 8, 10]
    assert pl.read_parquet(tmp_path / "out.rejected.parquet")["topic"].to_list() == ["t1", "t8"]


def test_a_late_bad_row_is_reported_by_its_row_in_the_file(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "in.ndjson"
    topics = [f"t{i}" for i in range(11)]
    topics[9] = "   "  # row 10, in the fourth slice
    pl.DataFrame({"id": list(range(11)), "topic": topics}).write_ndjson(source)
    state = enrich_table(job(fake_llm, source, tmp_path / "out.parquet"), return_state=True)
    assert state.name == INVALID_STATE
    assert "1 of 11 rows fail" in state.message and "row 10: column 'topic' must not be blank" in state.message


def test_many_slices_come_out_as_one_file_in_input_order_and_the_staging_area_is_gone(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    source = tmp_path / "in.parquet"
    topics = [f"t{i % 13}" for i in range(200)]
    pl.DataFrame({"id": list(range(200)), "topic": topics}).write_parquet(source, row_group_size=17)
    out = tmp_path / "out.parquet"
    summary = enrich_table(job(fake_llm, source, out, partition_rows=9, partition_workers=4))
    frame = pl.read_parquet(out)
    assert frame["id"].to_list() == list(range(200))
    assert frame["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    assert frame[ERROR_COLUMN].null_count() == 200
    assert frame.filter(pl.col(INPUT_TOKENS_COLUMN) > 0)["id"].to_list() == list(range(13))
    assert summary["requests"] == fake_llm.stats.requests == 13
    assert leftovers(tmp_path) == []


def test_the_staging_area_is_removed_when_a_run_fails(
    fake_llm: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": [1, 2, 3, 4], "topic": ["a", "b", "c", "d"]}).write_csv(source)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    fake_llm.behaviour.require_key = "sk-right"
    state = enrich_table(job(fake_llm, source, tmp_path / "out.parquet", partition_rows=1), return_state=True)
    assert state.is_failed() and "HTTP 401" in state.message
    assert not (tmp_path / "out.parquet").exists()
    assert leftovers(tmp_path) == []


def test_a_custom_staging_dir_is_used_and_emptied(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": [1, 2, 3, 4], "topic": ["a", "b", "c", "d"]}).write_csv(source)
    staging = tmp_path / "shared" / "staging"
    summary = enrich_table(job(fake_llm, source, tmp_path / "out.parquet", staging_dir=str(staging)))
    assert summary["rows_ok"] == 4
    assert staging.is_dir() and list(staging.iterdir()) == []
