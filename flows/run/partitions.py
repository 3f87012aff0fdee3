"""The partition tasks: each gets a slice descriptor, reads its slice, and writes its own part file.

On one machine, one task per slice does everything: the run-wide memo makes every distinct
prompt be asked once. On Dask, worker processes do not share a memo, so a run goes in two
phases: first ``ask_partition`` runs on the slices that *own* a prompt (hold the first row
needing it) and asks only those rows, writing the answers to the staging area; then every
worker loads those answers into its memo once, and ``enrich_partition`` fills and writes every
slice without asking anything twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.plan.known_answers import ROW_INDEX, LaneColumns
from llm_enrich.flows.plan.survey import Slice
from llm_enrich.flows.report.artifacts import failed_rows
from llm_enrich.flows.report.progress import current_sink
from llm_enrich.flows.run.assembly import assemble_slice
from llm_enrich.flows.run.runtime import Runtime
from llm_enrich.flows.run.workers import counts_of, hold_runtime
from llm_enrich.flows.tables.staging import Staging
from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TRUNCATED_COLUMN,
    bookkeeping_names,
)
from llm_enrich.schemas.errors import UserError
from llm_enrich.transforms.enrichment import enrich_frame_async
from llm_enrich.transforms.outcome import Outcome, StatsCounts

__all__ = ["AskResult", "PartitionResult", "PartitionWork", "ask_partition", "enrich_partition"]

SAMPLE_ROWS = 20
_LOADING = threading.Lock()


@dataclass(frozen=True)
class PartitionWork:
    """What every partition task of one run gets besides its slice (small and picklable for Dask)."""

    job: EnrichJob
    columns: tuple[str, ...]
    staging_root: str
    runtime_key: str
    local: bool
    served_url: str | None
    workers: int = 1
    answers: tuple[str, ...] = ()  # part files of the first phase's answers (two-phase Dask runs)

    def with_answers(self, paths: list[str]) -> PartitionWork:
        """The same work, once the first phase has staged its answers."""
        return replace(self, answers=tuple(paths))


@dataclass(frozen=True)
class AskResult:
    """The first phase's result for a slice: its staged answers, and counters measured on a worker."""

    path: str | None
    stats: list[StatsCounts] | None


@dataclass
class PartitionResult:
    """One slice's part file and what the flow adds up: rows, failures, a sample, counters."""

    number: int
    path: str
    rows: int
    failed: list[int]
    failed_any: int
    truncated_any: int
    sample: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    stats: list[StatsCounts] | None = None


def _transient_infrastructure(task: Any, task_run: Any, state: State) -> bool:
    """Retry a partition only for infrastructure hiccups, never for bad input or configuration."""
    try:
        state.result()
    except UserError:
        return False
    except (OSError, ConnectionError, TimeoutError):
        return True  # e.g. the cache directory on a network share blinked
    except BaseException:  # noqa: BLE001 - anything else is a bug: retrying would not help
        return False
    return False


_TASK = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": _transient_infrastructure,
}


# Rows never fail a task (they carry enrich_error), and answers already obtained are memoised
# in the run, so a retried partition does not pay again for them.
@task(name="ask-partition", task_run_name="ask {piece.label}", **_TASK)  # type: ignore[call-overload, untyped-decorator]
def ask_partition(piece: Slice, work: PartitionWork) -> AskResult:
    """First phase on Dask: ask the prompts this slice owns and stage the answers."""
    columns = list(work.columns)
    with _open(work) as (rt, remote, staging):
        staged = staging.read(piece.path)
        before = counts_of(rt) if remote else None
        frames = _ask(rt, staged, columns, lambda lane: pl.col(lane.owner), progress=False)
        answers = [
            frame.select(
                pl.lit(number).alias("lane"), KEY_COLUMN, pl.col(rt.lanes[number].spec.output_column).alias("text"),
                ERROR_COLUMN, INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN, CACHED_TOKENS_COLUMN, TRUNCATED_COLUMN,
            ).filter(pl.col(KEY_COLUMN).is_not_null())
            for number, frame in enumerate(frames) if frame is not None
        ]  # fmt: skip
        path = None
        if answers:
            path = staging.path("answers", piece.number)
            staging.write(pl.concat(answers), path)
        if rt.cache is not None:
            rt.cache.flush()
        return AskResult(path=path, stats=_delta(rt, before) if before is not None else None)


