"""`enrich estimate` / `run --dry-run`: what a run would send and cost, without calling the model."""

from __future__ import annotations

from pydantic import BaseModel

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm.endpoint import resolve_endpoint
from llm_enrich.flows.plan.lanes import is_discounted, plan_outputs, resolve_price
from llm_enrich.flows.plan.survey import read_columns, survey_input
from llm_enrich.flows.plan.trial import TrialPick
from llm_enrich.flows.report.summary import FullRunEstimate, RunSummary
from llm_enrich.flows.tables.schema_choice import resolve_schema
from llm_enrich.transforms.admission import estimate_tokens
from llm_enrich.transforms.prompts import parse_template

__all__ = ["Estimate", "estimate_job", "project_full_run"]


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
    online_cost_usd: float | None = None  # the same ceiling at online prices
    batch_cost_usd: float | None = None  # the same ceiling at Batch API / flex prices (half, for OpenAI)


def estimate_job(job: EnrichJob, pick: TrialPick | None = None) -> Estimate:
    """Load, validate and plan exactly as a run would (every output), then count instead of sending.

    A trial's sample ``pick`` learns its rows on the way (this is the trial's first pass).
    """
    template = parse_template(job.prompt)
    columns = read_columns(job)
    schema = resolve_schema(job.input_schema, template, columns)
    endpoint = resolve_endpoint(job)
    runs, _ = plan_outputs(job, columns, endpoint)
    survey = survey_input(job, schema, template, runs, staging=None, pick=pick)
    input_tokens = output_tokens = 0
    cost: float | None = 0.0
    by_mode: dict[str, float | None] = {"online": 0.0, "batch": 0.0}
    for run in runs:
        prefix = f"{run.job.system}\n" if run.job.system else ""
        tokens_in = sum(estimate_tokens(prefix + p) for p in run.tally.todo.values())
        tokens_out = run.job.max_tokens * run.tally.unique_todo
        input_tokens, output_tokens = input_tokens + tokens_in, output_tokens + tokens_out
        cost = None if cost is None or run.price is None else cost + run.price.cost(tokens_in, tokens_out)
        for mode, so_far in by_mode.items():
            price = resolve_price(
                run.job, run.spec.identity.model, local=endpoint.local, discounted=is_discounted(mode, None)
            )
            by_mode[mode] = None if so_far is None or price is None else so_far + price.cost(tokens_in, tokens_out)
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
        online_cost_usd=_rounded(by_mode["online"]),
        batch_cost_usd=_rounded(by_mode["batch"]),
    )


def _rounded(cost: float | None) -> float | None:
    return round(cost, 6) if cost is not None else None


def project_full_run(before: Estimate, trial: RunSummary) -> FullRunEstimate:
    """The whole table after the trial: prompts left, and their cost at the tokens the trial used per prompt."""
    left = max(0, before.unique_prompts - trial.unique_prompts_sent)
    sent = trial.unique_prompts_sent
    if sent:
        per_in, per_out = trial.input_tokens / sent, trial.output_tokens / sent
    else:  # nothing was sent (all cached): fall back on the estimate's guesses
        per_in = before.estimated_input_tokens / max(1, before.unique_prompts)
        per_out = before.max_output_tokens / max(1, before.unique_prompts)
    tokens_in, tokens_out = round(per_in * left), round(per_out * left)
    price = before.price_per_million
    cost = None if price is None else round((tokens_in * price[0] + tokens_out * price[1]) / 1e6, 6)
    ceiling = (
        None
        if before.estimated_cost_usd is None
        else round(before.estimated_cost_usd * left / max(1, before.unique_prompts), 6)
    )
    return FullRunEstimate(
        rows=before.rows_valid,
        distinct_prompts_to_send=left,
        projected_input_tokens=tokens_in,
        projected_output_tokens=tokens_out,
        projected_cost_usd=cost,
        ceiling_cost_usd=ceiling,
        based_on_prompts=sent,
    )
