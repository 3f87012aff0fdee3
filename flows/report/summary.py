"""The small summary a run returns (and the CLI writes with --summary-json)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel

__all__ = ["FullRunEstimate", "RunSummary", "most_common", "one_line"]


class FullRunEstimate(BaseModel):
    """What the whole table would cost after a trial, scaled from the tokens the trial really used."""

    rows: int  # valid rows in the whole table
    distinct_prompts_to_send: int  # not answered by the cache, a previous output or this trial
    projected_input_tokens: int
    projected_output_tokens: int
    projected_cost_usd: float | None
    ceiling_cost_usd: float | None  # the worst case `enrich estimate` gives: every answer max_tokens long
    based_on_prompts: int  # distinct prompts the trial sent (0: the projection falls back on estimates)


class RunSummary(BaseModel):
    """Counts and totals of one run; no frames, no secrets."""

    rows_in: int
    rows_valid: int
    rows_rejected: int
    rows_ok: int
    rows_failed: int
    rows_truncated: int = 0
    rows_cached: int
    rows_deduplicated: int
    unique_prompts_sent: int
    requests: int
    retries: int
    rate_limited: int
    timeouts: int = 0
    input_tokens: int
    cached_input_tokens: int = 0  # of input_tokens, served from the provider's prompt cache
    output_tokens: int
    cost_usd: float | None
    wall_seconds: float
    output: str
    rejected_output: str | None = None
    model: str
    endpoint: str
    outputs: dict[str, dict[str, int]] = {}
    trial: str | None = None  # how a trial run picked its rows; None for a full run
    full_run_estimate: FullRunEstimate | None = None
    batches_submitted: int = 0  # batch mode: batches this run submitted
    batches_pending: int = 0  # batch mode: still running when the run ended (--batch-no-wait); no output yet
    most_common_error: str | None = None  # among the failed rows the report samples
    notes: list[str] = []  # what the run learned that a rerun could use, e.g. a smaller --max-tokens


def one_line(s: RunSummary) -> str:
    """The run's result in one line: the final state's message in the UI."""
    if s.batches_pending:
        return f"submitted to the Batch API: {s.batches_pending} batches pending; rerun the same job to collect them"
    cost = f"${s.cost_usd:.4f}" if s.cost_usd is not None else "cost unknown"
    failed = f", {s.rows_failed:,} failed" if s.rows_failed else ""
    rejected = f", {s.rows_rejected:,} rejected" if s.rows_rejected else ""
    return (
        f"wrote {s.output}: {s.rows_ok:,} rows ok{failed}{rejected} ({s.rows_cached:,} from cache), "
        f"{s.requests:,} requests, {cost}, {s.wall_seconds:.1f} s"
    )


def most_common(errors: list[Any]) -> str | None:
    """The most frequent reason among the failed rows the partitions sampled."""
    counted = Counter(e for e in errors if e)
    return str(counted.most_common(1)[0][0]) if counted else None
