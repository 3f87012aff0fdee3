"""Validate lazily against the input schema (resolved in flows.schema_choice), report or quarantine failing rows."""

from __future__ import annotations

from dataclasses import dataclass

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaError, SchemaErrors

from llm_enrich.flows.tables.schema_choice import field_hint, resolve_schema
from llm_enrich.schemas.enriched import build_output_schema
from llm_enrich.schemas.errors import OutputError, ValidationFailed
from llm_enrich.transforms.structured import StructuredOutput, field_dtypes

__all__ = [
    "REJECT_REASON",
    "Checked",
    "check_rows",
    "failure_report",
    "refusal",
    "resolve_schema",
    "unique_columns",
    "validate_output",
]

REJECT_REASON = "reject_reason"
_REPORT_ROWS = 20
_CHECK_WORDS = {
    "field_uniqueness": "must be unique (fails field_uniqueness)",
    "not_nullable": "must not be empty (fails not_nullable)",
    "not_blank": "must not be blank (fails not_blank)",
}

# Named as the job field, since a deployment run's form has no CLI flags.
_OTHER_SCHEMAS = (
    f"{field_hint('template')} checks only the columns the prompt uses, {field_hint('module:Class')} uses your own."
)


@dataclass(frozen=True)
class Checked:
    """One slice of the input, checked: valid rows, rejected rows (with reasons), failure cases."""

    valid: pl.DataFrame
    rejected: pl.DataFrame
    cases: pl.DataFrame

    @property
    def failing(self) -> int:
        """How many rows of the slice fail."""
        return self.rejected.height


def refusal(report: str) -> str:
    """The message of a run refused for failing rows."""
    return (
        f"{report}\nNo output was written. Fix these rows, or pass `on_invalid` = quarantine "
        "to enrich the valid rows and set the failing ones aside."
    )


def check_rows(
    frame: pl.DataFrame,
    schema: pa.DataFrameSchema,
    *,
    source: str,
    offset: int = 0,
    duplicates: dict[str, pl.Series] | None = None,
) -> Checked:
    """Validate one slice (its first row is row ``offset`` of the file); only schema-level problems raise.

    ``duplicates`` holds, per unique column, the values repeated anywhere in the table, so a
    slice also rejects a row whose twin sits in another slice.
    """
    missing = [name for name, col in schema.columns.items() if col.required and name not in frame.columns]
    if missing:
        raise ValidationFailed(_missing_message(missing, frame, source, schema.name))
    original = frame
    frame, coerce_cases = _coerce(frame, schema)
    try:
        checked = schema.validate(frame, lazy=True)
        cases = coerce_cases
    except SchemaErrors as exc:
        checked, cases = None, _merge_cases(coerce_cases, exc.failure_cases)
    if duplicates:
        cases = pl.concat([cases, _duplicate_cases(original, duplicates)]).unique(
            ["column", "index", "check"], maintain_order=True
        )
    if checked is not None and not cases.height:
        return Checked(checked, original.clear().with_columns(pl.lit("").alias(REJECT_REASON)), cases)
    row_cases = cases.filter(pl.col("index").is_not_null())
    schema_cases = cases.filter(pl.col("index").is_null())
    if schema_cases.height:
        raise ValidationFailed(_schema_level_message(schema_cases, frame, source, schema.name))
    reasons = (
        row_cases.with_columns(
            (pl.col("column") + ": " + pl.col("check")).alias("reason"),
            pl.col("index").cast(pl.UInt32),
        )
        .group_by("index", maintain_order=True)
        .agg(pl.col("reason").unique(maintain_order=True).str.join("; ").alias(REJECT_REASON))
    )
    # Rejected rows keep their original values; the valid ones carry the coerced types.
    rejected = (
        original.with_row_index("_row")
        .join(reasons, left_on="_row", right_on="index", how="inner", maintain_order="left")
        .drop("_row")
    )
    good = (
        frame.with_row_index("_row")
        .join(reasons, left_on="_row", right_on="index", how="anti", maintain_order="left")
        .drop("_row")
    )
    try:
        valid = schema.validate(good, lazy=True)
    except (SchemaErrors, SchemaError) as exc:  # e.g. a frame-wide check still failing
        raise ValidationFailed(f"{source}: the rows left after quarantine still fail: {exc}") from exc
    return Checked(valid, rejected, row_cases.with_columns(pl.col("index").cast(pl.Int64) + offset))


def unique_columns(schema: pa.DataFrameSchema) -> list[str]:
    """Columns whose values must be unique across the whole table."""
    return [name for name, col in schema.columns.items() if col.unique]


def _duplicate_cases(frame: pl.DataFrame, duplicates: dict[str, pl.Series]) -> pl.DataFrame:
    found = []
    for name, values in duplicates.items():
        if name not in frame.columns or not values.len():
            continue
        hit = frame.select(pl.col(name), pl.int_range(pl.len(), dtype=pl.Int32).alias("index")).filter(
            pl.col(name).is_in(values.implode()) & pl.col(name).is_not_null()
        )
        found.append(
            hit.select(
                pl.col(name).cast(pl.String).alias("failure_case"),
                pl.lit(name).alias("column"),
                pl.lit("field_uniqueness").alias("check"),
                "index",
            )
        )
    return pl.concat([_EMPTY_CASES, *found])


