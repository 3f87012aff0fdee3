"""Answer a run's prompts through the Batch API before the partition pass: split, submit, poll, collect.

Every answer lands in its lane's memo (and, when whole, the cache), so the partition pass that
follows sends nothing online. The manifest is written before the first upload and after every
step, so a run killed at any point resumes the same files and batches when it is run again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openai.types import Batch

from llm_enrich.flows.batch.client import BatchClient
from llm_enrich.flows.batch.deadline import (
    FIRST_PAUSE,
    TERMINAL,
    fall_back,
    is_overdue,
    reprice_online,
    sleep_unless_stopped,
)
from llm_enrich.flows.batch.manifest import BatchEntry, Manifest, manifest_path
from llm_enrich.flows.batch.requests import LaneBatch, lane_batch, line_of, split_keys, within_budget
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm.endpoint import Endpoint, describe_url
from llm_enrich.flows.plan.lanes import OutputRun
from llm_enrich.flows.plan.survey import Survey
from llm_enrich.flows.report.artifacts import publish_batches
from llm_enrich.flows.report.summary import RunSummary
from llm_enrich.flows.run.results import CallTotals
from llm_enrich.flows.run.runtime import Lane
from llm_enrich.schemas.errors import ConfigError, RunAborted
from llm_enrich.transforms.batch_lines import line_outcome
from llm_enrich.transforms.guards import StopSignal
from llm_enrich.transforms.outcome import Outcome

__all__ = ["BatchRun", "answer_by_batch", "batch_pending_summary"]

_UNFINISHED_CODES = ("batch_expired", "batch_cancelled")
_REFUSED = "token_limit_exceeded"
_MAX_LONE_REFUSALS = 5  # refused with nothing else in flight: the file alone is over the limit
_NOT_SENT = (
    "not answered: its batch was cancelled (enrich batch cancel) before this prompt was answered; "
    "rerun the job to send it"
)
_RESEND = "collecting submits no new batch; rerun the job to send it"
_NOT_SUBMITTED = "not sent: collecting submits no new batch and no batch held this prompt; rerun the job to send it"


@dataclass
class BatchRun:
    """What batch mode did: batches submitted now, batches still running, prompts sent by batch, gone online."""

    submitted: int = 0
    pending: int = 0
    prompts: int = 0
    overdue: int = 0  # prompts left to the online pass because the batch deadline passed

    def describe(self) -> str:
        """The line a run that submitted and did not wait ends with."""
        return (
            f"submitted {self.submitted} batches for {self.prompts} prompts; {self.pending} still running; "
            "run the same command again to collect"
        )

    def overdue_notes(self, deadline: float | None) -> list[str]:
        """The summary's note when the batch deadline sent prompts online (none otherwise)."""
        if not self.overdue:
            return []
        return [
            f"the batch deadline ({deadline or 0:g} s) passed: {self.overdue} prompts were sent online, at online "
            "prices, instead of waiting for their batches"
        ]


def answer_by_batch(
    job: EnrichJob, runs: list[OutputRun], lanes: list[Lane], endpoint: Endpoint, base_url: str | None,
    stop: StopSignal, log: logging.Logger | logging.LoggerAdapter[Any],
) -> BatchRun:  # fmt: skip
    """Send every prompt still to ask by batch and put the answers in the lanes' memos; see the module doc."""
    if endpoint.local:
        raise ConfigError(
            "`mode` = batch needs an endpoint with the Batch API (`base_url` or OPENAI_API_KEY), not the bundled "
            "local model; use `mode` = online."
        )
    secret = endpoint.secret
    work = [lane_batch(i, run, lane) for i, (run, lane) in enumerate(zip(runs, lanes, strict=True))]
    manifest = Manifest.load(manifest_path(job.destination), job.storage())
    result = BatchRun(prompts=sum(len(w.todo) for w in work))
    if not result.prompts:
        manifest.remove()
        return result
    _plan(manifest, work, job)
    client = BatchClient(base_url, secret, timeout=job.reply_timeout, secret=secret)
    try:
        pause = FIRST_PAUSE
        while manifest.pending:
            stop.check()
            progressed = False
            for entry in [e for e in manifest.pending if e.state == "submitted"]:
                assert entry.batch_id is not None
                batch = client.retrieve(entry.batch_id)
                entry.status = batch.status
                if batch.status in TERMINAL:
                    # A refusal is no progress: the pause keeps growing until earlier batches finish.
                    progressed = _finish(entry, batch, client, work, manifest, job, secret, log) or progressed
                    manifest.save()
            if is_overdue(manifest, job):
                result.overdue = _go_online(manifest, client, work, runs, job, secret, stop, log)
                break
            in_flight = any(e.state == "submitted" for e in manifest.pending)
            for entry in [e for e in manifest.pending if e.state in ("new", "uploaded")]:
                if entry.refusals and in_flight and job.batch_wait:
                    continue  # the enqueued-token limit: wait for this wave to finish
                stop.check()
                _submit(entry, client, work, manifest, job)
                result.submitted += 1
                in_flight = progressed = True
            if not job.batch_wait:
                break
            if manifest.pending:
                pause = FIRST_PAUSE if progressed else min(pause * 2, job.batch_poll_seconds)
                sleep_unless_stopped(pause, stop)
    finally:
        client.close()
    result.pending = sum(1 for e in manifest.pending if not e.overdue)
    about = f"{result.pending} of {len(manifest.entries)} batches pending, {result.prompts} prompts sent by batch"
    publish_batches(manifest.table([run.job.output_column for run in runs]), about)
    if not manifest.pending:
        manifest.remove()
    return result


