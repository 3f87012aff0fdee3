"""Prompt templates: parsing, column checks, and cell values that are data, never syntax."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_enrich.schemas.errors import TemplateError
from llm_enrich.transforms.prompts import build_messages, parse_template, render_prompts


def test_fields_are_found_in_order_once() -> None:
    template = parse_template("{topic} in {lang}, about {topic}")
    assert template.fields == ("topic", "lang")


def test_literal_braces_are_written_doubled() -> None:
    template = parse_template('Answer as JSON {{"summary": ...}} about {topic}')
    assert template.render({"topic": "x"}) == 'Answer as JSON {"summary": ...} about x'


def test_column_names_with_spaces_work() -> None:
    assert parse_template("Tell me about {first name}").render({"first name": "Ada"}) == "Tell me about Ada"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("No placeholder at all", "no {column} placeholder"),
        ("Unbalanced {topic", "malformed"),
        ("Unbalanced topic}", "malformed"),
        ("Positional {}", "not a column name"),
        ("Positional {0}", "not a column name"),
        ("Attribute {topic.upper}", "not a column name"),
        ("Index {topic[0]}", "not a column name"),
        ("Spec {topic:>10}", "format syntax"),
        ("Conversion {topic!r}", "format syntax"),
    ],
)
def test_malformed_templates_are_clear_errors(text: str, fragment: str) -> None:
    with pytest.raises(TemplateError, match=r"(?s).*" + fragment.replace("{", r"\{").replace("}", r"\}")):
        parse_template(text)


def test_missing_column_names_it_and_lists_the_table() -> None:
    template = parse_template("Explain {topc} for {audience}")
    with pytest.raises(TemplateError) as err:
        template.check_columns(["id", "topic"], source="'data/in.csv'")
    message = err.value.message
    assert "'topc', 'audience'" in message
    assert "not a column of 'data/in.csv'" in message
    assert "it has: id, topic" in message


@pytest.mark.parametrize(
    "value",
    [
        "{other}",
        "{topic}",
        "{{doubled}}",
        "{",
        "}",
        "{0}",
        "{topic!r:>10}",
        "%s %(name)s $name ${name}",
        "x" * 200_000,
        "인공지능 {딥러닝}",
        "line one\nline two\r\n\ttab",
    ],
)
def test_cell_values_are_data_not_template_syntax(value: str) -> None:
    template = parse_template("Before {topic} after {other}.")
    rendered = template.render({"topic": value, "other": "OTHER"})
    assert rendered == f"Before {value} after OTHER."


@given(prefix=st.text(), value=st.text(), suffix=st.text())
def test_rendering_inserts_any_value_verbatim(prefix: str, value: str, suffix: str) -> None:
    escaped = (prefix.replace("{", "{{").replace("}", "}}"), suffix.replace("{", "{{").replace("}", "}}"))
    template = parse_template(f"{escaped[0]}{{topic}}{escaped[1]}")
    assert template.render({"topic": value}) == prefix + value + suffix


def test_non_string_cells_are_rendered_as_text_and_nulls_as_none() -> None:
    template = parse_template("{id}: {topic}")
    rows = [{"id": 1, "topic": "a"}, {"id": 2, "topic": None}, {"id": 3.5, "topic": "c"}]
    assert render_prompts(template, rows) == ["1: a", None, "3.5: c"]


def test_messages_carry_the_system_message_first() -> None:
    messages = build_messages("hello", "be brief")
    assert [m.type for m in messages] == ["system", "human"]
    assert [m.type for m in build_messages("hello", None)] == ["human"]
