"""Dispatch: one partition task per slice, at most ``partition_workers`` at once, on threads or Dask.

The first error stops the others from sending (they drain), a stop request lets running tasks
end on their own, and counters measured on Dask workers are merged into the flow's lanes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.plan.lanes import OutputRun
from llm_enrich.flows.plan.survey import Slice, Survey
from llm_enrich.flows.report.artifacts import Progress
from llm_enrich.flows.run.partitions import (
    PartitionResult,
    PartitionWork,
    ask_partition,
    enrich_partition,
)
from llm_enrich.flows.run.scaling import count_workers, dask_runner, workers_report_here

__all__ = ["dispatch_partitions"]

_REPORT_SLICES = 100  # only the first slices' rows feed the sample and failures artifacts


def dispatch_partitions(
    survey: Survey, job: EnrichJob, progress: Progress, runs: list[OutputRun], work: PartitionWork
) -> list[PartitionResult]:
    """Run the partition tasks (two phases on Dask, see run.partitions); their results in slice order."""
    with ExitStack() as stack:
        runner = None
        if job.dask_address or job.dask_local:
            if job.dask_local:
                stack.enter_context(workers_report_here())
            runner = stack.enter_context(dask_runner(job))
            work = replace(work, workers=count_workers(job))
        owning = [piece for piece in survey.slices if piece.owned]
        if runner is not None and owning:
            asked = _run_tasks(ask_partition, owning, job, runner, work, runs, lambda piece: None)
            work = work.with_answers([r.path for r in asked if r.path])

        def finished(piece: Slice) -> None:
            progress.advance(piece.to_ask)

        return _run_tasks(enrich_partition, survey.slices, job, runner, work, runs, finished)


def _run_tasks(
    task: Any, pieces: list[Slice], job: EnrichJob, runner: Any, work: PartitionWork, runs: list[OutputRun],
    finished: Callable[[Slice], None],
) -> list[Any]:  # fmt: skip
    """Submit one task per slice, at most partition_workers at once; their results in slice order."""
    log = get_run_logger()
    results: dict[int, Any] = {}
    waiting = deque(pieces)
    running: dict[PrefectFuture[Any], Slice] = {}
    first_error: BaseException | None = None
    stop = runs[0].ctx.stop
    while waiting or running:
        if stop.is_set:
            waiting.clear()  # nothing new starts; the running tasks end on their own
            if not running:
                stop.check()
        while waiting and first_error is None and len(running) < job.partition_workers:
            piece = waiting.popleft()
            if runner is None:
                running[task.submit(piece, work)] = piece
            else:  # tasks get a descriptor; the rows stay in the staging area
                running[runner.submit(task, {"piece": piece, "work": work})] = piece
        future = next(as_completed(list(running)))
        piece = running.pop(future)
        try:
            result = future.result()
        except BaseException as exc:  # noqa: BLE001 - keep draining, re-raise the first
            first_error = first_error or exc
            waiting.clear()
            # The run is lost: the other partitions stop sending instead of finishing their slices.
            stop.set(f"stopped after an error in another partition ({type(exc).__name__})")
            continue
        results[piece.number] = result
        # Only the first rows make the sample and failures artifacts; keep little per slice.
        if piece.number >= _REPORT_SLICES and isinstance(result, PartitionResult):
            result.sample, result.problems = [], result.problems[:1]
        for run, counts in zip(runs, result.stats or [], strict=False):
            run.ctx.stats.merge(counts)
        finished(piece)
        log.info("%s %d/%d done", task.name, len(results), len(pieces))
    if first_error is not None:
        raise first_error
    return [results[number] for number in sorted(results)]
