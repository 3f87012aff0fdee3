"""The batched LLM column transform: a frame in, the same frame plus answer columns out."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable, RunnableLambda

from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TOKEN_COLUMNS,
    TRUNCATED_COLUMN,
    added_columns,
)
from llm_enrich.schemas.errors import EnrichError
from llm_enrich.transforms.calls import CallContext, ask_model
from llm_enrich.transforms.keys import AnswerIdentity, answer_key
from llm_enrich.transforms.outcome import Outcome
from llm_enrich.transforms.prompts import PromptTemplate, build_messages, render_prompts
from llm_enrich.transforms.structured import StructuredOutput

__all__ = [
    "AnswerMemo",
    "EnrichSpec",
    "charge_first",
    "enrich_frame",
    "enrich_frame_async",
    "key_columns",
    "prompt_keys",
]

RowsDone = Callable[[int, int], None]
"""Progress callback: (rows answered, rows failed) since the last call."""


@dataclass(frozen=True)
class EnrichSpec:
    """What to ask, of whom, and where to put the answer."""

    template: PromptTemplate
    output_column: str
    system: str | None = None
    max_concurrency: int = 8
    identity: AnswerIdentity = field(default_factory=lambda: AnswerIdentity(model="unknown", endpoint="unknown"))
    structured: StructuredOutput | None = None


@dataclass
class AnswerMemo:
    """This run's answers by key and its requests in flight, shared by every partition."""

    done: dict[str, Outcome] = field(default_factory=dict)
    in_flight: dict[str, asyncio.Future[Outcome]] = field(default_factory=dict)
    on_answer: Callable[[str, Outcome], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def prompt_keys(frame: pl.DataFrame, spec: EnrichSpec) -> tuple[list[str | None], list[str | None]]:
    """Each row's rendered prompt and answer key (None where a placeholder cell is null)."""
    prompts = render_prompts(spec.template, frame.select(spec.template.fields).to_dicts())
    keys = [None if p is None else answer_key(spec.identity, spec.system, p) for p in prompts]
    return prompts, keys


def key_columns(frame: pl.DataFrame, spec: EnrichSpec, *, prompt: str, key: str) -> pl.DataFrame:
    """Two String columns, each row's prompt and answer key, rendered once per distinct set of cells."""
    fields = list(spec.template.fields)
    cells = frame.select(fields)
    try:
        distinct = cells.unique(maintain_order=True)
        prompts, keys = prompt_keys(distinct, spec)
        rendered = distinct.with_columns(
            pl.Series(prompt, prompts, dtype=pl.String), pl.Series(key, keys, dtype=pl.String)
        )
        # Repeated values (the usual case in big tables) cost one render and one hash, not one per row.
        joined = cells.join(rendered, on=fields, how="left", nulls_equal=True, maintain_order="left")
        return joined.select(prompt, key)
    except pl.exceptions.PolarsError:  # cells polars cannot join on (nested types): one per row
        prompts, keys = prompt_keys(cells, spec)
        return pl.DataFrame([pl.Series(prompt, prompts, dtype=pl.String), pl.Series(key, keys, dtype=pl.String)])


def charge_first(frame: pl.DataFrame) -> pl.DataFrame:
    """Tokens (cached ones too) stay on the first row of each answer key; rows that reused the answer show 0."""
    first = pl.col(KEY_COLUMN).is_first_distinct() & pl.col(KEY_COLUMN).is_not_null()
    return frame.with_columns(pl.when(first).then(pl.col(c)).otherwise(0).alias(c) for c in TOKEN_COLUMNS)


async def enrich_frame_async(
    frame: pl.DataFrame,
    spec: EnrichSpec,
    model: BaseChatModel,
    *,
    ctx: CallContext | None = None,
    memo: AnswerMemo | None = None,
    on_rows_done: RowsDone | None = None,
    keys: pl.Series | None = None,
) -> pl.DataFrame:
    """Answer every row's prompt; each row gets its own answer or an explicit error.

    ``keys`` (each row's answer key, computed earlier) spares rendering and hashing every row.
    """
    spec.template.check_columns(frame.columns)
    ctx = ctx if ctx is not None else CallContext()
    memo = memo if memo is not None else AnswerMemo()
    if keys is None:
        keys = key_columns(frame, spec, prompt="_prompt", key="_key").get_column("_key")
    keys = keys.rename(KEY_COLUMN).cast(pl.String)
    target = (
        model
        if spec.structured is None
        else model.with_structured_output(spec.structured.model, method=spec.structured.method, include_raw=True)
    )

    # Identical prompts are asked once per run and the answer fanned out to every row.
    counted = pl.DataFrame([keys]).with_row_index("_row").filter(pl.col(KEY_COLUMN).is_not_null())
    firsts = counted.group_by(KEY_COLUMN, maintain_order=True).agg(pl.col("_row").first(), pl.len().alias("_n"))
    rows_of = dict(zip(firsts.get_column(KEY_COLUMN).to_list(), firsts.get_column("_n").to_list(), strict=True))
    outcomes: dict[str, Outcome] = {}
    with memo._lock:  # answers this run already has need no prompt and no task
        for key in rows_of:
            if key in memo.done:
                outcomes[key] = memo.done[key]
    for key, known in outcomes.items():
        ctx.errors.record(rows_of[key], known.error, ctx.stop)
    if outcomes:
        reused = sum(rows_of[k] for k in outcomes)
        failed = sum(rows_of[k] for k, o in outcomes.items() if o.error)
        ctx.stats.bump(rows_deduplicated=reused)
        if on_rows_done is not None:
            on_rows_done(reused - failed, failed)
    todo = firsts.filter(~pl.col(KEY_COLUMN).is_in(pl.Series(list(outcomes), dtype=pl.String).implode()))
    cells = frame[todo.get_column("_row").to_list()].select(spec.template.fields).to_dicts()
    prompt_of = dict(zip(todo.get_column(KEY_COLUMN).to_list(), render_prompts(spec.template, cells), strict=True))

    async def resolve(key: str) -> Outcome:
        outcome, asked = await _answer_once(key, prompt_of[key], spec, target, ctx, memo)
        ctx.errors.record(rows_of[key], outcome.error, ctx.stop)
        reused = rows_of[key] - (1 if asked else 0)
        if reused:
            ctx.stats.bump(rows_deduplicated=reused)
        if on_rows_done is not None:
            n = rows_of[key]
            on_rows_done(0 if outcome.error else n, n if outcome.error else 0)
        return outcome

    unique = list(prompt_of)
    results = await RunnableLambda(resolve).abatch(
        unique, config={"max_concurrency": spec.max_concurrency}, return_exceptions=True
    )
    for key, result in zip(unique, results, strict=True):
        if isinstance(result, EnrichError):  # a stop (signal, fatal answer, error rate) ends the batch
            raise result
        if isinstance(result, BaseException):
            outcomes[key] = Outcome(error=f"internal error: {type(result).__name__}: {result}")
        else:
            outcomes[key] = result

    null_rows = keys.null_count()
    if null_rows and on_rows_done is not None:
        on_rows_done(0, null_rows)
    answers = pl.DataFrame(
        {
            KEY_COLUMN: list(outcomes),
            spec.output_column: [o.text for o in outcomes.values()],
            ERROR_COLUMN: [o.error for o in outcomes.values()],
            TRUNCATED_COLUMN: [o.truncated for o in outcomes.values()],
            INPUT_TOKENS_COLUMN: [o.input_tokens for o in outcomes.values()],
            OUTPUT_TOKENS_COLUMN: [o.output_tokens for o in outcomes.values()],
            CACHED_TOKENS_COLUMN: [o.cached_input_tokens for o in outcomes.values()],
        },
        schema={
            KEY_COLUMN: pl.String, spec.output_column: pl.String, ERROR_COLUMN: pl.String,
            TRUNCATED_COLUMN: pl.Boolean, INPUT_TOKENS_COLUMN: pl.Int64, OUTPUT_TOKENS_COLUMN: pl.Int64,
            CACHED_TOKENS_COLUMN: pl.Int64,
        },
    )  # fmt: skip
    joined = pl.DataFrame([keys]).join(answers, on=KEY_COLUMN, how="left", maintain_order="left")
    if null_rows:
        nulls = [None if k is not None else _null_cell_error(frame, spec, row) for row, k in enumerate(keys)]
        joined = joined.with_columns(
            pl.coalesce(pl.col(ERROR_COLUMN), pl.Series(nulls, dtype=pl.String)).alias(ERROR_COLUMN),
            *(pl.col(c).fill_null(0) for c in TOKEN_COLUMNS),
        )
    joined = joined.with_columns(pl.col(TRUNCATED_COLUMN).fill_null(False))
    enriched = frame.drop([c for c in added_columns(spec.output_column) if c in frame.columns]).with_columns(
        joined.get_column(c) for c in added_columns(spec.output_column)
    )
    return charge_first(enriched)


async def _answer_once(
    key: str, prompt: str, spec: EnrichSpec, model: Runnable[Any, Any], ctx: CallContext, memo: AnswerMemo
) -> tuple[Outcome, bool]:
    """The run's one answer for a key: memoised, awaited if in flight, else asked now."""
    with memo._lock:
        if key in memo.done:
            return memo.done[key], False
        pending = memo.in_flight.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            memo.in_flight[key] = pending
            mine = True
        else:
            mine = False
    if not mine:
        return await asyncio.shield(pending), False
    try:
        messages = build_messages(prompt, spec.system)
        outcome = await ask_model(model, messages, ctx, structured=spec.structured is not None)
    except BaseException as exc:
        pending.set_exception(exc)
        pending.exception()  # mark retrieved: waiters re-raise it themselves
        raise
    finally:
        with memo._lock:
            memo.in_flight.pop(key, None)
    with memo._lock:
        memo.done[key] = outcome
    pending.set_result(outcome)
    # A cut-off answer is not cached: the cache has no place for the flag, and a reused answer
    # must never lose it (a rerun finds it, flagged, in the previous output instead).
    if outcome.error is None and not outcome.truncated and memo.on_answer is not None:
        memo.on_answer(key, outcome)
    return outcome, True


def _null_cell_error(frame: pl.DataFrame, spec: EnrichSpec, row: int) -> str:
    column = next(c for c in spec.template.fields if frame[c][row] is None)
    return f"column {column!r} is null in this row; no request was sent"


def enrich_frame(
    frame: pl.DataFrame,
    spec: EnrichSpec,
    model: BaseChatModel,
    *,
    ctx: CallContext | None = None,
) -> pl.DataFrame:
    """Synchronous enrich_frame_async, for callers without an event loop."""
    return asyncio.run(enrich_frame_async(frame, spec, model, ctx=ctx))
