"""Before any request: which rows are already answered (cache, previous output) and which to send."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from flows.storage import is_remote
from schemas.enriched import ERROR_COLUMN, INPUT_TOKENS_COLUMN, KEY_COLUMN, OUTPUT_TOKENS_COLUMN
from transforms.enrichment import EnrichSpec, prompt_keys

__all__ = ["ROW_INDEX", "Plan", "load_previous", "plan_run"]

ROW_INDEX = "_enrich_row"
_PROMPT = "_enrich_prompt"


@dataclass(frozen=True)
class Plan:
    """Rows settled without a request, rows to send, and the counts an estimate needs."""

    done: pl.DataFrame
    todo: pl.DataFrame
    todo_prompts: list[str]
    rows_cached: int
    rows_kept_failed: int

    @property
    def unique_todo(self) -> int:
        """Distinct prompts that will be sent."""
        return len(self.todo_prompts)


def load_previous(destination: str, output_column: str, names: dict[str, str] | None = None) -> pl.DataFrame | None:
    """The answers of an earlier run at the destination, if it has the columns we need."""
    path = Path(destination)
    names = names or {}
    canonical = [KEY_COLUMN, ERROR_COLUMN, INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN]
    columns = [output_column, *(names.get(c, c) for c in canonical)]
    dataset = not is_remote(destination) and path.is_dir()
    if not is_remote(destination) and not path.is_file() and not dataset:
        return None
    try:
        source = f"{destination.rstrip('/')}/**/*.parquet" if dataset else destination
        scan = pl.scan_parquet(source, hive_partitioning=dataset)
        if not all(c in scan.collect_schema() for c in columns):
            return None
        back = {names.get(c, c): c for c in canonical}
        return scan.select(columns).collect().rename({output_column: "text", **back})
    except (pl.exceptions.PolarsError, OSError):
        return None  # not ours or unreadable: nothing to reuse, the new output replaces it


def plan_run(
    valid: pl.DataFrame,
    spec: EnrichSpec,
    *,
    cached: pl.DataFrame | None,
    previous: pl.DataFrame | None,
    retry_failed: bool,
) -> Plan:
    """Split the valid rows into settled ones (with answer columns) and ones to ask for."""
    prompts, keys = prompt_keys(valid, spec)
    keyed = valid.with_row_index(ROW_INDEX).with_columns(
        pl.Series(KEY_COLUMN, keys, dtype=pl.String), pl.Series(_PROMPT, prompts, dtype=pl.String)
    )
    sources = []
    if previous is not None:
        sources.append(
            previous.filter(pl.col("text").is_not_null()).select(
                pl.col(KEY_COLUMN).alias("key"), "text", INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN
            )
        )
    if cached is not None and cached.height:
        sources.append(
            cached.select(
                "key",
                "text",
                pl.col("input_tokens").alias(INPUT_TOKENS_COLUMN),
                pl.col("output_tokens").alias(OUTPUT_TOKENS_COLUMN),
            )
        )
    known = (
        pl.concat(sources).unique("key", keep="first", maintain_order=True)
        if sources
        else pl.DataFrame(
            schema={"key": pl.String, "text": pl.String, INPUT_TOKENS_COLUMN: pl.Int64, OUTPUT_TOKENS_COLUMN: pl.Int64}
        )
    )
    known = known.with_columns(pl.lit(None, dtype=pl.String).alias(ERROR_COLUMN))
    if previous is not None and not retry_failed:
        failed = previous.filter(pl.col(ERROR_COLUMN).is_not_null() & pl.col(KEY_COLUMN).is_not_null()).select(
            pl.col(KEY_COLUMN).alias("key"),
            pl.lit(None, dtype=pl.String).alias("text"),
            pl.lit(0, dtype=pl.Int64).alias(INPUT_TOKENS_COLUMN),
            pl.lit(0, dtype=pl.Int64).alias(OUTPUT_TOKENS_COLUMN),
            ERROR_COLUMN,
        )
        known = pl.concat([known, failed.join(known, on="key", how="anti")])

    done = keyed.join(known, left_on=KEY_COLUMN, right_on="key", how="inner", maintain_order="left").drop(_PROMPT)
    todo = keyed.join(known, left_on=KEY_COLUMN, right_on="key", how="anti", maintain_order="left")
    todo_prompts = (
        todo.filter(pl.col(KEY_COLUMN).is_not_null()).unique(KEY_COLUMN, maintain_order=True).get_column(_PROMPT)
    ).to_list()
    return Plan(
        done=done.rename({"text": spec.output_column}),
        todo=todo.drop(_PROMPT),
        todo_prompts=todo_prompts,
        rows_cached=int(done.get_column(ERROR_COLUMN).is_null().sum()),
        rows_kept_failed=int(done.get_column(ERROR_COLUMN).is_not_null().sum()),
    )
