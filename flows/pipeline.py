"""The Prefect flow: load -> validate -> plan -> enrich in partitions -> validate -> write."""

# No `from __future__ import annotations` here: Prefect builds the parameter model from this
# module's real annotations when a deployment loads the flow.
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
from flows.llm import build_chat_model, describe_url, resolve_endpoint
from flows.local_model import LOCAL_MODEL_NOTICE, serve_local_model
from flows.planning import ROW_INDEX
from flows.preparation import build_spec, check_structured_fields, load_valid_rows, plan_job
from flows.progress import current_sink
from flows.reports import Progress, publish_failure, publish_report
from flows.runtime import (
    EventLoopThread,
    Runtime,
    build_context,
    forget_runtime,
    lookup_runtime,
    register_runtime,
    resolve_price,
)
from flows.summary import RunSummary
from flows.validation import validate_output
from flows.writing import rejected_path, write_parquet_atomic
from schemas.enriched import ERROR_COLUMN, added_columns
from schemas.errors import UserError
from transforms.enrichment import AnswerMemo, EnrichSpec, charge_first, enrich_frame_async
from transforms.keys import KEY_VERSION
from transforms.structured import expand_columns

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
def enrich_partition(part: pl.DataFrame, number: int, runtime_key: str) -> pl.DataFrame:
    """Enrich one partition on the run's shared event loop; rows fail, the task does not."""
    rt = lookup_runtime(runtime_key)
    coro = enrich_frame_async(part, rt.spec, rt.model, ctx=rt.ctx, memo=rt.memo, on_rows_done=current_sink().advance)
    return rt.loop.run(coro)


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
    spec = build_spec(job, endpoint)
    check_structured_fields(spec, split.valid.columns)
    plan, cache = plan_job(job, split.valid, spec)
    log.info(
        "%d rows already answered (cache or previous output), %d kept as failed, %d to ask (%d distinct prompts)",
        plan.rows_cached, plan.rows_kept_failed, plan.todo.height, plan.unique_todo,
    )  # fmt: skip
    price = resolve_price(job, spec.identity.model, local=endpoint.local)
    ctx = build_context(job, price, max_concurrency=spec.max_concurrency)
    sink = current_sink()
    base_url = endpoint.base_url
    sink.start(split.valid.height)
    sink.advance(plan.rows_cached, plan.rows_kept_failed)
    asked = plan.done.clear()
    progress = Progress(split.valid.height, plan.done.height)
    if plan.todo.height:
        with ExitStack() as stack:
            if endpoint.local:
                sink.notice(LOCAL_MODEL_NOTICE)
                log.warning(LOCAL_MODEL_NOTICE)
                base_url = stack.enter_context(serve_local_model())
            log.info("asking %s at %s", spec.identity.model, describe_url(base_url))
            model, http = build_chat_model(
                job, endpoint, base_url=base_url, model_name=spec.identity.model, max_concurrency=spec.max_concurrency
            )
            loop = EventLoopThread()
            stack.callback(loop.close)
            stack.callback(lambda: loop.run(http.aclose()))
            memo = AnswerMemo()
            if cache is not None:
                stack.callback(cache.close)
                memo.on_answer = lambda key, outcome: cache.append(key, outcome, model=spec.identity.model)
            runtime = Runtime(spec=spec, model=model, loop=loop, ctx=ctx, memo=memo, cache=cache)
            stack.callback(forget_runtime, register_runtime(runtime))
            asked = _enrich_partitions(plan.todo, job, runtime.key, progress)

    ordered = [*split.valid.columns, *added_columns(job.output_column)]
    enriched = charge_first(pl.concat([plan.done.select(ROW_INDEX, *ordered), asked.select(ROW_INDEX, *ordered)]))
    enriched = enriched.sort(ROW_INDEX).drop(ROW_INDEX)
    if spec.structured is not None:
        enriched = expand_columns(enriched, job.output_column, spec.structured)
        fields = [f"{spec.structured.prefix}{name}" for name in spec.structured.model.model_fields]
        added = added_columns(job.output_column)
        enriched = enriched.select(*split.valid.columns, added[0], *fields, *added[1:])
    if endpoint.api_key is not None:
        secret = endpoint.api_key.get_secret_value()
        enriched = enriched.with_columns(pl.col(ERROR_COLUMN).str.replace_all(secret, "***", literal=True))
    validate_output(enriched, schema, job.output_column, spec.structured)
    if split.rejected.height:
        write_parquet_atomic(split.rejected, rejected_path(job.destination))
    write_parquet_atomic(enriched, job.destination, metadata=_metadata(job, spec))
    if not split.rejected.height:
        Path(rejected_path(job.destination)).unlink(missing_ok=True)

    failed = int(enriched.get_column(ERROR_COLUMN).is_not_null().sum())
    stats = ctx.stats
    summary = RunSummary(
        rows_in=frame.height,
        rows_valid=split.valid.height,
        rows_rejected=split.rejected.height,
        rows_ok=enriched.height - failed,
        rows_failed=failed,
        rows_cached=plan.rows_cached,
        rows_deduplicated=stats.rows_deduplicated,
        unique_prompts_sent=plan.unique_todo,
        requests=stats.requests,
        retries=stats.retries,
        rate_limited=stats.rate_limited,
        input_tokens=stats.input_tokens,
        output_tokens=stats.output_tokens,
        cost_usd=round(price.cost(stats.input_tokens, stats.output_tokens), 6) if price else None,
        wall_seconds=round(time.perf_counter() - started, 3),
        output=job.destination,
        rejected_output=rejected_path(job.destination) if split.rejected.height else None,
        model=spec.identity.model,
        endpoint=describe_url(base_url) + (" (bundled local model)" if endpoint.local else ""),
    )
    log.info("wrote %s: %d rows ok, %d failed", job.destination, summary.rows_ok, summary.rows_failed)
    publish_report(summary, enriched, split.rejected, job.output_column)
    return summary


def _enrich_partitions(todo: pl.DataFrame, job: EnrichJob, runtime_key: str, progress: Progress) -> pl.DataFrame:
    """Run partition tasks, at most partition_workers at once, and reassemble in input order."""
    log = get_run_logger()
    parts = list(todo.iter_slices(n_rows=job.partition_rows))
    results: list[pl.DataFrame | None] = [None] * len(parts)
    waiting = deque(enumerate(parts))
    running: dict[PrefectFuture[pl.DataFrame], int] = {}
    done_rows = 0
    first_error: BaseException | None = None
    while waiting or running:
        while waiting and first_error is None and len(running) < job.partition_workers:
            number, part = waiting.popleft()
            running[enrich_partition.submit(quote(part), number, runtime_key)] = number
        future = next(as_completed(list(running)))
        number = running.pop(future)
        try:
            results[number] = future.result()
        except BaseException as exc:  # noqa: BLE001 - keep draining, re-raise the first
            first_error = first_error or exc
            waiting.clear()
            continue
        done_rows += parts[number].height
        progress.advance(parts[number].height)
        log.info("partition %d/%d done: %d/%d rows", number + 1, len(parts), done_rows, todo.height)
    if first_error is not None:
        raise first_error
    return pl.concat([r for r in results if r is not None], how="vertical")


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
