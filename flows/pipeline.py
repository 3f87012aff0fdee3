"""The Prefect flow: load -> validate -> enrich in partitions -> validate -> write atomically."""

from __future__ import annotations

import asyncio
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
from flows.llm import (
    DEFAULT_REMOTE_MODEL,
    build_chat_model,
    classify_openai_error,
    describe_url,
    resolve_endpoint,
)
from flows.loading import detect_format, load_table
from flows.local_model import LOCAL_MODEL_NAME, LOCAL_MODEL_NOTICE, serve_local_model
from flows.progress import current_sink
from flows.runtime import EventLoopThread, Runtime, forget_runtime, lookup_runtime, register_runtime
from flows.summary import RunSummary
from flows.validation import resolve_schema, split_valid, validate_output
from flows.writing import rejected_path, write_parquet_atomic
from schemas.enriched import ERROR_COLUMN, INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN, added_columns
from schemas.errors import ConfigError, UserError
from transforms.calls import RetryPolicy
from transforms.enrichment import EnrichSpec, enrich_frame_async
from transforms.prompts import parse_template

__all__ = ["INVALID_STATE", "enrich_partition", "enrich_table", "run_enrichment"]

INVALID_STATE = "Invalid"
"""Name of the Failed state for bad input or configuration (the CLI maps it to exit code 2)."""

# The pool is sized for the largest partition_workers a job may ask for; the flow itself
# keeps at most job.partition_workers partitions submitted at once.
_MAX_PARTITION_WORKERS = 64


@task(name="enrich-partition", cache_policy=NO_CACHE, persist_result=False)
def enrich_partition(part: pl.DataFrame, number: int, runtime_key: str) -> pl.DataFrame:
    """Enrich one partition on the run's shared event loop; rows fail, the task does not."""
    runtime = lookup_runtime(runtime_key)
    sink = current_sink()
    return runtime.loop.run(
        enrich_frame_async(
            part, runtime.spec, runtime.model, stats=runtime.stats, gate=runtime.gate,
            on_rows_done=sink.advance,
        )
    )  # fmt: skip


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
        # A returned Failed state fails the run with our message and no traceback.
        return Failed(name=INVALID_STATE, message=err.message)


def run_enrichment(job: EnrichJob) -> RunSummary:
    """The body of the flow, callable inside any flow run."""
    log = get_run_logger()
    started = time.perf_counter()
    template = parse_template(job.prompt)
    if job.in_place and detect_format(job.input_path, job.input_format) != "parquet":
        raise ConfigError(
            f"--in-place rewrites the input, which must then be Parquet; '{job.input_path}' is not. "
            "Pass --output PATH.parquet instead."
        )
    frame = load_table(job.input_path, job.input_format)
    # A rerun over an enriched file replaces the old answer columns rather than nesting them.
    frame = frame.drop([c for c in added_columns(job.output_column) if c in frame.columns])
    template.check_columns(frame.columns, source=f"'{job.input_path}'")
    schema = resolve_schema(job.input_schema, template)
    split = split_valid(frame, schema, source=job.input_path, quarantine=job.on_invalid == "quarantine")
    log.info("loaded %d rows from %s; %d valid", frame.height, job.input_path, split.valid.height)
    if split.rejected.height:
        log.warning("%s\nThese rows are set aside in %s.", split.report, rejected_path(job.destination))

    endpoint = resolve_endpoint(job)
    sink = current_sink()
    with ExitStack() as stack:
        base_url, model_name = endpoint.base_url, job.model or DEFAULT_REMOTE_MODEL
        if endpoint.local:
            sink.notice(LOCAL_MODEL_NOTICE)
            log.warning(LOCAL_MODEL_NOTICE)
            base_url, model_name = stack.enter_context(serve_local_model()), LOCAL_MODEL_NAME
        log.info("asking %s at %s", model_name, describe_url(base_url))
        model = build_chat_model(job, endpoint, base_url=base_url, model_name=model_name)
        loop = EventLoopThread()
        stack.callback(loop.close)
        spec = EnrichSpec(
            template=template,
            output_column=job.output_column,
            system=job.system,
            max_concurrency=job.max_concurrency,
            policy=RetryPolicy(
                max_retries=job.max_retries,
                base_delay=job.retry_base_delay,
                classify=classify_openai_error,
            ),
        )
        runtime = Runtime(spec=spec, model=model, loop=loop, gate=asyncio.Semaphore(job.max_concurrency))
        stack.callback(forget_runtime, register_runtime(runtime))
        sink.start(split.valid.height)
        enriched = _enrich_partitions(split.valid, job, runtime.key)

    if endpoint.api_key is not None:
        secret = endpoint.api_key.get_secret_value()
        enriched = enriched.with_columns(pl.col(ERROR_COLUMN).str.replace_all(secret, "***", literal=True))
    validate_output(enriched, schema, job.output_column)
    if split.rejected.height:
        write_parquet_atomic(split.rejected, rejected_path(job.destination))
    write_parquet_atomic(enriched, job.destination, metadata=_metadata(job, model_name, base_url))
    if not split.rejected.height:
        Path(rejected_path(job.destination)).unlink(missing_ok=True)

    failed = enriched.get_column(ERROR_COLUMN).is_not_null().sum()
    summary = RunSummary(
        rows_in=frame.height,
        rows_valid=split.valid.height,
        rows_rejected=split.rejected.height,
        rows_ok=enriched.height - failed,
        rows_failed=failed,
        requests=runtime.stats.requests,
        retries=runtime.stats.retries,
        input_tokens=int(enriched.get_column(INPUT_TOKENS_COLUMN).sum()),
        output_tokens=int(enriched.get_column(OUTPUT_TOKENS_COLUMN).sum()),
        wall_seconds=round(time.perf_counter() - started, 3),
        output=job.destination,
        rejected_output=rejected_path(job.destination) if split.rejected.height else None,
        model=model_name,
        endpoint=describe_url(base_url),
    )
    log.info("wrote %s: %d rows ok, %d failed", job.destination, summary.rows_ok, summary.rows_failed)
    return summary


def _enrich_partitions(valid: pl.DataFrame, job: EnrichJob, runtime_key: str) -> pl.DataFrame:
    """Run partition tasks, at most partition_workers at once, and reassemble in input order."""
    log = get_run_logger()
    parts = list(valid.iter_slices(n_rows=job.partition_rows)) or [valid]
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
        log.info("partition %d/%d done: %d/%d rows", number + 1, len(parts), done_rows, valid.height)
    if first_error is not None:
        raise first_error
    return pl.concat([r for r in results if r is not None], how="vertical")


def _metadata(job: EnrichJob, model_name: str, base_url: str | None) -> dict[str, str]:
    """Provenance stored in the Parquet footer; never credentials."""
    info = {
        "model": model_name,
        "endpoint": describe_url(base_url),
        "prompt": job.prompt,
        "system": job.system,
        "output_column": job.output_column,
        "temperature": job.temperature,
        "max_tokens": job.max_tokens,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {"llm_enrich": json.dumps(info, ensure_ascii=False)}
