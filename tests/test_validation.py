"""Input schemas: the bundled topics schema, derived and user schemas, reports and quarantine."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.tables.validation import REJECT_REASON, resolve_schema, validate_output
from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TRUNCATED_COLUMN,
)
from llm_enrich.schemas.errors import ConfigError, OutputError, ValidationFailed
from llm_enrich.transforms.prompts import parse_template
from tests.conftest import DATA
from tests.support import load_table, split_valid

TEMPLATE = parse_template("Explain {topic}")
BAD = str(DATA / "topics_bad.csv")


def topics_schema():
    return resolve_schema("topics", TEMPLATE)


def test_the_sample_is_valid() -> None:
    frame = load_table(str(DATA / "topics.csv"))
    split = split_valid(frame, topics_schema(), source="topics.csv", quarantine=False)
    assert split.valid.height == 30 and split.rejected.height == 0
    assert {"인공지능", "머신러닝", "딥러닝"} <= set(split.valid["topic"])


def test_bad_sample_reports_every_kind_of_failure_with_row_column_and_check() -> None:
    with pytest.raises(ValidationFailed) as err:
        split_valid(load_table(BAD), topics_schema(), source=BAD, quarantine=False)
    message = err.value.message
    assert message.startswith(f"{BAD}: 7 of 9 rows fail the input schema 'TopicsInput'.")
    expected = [
        "row 2: column 'id' must be unique (fails field_uniqueness) (value '2')",
        "row 3: column 'id' must be unique (fails field_uniqueness) (value '2')",
        "row 4: column 'id' fails convertible to Int64 (value 'abc')",
        "row 5: column 'id' must not be empty (fails not_nullable) (value null)",
        "row 6: column 'topic' must not be empty (fails not_nullable) (value null)",
        "row 7: column 'topic' must not be blank (fails not_blank) (value '   ')",
        "row 9: column 'topic' fails str_length(None, 4000) (value 'xxxxxxxx",
    ]
    for line in expected:
        assert line in message
    assert "No output was written" in message and "`on_invalid` = quarantine" in message
    assert err.value.failing_rows == 7


def test_the_report_is_capped_at_twenty_failures() -> None:
    frame = pl.DataFrame({"id": [1] * 50, "topic": ["t"] * 50})
    with pytest.raises(ValidationFailed) as err:
        split_valid(frame, topics_schema(), source="dups.csv", quarantine=False)
    assert "50 of 50 rows fail" in err.value.message
    assert err.value.message.count("must be unique") == 20


def test_quarantine_keeps_valid_rows_and_explains_the_rest() -> None:
    frame = load_table(BAD)
    split = split_valid(frame, topics_schema(), source=BAD, quarantine=True)
    assert split.valid["id"].to_list() == [1, 8]
    assert split.valid.schema["id"] == pl.Int64
    assert split.rejected.height == 7
    assert split.rejected.columns == [*frame.columns, REJECT_REASON]
    reasons = dict(zip(split.rejected["topic"].fill_null("<null>"), split.rejected[REJECT_REASON], strict=True))
    assert reasons["An id that is not a number"] == "id: convertible to Int64"
    assert reasons["<null>"] == "topic: not_nullable"
    # Rejected rows keep their original values, not the coerced ones.
    assert "abc" in split.rejected["id"].to_list()


def test_a_missing_column_is_a_schema_level_error_even_in_quarantine() -> None:
    frame = pl.DataFrame({"id": [1], "title": ["x"]})
    with pytest.raises(ValidationFailed) as err:
        split_valid(frame, topics_schema(), source="in.csv", quarantine=True)
    assert "column 'topic' is missing; the file has: id, title" in err.value.message
    assert "`input_schema` = 'template'" in err.value.message


def test_template_schema_checks_only_the_prompt_columns() -> None:
    schema = resolve_schema("template", parse_template("Summarise {title} by {author}"))
    frame = pl.DataFrame({"title": ["a", "b"], "author": ["x", None], "other": [1, 2]})
    with pytest.raises(ValidationFailed, match="row 2: column 'author' must not be empty"):
        split_valid(frame, schema, source="books.csv", quarantine=False)


def test_user_schema_from_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_schemas.py").write_text(
        textwrap.dedent(
            """
            import pandera.polars as pa

            class Books(pa.DataFrameModel):
                title: str = pa.Field(str_length={"min_value": 3})
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    schema = resolve_schema("my_schemas:Books", TEMPLATE)
    with pytest.raises(ValidationFailed, match="column 'title' fails str_length"):
        split_valid(pl.DataFrame({"title": ["ab", "long enough"]}), schema, source="b.csv", quarantine=False)
    sys.modules.pop("my_schemas", None)


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("nonsense", "is not 'auto', 'topics', 'template' or 'module:Class'"),
        ("no_such_module_xyz:Thing", "could not be loaded"),
        ("json:loads", "not a pandera.polars DataFrameModel"),
    ],
)
def test_bad_schema_references_are_config_errors(ref: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        resolve_schema(ref, TEMPLATE)


def test_output_validation_catches_a_row_with_neither_answer_nor_error() -> None:
    frame = pl.DataFrame(
        {
            "id": [1, 2],
            "topic": ["a", "b"],
            "answer": ["x", None],
            ERROR_COLUMN: [None, None],
            TRUNCATED_COLUMN: [False, False],
            INPUT_TOKENS_COLUMN: [1, 0],
            OUTPUT_TOKENS_COLUMN: [1, 0],
            CACHED_TOKENS_COLUMN: [1, 0],
            KEY_COLUMN: ["a" * 64, None],
        }
    )
    with pytest.raises(OutputError, match="answer_xor_error"):
        validate_output(frame, topics_schema(), "answer")
    fixed = frame.with_columns(pl.Series(ERROR_COLUMN, [None, "HTTP 400"]))
    validate_output(fixed, topics_schema(), "answer")
    # Cached tokens are a part of the input tokens: a row never has more of them.
    with pytest.raises(OutputError, match="cached_le_input"):
        validate_output(fixed.with_columns(pl.Series(CACHED_TOKENS_COLUMN, [2, 0])), topics_schema(), "answer")
