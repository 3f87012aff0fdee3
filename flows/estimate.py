"""`enrich estimate` / `run --dry-run`: what a run would send and cost, without calling the model."""

from __future__ import annotations

from pydantic import BaseModel

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm import resolve_endpoint
from llm_enrich.flows.outputs import plan_outputs
from llm_enrich.flows.schema_choice import resolve_schema
from llm_enrich.flows.survey import read_columns, survey_input
from llm_enrich.transforms.prompts import parse_template
from llm_enrich.transforms.scheduling import estimate_tokens

__all__ = ["Estimate", "estimate_job"]


class Estimate(BaseModel):
    """Counts and upper bounds for a run that has not happened."""

    rows_in: int
    rows_valid: int
    rows_rejected: int
    rows_cached: int
    rows_kept_failed: int
    rows_to_ask: int
    unique_prompts: int
    estimated_input_tokens: int
    max_output_tokens: int
    estimated_cost_usd: float | None
    model: str
    price_per_million: tuple[float, float] | None


def estimate_job(job: EnrichJob) -> Estimate:
    """Load, validate and plan exactly as a run would (every output), then count instead of sending."""
    template = parse_template(job.prompt)
    columns = read_columns(job)
    schema = resolve_schema(job.input_schema, template, columns)
    endpoint = resolve_endpoint(job)
    runs, _ = plan_outputs(job, columns, endpoint)
    survey = survey_input(job, schema, template, runs, staging=None)
    input_tokens = output_tokens = 0
    cost: float | None = 0.0
    for run in runs:
        prefix = f"{run.job.system}\n" if run.job.system else ""
        tokens_in = sum(estimate_tokens(prefix + p) for p in run.tally.todo.values())
        tokens_out = run.job.max_tokens * run.tally.unique_todo
        input_tokens, output_tokens = input_tokens + tokens_in, output_tokens + tokens_out
        cost = None if cost is None or run.price is None else cost + run.price.cost(tokens_in, tokens_out)
    primary = runs[0]
    price = primary.price
    return Estimate(
        rows_in=survey.rows_in,
        rows_valid=survey.rows_valid,
        rows_rejected=survey.rows_rejected,
        rows_cached=primary.tally.rows_cached,
        rows_kept_failed=primary.tally.rows_kept_failed,
        rows_to_ask=primary.tally.rows_to_ask,
        unique_prompts=sum(run.tally.unique_todo for run in runs),
        estimated_input_tokens=input_tokens,
        max_output_tokens=output_tokens,
        estimated_cost_usd=round(cost, 6) if cost is not None else None,
        model=primary.spec.identity.model,
        price_per_million=(price.input_per_million, price.output_per_million) if price else None,
    )
