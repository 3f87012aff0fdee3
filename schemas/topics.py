"""The bundled input schema for topic lists (the sample in data/topics.csv)."""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

__all__ = ["TOPIC_MAX_CHARS", "TopicsInput"]

TOPIC_MAX_CHARS = 4_000


class TopicsInput(pa.DataFrameModel):
    """A topic list: unique integer ids and non-blank topics; other columns pass through."""

    id: int = pa.Field(unique=True, nullable=False, coerce=True)
    topic: str = pa.Field(nullable=False, str_length={"max_value": TOPIC_MAX_CHARS})

    @pa.check("topic", name="not_blank")
    def not_blank(cls, data: pa.PolarsData) -> pl.LazyFrame:
        """A topic must contain something other than white space."""
        return data.lazyframe.select(pl.col(data.key).str.strip_chars().str.len_chars() > 0)

    class Config:
        """Extra columns are allowed and carried through untouched."""

        name = "TopicsInput"
        strict = False
