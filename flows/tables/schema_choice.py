"""Which input schema a run checks: 'auto', 'topics', 'template' or 'module:Class', and why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandera.polars as pa

from llm_enrich.flows.job.references import import_reference
from llm_enrich.schemas.errors import ConfigError
from llm_enrich.schemas.topics import TopicsInput
from llm_enrich.transforms.prompts import PromptTemplate

__all__ = ["AUTO", "SchemaChoice", "choose_schema", "field_hint", "resolve_schema"]

AUTO = "auto"
"""The default: the bundled topics schema for a topic list, otherwise the template's columns."""

_TOPICS_COLUMNS = tuple(TopicsInput.to_schema().columns)


def field_hint(value: str) -> str:
    """How to set input_schema, named as the job field (the Prefect form; the CLI names its flag instead)."""
    return f"`input_schema` = {value!r}"


@dataclass(frozen=True)
class SchemaChoice:
    """The schema a run checks its input against, the input_schema value it amounts to, and why."""

    schema: pa.DataFrameSchema
    ref: str
    reason: str

    def describe(self) -> str:
        """One log line: which schema, and why this one."""
        return f"input schema: {self.ref!r} ({_words(self)}), {self.reason}"


def choose_schema(ref: str, template: PromptTemplate, columns: Sequence[str] | None = None) -> SchemaChoice:
    """Resolve the job's input_schema; 'auto' looks at the input's column names (required then)."""
    if ref != AUTO:
        return SchemaChoice(_resolve(ref, template), ref, "as input_schema says")
    if columns is None:
        raise ValueError("input_schema 'auto' needs the input's column names")
    # A table with the topics columns is a topic list: keep the bundled schema's stricter checks for it.
    missing = [name for name in _TOPICS_COLUMNS if name not in columns]
    if not missing:
        why = f"chosen by input_schema 'auto' because the table has columns {' and '.join(_TOPICS_COLUMNS)}"
        return SchemaChoice(TopicsInput.to_schema(), "topics", why)
    lacks = f"column{'s' if len(missing) > 1 else ''} {' and '.join(repr(name) for name in missing)}"
    why = f"chosen by input_schema 'auto' because the table has no {lacks} of the bundled topics schema"
    return SchemaChoice(_template_schema(template), "template", why)


def resolve_schema(ref: str, template: PromptTemplate, columns: Sequence[str] | None = None) -> pa.DataFrameSchema:
    """'auto', 'topics', 'template' or 'module:Class' -> a pandera polars schema."""
    return choose_schema(ref, template, columns).schema


def _resolve(ref: str, template: PromptTemplate) -> pa.DataFrameSchema:
    if ref == "topics":
        return TopicsInput.to_schema()
    if ref == "template":
        return _template_schema(template)
    return _user_schema(ref)


def _words(choice: SchemaChoice) -> str:
    """What the chosen schema checks, in a few words."""
    if choice.ref == "topics":
        return f"the bundled {choice.schema.name}: {', '.join(choice.schema.columns)}"
    if choice.ref == "template":
        return f"the template's columns {', '.join(choice.schema.columns)}, present and non-null"
    return choice.schema.name or "your own schema"


def _template_schema(template: PromptTemplate) -> pa.DataFrameSchema:
    columns = {name: pa.Column(nullable=False) for name in template.fields}
    return pa.DataFrameSchema(columns, strict=False, name="template columns")


def _user_schema(ref: str) -> pa.DataFrameSchema:
    """A schema of the user's own, from 'module:Class'."""
    if ":" not in ref:
        raise ConfigError(
            f"`input_schema` = {ref!r} is not 'auto', 'topics', 'template' or 'module:Class' "
            "(for example 'myproject.schemas:Orders')."
        )
    found = import_reference(ref, "input_schema", "myproject.schemas:Orders")
    if isinstance(found, type) and issubclass(found, pa.DataFrameModel):
        return found.to_schema()
    if isinstance(found, pa.DataFrameSchema):
        return found
    raise ConfigError(
        f"`input_schema` = {ref!r} is a {type(found).__name__}, not a pandera.polars DataFrameModel or DataFrameSchema."
    )
