"""A job's outputs (the primary answer column and any extra ones), planned and assembled slice by slice."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandera.polars as pa
import polars as pl

from llm_enrich.flows.cache import AnswerStore, default_cache_dir, open_cache
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm import Endpoint
from llm_enrich.flows.planning import ROW_INDEX, LaneColumns, Tally, build_known, load_previous
from llm_enrich.flows.preparation import build_spec, check_structured_fields
from llm_enrich.flows.runtime import build_context, resolve_price, share_limits
from llm_enrich.flows.validation import validate_output
from llm_enrich.schemas.enriched import (
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TRUNCATED_COLUMN,
    added_columns,
    bookkeeping_names,
)
from llm_enrich.schemas.errors import ConfigError
from llm_enrich.transforms.calls import CallContext
from llm_enrich.transforms.costs import Price
from llm_enrich.transforms.enrichment import EnrichSpec
from llm_enrich.transforms.structured import expand_columns

__all__ = ["OutputRun", "assemble_slice", "plan_outputs"]


@dataclass
class OutputRun:
    """One answer column: its single-output job, spec, settled keys, column names, price and counters."""

    job: EnrichJob
    spec: EnrichSpec
    known: pl.DataFrame
    names: dict[str, str]
    price: Price | None
    ctx: CallContext
    lane: LaneColumns
    tally: Tally = field(default_factory=Tally)

    @property
    def cost_usd(self) -> float | None:
        """What this output's requests cost in this run."""
        stats = self.ctx.stats
        return self.price.cost(stats.input_tokens, stats.output_tokens) if self.price else None


def plan_outputs(
    job: EnrichJob, input_columns: list[str], endpoint: Endpoint
) -> tuple[list[OutputRun], AnswerStore | None]:
    """Spec and settled answers for every output; they share one scheduler and budget (and the cache)."""
    runs: list[OutputRun] = []
    cache = open_cache(job.cache_dir or default_cache_dir(job.destination), job.storage()) if job.cache else None
    cached = cache.load() if cache is not None and not job.refresh_cache else None
    shared: CallContext | None = None
    taken = list(input_columns)
    for number, single in enumerate(job.output_jobs()):
        spec = build_spec(single, endpoint)
        check_structured_fields(spec, taken)
        names = bookkeeping_names(single.output_column, primary=number == 0)
        taken += [single.output_column, *names.values()]
        if spec.structured is not None:
            taken += [f"{spec.structured.prefix}{n}" for n in spec.structured.model.model_fields]
        if len(set(taken)) != len(taken):
            raise ConfigError(f"output '{single.output_column}' would overwrite another column; rename it.")
        previous = (
            None if job.refresh_cache else load_previous(job.destination, single.output_column, names, job.storage())
        )
        known = build_known(cached, previous, retry_failed=job.retry_failed)
        price = resolve_price(single, spec.identity.model, local=endpoint.local)
        secret = endpoint.api_key.get_secret_value() if endpoint.api_key is not None else None
        ctx = build_context(single, price, max_concurrency=spec.max_concurrency, secret=secret)
        if shared is None:
            shared = ctx
        else:
            share_limits(ctx, shared)
        runs.append(OutputRun(single, spec, known, names, price, ctx, LaneColumns.of(number)))
    return runs, cache


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
    # Tokens stay on the first row of each key in the whole table; rows that reused it show 0.
    return planned.select(
        pl.col(output_column),
        pl.col(ERROR_COLUMN),
        pl.col(TRUNCATED_COLUMN).fill_null(False),
        *(pl.when(pl.col(lane.charge)).then(pl.col(c)).otherwise(0).fill_null(0).alias(c)
          for c in (INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN)),
        pl.col(KEY_COLUMN),
    )  # fmt: skip