def validate_output(
    frame: pl.DataFrame,
    input_schema: pa.DataFrameSchema,
    output_column: str,
    structured: StructuredOutput | None = None,
) -> None:
    """Check the enriched frame before it is written; a failure here is a bug, not bad input."""
    schema = build_output_schema(input_schema, output_column)
    if structured is not None:
        schema = schema.add_columns(structured_columns(structured))
    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors as exc:
        raise OutputError(
            f"the enriched table failed its own output schema, so nothing was written: "
            f"{exc.failure_cases.head(_REPORT_ROWS)}"
        ) from exc


def structured_columns(structured: StructuredOutput) -> dict[str, pa.Column]:
    """One typed, nullable column per field of the answer, with its range checks."""
    dtypes = field_dtypes(structured.model)
    columns = {}
    for name, info in structured.model.model_fields.items():
        checks = []
        for rule in info.metadata:
            if getattr(rule, "ge", None) is not None:
                checks.append(pa.Check.ge(rule.ge))
            if getattr(rule, "le", None) is not None:
                checks.append(pa.Check.le(rule.le))
        columns[f"{structured.prefix}{name}"] = pa.Column(dtypes[name], checks, nullable=True)
    return columns


def failure_report(cases: pl.DataFrame, total: int, failing: int, source: str, name: str | None) -> str:
    """What fails, in words: the count and the first failures with row, column, check and value."""
    lines = [f"{source}: {failing} of {total} rows fail the input schema '{name or 'input'}'."]
    lines.append(f"First {min(_REPORT_ROWS, cases.height)} failures (row 1 is the first data row):")
    shown = cases.sort("index").head(_REPORT_ROWS)
    for row in shown.iter_rows(named=True):
        value = row["failure_case"]
        shown_value = "null" if value is None else repr(value if len(value) <= 60 else value[:57] + "...")
        check = _CHECK_WORDS.get(row["check"], f"fails {row['check']}")
        lines.append(f"  row {row['index'] + 1}: column '{row['column']}' {check} (value {shown_value})")
    return "\n".join(lines)


def _coerce(frame: pl.DataFrame, schema: pa.DataFrameSchema) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cast columns the schema coerces; values that do not convert become row failures."""
    # pandera's own coercion reports such rows under the schema's name and adds a frame-wide
    # dtype failure, which would make one bad cell fatal even with --on-invalid quarantine.
    casts, cases = [], []
    for name, col in schema.columns.items():
        if name not in frame.columns or col.dtype is None or not (col.coerce or schema.coerce):
            continue
        target = col.dtype.type
        if frame.schema[name] == target:
            continue
        try:
            cast = frame.get_column(name).cast(target, strict=False)
        except pl.exceptions.PolarsError:
            continue  # not castable at all: pandera reports the dtype mismatch
        lost = frame.get_column(name).is_not_null() & cast.is_null()
        if lost.any():
            bad = frame.with_row_index("index").filter(lost)
            cases.append(
                pl.DataFrame(
                    {
                        "failure_case": bad.get_column(name).cast(pl.String),
                        "column": name,
                        "check": f"convertible to {target}",
                        "index": bad.get_column("index").cast(pl.Int32),
                    }
                )
            )
        casts.append(cast)
    coerced = frame.with_columns(casts) if casts else frame
    if not cases:
        return coerced, _EMPTY_CASES
    return coerced, pl.concat(cases)


_EMPTY_CASES = pl.DataFrame(
    schema={"failure_case": pl.String, "column": pl.String, "check": pl.String, "index": pl.Int32}
)


def _merge_cases(coerce_cases: pl.DataFrame, pandera_cases: pl.DataFrame) -> pl.DataFrame:
    """One table of failures; a cell that did not convert is not also reported as null."""
    pandera_cases = pandera_cases.select("failure_case", "column", "check", "index").filter(
        # pandera also lists null ids as duplicates of each other; not_nullable already says it.
        ~((pl.col("check") == "field_uniqueness") & pl.col("failure_case").is_null())
    )
    if coerce_cases.height:
        pandera_cases = pandera_cases.join(
            coerce_cases.select("column", "index"),
            on=["column", "index"],
            how="anti",
            maintain_order="left",
            nulls_equal=False,
        )
    return pl.concat([coerce_cases, pandera_cases])


def _missing_message(missing: list[str], frame: pl.DataFrame, source: str, name: str | None) -> str:
    names = ", ".join(repr(m) for m in missing)
    return (
        f"{source} does not fit the input schema '{name or 'input'}': column {names} "
        f"{'is' if len(missing) == 1 else 'are'} missing; the file has: {', '.join(frame.columns)}. "
        f"Rename the column, or choose another schema: {_OTHER_SCHEMAS}"
    )


def _schema_level_message(cases: pl.DataFrame, frame: pl.DataFrame, source: str, name: str | None) -> str:
    problems = []
    for row in cases.iter_rows(named=True):
        if row["check"] == "column_in_dataframe":
            problems.append(f"column '{row['failure_case']}' is missing")
        else:
            problems.append(f"column '{row['column']}' fails {row['check']} ({row['failure_case']})")
    return (
        f"{source} does not fit the input schema '{name or 'input'}': {'; '.join(problems)}. "
        f"The file has columns: {', '.join(frame.columns)}. Fix the file, or choose another "
        f"schema: {_OTHER_SCHEMAS}"
    )
