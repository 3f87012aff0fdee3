"""Run reports as Prefect artifacts: summary, sample, failures, and live progress."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import polars as pl
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from llm_enrich.flows.report.events import public_uri
from llm_enrich.flows.report.orchestration import best_effort
from llm_enrich.flows.report.summary import RunSummary
from llm_enrich.flows.tables.validation import REJECT_REASON
from llm_enrich.schemas.enriched import ERROR_COLUMN

__all__ = ["FAILURE_ROWS", "Progress", "failed_rows", "publish_batches", "publish_failure", "publish_report"]

_SAMPLE_ROWS = 20
FAILURE_ROWS = 100
"""Rows the failures artifact shows at most."""
_CELL_CHARS = 200
_ANSWER_CHARS = 1_000


class Progress:
    """A progress artifact that moves as partitions finish."""

    def __init__(self, total_rows: int, already_done: int) -> None:
        self.total = max(total_rows, 1)
        self.done = already_done
        self.artifact: UUID | None = best_effort(  # type: ignore[assignment]
            lambda: create_progress_artifact(self._percent(), key="enrich-progress", description=self._rows()),
            "progress artifact",
        )

    def advance(self, rows: int) -> None:
        """Count finished rows and update the artifact."""
        self.done += rows
        if self.artifact is not None:
            artifact, percent, rows_text = self.artifact, self._percent(), self._rows()
            best_effort(lambda: update_progress_artifact(artifact, percent, description=rows_text), "progress update")

    def _rows(self) -> str:
        return f"{min(self.done, self.total):,} of {self.total:,} rows answered or failed"

    def _percent(self) -> float:
        return round(100.0 * min(self.done, self.total) / self.total, 1)


def publish_report(summary: RunSummary, sample: pl.DataFrame, failed: pl.DataFrame, rejected: pl.DataFrame) -> None:
    """Markdown summary, a sample of enriched rows, and (the first of) the failed and rejected rows."""
    s = summary
    cost = f"${s.cost_usd:.4f}" if s.cost_usd is not None else "unknown (no price for this model)"
    text = "\n".join(
        [
            f"# Enrichment of `{s.output}`",
            "",
            "| | |",
            "|---|---|",
            f"| rows in / valid / rejected | {s.rows_in} / {s.rows_valid} / {s.rows_rejected} |",
            f"| rows ok / failed | {s.rows_ok} / {s.rows_failed} |",
            f"| rows from cache / deduplicated | {s.rows_cached} / {s.rows_deduplicated} |",
            f"| requests / retries / rate-limited | {s.requests} / {s.retries} / {s.rate_limited} |",
            f"| tokens in / out | {s.input_tokens:,} / {s.output_tokens:,} |",
            f"| cost | {cost} |",
            f"| wall time | {s.wall_seconds:.1f} s |",
            f"| model | {s.model} at {s.endpoint} |",
            f"| output | `{s.output}` |",
            f"| rejected rows | {f'`{s.rejected_output}`' if s.rejected_output else 'none'} |",
        ]
    )
    best_effort(
        lambda: create_markdown_artifact(text, key="enrich-summary", description="What this run did"),
        "summary artifact",
    )
    best_effort(
        lambda: create_link_artifact(
            public_uri(s.output), link_text=s.output, key="enrich-output", description="The enriched table"
        ),
        "output link artifact",
    )
    if sample.height:
        # The key and token counts say nothing to a reader; the answer gets room to be read.
        shown = sample.head(_SAMPLE_ROWS).select(pl.exclude("enrich_key", r"^enrich_.*tokens$"))
        rows = _records(shown, cell_chars=_ANSWER_CHARS)
        best_effort(
            lambda: create_table_artifact(rows, key="enrich-sample", description="First enriched rows"),
            "sample artifact",
        )
    frames = [failed]
    if rejected.height:
        frames.append(rejected.select(pl.exclude(REJECT_REASON), stage=pl.lit("validation"), why=pl.col(REJECT_REASON)))
    problems = pl.concat(frames, how="diagonal_relaxed")
    # The reason first: wide rows would push it off-screen.
    problems = problems.select("why", "stage", pl.exclude("why", "stage")) if problems.height else problems
    total = s.rows_failed + s.rows_rejected
    if problems.height:
        rows = _records(problems.head(FAILURE_ROWS))
        about = f"Failed and rejected rows (first {min(FAILURE_ROWS, problems.height)} of {total})"
        best_effort(lambda: create_table_artifact(rows, key="enrich-failures", description=about), "failures artifact")


def failed_rows(enriched: pl.DataFrame, output_column: str, limit: int = FAILURE_ROWS) -> pl.DataFrame:
    """The first rows whose answer failed, with the reason, for the failures artifact."""
    return (
        enriched.filter(pl.col(ERROR_COLUMN).is_not_null())
        .head(limit)
        .select(pl.exclude(output_column, r"^enrich_.*$"), stage=pl.lit("model"), why=pl.col(ERROR_COLUMN))
    )


def publish_batches(rows: list[dict[str, Any]], about: str) -> None:
    """Batch mode: each batch's id, state and line count, as the run left them."""
    if rows:
        best_effort(lambda: create_table_artifact(rows, key="enrich-batches", description=about), "batches artifact")


def publish_failure(message: str) -> None:
    """The reason a run was refused, where the UI shows it."""
    text = f"# Run refused\n\n```\n{message}\n```"
    best_effort(lambda: create_markdown_artifact(text, key="enrich-summary", description="Why"), "refusal artifact")


def _records(frame: pl.DataFrame, cell_chars: int = _CELL_CHARS) -> list[dict[str, Any]]:
    short = frame.with_columns(pl.col(pl.String).str.slice(0, cell_chars))
    return [{k: ("" if v is None else v) for k, v in row.items()} for row in short.to_dicts()]
