"""The Prefect flow: load -> validate -> plan -> enrich in partitions -> validate -> write."""

# No `from __future__ import annotations` here: Prefect builds the parameter model from this
# module's real annotations when a deployment loads the flow.
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.states import Cancelled, Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from llm_enrich.flows.batch.collect import answer_by_batch, batch_pending_summary
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm.endpoint import describe_url, resolve_endpoint
from llm_enrich.flows.llm.local_model import LOCAL_MODEL_NOTICE, serve_local_model
from llm_enrich.flows.plan.approval import approve_run
from llm_enrich.flows.plan.estimate import estimate_job, project_full_run
from llm_enrich.flows.plan.lanes import plan_outputs
from llm_enrich.flows.plan.survey import choose_input_schema, read_columns, survey_input
from llm_enrich.flows.plan.trial import TrialPick
from llm_enrich.flows.report.artifacts import FAILURE_ROWS, Progress, publish_failure, publish_report
from llm_enrich.flows.report.events import RunOutcome, emit_run_event, outcome_of
from llm_enrich.flows.report.orchestration import begin_records, best_effort
from llm_enrich.flows.report.progress import current_sink
from llm_enrich.flows.report.summary import RunSummary, one_line
from llm_enrich.flows.run.dispatch import dispatch_partitions
from llm_enrich.flows.run.partitions import SAMPLE_ROWS, PartitionWork, enrich_partition
from llm_enrich.flows.run.results import summarize_run
from llm_enrich.flows.run.runtime import (
    EventLoopThread,
    Runtime,
    build_lane,
    close_client,
    forget_runtime,
    register_runtime,
)
from llm_enrich.flows.run.stopping import describe_interruption, drain_on_stop, stop_on_signals
from llm_enrich.flows.tables.destination import check_destination
from llm_enrich.flows.tables.lease import hold_lease
from llm_enrich.flows.tables.lock import hold_lock, sweep_debris
from llm_enrich.flows.tables.paths import is_remote
from llm_enrich.flows.tables.staging import open_staging
from llm_enrich.flows.tables.writing import publish_output, publish_parquet, rejected_path
from llm_enrich.schemas.errors import EnrichError, RunInterrupted, UserError
from llm_enrich.transforms.admission import Scheduler
from llm_enrich.transforms.guards import StopSignal
from llm_enrich.transforms.prompts import parse_template

__all__ = ["INVALID_STATE", "enrich_partition", "enrich_table", "finished_summary", "run_enrichment"]

INVALID_STATE = "Invalid"
"""Name of the Failed state for bad input or configuration (the CLI maps it to exit code 2)."""

# The pool is sized for the largest partition_workers a job may ask for; the flow itself
# keeps at most job.partition_workers partitions submitted at once.
_MAX_PARTITION_WORKERS = 64


@flow(
    name="enrich-table",
    task_runner=ThreadPoolTaskRunner(max_workers=_MAX_PARTITION_WORKERS),  # type: ignore[arg-type]
    validate_parameters=True,
    persist_result=False,
)
def enrich_table(job: EnrichJob = EnrichJob()) -> dict[str, Any] | State:
    """Enrich a table with an LLM column; bad input fails the run with a clear message."""
    try:
        summary = run_enrichment(job)
    except RunInterrupted as err:
        get_run_logger().warning(err.message)
        _announce(RunOutcome("cancelled", job.destination, _model_of(job), error=err.message))
        return Cancelled(message=err.message)
    except EnrichError as err:
        # A returned Failed state fails the run with our message and no traceback.
        get_run_logger().error(err.message)
        publish_failure(err.message)
        _announce(RunOutcome("failed", job.destination, _model_of(job), error=err.message))
        return Failed(name=INVALID_STATE if isinstance(err, UserError) else "Failed", message=err.message)
    except Exception as exc:
        # Only the type: an unexpected message could carry anything, and events leave the process.
        error = f"unexpected {type(exc).__name__}; see the run's logs"
        _announce(RunOutcome("failed", job.destination, _model_of(job), error=error))
        raise
    _announce(RunOutcome(outcome_of(summary), job.destination, summary.model, summary=summary))
    return Completed(message=one_line(summary), data=summary.model_dump())


