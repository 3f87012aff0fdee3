"""The Prefect flow: load -> validate -> plan -> enrich in partitions -> validate -> write."""

# No `from __future__ import annotations` here: Prefect builds the parameter model from this
# module's real annotations when a deployment loads the flow.
import asyncio
import io
import json
import time
from collections import deque
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.job import EnrichJob
from flows.llm import describe_url, resolve_endpoint
from flows.local_model import LOCAL_MODEL_NOTICE, serve_local_model
from flows.outputs import ASK_PREFIX, OutputRun, assemble_output, plan_outputs, rows_to_ask
from flows.planning import ROW_INDEX
from flows.preparation import load_valid_rows
from flows.progress import current_sink
from flows.reports import Progress, publish_failure, publish_report
from flows.runtime import (
    EventLoopThread,
    Runtime,
    build_lane,
    forget_runtime,
    register_runtime,
)
from flows.scaling import count_workers, dask_runner
from flows.storage import is_remote
from flows.summary import RunSummary
from flows.workers import runtime_for, stats_of
from flows.writing import rejected_path, write_parquet_atomic, write_parquet_dataset_atomic
from schemas.enriched import ERROR_COLUMN
from schemas.errors import ConfigError, UserError
from transforms.enrichment import EnrichSpec, enrich_frame_async
from transforms.keys import KEY_VERSION

__all__ = ["INVALID_STATE", "enrich_partition", "enrich_table", "run_enrichment"]

INVALID_STATE = "Invalid"
"""Name of the Failed state for bad input or configuration (the CLI maps it to exit code 2)."""

# The pool is sized for the largest partition_workers a job may ask for; the flow itself
# keeps at most job.partition_workers partitions submitted at once.
_MAX_PARTITION_WORKERS = 64


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


# Rows never fail a task (they carry enrich_error), and answers already obtained are memoised
# in the run, so a retried partition does not pay again for them.
@task(
    name="enrich-partition",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient_infrastructure,
)
def enrich_partition(
    part: pl.DataFrame | bytes,
    number: int,
    runtime_key: str,
    job: EnrichJob,
    local: bool,
    served_url: str | None,
    workers: int = 1,
) -> dict[str, Any]:
    """Enrich one partition for every output; on a Dask worker the runtime is rebuilt from the job."""
    rt, remote = runtime_for(runtime_key, job, local=local, served_url=served_url, workers=workers)
    # Frames cross process boundaries as Arrow IPC bytes, which nothing on the way tries to walk.
    part = pl.read_ipc(io.BytesIO(part)) if isinstance(part, bytes) else part
    sink = current_sink()
    flags = [f"{ASK_PREFIX}{i}" for i in range(len(rt.lanes))]
    before = stats_of(rt) if remote else None

    async def all_outputs() -> list[pl.DataFrame]:
        jobs = [
            enrich_frame_async(
                part.filter(pl.col(flag)).drop(flags), lane.spec, lane.model, ctx=lane.ctx, memo=lane.memo,
                on_rows_done=sink.advance if i == 0 and not remote else None,
            )
            for i, (lane, flag) in enumerate(zip(rt.lanes, flags, strict=True))
        ]  # fmt: skip
        return list(await asyncio.gather(*jobs))

    frames = rt.loop.run(all_outputs())
    # Counters of a worker's runtime live in that process: hand this partition's share back.
    delta = None
    if before is not None:
        delta = [{k: a[k] - b[k] for k in a} for a, b in zip(stats_of(rt), before, strict=True)]
    return {"frames": [_ipc(f) for f in frames] if remote else frames, "stats": delta}


