"""The `enrich` command: a thin typer layer that builds an EnrichJob and runs the flow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llm_enrich.flows.cli.messages import print_estimate, print_summary
from llm_enrich.flows.cli.options import job_from_options
from llm_enrich.flows.cli.running import approve_on_terminal, estimate_summary, fail, leave, out_console, run_flow
from llm_enrich.flows.cli.startup import release_signals
from llm_enrich.flows.job import EnrichJob
from llm_enrich.schemas.errors import ConfigError, EnrichError

__all__ = ["app"]

app = typer.Typer(
    name="enrich",
    help="Enrich a table (CSV, Parquet, NDJSON) with an LLM column, as a Prefect flow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Until these start their run (run_flow), a signal still means "nothing was sent": the quiet exit holds.
_HOLD_UNTIL_THE_RUN = frozenset({"run", "estimate", "collect"})


@app.callback()
def main(ctx: typer.Context) -> None:
    """Enrich tables with an LLM."""
    if ctx.invoked_subcommand not in _HOLD_UNTIL_THE_RUN:
        release_signals()  # every other command handles signals (or Python's default) from here on


@app.command()
def run(
    input_path: Annotated[
        Optional[str], typer.Argument(help="Input .csv/.parquet/.ndjson/.jsonl file.", show_default=False)
    ] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output Parquet path.")] = None,
    in_place: Annotated[
        Optional[bool], typer.Option("--in-place", help="Rewrite the Parquet input atomically.")
    ] = None,
    output_partition_by: Annotated[
        Optional[str], typer.Option(help="Write a Hive-partitioned dataset directory by this column.")
    ] = None,
    input_format: Annotated[
        Optional[str], typer.Option("--format", help="csv, parquet or ndjson (default: from the extension).")
    ] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt template; {column} is filled from each row.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    output_column: Annotated[Optional[str], typer.Option(help="Name of the answer column.")] = None,
    model: Annotated[
        Optional[str], typer.Option(help="Model name (default gpt-4o-mini; the bundled model without a key).")
    ] = None,
    base_url: Annotated[
        Optional[str], typer.Option(help="OpenAI-compatible endpoint; default OPENAI_BASE_URL.")
    ] = None,
    api_key_env: Annotated[
        Optional[str], typer.Option(help="Environment variable holding the API key (default OPENAI_API_KEY).")
    ] = None,
    api_key_block: Annotated[
        Optional[str],
        typer.Option(help="Prefect Secret block holding the API key, read where requests go (job: api_key_secret)."),
    ] = None,
    max_concurrency: Annotated[Optional[int], typer.Option(help="Requests in flight at once, run-wide.")] = None,
    max_retries: Annotated[Optional[int], typer.Option(help="Retries per row for transient failures.")] = None,
    retry_base_delay: Annotated[
        Optional[float], typer.Option(help="First retry wait in seconds (doubles, jittered).")
    ] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Seconds to wait for one reply.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Maximum tokens per answer.")] = None,
    partition_rows: Annotated[Optional[int], typer.Option(help="Rows per partition task.")] = None,
    partition_workers: Annotated[Optional[int], typer.Option(help="Partition tasks at once.")] = None,
    on_invalid: Annotated[
        Optional[str], typer.Option(help="fail (default) or quarantine rows that fail the schema.")
    ] = None,
    schema: Annotated[
        Optional[str],
        typer.Option(
            help="Input schema: auto (default: topics if the table has id and topic, else template), "
            "topics, template (the prompt's columns, non-null), or module:Class."
        ),
    ] = None,
    output_schema: Annotated[
        Optional[str],
        typer.Option(
            help="Typed answer: 'summary:str, difficulty:int[1..5], kind:enum(a,b)', FILE.json or module:Model."
        ),
    ] = None,
    output_prefix: Annotated[Optional[str], typer.Option(help="Prefix for the typed answer columns.")] = None,
    structured_method: Annotated[
        Optional[str], typer.Option(help="auto, json_schema, function_calling or json_mode.")
    ] = None,
    dask_address: Annotated[Optional[str], typer.Option(help="Run partitions on this Dask scheduler.")] = None,
    dask_local: Annotated[Optional[int], typer.Option(help="Run partitions on N local Dask workers.")] = None,
    staging_dir: Annotated[
        Optional[str], typer.Option(help="Where slices wait before publishing (default: beside the output).")
    ] = None,
    storage_option: Annotated[
        Optional[list[str]],
        typer.Option(help="Object-store setting KEY=VALUE for polars (repeatable), e.g. aws_region=eu-west-1."),
    ] = None,
    rpm: Annotated[Optional[int], typer.Option(help="Provider limit, requests per minute (held run-wide).")] = None,
    tpm: Annotated[Optional[int], typer.Option(help="Provider limit, tokens per minute (held run-wide).")] = None,
    max_error_rate: Annotated[
        Optional[float],
        typer.Option(help="Stop once more than this share of answered rows failed (default 0.5; 1 = off)."),
    ] = None,
    on_truncated: Annotated[
        Optional[str], typer.Option(help="An answer cut off at --max-tokens: keep (flagged) or error.")
    ] = None,
    mode: Annotated[
        Optional[str], typer.Option(help="online (default) or batch: the provider's Batch API at half price.")
    ] = None,
    batch_wait: Annotated[
        Optional[bool],
        typer.Option(
            "--batch-wait/--batch-no-wait",
            help="Batch mode: wait and write the output (default), or submit and end; rerun to collect.",
        ),
    ] = None,
    batch_max_requests: Annotated[Optional[int], typer.Option(help="Batch mode: requests per file (50,000).")] = None,
    batch_max_bytes: Annotated[Optional[int], typer.Option(help="Batch mode: bytes per file (200 MB).")] = None,
    batch_poll_seconds: Annotated[
        Optional[float], typer.Option(help="Batch mode: longest pause between looks at a batch (30 s).")
    ] = None,
    deadline: Annotated[
        Optional[str],
        typer.Option(
            help="Batch mode: after this long (90s, 30m, 6h, 1d) cancel the running batches and send the "
            "unanswered prompts online.",
            show_default=False,
        ),
    ] = None,
    service_tier: Annotated[
        Optional[str], typer.Option(help="OpenAI service tier: auto, default or flex (batch prices, slower).")
    ] = None,
    prompt_cache_key: Annotated[
        Optional[str], typer.Option(help="prompt_cache_key sent with each request (provider prompt caching).")
    ] = None,
    limit: Annotated[
        Optional[int],
        typer.Option(
            help="Trial: only the first N valid rows, into <output stem>.trial.parquet; the output is untouched."
        ),
    ] = None,
    sample: Annotated[
        Optional[int], typer.Option(help="Trial: N valid rows drawn at random (--seed), written like --limit.")
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of --sample (default 0: the same rows each time).")] = None,
    wait: Annotated[
        Optional[bool],
        typer.Option("--wait/--no-wait", help="Wait for another run writing the same output (default), or refuse."),
    ] = None,
    wait_timeout: Annotated[
        Optional[float], typer.Option(help="Longest wait (s) for another run on the same output (default 6 h).")
    ] = None,
    cache: Annotated[
        Optional[bool], typer.Option("--cache/--no-cache", help="Use the persistent response cache (default on).")
    ] = None,
    cache_dir: Annotated[Optional[str], typer.Option(help="Cache directory (default: beside the output).")] = None,
    refresh_cache: Annotated[
        Optional[bool], typer.Option("--refresh-cache", help="Ask again even for cached or previously answered rows.")
    ] = None,
    retry_failed: Annotated[
        Optional[bool],
        typer.Option("--retry-failed/--no-retry-failed", help="On a rerun, ask again for failed rows (default on)."),
    ] = None,
    max_cost: Annotated[Optional[float], typer.Option(help="Stop sending before this many USD would be spent.")] = None,
    approve_above: Annotated[
        Optional[float], typer.Option(help="Ask y/N first when the cost ceiling is above this many USD.")
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Approve in advance (--approve-above off a terminal).")
    ] = False,
    input_price: Annotated[Optional[float], typer.Option(help="USD per 1M input tokens (override).")] = None,
    output_price: Annotated[Optional[float], typer.Option(help="USD per 1M output tokens (override).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only estimate rows, prompts, tokens and cost.")] = False,
    columns: Annotated[
        bool, typer.Option("--columns", help="Same as --schema template: only check the template's columns.")
    ] = False,
    config: Annotated[
        Optional[Path], typer.Option(help="TOML or YAML job file; options given here override it.")
    ] = None,
    summary_json: Annotated[Optional[Path], typer.Option(help="Write the run summary as JSON here.")] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Prefect's log lines on a terminal too.")
    ] = False,
) -> None:
    """Enrich INPUT_PATH with an LLM and write an enriched Parquet file."""
    job = job_from_options(locals())
    try:
        if summary_json is not None:
            _check_summary_path(job, str(summary_json))
        if not dry_run:
            from llm_enrich.flows.tables.destination import check_destination

            check_destination(job)  # at once, before Prefect starts; the flow checks again (deployments)
    except EnrichError as err:
        fail(err.message, err.exit_code)
    if dry_run:
        summary = estimate_summary(job)
        print_estimate(out_console, summary)
    else:
        summary = run_flow(approve_on_terminal(job, yes=yes), verbose=verbose)
        print_summary(out_console, summary)
    if summary_json:
        from llm_enrich.flows.tables.writing import write_json_atomic

        write_json_atomic(summary, str(summary_json))
    leave(0)


def _check_summary_path(job: EnrichJob, path: str) -> None:
    """--summary-json must not overwrite the input or the output."""
    from llm_enrich.flows.tables.destination import same_location

    if same_location(path, job.input_path) or same_location(path, job.destination):
        raise ConfigError(
            f"--summary-json '{path}' is the input or the output file; give the summary its own .json path. "
            "Nothing was sent or written."
        )


def estimate(**options: Any) -> None:
    """Estimate rows, distinct prompts, cache hits, tokens and cost without calling the model."""
    run(**{**options, "dry_run": True})


estimate.__wrapped__ = run  # type: ignore[attr-defined]  # typer reads run's options
app.command("estimate")(estimate)
