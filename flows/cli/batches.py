"""`enrich batch cancel`: cancel a --mode batch job's batches, then collect what they finished into the output."""

from __future__ import annotations

from typing import Any

import typer

from llm_enrich.flows.cli.app import app, run
from llm_enrich.flows.cli.messages import print_summary
from llm_enrich.flows.cli.options import job_from_options
from llm_enrich.flows.cli.running import fail, leave, out_console, run_flow
from llm_enrich.schemas.errors import EnrichError

__all__ = ["batch_app", "cancel"]

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
        f"[bold]Batch mode:[/] {done.describe()}; collecting what they finished.", highlight=False, soft_wrap=True
    )
    # Only collect: nothing new is submitted, and the cancelled batches' rest becomes each row's error.
    collect = job.model_copy(update={"mode": "batch", "batch_wait": True, "batch_submit": False})
    summary = run_flow(collect, verbose=bool(options.get("verbose")))
    print_summary(out_console, summary)
    if where := options.get("summary_json"):
        from llm_enrich.flows.tables.writing import write_json_atomic

        write_json_atomic(summary, str(where))
    leave(0)


cancel.__wrapped__ = run  # type: ignore[attr-defined]  # typer reads run's options
batch_app.command("cancel")(cancel)
