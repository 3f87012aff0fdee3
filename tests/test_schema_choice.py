"""The input schema 'auto' (the default): a user's own table works as it is, a topic list keeps its checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.plan.estimate import estimate_job
from llm_enrich.flows.tables.schema_choice import choose_schema
from llm_enrich.schemas.errors import ConfigError, ValidationFailed
from llm_enrich.transforms.prompts import parse_template
from tests.conftest import DATA, REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer
from tests.support import split_valid

ORDERS_PROMPT = "Summarize {description}"
DESCRIPTIONS = ["two red mugs", "a blue teapot", "one chipped saucer, returned", "six spoons"]


@pytest.fixture
def orders_csv(tmp_path: Path) -> Path:
    """A user's table that is not a topic list: `order_id, description`."""
    path = tmp_path / "orders.csv"
    pl.DataFrame({"order_id": [101, 102, 103, 104], "description": DESCRIPTIONS}).write_csv(path)
    return path


def test_auto_uses_the_bundled_schema_for_a_topic_list() -> None:
    choice = choose_schema("auto", parse_template("Explain {topic}"), ["id", "topic", "category"])
    assert choice.ref == "topics" and choice.schema.name == "TopicsInput"
    assert choice.describe().startswith("input schema: 'topics' (the bundled TopicsInput: id, topic)")
    assert "input_schema 'auto' because the table has columns id and topic" in choice.describe()


def test_auto_checks_only_the_template_columns_of_another_table() -> None:
    choice = choose_schema("auto", parse_template(ORDERS_PROMPT), ["order_id", "description"])
    assert choice.ref == "template" and list(choice.schema.columns) == ["description"]
    assert "no columns 'id' and 'topic' of the bundled topics schema" in choice.describe()
    # A table with only one of the two columns is not a topic list either.
    partial = choose_schema("auto", parse_template("Explain {topic}"), ["topic", "note"])
    assert partial.ref == "template" and "no column 'id' of" in partial.describe()
    frame = pl.DataFrame({"order_id": [1, 2], "description": ["a", None]})
    with pytest.raises(ValidationFailed, match="row 2: column 'description' must not be empty"):
        split_valid(frame, choice.schema, source="orders.csv", quarantine=False)


@pytest.mark.parametrize("ref", ["topics", "template", "json:JSONDecoder", "nonsense"])
def test_named_schemas_ignore_the_columns_and_errors_name_the_job_field(ref: str) -> None:
    template = parse_template(ORDERS_PROMPT)
    if ref in ("topics", "template"):
        choice = choose_schema(ref, template, ["order_id", "description"])
        assert choice.ref == ref and choice.describe().endswith("as input_schema says")
        return
    with pytest.raises(ConfigError) as err:
        choose_schema(ref, template, ["order_id", "description"])
    assert err.value.message.startswith(f"`input_schema` = {ref!r} ")


def test_a_missing_topics_column_names_the_job_field_first() -> None:
    schema = choose_schema("topics", parse_template(ORDERS_PROMPT)).schema
    with pytest.raises(ValidationFailed) as err:
        split_valid(pl.DataFrame({"order_id": [1], "description": ["x"]}), schema, source="o.csv", quarantine=True)
    assert "`input_schema` = 'template' checks only the columns" in err.value.message


def test_estimate_of_a_user_table_with_the_defaults(orders_csv: Path, tmp_path: Path) -> None:
    job = EnrichJob(
        input_path=str(orders_csv), output_path=str(tmp_path / "o.parquet"), prompt=ORDERS_PROMPT,
        base_url="http://127.0.0.1:9/v1",
    )  # fmt: skip
    estimate = estimate_job(job)
    assert estimate.rows_valid == estimate.rows_to_ask == len(DESCRIPTIONS)


@pytest.fixture
def _prefect_url(prefect_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI subprocesses report to the session's Prefect server instead of starting their own."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def invoke(*args: str) -> tuple[int, str]:
    """Run the real `enrich` command; returns its exit code and its output (stdout, then stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.usefixtures("_prefect_url")
def test_a_user_table_runs_with_the_defaults_from_the_cli(
    orders_csv: Path, fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    out = tmp_path / "orders.parquet"
    code, output = invoke(
        "run", str(orders_csv), "-o", str(out), "--base-url", fake_llm.base_url, "--prompt", ORDERS_PROMPT
    )
    assert code == 0, output
    frame = pl.read_parquet(out)
    assert frame["order_id"].to_list() == [101, 102, 103, 104]
    assert frame["explanation"].to_list() == [expected_answer(f"Summarize {d}") for d in DESCRIPTIONS]
    assert frame["enrich_error"].null_count() == frame.height
    # The choice is the run's first line of its own, before the input is loaded.
    ours = [line for line in output.splitlines() if "input schema:" in line or "loaded 4 rows" in line]
    assert "input schema: 'template' (the template's columns description, present and non-null)" in ours[0]
    assert "input_schema 'auto'" in ours[0] and "loaded 4 rows" in ours[1]


@pytest.mark.usefixtures("_prefect_url")
def test_the_bad_topics_sample_still_uses_the_bundled_schema(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    out = tmp_path / "never.parquet"
    code, output = invoke("run", str(DATA / "topics_bad.csv"), "-o", str(out), "--base-url", fake_llm.base_url)
    assert code == 2, output
    assert "input schema: 'topics' (the bundled TopicsInput: id, topic), chosen by input_schema 'auto'" in output
    assert "7 of 9 rows fail the input schema 'TopicsInput'" in output
    assert not out.exists() and fake_llm.stats.requests == 0


@pytest.mark.usefixtures("prefect_backend")
def test_dask_workers_choose_as_the_flow_did(orders_csv: Path, fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    from llm_enrich.flows.pipeline import enrich_table

    job = EnrichJob(
        input_path=str(orders_csv), output_path=str(tmp_path / "out.parquet"), base_url=fake_llm.base_url,
        prompt=ORDERS_PROMPT, partition_rows=2, dask_local=2,
    )  # fmt: skip
    state = enrich_table(job, return_state=True)
    assert state.is_completed(), state.message
    answers = pl.read_parquet(tmp_path / "out.parquet")["explanation"].to_list()
    assert answers == [expected_answer(f"Summarize {d}") for d in DESCRIPTIONS]