def _model_of(job: EnrichJob) -> str:
    """The model a job names, for an event about a run that ended before it resolved one."""
    return job.model or "default"


def _announce(outcome: RunOutcome) -> None:
    """The end-of-run event; a Prefect API that cannot take it costs the event, never the run."""
    best_effort(lambda: emit_run_event(outcome), "end-of-run event")


_FINISHED: list[RunSummary] = []


def finished_summary() -> RunSummary | None:
    """The summary of the last run in this process that wrote its output (even if Prefect lost track of it)."""
    return _FINISHED[-1] if _FINISHED else None


def run_enrichment(job: EnrichJob) -> RunSummary:
    """The body of the flow, callable inside any flow run: check, lock, then enrich."""
    _FINISHED.clear()
    begin_records()
    log = get_run_logger()
    started = time.perf_counter()
    stop = StopSignal()
    with stop_on_signals(stop), ExitStack() as held:
        template = parse_template(job.prompt)
        choice = choose_input_schema(job, template)
        log.info(choice.describe())
        schema = choice.schema
        check_destination(job)
        pick, before = TrialPick.of(job), None
        if pick is not None:
            # The whole table first (counts, and a sample's rows), then the trial on its own file.
            before = estimate_job(job, pick if not pick.ready else None)
            job = job.trial_job()
            check_destination(job)
            log.info("trial run on %s, written to %s", job.trial, job.destination)
        if job.approve_above_usd is not None:
            approve_run(job, log.warning, stop.check)
        endpoint = resolve_endpoint(job)
        if not is_remote(job.destination):
            held.enter_context(
                hold_lock(
                    job.destination, wait=job.wait, timeout=job.wait_timeout, on_wait=log.warning,
                    check_stop=stop.check,
                )
            )  # fmt: skip
            local_staging = job.staging_dir if job.staging_dir and not is_remote(job.staging_dir) else None
            if removed := sweep_debris(job.destination, local_staging):
                log.warning("removed what runs that died left behind: %s", ", ".join(removed))
        else:
            held.enter_context(
                hold_lease(
                    job.destination, wait=job.wait, timeout=job.wait_timeout, on_wait=log.warning,
                    check_stop=stop.check, storage=job.storage(),
                )
            )  # fmt: skip
        summary = _enrich(job, template, schema, endpoint, stop, started, pick)
    if before is not None:
        summary.trial = job.trial
        summary.full_run_estimate = project_full_run(before, summary)
    _FINISHED.append(summary)
    return summary


