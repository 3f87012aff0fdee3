"""Prompt templates over a row's columns: parse, check against a table, render safely."""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from llm_enrich.schemas.errors import TemplateError

__all__ = ["PromptTemplate", "build_messages", "parse_template", "render_prompts"]

_FORMATTER = string.Formatter()


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template: literal text and ``{column}`` placeholders, in order."""

    text: str
    fields: tuple[str, ...]

    def check_columns(self, columns: Iterable[str], *, source: str = "the table") -> None:
        """Raise TemplateError naming every placeholder that is not a column."""
        available = list(columns)
        missing = [f for f in self.fields if f not in available]
        if missing:
            names = ", ".join(repr(m) for m in missing)
            raise TemplateError(
                f"the prompt template uses {names}, which {'is' if len(missing) == 1 else 'are'} "
                f"not a column of {source}; it has: {', '.join(available)}. "
                "Change the template's {placeholders} to column names, or write a literal "
                "brace as {{ or }}."
            )

    def render(self, values: Mapping[str, object]) -> str:
        """Fill the placeholders with cell values; values are never parsed as template syntax."""
        # str.format substitutes each value once and never re-reads it, so braces or
        # "{other}" inside a cell stay literal text.
        return self.text.format_map({f: _as_text(values[f]) for f in self.fields})


def parse_template(text: str) -> PromptTemplate:
    """Parse a template, rejecting anything but plain ``{column}`` placeholders."""
    if not text or not text.strip():
        raise TemplateError("the prompt template is empty; pass `prompt` = 'Explain {topic}'.")
    try:
        parts = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise TemplateError(
            f"the prompt template {text!r} is malformed ({exc}); placeholders look like "
            "{column}, and a literal brace is written {{ or }}."
        ) from exc
    fields: list[str] = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not _is_column_name(name):
            raise TemplateError(
                f"the prompt template has a placeholder {{{name}}} that is not a column name; "
                "write {column}, and a literal brace as {{ or }}."
            )
        if spec or conversion:
            raise TemplateError(
                f"the placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} uses format syntax; write a plain {{column}}."
            )
        if name not in fields:
            fields.append(name)
    if not fields:
        raise TemplateError(
            f"the prompt template {text!r} has no {{column}} placeholder, so every row would "
            "get the same prompt; name at least one column, e.g. {topic}."
        )
    return PromptTemplate(text=text, fields=tuple(fields))


def build_messages(prompt: str, system: str | None) -> list[BaseMessage]:
    """The chat messages for one rendered prompt: optional system message, then the prompt."""
    return [SystemMessage(system), HumanMessage(prompt)] if system else [HumanMessage(prompt)]


def render_prompts(template: PromptTemplate, rows: Sequence[Mapping[str, object]]) -> list[str | None]:
    """Render every row; a row with a null placeholder value renders to None."""
    return [None if any(row[f] is None for f in template.fields) else template.render(row) for row in rows]


def _is_column_name(name: str) -> bool:
    # Columns like "first name" are legal in tables; format syntax and positional
    # fields ({0}, {a.b}, {a[0]}) are not.
    return bool(name.strip()) and not name.isdigit() and not any(ch in name for ch in ".[]")


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else str(value)
