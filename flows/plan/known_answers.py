"""Before any request: which rows are already answered (cache, previous output) and which to send."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from llm_enrich.flows.tables.paths import is_remote, literal_path
from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TRUNCATED_COLUMN,
)
from llm_enrich.transforms.enrichment import EnrichSpec, key_columns

__all__ = ["ROW_INDEX", "LaneColumns", "Tally", "build_known", "load_previous", "plan_slice"]

ROW_INDEX = "_enrich_row"
_KNOWN_SCHEMA = {
    "key": pl.String,
    "text": pl.String,
    INPUT_TOKENS_COLUMN: pl.Int64,
    OUTPUT_TOKENS_COLUMN: pl.Int64,
    CACHED_TOKENS_COLUMN: pl.Int64,
    ERROR_COLUMN: pl.String,
    TRUNCATED_COLUMN: pl.Boolean,
}


# Distinct template cells remembered across slices; beyond this, slices render their own.
_RENDER_MEMO = 250_000
_LANE_FIELDS = (
    "key",
    "prompt",
    "text",
    "error",
    "truncated",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "ask",
    "charge",
    "owner",
)


@dataclass(frozen=True)
class LaneColumns:
    """The staging columns of one output: its planned answer and what is left to do."""

    key: str
    prompt: str
    text: str
    error: str
    truncated: str
    input_tokens: str
    output_tokens: str
    cached_tokens: str
    ask: str
    charge: str
    owner: str

    @classmethod
    def of(cls, number: int) -> LaneColumns:
        """The columns of output ``number`` (0 is the primary one)."""
        return cls(*(f"_e{number}_{name}" for name in _LANE_FIELDS))

    @property
    def staged(self) -> list[str]:
        """Every column this output keeps in a staged slice."""
        return [
            self.key,
            self.text,
            self.error,
            self.truncated,
            self.input_tokens,
            self.output_tokens,
            self.cached_tokens,
            self.ask,
            self.charge,
            self.owner,
        ]


@dataclass
class Tally:
    """What the survey found for one output, added up over the slices."""

    rows_cached: int = 0
    rows_kept_failed: int = 0
    rows_to_ask: int = 0
    todo: dict[str, str] = field(default_factory=dict)  # key -> prompt, each distinct prompt to send once
    charged: set[str] = field(default_factory=set)  # keys whose tokens a row already shows
    rendered: pl.DataFrame | None = None  # template cells -> prompt and key, for repeated values

    @property
    def unique_todo(self) -> int:
        """Distinct prompts that will be sent."""
        return len(self.todo)


def load_previous(
    destination: str, output_column: str, names: dict[str, str] | None = None, storage: dict[str, str] | None = None
) -> pl.DataFrame | None:
    """The distinct answers (and failed keys) of an earlier run at the destination, read lazily."""
    path = Path(destination)
    names = names or {}
    canonical = [KEY_COLUMN, ERROR_COLUMN, INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN]
    columns = [output_column, *(names.get(c, c) for c in canonical)]
    flag = names.get(TRUNCATED_COLUMN, TRUNCATED_COLUMN)
    cached = names.get(CACHED_TOKENS_COLUMN, CACHED_TOKENS_COLUMN)
    dataset = not is_remote(destination) and path.is_dir()
    if not is_remote(destination) and not path.is_file() and not dataset:
        return None
    try:
        literal = literal_path(destination)
        source = f"{literal.rstrip('/')}/**/*.parquet" if dataset else literal
        scan = pl.scan_parquet(source, hive_partitioning=dataset, storage_options=storage)
        if not all(c in scan.collect_schema() for c in columns):
            return None
        back = {names.get(c, c): c for c in canonical}
        # Outputs written before the flag existed count as whole answers.
        truncated = pl.col(flag).fill_null(False) if flag in scan.collect_schema() else pl.lit(False)
        # ... and before the cached-token column existed, as answers that read nothing from the prompt cache.
        tokens = pl.col(cached).fill_null(0) if cached in scan.collect_schema() else pl.lit(0)
        rows = (
            scan.select(*columns, truncated.alias(TRUNCATED_COLUMN), tokens.cast(pl.Int64).alias(CACHED_TOKENS_COLUMN))
            .rename({output_column: "text", **back})
            .filter(pl.col(KEY_COLUMN).is_not_null())
        )
        # One row per key is all a plan needs, so memory follows distinct prompts, not table size.
        answers = rows.filter(pl.col("text").is_not_null()).unique(KEY_COLUMN, keep="any")
        failed = rows.filter(pl.col(ERROR_COLUMN).is_not_null() & pl.col("text").is_null()).unique(
            KEY_COLUMN, keep="any"
        )
        return pl.concat([answers, failed]).collect()
    except (pl.exceptions.PolarsError, OSError):
        return None  # not ours or unreadable: nothing to reuse, the new output replaces it


def build_known(cached: pl.DataFrame | None, previous: pl.DataFrame | None, *, retry_failed: bool) -> pl.DataFrame:
    """One row per settled key: an answer (cache or previous output) or, kept on request, a failure."""
    sources = []
    if previous is not None:
        sources.append(
            previous.filter(pl.col("text").is_not_null()).select(
                pl.col(KEY_COLUMN).alias("key"),
                "text",
                INPUT_TOKENS_COLUMN,
                OUTPUT_TOKENS_COLUMN,
                CACHED_TOKENS_COLUMN,
                TRUNCATED_COLUMN,
            )
        )
    if cached is not None and cached.height:
        sources.append(
            cached.select(
                "key",
                "text",
                pl.col("input_tokens").alias(INPUT_TOKENS_COLUMN),
                pl.col("output_tokens").alias(OUTPUT_TOKENS_COLUMN),
                # Records written before the field existed hold none: 0.
                (pl.col("cached_input_tokens").fill_null(0) if "cached_input_tokens" in cached.columns else pl.lit(0))
                .cast(pl.Int64)
                .alias(CACHED_TOKENS_COLUMN),
                pl.lit(False).alias(TRUNCATED_COLUMN),  # cut-off answers are never cached
            )
        )
    known = (
        pl.concat(sources).unique("key", keep="first", maintain_order=True)
        if sources
        else pl.DataFrame(schema={k: v for k, v in _KNOWN_SCHEMA.items() if k != ERROR_COLUMN})
    ).with_columns(pl.lit(None, dtype=pl.String).alias(ERROR_COLUMN))
    if previous is not None and not retry_failed:
        failed = previous.filter(pl.col(ERROR_COLUMN).is_not_null() & pl.col("text").is_null()).select(
            pl.col(KEY_COLUMN).alias("key"),
            pl.lit(None, dtype=pl.String).alias("text"),
            pl.lit(0, dtype=pl.Int64).alias(INPUT_TOKENS_COLUMN),
            pl.lit(0, dtype=pl.Int64).alias(OUTPUT_TOKENS_COLUMN),
            pl.lit(0, dtype=pl.Int64).alias(CACHED_TOKENS_COLUMN),
            ERROR_COLUMN,
            pl.lit(False).alias(TRUNCATED_COLUMN),
        )
        known = pl.concat([known, failed.join(known, on="key", how="anti").select(known.columns)])
    # Cached tokens are a part of the input tokens: a stored count never shows more (the output checks it).
    known = known.cast(_KNOWN_SCHEMA).with_columns(  # type: ignore[arg-type]
        pl.min_horizontal(CACHED_TOKENS_COLUMN, INPUT_TOKENS_COLUMN).clip(lower_bound=0).alias(CACHED_TOKENS_COLUMN)
    )
    return known


def plan_slice(
    valid: pl.DataFrame, spec: EnrichSpec, known: pl.DataFrame, tally: Tally, lane: LaneColumns
) -> pl.DataFrame:
    """Add output ``lane``'s staging columns to a slice of valid rows and count them in ``tally``."""
    keyed = pl.concat([valid, _keys(valid, spec, tally, lane)], how="horizontal")
    # Probe the (possibly large) known answers with this slice's keys first, so the join's hash
    # table is built over a slice's worth of rows rather than over every known answer.
    settled = known.filter(pl.col("key").is_in(keyed.get_column(lane.key).drop_nulls().implode())).rename(
        {"key": lane.key, "text": lane.text, ERROR_COLUMN: lane.error, INPUT_TOKENS_COLUMN: lane.input_tokens,
         OUTPUT_TOKENS_COLUMN: lane.output_tokens, CACHED_TOKENS_COLUMN: lane.cached_tokens,
         TRUNCATED_COLUMN: lane.truncated}
    )  # fmt: skip
    planned = keyed.join(settled, on=lane.key, how="left", maintain_order="left").with_columns(
        (pl.col(lane.text).is_null() & pl.col(lane.error).is_null()).alias(lane.ask)
    )
    # Tokens show on the first row of each key in the whole table (in row order), as one run would.
    first = pl.col(lane.key).is_first_distinct() & pl.col(lane.key).is_not_null()
    fresh = [k for k in keyed.filter(first).get_column(lane.key).to_list() if k not in tally.charged]
    tally.charged.update(fresh)
    planned = planned.with_columns(
        (first & pl.col(lane.key).is_in(pl.Series(fresh, dtype=pl.String).implode())).alias(lane.charge)
    )
    asked = planned.filter(pl.col(lane.ask))
    todo = asked.filter(pl.col(lane.key).is_not_null()).unique(lane.key, maintain_order=True)
    owned = [(k, p) for k, p in todo.select(lane.key, lane.prompt).iter_rows() if k not in tally.todo]
    tally.todo.update(owned)
    # The first row of the table that needs a prompt "owns" it: on Dask, only that row's slice asks.
    owners = pl.Series([k for k, _ in owned], dtype=pl.String).implode()
    planned = planned.with_columns((pl.col(lane.ask) & first & pl.col(lane.key).is_in(owners)).alias(lane.owner))
    done = planned.filter(~pl.col(lane.ask))
    tally.rows_to_ask += asked.height
    tally.rows_cached += int(done.get_column(lane.error).is_null().sum())
    tally.rows_kept_failed += int(done.get_column(lane.error).is_not_null().sum())
    return planned.drop(lane.prompt)


def _keys(valid: pl.DataFrame, spec: EnrichSpec, tally: Tally, lane: LaneColumns) -> pl.DataFrame:
    """Each row's prompt and key; values seen in earlier slices are not rendered and hashed again."""
    fields = list(spec.template.fields)
    cells = valid.select(fields)
    try:
        new = cells.unique(maintain_order=True)
        if tally.rendered is not None:
            new = new.join(tally.rendered.select(fields), on=fields, how="anti", nulls_equal=True)
        fresh = pl.concat([new, key_columns(new, spec, prompt=lane.prompt, key=lane.key)], how="horizontal")
        table = fresh if tally.rendered is None else pl.concat([tally.rendered, fresh])
        if table.height <= _RENDER_MEMO:
            tally.rendered = table
        joined = cells.join(table, on=fields, how="left", nulls_equal=True, maintain_order="left")
        return joined.select(lane.prompt, lane.key)
    except pl.exceptions.PolarsError:  # cells polars cannot join on (nested types): render the slice
        return key_columns(valid, spec, prompt=lane.prompt, key=lane.key)
