"""A job's outputs (the primary answer column and any extra ones), planned and assembled one by one."""

from __future__ import annotations

from dataclasses import dataclass

import pandera.polars as pa
import polars as pl

from flows.cache import ResponseCache
from flows.job import EnrichJob
from flows.llm import Endpoint
from flows.planning import ROW_INDEX, Plan
from flows.preparation import build_spec, check_structured_fields, plan_job
from flows.runtime import build_context, resolve_price, share_limits
from flows.validation import validate_output
from schemas.enriched import ERROR_COLUMN, added_columns, bookkeeping_names
from schemas.errors import ConfigError
from transforms.calls import CallContext
from transforms.costs import Price
from transforms.enrichment import EnrichSpec, charge_first
from transforms.structured import expand_columns

__all__ = ["ASK_PREFIX", "OutputRun", "assemble_output", "plan_outputs", "rows_to_ask"]

ASK_PREFIX = "_enrich_ask_"


@dataclass
class OutputRun:
    """One answer column: its single-output job, spec, plan, column names, price and counters."""

    job: EnrichJob
    spec: EnrichSpec
    plan: Plan
    names: dict[str, str]
    price: Price | None
    ctx: CallContext

    @property
    def cost_usd(self) -> float | None:
        """What this output's requests cost in this run."""
        stats = self.ctx.stats
        return self.price.cost(stats.input_tokens, stats.output_tokens) if self.price else None


def plan_outputs(
    job: EnrichJob, valid: pl.DataFrame, endpoint: Endpoint
) -> tuple[list[OutputRun], ResponseCache | None]:
    """Spec and plan for every output; they share one scheduler and budget (and the cache)."""
    runs: list[OutputRun] = []
    cache: ResponseCache | None = None
    shared: CallContext | None = None
    taken = list(valid.columns)
    for number, single in enumerate(job.output_jobs()):
        spec = build_spec(single, endpoint)
        check_structured_fields(spec, taken)
        names = bookkeeping_names(single.output_column, primary=number == 0)
        taken += [single.output_column, *names.values()]
        if spec.structured is not None:
            taken += [f"{spec.structured.prefix}{n}" for n in spec.structured.model.model_fields]
        if len(set(taken)) != len(taken):
            raise ConfigError(f"output '{single.output_column}' would overwrite another column; rename it.")
        plan, cache = plan_job(single, valid, spec, names)
        price = resolve_price(single, spec.identity.model, local=endpoint.local)
        secret = endpoint.api_key.get_secret_value() if endpoint.api_key is not None else None
        ctx = build_context(single, price, max_concurrency=spec.max_concurrency, secret=secret)
        if shared is None:
            shared = ctx
        else:
            share_limits(ctx, shared)
        runs.append(OutputRun(single, spec, plan, names, price, ctx))
    return runs, cache


def rows_to_ask(valid_keyed: pl.DataFrame, runs: list[OutputRun]) -> pl.DataFrame:
    """Rows some output must ask for, with one boolean column per output saying which."""
    flags = [
        pl.col(ROW_INDEX).is_in(run.plan.todo.get_column(ROW_INDEX).implode()).alias(f"{ASK_PREFIX}{i}")
        for i, run in enumerate(runs)
    ]
    marked = valid_keyed.with_columns(flags)
    return marked.filter(pl.any_horizontal(pl.col(f"{ASK_PREFIX}{i}") for i in range(len(runs))))


def assemble_output(
    run: OutputRun, asked: pl.DataFrame, input_columns: list[str], schema: pa.DataFrameSchema, secret: str | None
) -> pl.DataFrame:
    """This output's columns for every valid row, in input order, validated, with file names."""
    ordered = [*input_columns, *added_columns(run.job.output_column)]
    frame = pl.concat([run.plan.done.select(ROW_INDEX, *ordered), asked.select(ROW_INDEX, *ordered)])
    frame = charge_first(frame.sort(ROW_INDEX)).drop(ROW_INDEX)
    if secret:
        frame = frame.with_columns(pl.col(ERROR_COLUMN).str.replace_all(secret, "***", literal=True))
    structured = run.spec.structured
    fields: list[str] = []
    if structured is not None:
        frame = expand_columns(frame, run.job.output_column, structured)
        fields = [f"{structured.prefix}{name}" for name in structured.model.model_fields]
    validate_output(frame, schema, run.job.output_column, structured)
    added = added_columns(run.job.output_column)
    return frame.select(added[0], *fields, *added[1:]).rename(run.names)
