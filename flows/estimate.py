"""`enrich estimate` / `run --dry-run`: what a run would send and cost, without calling the model."""

from __future__ import annotations

from pydantic import BaseModel

from flows.job import EnrichJob
from flows.llm import resolve_endpoint
from flows.preparation import build_spec, check_structured_fields, load_valid_rows, plan_job
from flows.runtime import resolve_price
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
    """Load, validate and plan exactly as a run would, then count instead of sending."""
    frame, _, split = load_valid_rows(job)
    endpoint = resolve_endpoint(job)
    spec = build_spec(job, endpoint)
    check_structured_fields(spec, split.valid.columns)
    plan, _ = plan_job(job, split.valid, spec)
    prefix = f"{job.system}\n" if job.system else ""
    input_tokens = sum(estimate_tokens(prefix + p) for p in plan.todo_prompts)
    output_tokens = job.max_tokens * plan.unique_todo
    price = resolve_price(job, spec.identity.model, local=endpoint.local)
    return Estimate(
        rows_in=frame.height,
        rows_valid=split.valid.height,
        rows_rejected=split.rejected.height,
        rows_cached=plan.rows_cached,
        rows_kept_failed=plan.rows_kept_failed,
        rows_to_ask=plan.todo.height,
        unique_prompts=plan.unique_todo,
        estimated_input_tokens=input_tokens,
        max_output_tokens=output_tokens,
        estimated_cost_usd=round(price.cost(input_tokens, output_tokens), 6) if price else None,
        model=spec.identity.model,
        price_per_million=(price.input_per_million, price.output_per_million) if price else None,
    )