def _ipc(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    return buffer.getvalue()


@flow(
    name="enrich-table",
    task_runner=ThreadPoolTaskRunner(max_workers=_MAX_PARTITION_WORKERS),
    validate_parameters=True,
    persist_result=False,
)
def enrich_table(job: EnrichJob = EnrichJob()) -> dict[str, Any] | State:
    """Enrich a table with an LLM column; bad input fails the run with a clear message."""
    try:
        return run_enrichment(job).model_dump()
    except UserError as err:
        get_run_logger().error(err.message)
        publish_failure(err.message)
        # A returned Failed state fails the run with our message and no traceback.
        return Failed(name=INVALID_STATE, message=err.message)


def run_enrichment(job: EnrichJob) -> RunSummary:
    """The body of the flow, callable inside any flow run."""
    log = get_run_logger()
    started = time.perf_counter()
    frame, schema, split = load_valid_rows(job)
    log.info("loaded %d rows from %s; %d valid", frame.height, job.input_path, split.valid.height)
    if split.rejected.height:
        log.warning("%s\nThese rows are set aside in %s.", split.report, rejected_path(job.destination))
    endpoint = resolve_endpoint(job)
    runs, cache = plan_outputs(job, split.valid, endpoint)
    primary = runs[0]
    for run in runs:
        log.info(
            "%s: %d rows already answered (cache or previous output), %d kept as failed, %d to ask (%d prompts)",
            run.job.output_column, run.plan.rows_cached, run.plan.rows_kept_failed, run.plan.todo.height,
            run.plan.unique_todo,
        )  # fmt: skip
    todo = rows_to_ask(split.valid.with_row_index(ROW_INDEX), runs)
    sink = current_sink()
    base_url = endpoint.base_url
    sink.start(split.valid.height)
    sink.advance(primary.plan.rows_cached, primary.plan.rows_kept_failed)
    progress = Progress(split.valid.height, split.valid.height - todo.height)
    asked = [run.plan.done.clear() for run in runs]
    if todo.height:
        with ExitStack() as stack:
            if endpoint.local:
                sink.notice(LOCAL_MODEL_NOTICE)
                log.warning(LOCAL_MODEL_NOTICE)
                base_url = stack.enter_context(serve_local_model())
            loop = EventLoopThread()
            stack.callback(loop.close)
            lanes = []
            for run in runs:
                log.info("%s: asking %s at %s", run.job.output_column, run.spec.identity.model, describe_url(base_url))
                lane, http = build_lane(run.job, run.spec, run.ctx, endpoint, base_url=base_url, cache=cache)
                stack.callback(lambda http=http: loop.run(http.aclose()))
                lanes.append(lane)
            if cache is not None:
                stack.callback(cache.close)
            runtime = Runtime(lanes=lanes, loop=loop)
            stack.callback(forget_runtime, register_runtime(runtime))
            remote = {"job": job, "local": endpoint.local, "served_url": base_url}
            asked = _enrich_partitions(todo, job, runtime.key, progress, runs, remote)

    secret = endpoint.api_key.get_secret_value() if endpoint.api_key is not None else None
    columns = [
        assemble_output(run, got, split.valid.columns, schema, secret) for run, got in zip(runs, asked, strict=True)
    ]
    enriched = pl.concat([split.valid, *columns], how="horizontal")
    if split.rejected.height:
        write_parquet_atomic(split.rejected, rejected_path(job.destination))
    if job.output_partition_by:
        if job.output_partition_by not in enriched.columns:
            raise ConfigError(
                f"--output-partition-by {job.output_partition_by!r} is not a column of the output; "
                f"it has: {', '.join(enriched.columns)}."
            )
        write_parquet_dataset_atomic(enriched, job.destination, job.output_partition_by, _metadata(job, primary.spec))
    else:
        write_parquet_atomic(enriched, job.destination, metadata=_metadata(job, primary.spec))
    if not split.rejected.height and not is_remote(job.destination):
        Path(rejected_path(job.destination)).unlink(missing_ok=True)

    errors = [run.names[ERROR_COLUMN] for run in runs]
    failed = int(enriched.select(pl.any_horizontal(pl.col(c).is_not_null() for c in errors)).to_series().sum())
    stats = [run.ctx.stats for run in runs]
    costs = [run.cost_usd for run in runs]
    summary = RunSummary(
        rows_in=frame.height,
        rows_valid=split.valid.height,
        rows_rejected=split.rejected.height,
        rows_ok=enriched.height - failed,
        rows_failed=failed,
        rows_cached=primary.plan.rows_cached,
        rows_deduplicated=primary.ctx.stats.rows_deduplicated,
        unique_prompts_sent=sum(run.plan.unique_todo for run in runs),
        requests=sum(s.requests for s in stats),
        retries=sum(s.retries for s in stats),
        rate_limited=sum(s.rate_limited for s in stats),
        input_tokens=sum(s.input_tokens for s in stats),
        output_tokens=sum(s.output_tokens for s in stats),
        cost_usd=None if any(c is None for c in costs) else round(sum(c or 0.0 for c in costs), 6),
        wall_seconds=round(time.perf_counter() - started, 3),
        output=job.destination,
        rejected_output=rejected_path(job.destination) if split.rejected.height else None,
        model=primary.spec.identity.model,
        endpoint=describe_url(base_url) + (" (bundled local model)" if endpoint.local else ""),
        outputs={
            run.job.output_column: {
                "rows_failed": int(enriched.get_column(run.names[ERROR_COLUMN]).is_not_null().sum()),
                "rows_cached": run.plan.rows_cached,
                "requests": run.ctx.stats.requests,
            }
            for run in runs
        },
    )
    log.info("wrote %s: %d rows ok, %d failed", job.destination, summary.rows_ok, summary.rows_failed)
    publish_report(summary, enriched, split.rejected, job.output_column)
    return summary


def _enrich_partitions(
    todo: pl.DataFrame, job: EnrichJob, runtime_key: str, progress: Progress, runs: list[OutputRun],
    remote: dict[str, Any],
) -> list[pl.DataFrame]:  # fmt: skip
    """Run partition tasks, at most partition_workers at once; per output, the asked rows in order."""
    log = get_run_logger()
    parts = list(todo.iter_slices(n_rows=job.partition_rows))
    results: list[list[pl.DataFrame] | None] = [None] * len(parts)
    waiting = deque(enumerate(parts))
    running: dict[PrefectFuture[dict[str, Any]], int] = {}
    done_rows = 0
    first_error: BaseException | None = None
    with ExitStack() as stack:
        runner = stack.enter_context(dask_runner(job)) if job.dask_address or job.dask_local else None
        if runner is not None:
            remote = {**remote, "workers": count_workers(job)}
        while waiting or running:
            while waiting and first_error is None and len(running) < job.partition_workers:
                number, part = waiting.popleft()
                params = {"number": number, "runtime_key": runtime_key, **remote}
                if runner is None:
                    running[enrich_partition.submit(quote(part), **params)] = number
                else:  # the runner is used directly: it would not unwrap quote(); bytes need no walk
                    running[runner.submit(enrich_partition, {"part": _ipc(part), **params})] = number
            future = next(as_completed(list(running)))
            number = running.pop(future)
            try:
                result = future.result()
            except BaseException as exc:  # noqa: BLE001 - keep draining, re-raise the first
                first_error = first_error or exc
                waiting.clear()
                continue
            results[number] = [pl.read_ipc(io.BytesIO(f)) if isinstance(f, bytes) else f for f in result["frames"]]
            for run, delta in zip(runs, result["stats"] or [], strict=False):
                run.ctx.stats.add(
                    requests=delta["requests"], retries=delta["retries"],
                    tokens=(delta["input_tokens"], delta["output_tokens"]),
                )  # fmt: skip
                run.ctx.stats.rate_limited += delta["rate_limited"]
                run.ctx.stats.rows_deduplicated += delta["rows_deduplicated"]
            done_rows += parts[number].height
            progress.advance(parts[number].height)
            log.info("partition %d/%d done: %d/%d rows", number + 1, len(parts), done_rows, todo.height)
    if first_error is not None:
        raise first_error
    done = [r for r in results if r is not None]
    return [pl.concat([r[i] for r in done], how="vertical") for i in range(len(runs))]


def _metadata(job: EnrichJob, spec: EnrichSpec) -> dict[str, str]:
    """Provenance stored in the Parquet footer; never credentials."""
    info = {
        "model": spec.identity.model,
        "endpoint": spec.identity.endpoint,
        "prompt": job.prompt,
        "system": job.system,
        "output_column": job.output_column,
        "temperature": job.temperature,
        "max_tokens": job.max_tokens,
        "key_version": KEY_VERSION,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {"llm_enrich": json.dumps(info, ensure_ascii=False)}
