"""Data contracts: the pandera schemas at each boundary, and the error hierarchy."""

from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    added_columns,
    build_output_schema,
)
from llm_enrich.schemas.topics import TopicsInput

__all__ = [
    "CACHED_TOKENS_COLUMN",
    "ERROR_COLUMN",
    "INPUT_TOKENS_COLUMN",
    "KEY_COLUMN",
    "OUTPUT_TOKENS_COLUMN",
    "TopicsInput",
    "added_columns",
    "build_output_schema",
]
