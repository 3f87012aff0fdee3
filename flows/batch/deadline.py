"""The job's batch deadline: when it passes, the batches stop and their unanswered prompts go online.

The clock starts when the job's first batch is created (kept in the manifest, so a scheduled rerun
counts from the same moment). At the deadline files not yet submitted are dropped (nothing was paid
for them), running batches are cancelled and, for a bounded while, collected as they end: a line the
provider finished is kept and paid once at batch price. Every prompt still without an answer is then
left to the online pass at online prices. A batch still cancelling when that wait ends stays in the
manifest; its late lines are never written over the online answers (the cache and the output already
hold them), so a row's answer is written once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from openai.types import Batch

from llm_enrich.flows.batch.client import BatchClient
from llm_enrich.flows.batch.manifest import BatchEntry, Manifest
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.plan.lanes import OutputRun, is_discounted, resolve_price
from llm_enrich.transforms.guards import StopSignal

__all__ = [
    "CANCEL_WAIT_SECONDS",
    "FIRST_PAUSE",
    "TERMINAL",
    "fall_back",
    "is_overdue",
    "reprice_online",
    "sleep_unless_stopped",
]

TERMINAL = ("completed", "failed", "expired", "cancelled")
# How long the fallback waits for cancelled batches to end before the online pass starts: OpenAI
# takes up to 10 minutes to cancel; past this, paying twice for a line is less likely than waiting.
CANCEL_WAIT_SECONDS = 120.0
FIRST_PAUSE = 0.05  # the first pause between looks at a batch; it doubles up to batch_poll_seconds


def is_overdue(manifest: Manifest, job: EnrichJob, now: float | None = None) -> bool:
    """True when the job has a batch deadline and it passed since the first batch was created."""
    if job.batch_deadline is None or manifest.first_submitted is None:
        return False
    return (time.time() if now is None else now) >= manifest.first_submitted + job.batch_deadline


def fall_back(
    manifest: Manifest, client: BatchClient, finish: Callable[[BatchEntry, Batch], object], job: EnrichJob,
    stop: StopSignal, log: logging.Logger | logging.LoggerAdapter[Any],
) -> int:  # fmt: skip
    """Drop unsubmitted files, cancel running batches and collect them as they end (bounded); batches cancelled."""
    for entry in [e for e in manifest.pending if e.state != "submitted"]:
        manifest.entries.remove(entry)  # never submitted: nothing was paid, its prompts go online
    cancelled = 0
    for entry in manifest.pending:
        if not entry.overdue and entry.batch_id is not None:
            cancelled += client.cancel(entry.batch_id)
            entry.overdue = True
        manifest.save()  # each cancel recorded: a run killed here does not cancel twice or resubmit
    give_up = time.monotonic() + min(CANCEL_WAIT_SECONDS, max(job.batch_poll_seconds * 4, 1.0))
    pause = FIRST_PAUSE
    while True:  # bounded: past give_up the loop breaks, and every pass sleeps
        for entry in list(manifest.pending):
            assert entry.batch_id is not None
            batch = client.retrieve(entry.batch_id)
            entry.status = batch.status
            if batch.status in TERMINAL:
                finish(entry, batch)
                if entry.state in ("new", "uploaded"):  # refused over the enqueued-token limit: not resubmitted
                    manifest.entries.remove(entry)
                manifest.save()
        left = give_up - time.monotonic()
        if not manifest.pending or left <= 0:
            break
        pause = min(pause * 2, job.batch_poll_seconds, left)
        sleep_unless_stopped(pause, stop)
    if manifest.pending:
        log.warning(
            "batch_deadline: %d cancelled batches have not ended yet; their unanswered prompts go online now, and "
            "lines they still finish are not written (the online answers are)",
            len(manifest.pending),
        )
    return cancelled


def reprice_online(runs: list[OutputRun]) -> None:
    """From now on the runs' requests are online ones: their cost and budget use online prices."""
    for run in runs:
        online = is_discounted("online", run.job.service_tier)  # still half price on the flex tier
        run.reprice(resolve_price(run.job, run.spec.identity.model, local=False, discounted=online))


def sleep_unless_stopped(seconds: float, stop: StopSignal) -> None:
    """A pause that a stop (Ctrl-C, SIGTERM) cuts short within 0.1 s."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        stop.check()
        time.sleep(min(0.1, left))
    stop.check()