@task(name="enrich-partition", task_run_name="enrich {piece.label}", **_TASK)  # type: ignore[call-overload, untyped-decorator]
def enrich_partition(piece: Slice, work: PartitionWork) -> PartitionResult:
    """Enrich one staged slice for every output and write its part file; return only the path and counts."""
    job, columns = work.job, list(work.columns)
    with _open(work) as (rt, remote, staging):
        if work.answers:
            _load_answers(rt, staging, list(work.answers))
        staged = staging.read(piece.path)
        before = counts_of(rt) if remote else None
        frames = _ask(rt, staged, columns, lambda lane: pl.col(lane.ask), progress=not remote)
        if work.answers:
            # Owner rows were asked in the first phase; here they only read the memo.
            for number, lane in enumerate(rt.lanes):
                owned = int(staged.get_column(LaneColumns.of(number).owner).sum())
                lane.ctx.stats.bump(rows_deduplicated=-owned)
        singles = job.output_jobs()
        specs = [
            (single, lane.spec, bookkeeping_names(single.output_column, primary=n == 0))
            for n, (single, lane) in enumerate(zip(singles, rt.lanes, strict=True))
        ]
        assert rt.schema is not None  # every runtime is built with the run's input schema
        enriched, failed = assemble_slice(staged, frames, specs, columns, rt.schema, rt.secret)
        path = staging.path("out", piece.number)
        staging.write(enriched, path)
        if rt.cache is not None:
            rt.cache.flush()  # the slice's answers are durable before its task reports done
        errors = [name for _, _, names in specs for key, name in names.items() if key == ERROR_COLUMN]
        flags = [name for _, _, names in specs for key, name in names.items() if key == TRUNCATED_COLUMN]
        return PartitionResult(
            number=piece.number,
            path=path,
            rows=enriched.height,
            failed=failed,
            failed_any=int(enriched.select(pl.any_horizontal(pl.col(c).is_not_null() for c in errors).sum()).item()),
            truncated_any=int(enriched.select(pl.any_horizontal(pl.col(c) for c in flags).sum()).item()),
            sample=enriched.head(SAMPLE_ROWS).to_dicts(),
            problems=failed_rows(enriched, job.output_column).to_dicts(),
            stats=_delta(rt, before) if before is not None else None,
        )


@contextmanager
def _open(work: PartitionWork) -> Iterator[tuple[Runtime, bool, Staging]]:
    """This process's runtime for the run (built here on a Dask worker: then True), held, and its staging area."""
    with hold_runtime(
        work.runtime_key, work.job, local=work.local, served_url=work.served_url, workers=work.workers,
        columns=work.columns,
    ) as (rt, remote):  # fmt: skip
        yield rt, remote, Staging(work.staging_root, work.job.storage())


def _ask(
    rt: Runtime, staged: pl.DataFrame, columns: list[str], rows: Any, *, progress: bool
) -> list[pl.DataFrame | None]:
    """Each output's answers for the rows ``rows(lane columns)`` selects (None where there are none)."""
    sink = current_sink()

    async def one(number: int) -> pl.DataFrame | None:
        lane, names = rt.lanes[number], LaneColumns.of(number)
        asked = staged.filter(rows(names))
        if not asked.height:
            return None
        return await enrich_frame_async(
            asked.select(ROW_INDEX, *columns), lane.spec, lane.model, ctx=lane.ctx, memo=lane.memo,
            on_rows_done=sink.advance if number == 0 and progress else None, keys=asked.get_column(names.key),
        )  # fmt: skip

    async def every() -> list[pl.DataFrame | None]:
        return list(await asyncio.gather(*(one(n) for n in range(len(rt.lanes)))))

    try:
        return rt.loop.run(every())
    except (asyncio.CancelledError, concurrent.futures.CancelledError):
        # The run's stop drained and cancelled the loop: say why, not "cancelled".
        rt.lanes[0].ctx.stop.check()
        raise


def _load_answers(rt: Runtime, staging: Staging, paths: list[str]) -> None:
    """Put the first phase's answers into this process's memo, once per run."""
    with _LOADING:
        if rt.answers_loaded:
            return
        found = staging.scan(paths).collect()
        for number, key, text, error, tokens_in, tokens_out, cached, truncated in found.iter_rows():
            outcome = Outcome(
                text=text, error=error, input_tokens=tokens_in, output_tokens=tokens_out, cached_input_tokens=cached,
                truncated=truncated,
            )  # fmt: skip
            rt.lanes[number].memo.done.setdefault(key, outcome)
        rt.answers_loaded = True


def _delta(rt: Runtime, before: list[StatsCounts]) -> list[StatsCounts]:
    """This task's share of the counters of a worker's runtime (they live in that process)."""
    return [now.minus(then) for now, then in zip(counts_of(rt), before, strict=True)]
