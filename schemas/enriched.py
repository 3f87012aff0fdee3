"""The enriched output: the input's columns, then the answer, its error, token cost and key."""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

__all__ = [
    "CACHED_TOKENS_COLUMN",
    "ERROR_COLUMN",
    "INPUT_TOKENS_COLUMN",
    "KEY_COLUMN",
    "OUTPUT_TOKENS_COLUMN",
    "TOKEN_COLUMNS",
    "TRUNCATED_COLUMN",
    "added_columns",
    "bookkeeping_names",
    "build_output_schema",
]

ERROR_COLUMN = "enrich_error"
INPUT_TOKENS_COLUMN = "enrich_input_tokens"
OUTPUT_TOKENS_COLUMN = "enrich_output_tokens"
CACHED_TOKENS_COLUMN = "enrich_cached_tokens"  # of the input tokens, those read from the provider's prompt cache
KEY_COLUMN = "enrich_key"
TRUNCATED_COLUMN = "enrich_truncated"
TOKEN_COLUMNS = (INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN, CACHED_TOKENS_COLUMN)
"""The per-row token columns: shown on the first row of an answer key, 0 on the rows that reused it."""
_BOOKKEEPING = (ERROR_COLUMN, TRUNCATED_COLUMN, *TOKEN_COLUMNS, KEY_COLUMN)


def added_columns(output_column: str) -> list[str]:
    """The columns enrichment appends, in output order."""
    return [output_column, *_BOOKKEEPING]


def bookkeeping_names(output_column: str, *, primary: bool) -> dict[str, str]:
    """How an output's bookkeeping columns are named in the file (extra outputs get a suffix)."""
    return {c: c if primary else f"{c}_{output_column}" for c in _BOOKKEEPING}


def build_output_schema(input_schema: pa.DataFrameSchema, output_column: str) -> pa.DataFrameSchema:
    """Input schema plus the added columns; every row carries exactly one of answer or error.

    Cached tokens are a part of the input tokens, so no row has more of them than input tokens.
    """

    def one_outcome(data: pa.PolarsData) -> pl.LazyFrame:
        answered = pl.col(output_column).is_not_null()
        failed = pl.col(ERROR_COLUMN).is_not_null()
        return data.lazyframe.select(answered ^ failed)

    def cached_within_input(data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(CACHED_TOKENS_COLUMN) <= pl.col(INPUT_TOKENS_COLUMN))

    def non_empty_answer(data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(data.key).str.strip_chars().str.len_chars() > 0)

    extra = {
        output_column: pa.Column(pl.String, pa.Check(non_empty_answer, name="answer_not_blank"), nullable=True),
        ERROR_COLUMN: pa.Column(pl.String, nullable=True),
        TRUNCATED_COLUMN: pa.Column(pl.Boolean),
        INPUT_TOKENS_COLUMN: pa.Column(pl.Int64, pa.Check.ge(0)),
        OUTPUT_TOKENS_COLUMN: pa.Column(pl.Int64, pa.Check.ge(0)),
        CACHED_TOKENS_COLUMN: pa.Column(pl.Int64, pa.Check.ge(0)),
        KEY_COLUMN: pa.Column(pl.String, pa.Check.str_length(64, 64), nullable=True),
    }
    merged = input_schema.add_columns(extra)
    merged.checks = [
        *input_schema.checks,
        pa.Check(one_outcome, name="answer_xor_error"),
        pa.Check(cached_within_input, name="cached_le_input"),
    ]
    # Values were coerced on the way in; the output must already have the right types.
    merged.coerce = False
    for column in merged.columns.values():
        column.coerce = False
    return merged
