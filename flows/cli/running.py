"""Running the flow from a terminal: a temporary Prefect server, the progress bar, exit codes and messages."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import ExitStack
from typing import Any, cast

import typer
from rich.console import Console
from rich.markup import escape

from llm_enrich.flows.cli.startup import NOTHING_STARTED, release_signals
from llm_enrich.flows.cli.wording import as_flags
from llm_enrich.flows.job import EnrichJob
from llm_enrich.schemas.errors import EnrichError

__all__ = [
    "approve_on_terminal",
    "err_console",
    "estimate_summary",
    "fail",
    "leave",
    "out_console",
    "run_flow",
]

err_console = Console(stderr=True)
out_console = Console()


def estimate_summary(job: EnrichJob) -> dict[str, Any]:
    """The dry-run estimate as a dict, or exit with the error's code."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from llm_enrich.flows.plan.estimate import estimate_job

    try:
        return estimate_job(job).model_dump()
    except EnrichError as err:
        fail(err.message, err.exit_code)
        raise  # unreachable: fail exits


def approve_on_terminal(job: EnrichJob, *, yes: bool) -> EnrichJob:
    """Above --approve-above, show the estimate and ask y/N (no terminal: exit 2 unless --yes); the approved job."""
    if job.approve_above_usd is None:
        return job
    approved = job.model_copy(update={"approve_above_usd": None})
    if yes:
        return approved
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from llm_enrich.flows.plan.approval import describe_estimate, needs_approval
    from llm_enrich.flows.plan.estimate import estimate_job

    try:
        estimate = estimate_job(job)
    except EnrichError as err:
        fail(err.message, err.exit_code)
    if not needs_approval(job, estimate):
        return approved
    text = describe_estimate(job, estimate)
    if not (sys.stdin.isatty() and out_console.is_terminal):
        fail(
            f"this run needs approval: {text} There is no terminal to ask on: add --yes to approve it in advance, "
            "or raise --approve-above. Nothing was sent or written.",
            2,
        )
    out_console.print(f"[bold]Approval needed:[/] {escape(text)}", highlight=False, soft_wrap=True)
    if not typer.confirm("Send these requests?", default=False):
        fail("not approved; nothing was sent or written.", 1)
    return approved


def run_flow(job: EnrichJob, *, verbose: bool) -> dict[str, Any]:
    """Run the flow in this process (reporting to PREFECT_API_URL or a temporary server of our own)."""
    from llm_enrich.flows.report.orchestration import bound_prefect_client, temporary_prefect_server
    from llm_enrich.flows.run.stopping import interrupt_on_signals, received_signal

    release_signals()  # from here a signal interrupts: children may start, and they must be stopped
    interrupt_on_signals()
    bound_prefect_client()
    if out_console.is_terminal and not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    with ExitStack() as stack:
        try:
            if not os.environ.get("PREFECT_API_URL"):
                stack.enter_context(temporary_prefect_server(while_starting=_import_flow))
            return _run_in_prefect(job)
        except KeyboardInterrupt:
            fail(_interrupted_outside_the_run(), 128 + _signal_seen())
        except EnrichError as err:
            fail(err.message, err.exit_code)
        except typer.Exit:
            raise
        except Exception:
            if received_signal() is None:
                raise
            # The interrupt landed inside a library that wrapped it (pydantic, while Prefect is imported).
            fail(_interrupted_outside_the_run(), 128 + _signal_seen())
    raise AssertionError("unreachable")  # pragma: no cover


def _import_flow(api_url: str) -> None:
    """Point Prefect at our temporary server and import the flow while that server starts."""
    # Prefect reads PREFECT_API_URL when it is imported, so the URL is set first.
    os.environ["PREFECT_API_URL"] = api_url
    import llm_enrich.flows.cli.progress_bar
    import llm_enrich.flows.pipeline  # noqa: F401 - the import is the point: 2.5-3 s of it


def _run_in_prefect(job: EnrichJob) -> dict[str, Any]:
    """The flow's final state as a summary or an exit code."""
    # Prefect reads its settings at import time, so it is imported only now.
    from llm_enrich.flows.cli.progress_bar import RichProgress
    from llm_enrich.flows.pipeline import INVALID_STATE, enrich_table, finished_summary
    from llm_enrich.flows.report.orchestration import records_incomplete
    from llm_enrich.flows.report.progress import reporting_to
    from llm_enrich.flows.run.stopping import received_signal

    sink = RichProgress(out_console) if out_console.is_terminal else None
    try:
        if sink is None:
            state = enrich_table(job, return_state=True)
        else:
            with sink, reporting_to(sink):
                state = enrich_table(job, return_state=True)
    except (KeyboardInterrupt, EnrichError):
        raise
    except Exception as exc:  # the orchestration API failed us, not the data work
        if received_signal() is not None:
            raise  # a wrapped interrupt, not the API: run_flow says what was kept
        done = finished_summary()
        if done is None:
            _RECORDS_LOST.append(f"{type(exc).__name__}: {exc}")
            fail(
                f"the Prefect API at {os.environ.get('PREFECT_API_URL')} stopped answering ({type(exc).__name__}: "
                f"{exc}), so the run could not go on. The answers received so far are kept in the cache: rerun the "
                "same command when the API is back (or without PREFECT_API_URL) to finish without paying for them "
                "again.",
                1,
            )
        _warn_records(f"{type(exc).__name__}: {exc}")
        assert done is not None  # the branch above exits when the run did not finish
        return done.model_dump()
    if state.is_completed():
        if (lost := records_incomplete()) is not None:
            _warn_records(lost)
        return cast(dict[str, Any], state.result())
    if state.is_cancelled():
        # A stop the user asked for is not an error: the message already starts "interrupted by ...".
        fail(state.message or "interrupted; the output was not written.", 128 + (received_signal() or 2), label="")
    if state.name == INVALID_STATE:
        fail(state.message or "the job was rejected", 2)
    fail(state.message or f"the run ended {state.name}", 1)
    raise AssertionError("unreachable")  # pragma: no cover


_RECORDS_LOST: list[str] = []


def _warn_records(why: str) -> None:
    _RECORDS_LOST.append(why)
    err_console.print(
        f"[bold yellow]warning:[/] the output was written, but the Prefect API stopped answering ({escape(why)}); "
        "this run's records there (state, artifacts, logs) are incomplete.",
        highlight=False,
        soft_wrap=True,
    )


def _interrupted_outside_the_run() -> str:
    """What an interrupt before or after the run (outside its own stop handling) kept."""
    pipeline = sys.modules.get("llm_enrich.flows.pipeline")
    if pipeline is not None and pipeline.finished_summary() is not None:
        return "interrupted after the run had finished; its output was written."
    return NOTHING_STARTED


def _signal_seen() -> int:
    from llm_enrich.flows.run.stopping import received_signal

    return received_signal() or signal.SIGINT


def fail(message: str, code: int, *, label: str = "[bold red]error:[/] ") -> None:
    """Print one error paragraph (job fields named as their flags) and exit with `code`."""
    err_console.print(f"{label}{escape(as_flags(message))}", highlight=False, soft_wrap=True)
    leave(code)
    raise typer.Exit(code)


def leave(code: int) -> None:
    """With the Prefect API gone, exit now: its workers would retry it for minutes at interpreter exit."""
    if _RECORDS_LOST:
        from llm_enrich.flows.children import exit_now

        exit_now(code)
