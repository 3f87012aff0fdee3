"""Scheduled deployments of the enrich flow: served by a long-running process, or on a work pool."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.types.entrypoint import EntrypointType

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import enrich_table
from llm_enrich.schemas.errors import ConfigError

__all__ = ["DEFAULT_CRON", "DEPLOYMENT_NAME", "deploy_to_pool", "deployment_parameters", "serve_deployment"]

DEFAULT_CRON = "0 2 * * *"
DEPLOYMENT_NAME = "nightly"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Two runs must never write the same output at once: a second one waits its turn.
_CREDENTIAL = re.compile(r"secret|key|token|password|sas|credential|signature", re.IGNORECASE)
_ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


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


def serve_deployment(job: EnrichJob, *, name: str = DEPLOYMENT_NAME, cron: str | None = DEFAULT_CRON) -> None:
    """Serve the flow (blocking) with the job as the default parameters and an optional cron schedule."""
    enrich_table.serve(
        name=name,
        cron=cron or None,
        parameters=deployment_parameters(job),
        global_limit=_ONE_AT_A_TIME,
        description="Enrich a table with an LLM column (llm-enrich). Custom run shows the job as a form.",
        tags=["llm-enrich"],
        # Runs import the installed package instead of loading flows/pipeline.py by path.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def deploy_to_pool(job: EnrichJob, *, pool: str, name: str = DEPLOYMENT_NAME, cron: str | None = DEFAULT_CRON) -> str:
    """Register a deployment on a process work pool; a `prefect worker` on this host runs it."""
    flow = enrich_table.from_source(source=str(REPO_ROOT), entrypoint="flows/pipeline.py:enrich_table")
    deployment_id = flow.deploy(  # type: ignore[union-attr]
        name=name,
        work_pool_name=pool,
        cron=cron or None,
        parameters=deployment_parameters(job),
        concurrency_limit=_ONE_AT_A_TIME,
        tags=["llm-enrich"],
        print_next_steps=False,
    )
    return str(deployment_id)
