"""`enrich estimate` / `run --dry-run`: what a run would send and cost, without calling the model."""

from __future__ import annotations

from pydantic import BaseModel

from flows.job import EnrichJob
from flows.llm import resolve_endpoint
from flows.outputs import plan_outputs
from flows.preparation import load_valid_rows
from transforms.scheduling import estimate_tokens

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
    frame, _, split = load_valid_rows(job)
    endpoint = resolve_endpoint(job)
    runs, _ = plan_outputs(job, split.valid, endpoint)
    input_tokens = output_tokens = 0
    cost: float | None = 0.0
    for run in runs:
        prefix = f"{run.job.system}\n" if run.job.system else ""
        tokens_in = sum(estimate_tokens(prefix + p) for p in run.plan.todo_prompts)
        tokens_out = run.job.max_tokens * run.plan.unique_todo
        input_tokens, output_tokens = input_tokens + tokens_in, output_tokens + tokens_out
        cost = None if cost is None or run.price is None else cost + run.price.cost(tokens_in, tokens_out)
    primary = runs[0]
    price = primary.price
    return Estimate(
        rows_in=frame.height,
        rows_valid=split.valid.height,
        rows_rejected=split.rejected.height,
        rows_cached=primary.plan.rows_cached,
        rows_kept_failed=primary.plan.rows_kept_failed,
        rows_to_ask=primary.plan.todo.height,
        unique_prompts=sum(run.plan.unique_todo for run in runs),
        estimated_input_tokens=input_tokens,
        max_output_tokens=output_tokens,
        estimated_cost_usd=round(cost, 6) if cost is not None else None,
        model=primary.spec.identity.model,
        price_per_million=(price.input_per_million, price.output_per_million) if price else None,
    )
