"""`enrich show` and `enrich cache verify`: look at what a run wrote and what it paid for."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llm_enrich.flows.cli.app import app
from llm_enrich.flows.cli.options import parse_pairs
from llm_enrich.flows.cli.running import fail, out_console
from llm_enrich.schemas.errors import EnrichError

__all__ = ["cache_app", "cache_verify", "show"]


@app.command()
def show(
    output: Annotated[
        str,
        typer.Argument(
            metavar="OUTPUT",
            help="An enriched Parquet file or dataset directory (or s3://, gs://, az:// URI).",
            show_default=False,
        ),
    ],
    rows: Annotated[int, typer.Option("--rows", "-n", min=0, help="How many rows to show; 0 for all.")] = 20,
    columns: Annotated[
        Optional[str], typer.Option(help="Comma-separated columns to show (default: all but keys and tokens).")
    ] = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="Only the failed rows, with their errors and a count per error kind.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row (NDJSON), nothing else.")] = False,
    storage_option: Annotated[
        Optional[list[str]], typer.Option(help="Object-store setting KEY=VALUE (repeatable), as for `run`.")
    ] = None,
) -> None:
    """Show an enriched output: its provenance and first rows, or its failed rows by error kind."""
    from llm_enrich.flows.cli.show import open_output, print_rows, write_ndjson

    wanted = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    try:
        enriched = open_output(output, parse_pairs(storage_option) if storage_option else None)
        if as_json:
            write_ndjson(enriched, wanted, limit=rows, failed=failed)
        else:
            print_rows(out_console, enriched, wanted, limit=rows, failed=failed)
    except EnrichError as err:
        fail(err.message, err.exit_code)


cache_app = typer.Typer(help="Check and repair the persistent response cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("verify")
def cache_verify(
    output: Annotated[
        Optional[str],
        typer.Argument(metavar="OUTPUT", help="A run's output: check the .enrich-cache beside it.", show_default=False),
    ] = None,
    cache_dir: Annotated[
        Optional[str], typer.Option(help="The cache directory or s3://, gs://, az:// prefix to check.")
    ] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Rewrite damaged segments keeping only their good records.")
    ] = False,
    storage_option: Annotated[
        Optional[list[str]], typer.Option(help="Object-store setting KEY=VALUE (repeatable), as for `run`.")
    ] = None,
) -> None:
    """Read every cache record; exit 0 when all are intact, 1 when damage was found (and, with --repair, removed)."""
    from llm_enrich.flows.cache.verification import cache_location, render_report, verify_cache

    try:
        storage = parse_pairs(storage_option) if storage_option else None
        report = verify_cache(cache_location(output=output, cache_dir=cache_dir), storage, repair=repair)
    except EnrichError as err:
        fail(err.message, err.exit_code)
    for line in render_report(report):
        out_console.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.clean else 1)
