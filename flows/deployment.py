"""Scheduled deployments of the enrich flow: served by a long-running process, or on a work pool."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.types.entrypoint import EntrypointType

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm.endpoint import describe_url
from llm_enrich.flows.pipeline import enrich_table
from llm_enrich.schemas.errors import ConfigError

__all__ = [
    "DEFAULT_CRON",
    "DEPLOYMENT_NAME",
    "deploy_to_pool",
    "deployment_parameters",
    "describe_deployment",
    "run_limit",
    "serve_deployment",
]

DEFAULT_CRON = "0 2 * * *"
DEPLOYMENT_NAME = "nightly"
REPO_ROOT = Path(__file__).resolve().parent.parent
_CREDENTIAL = re.compile(r"secret|key|token|password|sas|credential|signature", re.IGNORECASE)
Overlap = Literal["enqueue", "cancel-new"]
_STRATEGY = {"enqueue": ConcurrencyLimitStrategy.ENQUEUE, "cancel-new": ConcurrencyLimitStrategy.CANCEL_NEW}


def run_limit(limit: int = 1, on_overlap: Overlap = "enqueue") -> ConcurrencyLimitConfig:
    """How many runs of the deployment may run at once, and what a run over that does: wait, or cancel itself."""
    if limit < 1:
        raise ConfigError(f"--concurrency-limit must be 1 or more (got {limit}); 1 keeps runs of one output apart.")
    return ConcurrencyLimitConfig(limit=limit, collision_strategy=_STRATEGY[on_overlap])


def deployment_parameters(job: EnrichJob) -> dict[str, Any]:
    """The job as stored default parameters; storage options must then be settings, not credentials."""
    values = job.model_dump(mode="json")
    secret = [key for key in job.storage_options if _CREDENTIAL.search(key)]
    if secret:
        raise ConfigError(
            f"storage option {secret[0]!r} looks like a credential, and a deployment would store it in the "
            "Prefect database; set it in the worker's environment instead (e.g. AWS_SECRET_ACCESS_KEY)."
        )
    values["storage_options"] = {k: v.get_secret_value() for k, v in job.storage_options.items()}
    return {"job": values}


def describe_deployment(job: EnrichJob) -> str:
    """What the deployment runs, in words: table, output, model, where the key comes from."""
    if job.api_key_secret:
        key = f"the Prefect Secret block `{job.api_key_secret}`"
    else:
        key = f"the worker's `{job.api_key_env}` variable (without it: the bundled local model)"
    return (
        f"Enrich `{job.input_path}` with the column `{job.output_column}` and write `{job.destination}`, "
        f"using the model {job.model or 'gpt-4o-mini (default)'}"
        f"{f' at {describe_url(job.base_url)}' if job.base_url else ''}; the API key comes from {key}. "
        "Custom run shows the job as a form; one run per output at a time (llm-enrich)."
    )


def serve_deployment(
    job: EnrichJob,
    *,
    name: str = DEPLOYMENT_NAME,
    cron: str | None = DEFAULT_CRON,
    limit: ConcurrencyLimitConfig | None = None,
) -> None:
    """Serve the flow (blocking) with the job as the default parameters and an optional cron schedule."""
    enrich_table.serve(
        name=name,
        cron=cron or None,
        parameters=deployment_parameters(job),
        # Two runs must never write the same output at once: by default a second one waits its turn.
        global_limit=limit or run_limit(),
        description=describe_deployment(job),
        tags=["llm-enrich"],
        # Runs import the installed package instead of loading flows/pipeline.py by path.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def deploy_to_pool(
    job: EnrichJob,
    *,
    pool: str,
    name: str = DEPLOYMENT_NAME,
    cron: str | None = DEFAULT_CRON,
    limit: ConcurrencyLimitConfig | None = None,
) -> str:
    """Register a deployment on a process work pool; a `prefect worker` on this host runs it."""
    flow = enrich_table.from_source(source=str(REPO_ROOT), entrypoint="flows/pipeline.py:enrich_table")
    deployment_id = flow.deploy(  # type: ignore[union-attr]
        name=name,
        work_pool_name=pool,
        cron=cron or None,
        parameters=deployment_parameters(job),
        concurrency_limit=limit or run_limit(),
        description=describe_deployment(job),
        tags=["llm-enrich"],
        print_next_steps=False,
    )
    return str(deployment_id)
