"""The one Prefect event a run emits at its end, for automations to act on.

Automation triggers match event names and resource labels, never the payload, so whatever an
automation must test (the outcome, the model) is a label; the figures ride in the payload.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from prefect.events import emit_event

from llm_enrich.flows.report.summary import RunSummary
from llm_enrich.flows.tables.paths import is_remote, strip_credentials

__all__ = ["EVENT_PREFIX", "RunOutcome", "emit_run_event", "outcome_of", "public_uri"]

EVENT_PREFIX = "llm-enrich.run."

Outcome = Literal["ok", "with-failures", "submitted", "failed", "cancelled"]
# Event name suffix per outcome: a run that wrote its output (even with failed rows) completed.
_EVENT_OF: dict[str, str] = {
    "ok": "completed",
    "with-failures": "completed",
    "submitted": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, in the words an automation matches on."""

    outcome: Outcome
    output: str
    model: str
    summary: RunSummary | None = None
    error: str | None = None


def outcome_of(summary: RunSummary) -> Outcome:
    """`ok`, `with-failures` (rows with an enrich_error), or `submitted` (batches still pending)."""
    if summary.batches_pending:
        return "submitted"
    return "with-failures" if summary.rows_failed or summary.rows_rejected else "ok"


def public_uri(destination: str) -> str:
    """The output as a URI fit for a resource id: no credentials, no query (a SAS token lives there)."""
    if is_remote(destination) or "://" in destination:
        return strip_credentials(destination)
    return "file://" + os.path.abspath(destination)


def emit_run_event(result: RunOutcome) -> str | None:
    """Emit `llm-enrich.run.<completed|failed|cancelled>`; the event id, or None when Prefect could not."""
    resource = {
        "prefect.resource.id": f"llm-enrich.output.{public_uri(result.output)}",
        "prefect.resource.name": public_uri(result.output),
        "llm-enrich.outcome": result.outcome,
        "llm-enrich.model": result.model,
    }
    event = emit_event(
        event=EVENT_PREFIX + _EVENT_OF[result.outcome],
        resource=resource,
        payload=_payload(result),
    )
    return str(event.id) if event is not None else None


def _payload(result: RunOutcome) -> dict[str, Any]:
    """The figures a notification shows; an error text is already redacted where it was made."""
    payload: dict[str, Any] = {"outcome": result.outcome, "output": public_uri(result.output), "model": result.model}
    if result.error:
        payload["error"] = result.error
    s = result.summary
    if s is not None:
        payload.update(
            rows_in=s.rows_in,
            rows_ok=s.rows_ok,
            rows_failed=s.rows_failed,
            rows_rejected=s.rows_rejected,
            rows_cached=s.rows_cached,
            requests=s.requests,
            input_tokens=s.input_tokens,
            output_tokens=s.output_tokens,
            cost_usd=s.cost_usd,
            wall_seconds=s.wall_seconds,
            batches_pending=s.batches_pending,
            most_common_error=s.most_common_error,
        )
    return payload
