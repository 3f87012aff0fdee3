"""`enrich serve` and `enrich deploy`: the job as a scheduled Prefect deployment, one run per output at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from llm_enrich.flows.cli.app import app
from llm_enrich.flows.cli.options import job_from_config
from llm_enrich.flows.cli.running import fail, out_console
from llm_enrich.schemas.errors import ConfigError, EnrichError

__all__ = ["deploy", "serve"]

# The options both commands take.
_Config = Annotated[Optional[Path], typer.Option(help="TOML or YAML job file (default: the sample job).")]
_Cron = Annotated[str, typer.Option(help="Cron schedule; '' for none.")]
_Name = Annotated[str, typer.Option(help="Deployment name.")]
_Limit = Annotated[int, typer.Option(min=1, help="Runs of this deployment at once; 1 keeps two runs off one output.")]
_OnOverlap = Annotated[
    str, typer.Option(help="A run over the limit: 'enqueue' (waits its turn) or 'cancel-new' (is cancelled).")
]


@app.command()
def serve(
    config: _Config = None,
    cron: _Cron = "0 2 * * *",
    name: _Name = "nightly",
    concurrency_limit: _Limit = 1,
    on_overlap: _OnOverlap = "enqueue",
) -> None:
    """Serve the enrich flow as a scheduled deployment until stopped (Ctrl-C); runs can be started from the UI."""
    job = job_from_config(config)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from llm_enrich.flows.deployment import run_limit, serve_deployment

    try:
        limit = run_limit(concurrency_limit, _overlap(on_overlap))
        serve_deployment(job, name=name, cron=cron, limit=limit)
    except EnrichError as err:
        fail(err.message, err.exit_code)


@app.command()
def deploy(
    pool: Annotated[str, typer.Option(help="Process work pool that will run it.")] = "local-process",
    config: _Config = None,
    cron: _Cron = "0 2 * * *",
    name: _Name = "nightly",
    concurrency_limit: _Limit = 1,
    on_overlap: _OnOverlap = "enqueue",
) -> None:
    """Register the enrich flow on a work pool; start it with `prefect worker start --pool POOL`."""
    job = job_from_config(config)
    from llm_enrich.flows.deployment import deploy_to_pool, run_limit

    try:
        limit = run_limit(concurrency_limit, _overlap(on_overlap))
        deployment_id = deploy_to_pool(job, pool=pool, name=name, cron=cron, limit=limit)
    except EnrichError as err:
        fail(err.message, err.exit_code)
    out_console.print(
        f"Deployment enrich-table/{name} ({deployment_id}) is on work pool '{pool}'. Start a worker with "
        f"`prefect worker start --pool {pool}`; trigger a run with `prefect deployment run enrich-table/{name}`.",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _overlap(value: str) -> Literal["enqueue", "cancel-new"]:
    """--on-overlap checked, with the choices named."""
    if value == "enqueue":
        return "enqueue"
    if value == "cancel-new":
        return "cancel-new"
    raise ConfigError(f"--on-overlap must be 'enqueue' or 'cancel-new' (got {value!r}).")
