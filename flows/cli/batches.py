"""`enrich batch cancel` and `enrich collect`: a --mode batch job's batches, cancelled or collected into the output."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from llm_enrich.flows.cli.app import app, run
from llm_enrich.flows.cli.messages import print_summary
from llm_enrich.flows.cli.options import job_from_options
from llm_enrich.flows.cli.running import fail, leave, out_console, run_flow
from llm_enrich.flows.job import EnrichJob
from llm_enrich.schemas.errors import EnrichError

__all__ = ["batch_app", "cancel", "collect"]

batch_app = typer.Typer(help="The provider batch jobs of a --mode batch run.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")


def cancel(**options: Any) -> None:
    """Cancel the job's batches (same options as `run`), keep what they finished, write the output."""
    job = job_from_options(options)
    from llm_enrich.flows.batch.cancel import cancel_batches

    try:
        done = cancel_batches(job)
    except EnrichError as err:
        fail(err.message, err.exit_code)
    out_console.print(
        f"[bold]Batch mode:[/] {escape(done.describe())}; collecting what they finished.",
        highlight=False,
        soft_wrap=True,
    )
    # Only collect: nothing new is submitted, and the cancelled batches' rest becomes each row's error.
    _collect(job.model_copy(update={"mode": "batch", "batch_wait": True, "batch_submit": False}), options)


def collect(**options: Any) -> None:
    """Collect the job's submitted batches (same options as `run`) and write the output; submit nothing new."""
    job = job_from_options(options)
    from llm_enrich.flows.batch.manifest import Manifest, manifest_path

    path = manifest_path(job.destination)
    if not Manifest.load(path, job.storage()).pending:
        fail(
            f"there are no batches to collect for {job.destination} (no manifest at {path}); give the same input, "
            "output and job file as the --mode batch run that submitted them. Nothing was sent or written.",
            2,
        )
    _collect(job.model_copy(update={"mode": "batch", "batch_submit": False}), options)


def _collect(job: EnrichJob, options: dict[str, Any]) -> None:
    """Run the collecting flow, print its summary (and --summary-json), exit 0."""
    summary = run_flow(job, verbose=bool(options.get("verbose")))
    print_summary(out_console, summary)
    if where := options.get("summary_json"):
        from llm_enrich.flows.tables.writing import write_json_atomic

        write_json_atomic(summary, str(where))
    leave(0)


cancel.__wrapped__ = run  # type: ignore[attr-defined]  # typer reads run's options
batch_app.command("cancel")(cancel)
collect.__wrapped__ = run  # type: ignore[attr-defined]
app.command("collect")(collect)
