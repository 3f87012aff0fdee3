"""Whole-table conveniences the tests use over the product's sliced, streamed functions (not shipped)."""

from __future__ import annotations

from dataclasses import dataclass

import pandera.polars as pa
import polars as pl

from llm_enrich.flows.tables.reading import format_of, iter_partitions, scan_table
from llm_enrich.flows.tables.validation import check_rows, failure_report, refusal
from llm_enrich.flows.tables.writing import publish_parquet
from llm_enrich.schemas.errors import InputError, ValidationFailed


@dataclass(frozen=True)
class Split:
    """The rows that passed, the rows that failed (with reject_reason), and the report."""

    valid: pl.DataFrame
    rejected: pl.DataFrame
    report: str


def split_valid(frame: pl.DataFrame, schema: pa.DataFrameSchema, *, source: str, quarantine: bool) -> Split:
    """Validate a whole table as one slice (``check_rows``); fail with the run's report, or set rows aside."""
    checked = check_rows(frame, schema, source=source)
    if not checked.failing:
        return Split(checked.valid, checked.rejected, "")
    report = failure_report(checked.cases, frame.height, checked.failing, source, schema.name)
    if not quarantine:
        raise ValidationFailed(refusal(report), failing_rows=checked.failing)
    return Split(checked.valid, checked.rejected, report)


def load_table(path: str, requested_format: str = "auto") -> pl.DataFrame:
    """The whole table, read through the run's own scan and slicing; InputError naming the file."""
    fmt = format_of(path, requested_format)
    frame = pl.concat(list(iter_partitions(scan_table(path, requested_format), 1_000_000, source=path, fmt=fmt)))
    if frame.width == 0:
        raise InputError(f"input file '{path}' has no data rows; there is nothing to enrich.")
    return frame


def write_parquet_atomic(frame: pl.DataFrame, destination: str, metadata: dict[str, str] | None = None) -> None:
    """Publish a frame the way the run publishes its output (``publish_parquet``)."""
    publish_parquet(frame.lazy(), destination, metadata=metadata)