def _enrich(
    job: EnrichJob, template: Any, schema: Any, endpoint: Any, stop: StopSignal, started: float,
    pick: TrialPick | None = None,
) -> RunSummary:  # fmt: skip
    """Survey, enrich the partitions, publish; a stop keeps the answers and publishes nothing."""
    log = get_run_logger()
    runs, cache = plan_outputs(job, read_columns(job), endpoint)
    for run in runs:
        run.ctx.stop = stop
    primary = runs[0]
    staging = open_staging(job.destination, job.staging_dir, shared=bool(job.dask_address), storage=job.storage())
    try:
        survey = survey_input(job, schema, template, runs, staging, pick)
        log.info(
            "loaded %d rows from %s in %d slices; %d valid", survey.rows_in, job.input_path, len(survey.slices),
            survey.rows_valid,
        )  # fmt: skip
        if survey.rows_rejected:
            log.warning("%s\nThese rows are set aside in %s.", survey.report, rejected_path(job.destination))
        for run in runs:
            t = run.tally
            log.info(
                "%s: %d rows already answered (cache or previous output), %d kept as failed, %d to ask (%d prompts)",
                run.job.output_column, t.rows_cached, t.rows_kept_failed, t.rows_to_ask, t.unique_todo,
            )  # fmt: skip
        sink = current_sink()
        base_url = endpoint.base_url
        sink.start(survey.rows_valid)
        sink.advance(primary.tally.rows_cached, primary.tally.rows_kept_failed)
        progress = Progress(survey.rows_valid, survey.rows_valid - survey.rows_to_ask)
        secret = endpoint.secret
        learned: list[str] = []
        with ExitStack() as stack:
            if endpoint.local and survey.rows_to_ask:
                sink.notice(LOCAL_MODEL_NOTICE)
                log.warning(LOCAL_MODEL_NOTICE)
                base_url = stack.enter_context(serve_local_model())
            loop = EventLoopThread()
            stack.callback(loop.close)
            drain_on_stop(stop, loop, [run.ctx.stats for run in runs])
            lanes = []
            for run in runs:
                if run.tally.rows_to_ask:
                    log.info(
                        "%s: asking %s at %s", run.job.output_column, run.spec.identity.model, describe_url(base_url)
                    )
                lane, http = build_lane(run.job, run.spec, run.ctx, endpoint, base_url=base_url, cache=cache)
                stack.callback(partial(close_client, loop, http))
                lanes.append(lane)
            if cache is not None:
                stack.callback(cache.close)
            if job.mode == "batch":
                sent = answer_by_batch(job, runs, lanes, endpoint, base_url, stop, log)
                if sent.pending:
                    return batch_pending_summary(sent, survey, runs, job, started)
                learned += sent.overdue_notes(job.batch_deadline)
            runtime = Runtime(lanes=lanes, loop=loop, secret=secret, cache=cache, schema=schema)
            stack.callback(forget_runtime, register_runtime(runtime))
            work = PartitionWork(
                job=job, columns=tuple(survey.input_columns), staging_root=staging.root, runtime_key=runtime.key,
                local=endpoint.local, served_url=base_url,
            )  # fmt: skip
            results = dispatch_partitions(survey, job, progress, runs, work)
        stop.check()  # a stop that came as the last answers landed still publishes nothing
        enriched = staging.scan([r.path for r in results])
        publish_output(job, enriched, primary.spec, survey.input_columns)
        rejected = pl.DataFrame()
        if survey.rows_rejected:
            publish_parquet(staging.scan(survey.rejected), rejected_path(job.destination), storage=job.storage())
            rejected = staging.scan(survey.rejected).head(FAILURE_ROWS).collect()
        elif not is_remote(job.destination):
            Path(rejected_path(job.destination)).unlink(missing_ok=True)
    except RunInterrupted as err:
        raise RunInterrupted(
            describe_interruption(err, runs, cached=cache is not None), signal_number=err.signal_number
        ) from err
    finally:
        staging.remove()

    notes = [*_notes(primary.ctx.scheduler, sum(run.ctx.stats.output_tokens for run in runs)), *learned]
    summary = summarize_run(
        survey, runs, results, destination=job.destination, base_url=base_url, local=endpoint.local,
        started=started, notes=notes,
    )  # fmt: skip
    if summary.rows_truncated:
        log.warning(
            "%d rows have an answer cut off at max_tokens (%d; enrich_truncated is true): raise `max_tokens`, "
            "or set `on_truncated` = 'error' to count them as failed.",
            summary.rows_truncated, job.max_tokens,
        )  # fmt: skip
    log.info("wrote %s: %d rows ok, %d failed", job.destination, summary.rows_ok, summary.rows_failed)
    sample = pl.DataFrame([row for r in results for row in r.sample][:SAMPLE_ROWS], infer_schema_length=None)
    problems = pl.DataFrame([row for r in results for row in r.problems][:FAILURE_ROWS], infer_schema_length=None)
    publish_report(summary, sample, problems, rejected)
    return summary


def _notes(scheduler: Scheduler | None, output_tokens: int) -> list[str]:
    """Hints for the next run: a TPM pace bound by max_tokens reservations says so (Dask runs pace on workers)."""
    note = scheduler.reservation_note(output_tokens) if scheduler is not None else None
    return [note] if note else []
