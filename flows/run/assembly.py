"""Where a row's answer is written: each output's columns for one staged slice, in row order, validated."""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.plan.known_answers import ROW_INDEX, LaneColumns
from llm_enrich.flows.tables.validation import validate_output
from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TOKEN_COLUMNS,
    TRUNCATED_COLUMN,
    added_columns,
)
from llm_enrich.transforms.enrichment import EnrichSpec
from llm_enrich.transforms.structured import expand_columns

__all__ = ["assemble_slice"]


def assemble_slice(
    staged: pl.DataFrame,
    answers: list[pl.DataFrame | None],
    specs: list[tuple[EnrichJob, EnrichSpec, dict[str, str]]],
    input_columns: list[str],
    schema: pa.DataFrameSchema,
    secret: str | None,
) -> tuple[pl.DataFrame, list[int]]:
    """The output rows of one staged slice, validated, and each output's count of failed rows."""
    inputs = staged.select(input_columns)
    columns: list[pl.DataFrame] = []
    failed: list[int] = []
    for number, ((job, spec, names), asked) in enumerate(zip(specs, answers, strict=True)):
        frame = _answer_columns(staged, LaneColumns.of(number), job.output_column, asked)
        if secret:
            frame = frame.with_columns(pl.col(ERROR_COLUMN).str.replace_all(secret, "***", literal=True))
        full = pl.concat([inputs, frame], how="horizontal")
        fields: list[str] = []
        if spec.structured is not None:
            full = expand_columns(full, job.output_column, spec.structured)
            fields = [f"{spec.structured.prefix}{name}" for name in spec.structured.model.model_fields]
        validate_output(full, schema, job.output_column, spec.structured)
        added = added_columns(job.output_column)
        columns.append(full.select(added[0], *fields, *added[1:]).rename(names))
        failed.append(int(frame.get_column(ERROR_COLUMN).is_not_null().sum()))
    return pl.concat([inputs, *columns], how="horizontal"), failed


def _answer_columns(
    staged: pl.DataFrame, lane: LaneColumns, output_column: str, asked: pl.DataFrame | None
) -> pl.DataFrame:
    """One output's answer, error, tokens and key for every row of the slice, in row order."""
    planned = staged.select(
        ROW_INDEX,
        pl.col(lane.text).alias(output_column),
        pl.col(lane.error).alias(ERROR_COLUMN),
        pl.col(lane.truncated).fill_null(False).alias(TRUNCATED_COLUMN),
        pl.col(lane.input_tokens).alias(INPUT_TOKENS_COLUMN),
        pl.col(lane.output_tokens).alias(OUTPUT_TOKENS_COLUMN),
        pl.col(lane.cached_tokens).alias(CACHED_TOKENS_COLUMN),
        pl.col(lane.key).alias(KEY_COLUMN),
        pl.col(lane.ask),
        pl.col(lane.charge),
    )
    if asked is not None and asked.height:
        added = added_columns(output_column)
        fresh = asked.select(ROW_INDEX, *(pl.col(c).alias(f"{c}_new") for c in added))
        planned = planned.join(fresh, on=ROW_INDEX, how="left", maintain_order="left").with_columns(
            pl.when(pl.col(lane.ask)).then(pl.col(f"{c}_new")).otherwise(pl.col(c)).alias(c) for c in added
        )
    # Tokens (cached ones too) stay on the first row of each key in the whole table; rows that reused it show 0.
    return planned.select(
        pl.col(output_column),
        pl.col(ERROR_COLUMN),
        pl.col(TRUNCATED_COLUMN).fill_null(False),
        *(pl.when(pl.col(lane.charge)).then(pl.col(c)).otherwise(0).fill_null(0).alias(c) for c in TOKEN_COLUMNS),
        pl.col(KEY_COLUMN),
    )  # fmt: skip
