"""Approval before an expensive run: the estimate shown to a person, who lets it go or stops it."""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar, cast

from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.plan.estimate import Estimate, estimate_job
from llm_enrich.schemas.errors import ConfigError, RunInterrupted

__all__ = ["Approval", "approve_run", "describe_estimate", "needs_approval", "wait_for_approval"]

_POLL_SECONDS = 2
_GRACE_SECONDS = 60  # past approve_timeout, for Prefect's own last look at the run before it gives up
T = TypeVar("T")


class Approval(RunInput):
    """The form the Prefect UI shows on a paused run."""

    approve: bool = Field(False, title="Approve this run", description="Tick to send the requests; leave to stop it.")
    reason: str = Field("", title="Reason", description="Kept in the run's state message.", max_length=500)


def needs_approval(job: EnrichJob, estimate: Estimate) -> bool:
    """True when the cost ceiling is above the job's threshold, or unknown (no price): nobody can say it is not."""
    if job.approve_above_usd is None or estimate.unique_prompts == 0:
        return False
    ceiling = estimate.estimated_cost_usd
    return ceiling is None or ceiling > job.approve_above_usd


def describe_estimate(job: EnrichJob, e: Estimate) -> str:
    """The figures a person approves: rows, distinct prompts, tokens, the cost ceiling, the model."""
    cost = f"${e.estimated_cost_usd:,.4f}" if e.estimated_cost_usd is not None else "unknown (no price for this model)"
    return (
        f"{e.rows_valid:,} rows ({e.rows_cached:,} already answered), {e.unique_prompts:,} distinct prompts to send, "
        f"~{e.estimated_input_tokens:,} input tokens and at most {e.max_output_tokens:,} output tokens; cost "
        f"ceiling {cost} with {e.model}, above the approval threshold of ${job.approve_above_usd:,.2f}."
    )


def wait_for_approval(job: EnrichJob, estimate: Estimate, check_stop: Callable[[], None]) -> None:
    """Pause a deployment run until a person approves it in the UI; a rejection or a timeout stops it, nothing sent."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.deployment_id is None:
        raise ConfigError(
            f"approve_above_usd is set and this run needs approval ({describe_estimate(job, estimate)}), but nobody "
            "can give it here: run it from a deployment (the UI asks) or with the `enrich` command (it asks on a "
            "terminal; --yes approves in advance). Nothing was sent."
        )
    form = Approval.with_initial_data(description=f"**Approve this run?** {describe_estimate(job, estimate)}")
    try:
        answer = _paused(
            lambda: pause_flow_run(wait_for_input=form, timeout=job.approve_timeout, poll_interval=_POLL_SECONDS),
            check_stop,
            give_up=job.approve_timeout + _GRACE_SECONDS,
        )
    except FlowPauseTimeout as exc:
        raise RunInterrupted(
            f"not approved within {job.approve_timeout} s (approve_timeout); nothing was sent or written."
        ) from exc
    if answer is None or not answer.approve:
        why = f": {answer.reason}" if answer is not None and answer.reason else ""
        raise RunInterrupted(f"rejected by the approver{why}; nothing was sent or written.")


def approve_run(job: EnrichJob, warn: Callable[[str], None], check_stop: Callable[[], None]) -> None:
    """Above the job's threshold, a person approves the estimate first (the run pauses under a deployment)."""
    estimate = estimate_job(job)
    if needs_approval(job, estimate):
        warn(f"waiting for approval: {describe_estimate(job, estimate)}")
        wait_for_approval(job, estimate, check_stop)


def _paused(pause: Callable[[], T], check_stop: Callable[[], None], *, give_up: float) -> T:
    """Wait for Prefect's pause on a daemon thread, so a stop (a cancel's SIGTERM, Ctrl-C) ends the wait at once.

    Prefect's pause polls for hours without looking at our stop; its thread dies with the process. Its
    own timeout needs the Prefect API to answer, so the wait also ends ``give_up`` s from now regardless.
    """
    done: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=1)
    context = contextvars.copy_context()  # the pause needs the flow run's context

    def wait() -> None:
        try:
            done.put((True, context.run(pause)))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
            done.put((False, exc))

    threading.Thread(target=wait, name="approval-pause", daemon=True).start()
    deadline = time.monotonic() + give_up
    while True:  # bounded: the deadline raises, as does a stop; the pause itself ends after approve_timeout
        check_stop()
        if time.monotonic() > deadline:
            raise FlowPauseTimeout("the pause did not end (the Prefect API may be unreachable)")
        try:
            ok, value = done.get(timeout=0.1)
        except queue.Empty:
            continue
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return cast(T, value)
