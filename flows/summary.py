"""The small summary a run returns (and the CLI writes with --summary-json)."""

from __future__ import annotations

from pydantic import BaseModel

__all__ = ["RunSummary"]


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
    output_tokens: int
    cost_usd: float | None
    wall_seconds: float
    output: str
    rejected_output: str | None = None
    model: str
    endpoint: str
    outputs: dict[str, dict[str, int]] = {}
    notes: list[str] = []  # what the run learned that a rerun could use, e.g. a smaller --max-tokens