def _go_online(
    manifest: Manifest, client: BatchClient, work: list[LaneBatch], runs: list[OutputRun], job: EnrichJob,
    secret: str | None, stop: StopSignal, log: logging.Logger | logging.LoggerAdapter[Any],
) -> int:  # fmt: skip
    """The batch deadline passed: stop the batches, keep what they finished; the prompts left go online."""

    def finish(entry: BatchEntry, batch: Batch) -> None:
        _finish(entry, batch, client, work, manifest, job, secret, log)

    cancelled = fall_back(manifest, client, finish, job, stop, log)
    left = sum(1 for w in work for key in w.todo if key not in w.lane.memo.done)
    log.warning(
        "batch_deadline of %g s passed: cancelled %d batches; %d prompts go online, at online prices",
        job.batch_deadline, cancelled, left,
    )  # fmt: skip
    reprice_online(runs)
    return left


def batch_pending_summary(
    sent: BatchRun, survey: Survey, runs: list[OutputRun], job: EnrichJob, started: float
) -> RunSummary:
    """The summary of a run that submitted batches and did not wait for them (no output written)."""
    primary, totals = runs[0], CallTotals.of(runs)
    return RunSummary(
        rows_in=survey.rows_in, rows_valid=survey.rows_valid, rows_rejected=survey.rows_rejected, rows_ok=0,
        rows_failed=0, rows_cached=primary.tally.rows_cached, rows_deduplicated=0,
        unique_prompts_sent=sent.prompts, requests=totals.requests, retries=0, rate_limited=0,
        input_tokens=totals.input_tokens, output_tokens=totals.output_tokens,
        cached_input_tokens=totals.cached_input_tokens, cost_usd=totals.cost_usd,
        wall_seconds=round(time.perf_counter() - started, 3), output=job.destination,
        model=primary.spec.identity.model, endpoint=describe_url(job.base_url),
        batches_submitted=sent.submitted, batches_pending=sent.pending, notes=[sent.describe()],
    )  # fmt: skip


def _plan(manifest: Manifest, work: list[LaneBatch], job: EnrichJob) -> None:
    """Keep the manifest's files that still hold keys to ask; split the other keys into new files."""
    kept: list[BatchEntry] = []
    covered: set[tuple[int, str]] = set()
    for entry in manifest.entries:
        if entry.state in ("uploaded", "submitted") and entry.lane < len(work):
            if any(k in work[entry.lane].todo for k in entry.custom_ids):
                kept.append(entry)
                covered.update((entry.lane, k) for k in entry.custom_ids)
    manifest.entries = kept
    for w in work:
        fresh = [k for k in w.todo if (w.number, k) not in covered]
        if job.batch_submit:
            manifest.entries += split_keys(w, within_budget(w, fresh), job)
        else:  # only collecting (`enrich collect`, or after `enrich batch cancel`): what no batch holds is not sent
            for key in fresh:
                _withdraw(w.lane, key, _NOT_SUBMITTED)
    if not job.batch_submit:
        for entry in [e for e in manifest.entries if e.state != "submitted"]:
            manifest.entries.remove(entry)  # uploaded, never submitted: nothing was paid for it
            for key in entry.custom_ids:
                if key in work[entry.lane].todo:
                    _withdraw(work[entry.lane].lane, key, _NOT_SUBMITTED)
    manifest.save()


