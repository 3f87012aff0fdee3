"""Structured answers: output specs as pydantic models, and their typed polars columns."""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import polars as pl
from polars.datatypes import DataTypeClass
from pydantic import BaseModel, ConfigDict, Field, create_model

from llm_enrich.schemas.errors import ConfigError

__all__ = [
    "StructuredOutput",
    "expand_columns",
    "field_dtypes",
    "model_from_json_schema",
    "parse_inline_spec",
]

_FIELD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.+?)\s*$")
_RANGE = re.compile(r"^(int|integer|float|number)\s*\[\s*(-?[\d.]*)\s*\.\.\s*(-?[\d.]*)\s*\]$")
_SCALARS: dict[str, type] = {
    "str": str, "string": str, "text": str,
    "int": int, "integer": int,
    "float": float, "number": float,
    "bool": bool, "boolean": bool,
}  # fmt: skip


@dataclass(frozen=True)
class StructuredOutput:
    """The answer's shape (a pydantic model), how to ask for it, and the column prefix."""

    model: type[BaseModel]
    method: Literal["json_schema", "function_calling", "json_mode"] = "function_calling"
    prefix: str = ""

    @property
    def fingerprint(self) -> str:
        """What of the shape goes into the answer key."""
        return json.dumps([self.method, self.model.model_json_schema()], sort_keys=True, ensure_ascii=False)


def parse_inline_spec(spec: str) -> type[BaseModel]:
    """'summary:str, difficulty:int[1..5], category:enum(science,art)' -> a pydantic model."""
    fields: dict[str, Any] = {}
    for part in _split_top_level(spec):
        match = _FIELD.match(part)
        if not match:
            raise ConfigError(
                f"`output_schema`: {part!r} is not 'name:type'; types are str, int, float, bool, "
                "int[1..5], float[0..1], enum(a,b,c) and list[str] (e.g. 'summary:str, difficulty:int[1..5]')."
            )
        name, kind = match.group(1), match.group(2)
        if name in fields:
            raise ConfigError(f"`output_schema` names the field {name!r} twice.")
        fields[name] = (_annotation(kind, name), ...)
    if not fields:
        raise ConfigError("`output_schema` is empty; give at least one 'name:type'.")
    return create_model("Answer", __config__=ConfigDict(extra="forbid"), **fields)


def _annotation(kind: str, name: str) -> Any:
    lowered = kind.strip().lower()
    if lowered in _SCALARS:
        return _SCALARS[lowered]
    if match := _RANGE.match(lowered):
        base = int if match.group(1) in ("int", "integer") else float
        low, high = (base(v) if v else None for v in (match.group(2), match.group(3)))
        if low is not None and high is not None and low > high:
            # No answer could pass: every row would be paid for (twice, with the correction) and fail.
            raise ConfigError(
                f"`output_schema`: the range of field {name!r} ({kind.strip()}) is empty; write [low..high]."
            )
        return Annotated[base, Field(ge=low, le=high)]
    if lowered.startswith("enum(") and lowered.endswith(")"):
        values = tuple(v.strip() for v in kind.strip()[5:-1].split(",") if v.strip())
        if not values:
            raise ConfigError(f"`output_schema`: enum() of field {name!r} has no values.")
        return Literal[values]
    if lowered.startswith("list[") and lowered.endswith("]"):
        return list[_annotation(kind.strip()[5:-1], name)]  # type: ignore[misc]
    raise ConfigError(
        f"`output_schema`: unknown type {kind!r} for field {name!r}; use str, int, float, bool, "
        "int[lo..hi], float[lo..hi], enum(a,b,c) or list[type]."
    )


def _split_top_level(spec: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in spec:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def model_from_json_schema(schema: dict[str, Any], name: str = "Answer") -> type[BaseModel]:
    """A pydantic model for a JSON Schema object (types, enums, ranges, arrays, nested objects)."""
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise ConfigError("the output JSON Schema must be an object with 'properties'.")
    required = set(schema.get("required", schema["properties"]))
    fields: dict[str, Any] = {}
    for prop, spec in schema["properties"].items():
        annotation = _json_annotation(spec, f"{name}_{prop}")
        fields[prop] = (annotation, ...) if prop in required else (annotation | None, None)
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


def _json_annotation(spec: dict[str, Any], name: str) -> Any:
    if "enum" in spec:
        return Literal[tuple(spec["enum"])]
    kind = spec.get("type")
    if kind == "string":
        return str
    if kind in ("integer", "number"):
        base = int if kind == "integer" else float
        bounds = {"ge": spec.get("minimum"), "le": spec.get("maximum")}
        return Annotated[base, Field(**{k: v for k, v in bounds.items() if v is not None})]
    if kind == "boolean":
        return bool
    if kind == "array":
        return list[_json_annotation(spec.get("items", {"type": "string"}), name)]  # type: ignore[misc]
    if kind == "object":
        return model_from_json_schema(spec, name)
    raise ConfigError(f"the output JSON Schema uses an unsupported type {kind!r} (in {name}).")


def field_dtypes(model: type[BaseModel]) -> dict[str, pl.DataType]:
    """The polars dtype of each field: Enum for enums, List, Struct for nested models."""
    return {name: _dtype(info.annotation) for name, info in model.model_fields.items()}


def _dtype(annotation: Any) -> pl.DataType:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _dtype(args[0])
    if origin in (typing.Union, types.UnionType):
        return _dtype(next(a for a in args if a is not type(None)))
    if origin is Literal:
        return pl.Enum([str(a) for a in args])
    if origin is list:
        return pl.List(_dtype(args[0]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pl.Struct(field_dtypes(annotation))
    return {str: pl.String(), int: pl.Int64(), float: pl.Float64(), bool: pl.Boolean()}.get(annotation, pl.String())


def expand_columns(frame: pl.DataFrame, json_column: str, structured: StructuredOutput) -> pl.DataFrame:
    """Add one typed column per field (prefixed) from the JSON answers in ``json_column``."""
    dtypes = field_dtypes(structured.model)
    decoded = frame.get_column(json_column).str.json_decode(pl.Struct({k: _decodable(v) for k, v in dtypes.items()}))
    columns = decoded.struct.unnest()
    return frame.with_columns(
        columns.get_column(name).cast(dtype).alias(f"{structured.prefix}{name}") for name, dtype in dtypes.items()
    )


def _decodable(dtype: pl.DataType | DataTypeClass) -> pl.DataType:
    # JSON decoding reads enums as text; the cast to pl.Enum happens after.
    if isinstance(dtype, pl.Enum):
        return pl.String()
    if isinstance(dtype, pl.List):
        return pl.List(_decodable(dtype.inner))
    if isinstance(dtype, pl.Struct):
        return pl.Struct({f.name: _decodable(f.dtype) for f in dtype.fields})
    return dtype if isinstance(dtype, pl.DataType) else dtype()  # a bare class such as pl.Int64
