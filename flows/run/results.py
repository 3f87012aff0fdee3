"""What a run adds up to: the lanes' call totals and the partitions' results, as its RunSummary."""

from __future__ import annotations

import time
from dataclasses import dataclass

from llm_enrich.flows.llm.endpoint import describe_endpoint
from llm_enrich.flows.plan.lanes import OutputRun
from llm_enrich.flows.plan.survey import Survey
from llm_enrich.flows.report.summary import RunSummary, most_common
from llm_enrich.flows.run.partitions import PartitionResult
from llm_enrich.flows.tables.writing import rejected_path

__all__ = ["CallTotals", "summarize_run"]


@dataclass(frozen=True)
class CallTotals:
    """Every output's requests, retries, tokens and cost in this run, added up."""

    requests: int
    retries: int
    rate_limited: int
    timeouts: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_usd: float | None  # None when any output's model has no known price

    @classmethod
    def of(cls, runs: list[OutputRun]) -> CallTotals:
        """The totals over the runs' counters and prices."""
        stats = [run.ctx.stats for run in runs]
        costs = [run.cost_usd for run in runs]
        return cls(
            requests=sum(s.requests for s in stats),
            retries=sum(s.retries for s in stats),
            rate_limited=sum(s.rate_limited for s in stats),
            timeouts=sum(s.timeouts for s in stats),
            input_tokens=sum(s.input_tokens for s in stats),
            cached_input_tokens=sum(s.cached_input_tokens for s in stats),
            output_tokens=sum(s.output_tokens for s in stats),
            cost_usd=None if any(c is None for c in costs) else round(sum(c or 0.0 for c in costs), 6),
        )


def summarize_run(
    survey: Survey, runs: list[OutputRun], results: list[PartitionResult], *, destination: str, base_url: str | None,
    local: bool, started: float, notes: list[str],
) -> RunSummary:  # fmt: skip
    """The RunSummary of a run that wrote its output: rows from the results, calls from the lanes."""
    primary, totals = runs[0], CallTotals.of(runs)
    failed = sum(r.failed_any for r in results)
    return RunSummary(
        rows_in=survey.rows_in,
        rows_valid=survey.rows_valid,
        rows_rejected=survey.rows_rejected,
        rows_ok=survey.rows_valid - failed,
        rows_failed=failed,
        rows_truncated=sum(r.truncated_any for r in results),
        rows_cached=primary.tally.rows_cached,
        rows_deduplicated=primary.ctx.stats.rows_deduplicated,
        unique_prompts_sent=sum(run.tally.unique_todo for run in runs),
        requests=totals.requests,
        retries=totals.retries,
        rate_limited=totals.rate_limited,
        timeouts=totals.timeouts,
        input_tokens=totals.input_tokens,
        cached_input_tokens=totals.cached_input_tokens,
        output_tokens=totals.output_tokens,
        cost_usd=totals.cost_usd,
        wall_seconds=round(time.perf_counter() - started, 3),
        output=destination,
        rejected_output=rejected_path(destination) if survey.rows_rejected else None,
        model=primary.spec.identity.model,
        endpoint=describe_endpoint(base_url, local=local),
        outputs={
            run.job.output_column: {
                "rows_failed": sum(r.failed[i] for r in results),
                "rows_cached": run.tally.rows_cached,
                "requests": run.ctx.stats.requests,
            }
            for i, run in enumerate(runs)
        },
        notes=notes,
        most_common_error=most_common([row.get("why") for r in results for row in r.problems]),
    )
