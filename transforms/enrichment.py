"""The batched LLM column transform: a frame in, the same frame plus answer columns out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableLambda

from schemas.enriched import ERROR_COLUMN, INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN
from schemas.errors import EndpointRejected
from transforms.calls import CallStats, Outcome, RetryPolicy, ask_model
from transforms.prompts import PromptTemplate, build_messages, render_prompts

__all__ = ["EnrichSpec", "enrich_frame", "enrich_frame_async"]

RowsDone = Callable[[int, int], None]
"""Progress callback: (rows answered, rows failed) since the last call."""


@dataclass(frozen=True)
class EnrichSpec:
    """What to ask and where to put the answer."""

    template: PromptTemplate
    output_column: str
    system: str | None = None
    max_concurrency: int = 8
    policy: RetryPolicy = field(default_factory=RetryPolicy)


async def enrich_frame_async(
    frame: pl.DataFrame,
    spec: EnrichSpec,
    model: BaseChatModel,
    *,
    stats: CallStats | None = None,
    gate: asyncio.Semaphore | None = None,
    on_rows_done: RowsDone | None = None,
) -> pl.DataFrame:
    """Answer every row's prompt; each row gets its own answer or an explicit error."""
    spec.template.check_columns(frame.columns)
    stats = stats if stats is not None else CallStats()
    prompts = render_prompts(spec.template, frame.select(spec.template.fields).to_dicts())

    # Identical prompts are asked once and the answer fanned out to every row that asked.
    slot_of: dict[str, int] = {}
    rows_of: list[int] = []
    for prompt in prompts:
        if prompt is not None:
            if prompt not in slot_of:
                slot_of[prompt] = len(rows_of)
                rows_of.append(0)
            rows_of[slot_of[prompt]] += 1
    unique = list(slot_of)

    async def ask(index: int) -> Outcome:
        messages = build_messages(unique[index], spec.system)
        outcome = await ask_model(model, messages, policy=spec.policy, stats=stats, gate=gate)
        if on_rows_done is not None:
            n = rows_of[index]
            on_rows_done(n if outcome.error is None else 0, n if outcome.error else 0)
        return outcome

    results = await RunnableLambda(ask).abatch(
        list(range(len(unique))),
        config={"max_concurrency": spec.max_concurrency},
        return_exceptions=True,
    )
    outcomes: list[Outcome] = []
    for result in results:
        if isinstance(result, EndpointRejected):
            raise result
        if isinstance(result, BaseException):
            outcomes.append(Outcome(error=f"internal error: {type(result).__name__}: {result}"))
        else:
            outcomes.append(result)

    nulls = [c for c in spec.template.fields if frame[c].null_count()]
    answers: list[str | None] = []
    errors: list[str | None] = []
    in_tokens: list[int] = []
    out_tokens: list[int] = []
    charged: set[int] = set()
    for row, prompt in enumerate(prompts):
        if prompt is None:
            empty = [c for c in nulls if frame[c][row] is None]
            answers.append(None)
            errors.append(f"column {empty[0]!r} is null in this row; no request was sent")
            in_tokens.append(0)
            out_tokens.append(0)
            if on_rows_done is not None:
                on_rows_done(0, 1)
            continue
        slot = slot_of[prompt]
        outcome = outcomes[slot]
        answers.append(outcome.text)
        errors.append(outcome.error)
        # Tokens are charged to the first row that asked, so the column sums to what was paid.
        first = slot not in charged
        charged.add(slot)
        in_tokens.append(outcome.input_tokens if first else 0)
        out_tokens.append(outcome.output_tokens if first else 0)

    return frame.drop(
        [
            c
            for c in (spec.output_column, ERROR_COLUMN, INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN)
            if c in frame.columns
        ]
    ).with_columns(
        pl.Series(spec.output_column, answers, dtype=pl.String),
        pl.Series(ERROR_COLUMN, errors, dtype=pl.String),
        pl.Series(INPUT_TOKENS_COLUMN, in_tokens, dtype=pl.Int64),
        pl.Series(OUTPUT_TOKENS_COLUMN, out_tokens, dtype=pl.Int64),
    )


def enrich_frame(
    frame: pl.DataFrame,
    spec: EnrichSpec,
    model: BaseChatModel,
    *,
    stats: CallStats | None = None,
) -> pl.DataFrame:
    """Synchronous enrich_frame_async, for callers without an event loop."""
    return asyncio.run(enrich_frame_async(frame, spec, model, stats=stats))
