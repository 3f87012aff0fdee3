"""Structured answers: every schema form, typed columns, validation retry, per-row errors."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.job import EnrichJob, load_job_file, make_job
from llm_enrich.flows.llm.endpoint import Endpoint
from llm_enrich.flows.pipeline import INVALID_STATE, enrich_table
from llm_enrich.flows.plan.specs import resolve_structured
from llm_enrich.schemas.enriched import ERROR_COLUMN
from llm_enrich.schemas.errors import ConfigError
from llm_enrich.transforms.structured import field_dtypes, parse_inline_spec
from tests.fakes.openai_server import FakeOpenAIServer, expected_object

SPEC = "summary:str, difficulty:int[1..5], category:enum(science,art,history)"
REMOTE = Endpoint(base_url="http://127.0.0.1:9/v1", api_key=None, local=False)


def test_the_inline_spec_gives_typed_fields() -> None:
    model = parse_inline_spec(SPEC + ", tags:list[str], ok:bool, score:float[0..1]")
    assert field_dtypes(model) == {
        "summary": pl.String(),
        "difficulty": pl.Int64(),
        "category": pl.Enum(["science", "art", "history"]),
        "tags": pl.List(pl.String()),
        "ok": pl.Boolean(),
        "score": pl.Float64(),
    }
    schema = model.model_json_schema()["properties"]
    assert schema["difficulty"]["minimum"] == 1 and schema["difficulty"]["maximum"] == 5
    assert schema["category"]["enum"] == ["science", "art", "history"]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [("summary", "is not 'name:type'"), ("a:str, a:int", "twice"), ("x:date", "unknown type"), ("", "empty")],
)
def test_bad_inline_specs_are_config_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_inline_spec(spec)


def test_a_json_schema_file_and_a_pydantic_model_give_the_same_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema_file = tmp_path / "answer.json"
    schema_file.write_text(json.dumps(parse_inline_spec(SPEC).model_json_schema()))
    (tmp_path / "answers.py").write_text(
        textwrap.dedent(
            """
            from typing import Literal
            from pydantic import BaseModel, Field

            class Answer(BaseModel):
                summary: str
                difficulty: int = Field(ge=1, le=5)
                category: Literal["science", "art", "history"]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    forms = [SPEC, str(schema_file), "answers:Answer"]
    dtypes = [field_dtypes(resolve_structured(EnrichJob(output_schema=f), REMOTE).model) for f in forms]
    assert dtypes[0] == dtypes[1] == dtypes[2]
    sys.modules.pop("answers", None)


def test_the_method_is_chosen_per_endpoint() -> None:
    job = EnrichJob(output_schema=SPEC)
    openai = Endpoint(base_url=None, api_key=None, local=False)
    bundled = Endpoint(base_url=None, api_key=None, local=True)
    assert resolve_structured(job, openai).method == "json_schema"
    assert resolve_structured(job, REMOTE).method == "function_calling"
    assert resolve_structured(job, bundled).method == "function_calling"
    forced = EnrichJob(output_schema=SPEC, structured_method="json_mode")
    assert resolve_structured(forced, openai).method == "json_mode"