def _submit(entry: BatchEntry, client: BatchClient, work: list[LaneBatch], manifest: Manifest, job: EnrichJob) -> None:
    """Upload (if not yet) and create the batch, recording each step before the next."""
    if entry.state == "new":
        w = work[entry.lane]
        entry.file_id = client.upload([line_of(w, k) for k in entry.custom_ids])
        entry.state = "uploaded"
        manifest.save()
    assert entry.file_id is not None
    found = client.find(entry.file_id) if not entry.refusals else None  # created before a kill, not recorded
    try:
        batch = found or client.create(
            entry.file_id, {"llm_enrich_output": Path(job.destination.rstrip("/")).name, "lane": str(entry.lane)}
        )
    except ConfigError:
        # Refused as it is (too many lines, too big): a rerun with other limits splits those keys afresh.
        manifest.entries.remove(entry)
        manifest.save()
        raise
    entry.batch_id, entry.status, entry.state = batch.id, batch.status, "submitted"
    if manifest.first_submitted is None:
        manifest.first_submitted = time.time()  # wall clock: a rerun hours later counts from here
    manifest.save()


def _finish(
    entry: BatchEntry, batch: Batch, client: BatchClient, work: list[LaneBatch], manifest: Manifest,
    job: EnrichJob, secret: str | None, log: logging.Logger | logging.LoggerAdapter[Any],
) -> bool:  # fmt: skip
    """A batch reached a final state: collect its lines, resubmit what is left, or report why it failed.

    False when the enqueued-token limit refused it (it waits to be submitted again).
    """
    w = work[entry.lane]
    if batch.status == "failed":
        errors = list(batch.errors.data or []) if batch.errors is not None else []
        if errors and all(e.code == _REFUSED for e in errors):
            entry.refusals += 1
            lone = not any(e.state == "submitted" for e in manifest.pending if e is not entry)
            if lone and entry.refusals > _MAX_LONE_REFUSALS:
                raise RunAborted(
                    f"the Batch API keeps refusing batch file {entry.file_id} over the enqueued-token limit "
                    f"({errors[0].message}); lower `batch_max_requests` or `batch_max_bytes` and rerun."
                )
            log.warning("batch %s waits for earlier batches: %s", entry.batch_id, errors[0].message)
            entry.state, entry.batch_id = "uploaded", None
            return False
        manifest.entries.remove(entry)
        manifest.save()
        first = errors[0] if errors else None
        where = f"line {first.line}: " if first is not None and first.line else ""
        what = f"{first.message} ({first.code})" if first is not None else "no reason given"
        raise ConfigError(f"the Batch API refused batch {batch.id} (file {entry.file_id}): {where}{what}")
    records = client.records(batch.output_file_id) + client.records(batch.error_file_id)
    unfinished = set(entry.custom_ids)
    for record in records:
        key = record.get("custom_id")
        if key not in w.todo or key in w.lane.memo.done:
            continue
        error = record.get("error") or {}
        if isinstance(error, dict) and error.get("code") in _UNFINISHED_CODES:
            continue
        unfinished.discard(key)
        outcome = line_outcome(
            record, w.reply_of, w.lane.ctx, structured=w.lane.spec.structured is not None, secret=secret
        )
        _record(w.lane, key, outcome)
    left = [k for k in entry.custom_ids if k in unfinished and k in w.todo and k not in w.lane.memo.done]
    entry.state = "done"
    if not left or entry.overdue:  # past the deadline what a batch left goes online, not into a batch
        return True
    if entry.cancelled or not job.batch_submit:
        reason = _NOT_SENT if entry.cancelled else f"not answered: its batch ended {batch.status}; " + _RESEND
        for key in left:
            _withdraw(w.lane, key, reason)
        return True
    if not entry.resubmitted:
        log.warning("batch %s ended %s with %d lines unanswered; sending them again", batch.id, batch.status, len(left))
        manifest.entries += split_keys(w, left, job, resubmitted=True)
        return True
    for key in left:
        _record(w.lane, key, Outcome(error=f"the batch ended {batch.status} before this prompt was answered, twice; "
                                     "rerun the same command to send it again"))  # fmt: skip
    return True


def _record(lane: Lane, key: str, outcome: Outcome) -> None:
    """An answer into the lane's memo, its counters, and (when whole) the cache."""
    lane.memo.done[key] = outcome
    lane.ctx.stats.add(requests=1, tokens=(outcome.input_tokens, outcome.output_tokens))
    lane.ctx.stats.bump(cached_input_tokens=outcome.cached_input_tokens)
    if outcome.error is None:
        lane.ctx.stats.bump(answered=1)
        if not outcome.truncated and lane.memo.on_answer is not None:
            lane.memo.on_answer(key, outcome)


def _withdraw(lane: Lane, key: str, why: str) -> None:
    """A prompt no batch will answer now: the row's explicit error; no request was made for it."""
    lane.memo.done[key] = Outcome(error=why)
