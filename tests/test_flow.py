"""The Prefect flow end to end under a real (temporary) Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import INVALID_STATE, enrich_table
from llm_enrich.schemas.enriched import ERROR_COLUMN, INPUT_TOKENS_COLUMN, added_columns
from tests.conftest import DATA
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer

pytestmark = pytest.mark.usefixtures("prefect_backend")

SECRET = "sk-test-DO-NOT-LEAK-4242"


def job(server: FakeOpenAIServer, tmp_path: Path, **overrides: object) -> EnrichJob:
    values: dict[str, object] = {
        "input_path": str(DATA / "topics.csv"),
        "output_path": str(tmp_path / "out" / "enriched.parquet"),
        "base_url": server.base_url,
        "partition_rows": 7,
        "partition_workers": 3,
        "retry_base_delay": 0.01,
    }
    values.update(overrides)
    return EnrichJob(**values)


def test_the_sample_is_enriched_in_partitions_in_input_order(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    state = enrich_table(job(fake_llm, tmp_path, system="Be brief."), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    source = pl.read_csv(DATA / "topics.csv")
    out = pl.read_parquet(tmp_path / "out" / "enriched.parquet")
    assert out.columns == [*source.columns, *added_columns("explanation")]
    assert_frame_equal(out.select(source.columns), source)
    prompts = [f"Explain this topic in two sentences: {t}" for t in source["topic"]]
    assert out["explanation"].to_list() == [expected_answer(p, "Be brief.") for p in prompts]
    assert summary["rows_in"] == summary["rows_valid"] == summary["rows_ok"] == 30
    assert summary["rows_failed"] == summary["rows_rejected"] == 0
    assert summary["requests"] == fake_llm.stats.requests == 30
    assert summary["input_tokens"] == out[INPUT_TOKENS_COLUMN].sum() > 0
    assert summary["output"] == str(tmp_path / "out" / "enriched.parquet")
    assert len(json.dumps(summary)) < 2_000  # a small summary, not the frame
    meta = json.loads(pl.read_parquet_metadata(tmp_path / "out" / "enriched.parquet")["llm_enrich"])
    assert meta["prompt"] == "Explain this topic in two sentences: {topic}"


def test_bad_input_fails_the_run_with_the_report_and_writes_nothing(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    out = tmp_path / "out" / "enriched.parquet"
    out.parent.mkdir()
    pl.DataFrame({"previous": ["output"]}).write_parquet(out)
    previous = out.read_bytes()
    state = enrich_table(job(fake_llm, tmp_path, input_path=str(DATA / "topics_bad.csv")), return_state=True)
    assert state.is_failed() and state.name == INVALID_STATE
    assert "7 of 9 rows fail the input schema" in state.message
    assert "row 4: column 'id' fails convertible to Int64" in state.message
    assert out.read_bytes() == previous
    assert sorted(p.name for p in out.parent.iterdir()) == ["enriched.parquet"]
    assert fake_llm.stats.requests == 0


def test_quarantine_enriches_valid_rows_and_sets_the_rest_aside(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    state = enrich_table(
        job(fake_llm, tmp_path, input_path=str(DATA / "topics_bad.csv"), on_invalid="quarantine"),
        return_state=True,
    )
    summary = state.result()
    assert (summary["rows_in"], summary["rows_valid"], summary["rows_rejected"]) == (9, 2, 7)
    assert pl.read_parquet(summary["output"])["id"].to_list() == [1, 8]
    rejected = pl.read_parquet(tmp_path / "out" / "enriched.rejected.parquet")
    assert rejected.height == 7 and "reject_reason" in rejected.columns
    assert summary["rejected_output"] == str(tmp_path / "out" / "enriched.rejected.parquet")


def test_in_place_rewrites_a_parquet_input_and_a_rerun_replaces_the_answers(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    table = tmp_path / "table.parquet"
    pl.read_csv(DATA / "topics.csv").head(5).write_parquet(table)
    for _ in range(2):
        state = enrich_table(job(fake_llm, tmp_path, input_path=str(table), in_place=True), return_state=True)
        assert state.is_completed(), state.message
    out = pl.read_parquet(table)
    assert out.columns == ["id", "topic", "category", *added_columns("explanation")]
    assert out.height == 5 and out[ERROR_COLUMN].null_count() == 5


def test_in_place_refuses_a_csv_input(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    state = enrich_table(job(fake_llm, tmp_path, in_place=True), return_state=True)
    assert state.name == INVALID_STATE and "must then be Parquet" in state.message


def test_the_api_key_never_leaks(
    fake_llm: FakeOpenAIServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MY_KEY", SECRET)
    fake_llm.behaviour.require_key = SECRET
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": [1, 2], "topic": ["fine", "FAULT:echoauth"]}).write_csv(source)
    the_job = job(fake_llm, tmp_path, input_path=str(source), api_key_env="MY_KEY")
    state = enrich_table(the_job, return_state=True)
    summary = state.result()
    out_path = Path(summary["output"])
    out = pl.read_parquet(out_path)
    assert out["explanation"][0] == expected_answer("Explain this topic in two sentences: fine")
    assert fake_llm.stats.auth_headers == {f"Bearer {SECRET}"}  # the key was really used
    assert "***" in out[ERROR_COLUMN][1] and SECRET not in out[ERROR_COLUMN][1]
    assert SECRET.encode() not in out_path.read_bytes()
    assert SECRET not in json.dumps(summary)
    assert SECRET not in the_job.model_dump_json()
    assert "loaded 2 rows" in caplog.text  # the run's logs were captured
    assert SECRET not in caplog.text


def test_a_rejected_key_fails_the_run_clearly(
    fake_llm: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fake_llm.behaviour.require_key = "sk-something-else"
    state = enrich_table(job(fake_llm, tmp_path), return_state=True)
    assert state.name == INVALID_STATE
    assert "HTTP 401" in state.message and "check the API key" in state.message
    assert SECRET not in state.message
    assert not (tmp_path / "out" / "enriched.parquet").exists()


def test_a_hive_partitioned_output_and_input(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    dataset = tmp_path / "by_category"
    the_job = job(fake_llm, tmp_path, output_path=str(dataset), output_partition_by="category")
    first = enrich_table(the_job)
    assert first["requests"] == 30
    folders = sorted(p.name for p in dataset.iterdir())
    assert "category=ai" in folders and "category=science" in folders
    back = pl.read_parquet(f"{dataset}/**/*.parquet", hive_partitioning=True)
    assert back.height == 30 and back["enrich_error"].null_count() == 30
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".by_category")) == []  # no leftovers
    # A rerun reuses the answers in the dataset; the dataset is also a valid input (keys become columns).
    assert enrich_table(the_job)["requests"] == 0
    again = job(fake_llm, tmp_path, input_path=str(dataset), output_path=str(tmp_path / "flat.parquet"))
    summary = enrich_table(again)
    assert summary["rows_in"] == 30 and "category" in pl.read_parquet(tmp_path / "flat.parquet").columns