@pytest.mark.usefixtures("prefect_backend")
def test_a_structured_run_writes_typed_columns_and_per_row_errors(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    topics = ["plain", "FAULT:flakywrongtype:1", "FAULT:outofrange", "FAULT:badjson", "FAULT:badenum"]
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": range(5), "topic": topics}).write_csv(source)
    out = tmp_path / "out.parquet"
    job = EnrichJob(
        input_path=str(source), output_path=str(out), base_url=fake_llm.base_url, output_schema=SPEC,
        output_prefix="ai_", prompt="Explain {topic}", retry_base_delay=0.01,
    )  # fmt: skip
    summary = enrich_table(job)
    frame = pl.read_parquet(out)
    assert frame.schema["ai_difficulty"] == pl.Int64
    assert frame.schema["ai_category"] == pl.Enum(["science", "art", "history"])
    schema = fake_llm.stats.bodies[0]["tools"][0]["function"]["parameters"]
    assert frame.row(0, named=True)["ai_summary"] == expected_object(schema, "Explain plain")["summary"]
    # One validation retry, with the error in the prompt, then the row's error; never a wrong value.
    assert [fake_llm.stats.prompts[f"Explain {t}"] for t in topics] == [1, 2, 2, 2, 2]
    assert frame[ERROR_COLUMN].is_null().to_list() == [True, True, False, False, False]
    assert "less than or equal to 5" in frame[ERROR_COLUMN][2]
    assert "not valid JSON" in frame[ERROR_COLUMN][3]
    assert "'science', 'art' or 'history'" in frame[ERROR_COLUMN][4]
    assert frame["ai_difficulty"].drop_nulls().is_between(1, 5).all()
    assert frame.filter(pl.col(ERROR_COLUMN).is_not_null())["ai_category"].null_count() == 3
    assert summary["input_tokens"] > 0 and summary["output_tokens"] > 0  # usage counted from the raw message
    assert summary["requests"] == 9


@pytest.mark.usefixtures("prefect_backend")
def test_the_schema_is_part_of_the_answer_key(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": [1], "topic": ["x"]}).write_csv(source)
    base = {"input_path": str(source), "output_path": str(tmp_path / "o.parquet"), "base_url": fake_llm.base_url}
    enrich_table(EnrichJob(**base, output_schema="summary:str"))
    assert enrich_table(EnrichJob(**base, output_schema="summary:str"))["requests"] == 0
    assert enrich_table(EnrichJob(**base, output_schema="summary:str, level:int"))["requests"] == 1


@pytest.mark.usefixtures("prefect_backend")
def test_a_clashing_field_name_is_refused(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    state = enrich_table(
        EnrichJob(base_url=fake_llm.base_url, output_path=str(tmp_path / "o.parquet"), output_schema="explanation:str"),
        return_state=True,
    )
    assert state.name == INVALID_STATE and "`output_prefix`" in state.message


@pytest.mark.usefixtures("prefect_backend")
def test_a_multi_output_job_asks_once_per_row_per_output_in_one_pass(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    topics = [f"topic {i}" for i in range(12)]
    pl.DataFrame({"id": range(12), "topic": topics}).write_csv(source)
    config = tmp_path / "job.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            input_path = "{source}"
            output_path = "{tmp_path / "out.parquet"}"
            base_url = "{fake_llm.base_url}"
            prompt = "Explain {{topic}}"
            partition_rows = 5

            [[extra_outputs]]
            prompt = "Classify {{topic}}"
            output_column = "labels"
            output_schema = "{SPEC}"
            output_prefix = "label_"
            model = "gpt-4.1-mini"
            """
        )
    )
    job = make_job(load_job_file(str(config)))
    summary = enrich_table(job)
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert fake_llm.stats.requests == 24
    assert all(fake_llm.stats.prompts[f"{verb} {t}"] == 1 for t in topics for verb in ("Explain", "Classify"))
    assert {b["model"] for b in fake_llm.stats.bodies} == {"gpt-4o-mini", "gpt-4.1-mini"}
    assert frame.columns[:3] == ["id", "topic", "explanation"]
    assert {"labels", "label_summary", "label_difficulty", "label_category", "enrich_error_labels"} <= set(
        frame.columns
    )
    assert frame.schema["label_category"] == pl.Enum(["science", "art", "history"])
    assert frame["enrich_error"].null_count() == frame["enrich_error_labels"].null_count() == 12
    # The extra output's bookkeeping, cached tokens too, is suffixed with its name (short prompts: nothing cached).
    assert frame["enrich_cached_tokens_labels"].to_list() == frame["enrich_cached_tokens"].to_list() == [0] * 12
    assert frame.columns.index("enrich_cached_tokens_labels") == frame.columns.index("enrich_key_labels") - 1
    assert summary["outputs"]["labels"]["requests"] == 12 and summary["requests"] == 24
    again = enrich_table(job)
    assert again["requests"] == 0 and fake_llm.stats.requests == 24
