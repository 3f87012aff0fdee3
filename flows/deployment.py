"""Scheduled deployments of the enrich flow: served by a long-running process, or on a work pool."""

from __future__ import annotations

from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType

from flows.job import EnrichJob
from flows.pipeline import enrich_table

__all__ = ["DEFAULT_CRON", "DEPLOYMENT_NAME", "deploy_to_pool", "serve_deployment"]

DEFAULT_CRON = "0 2 * * *"
DEPLOYMENT_NAME = "nightly"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Two runs must never write the same output at once: a second one waits its turn.
_ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def serve_deployment(job: EnrichJob, *, name: str = DEPLOYMENT_NAME, cron: str | None = DEFAULT_CRON) -> None:
    """Serve the flow (blocking) with the job as the default parameters and an optional cron schedule."""
    enrich_table.serve(
        name=name,
        cron=cron or None,
        parameters={"job": job.model_dump(mode="json")},
        global_limit=_ONE_AT_A_TIME,
        description="Enrich a table with an LLM column (llm-enrich). Custom run shows the job as a form.",
        tags=["llm-enrich"],
        # Runs import the installed package instead of loading flows/pipeline.py by path.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def deploy_to_pool(job: EnrichJob, *, pool: str, name: str = DEPLOYMENT_NAME, cron: str | None = DEFAULT_CRON) -> str:
    """Register a deployment on a process work pool; a `prefect worker` on this host runs it."""
    flow = enrich_table.from_source(source=str(REPO_ROOT), entrypoint="flows/pipeline.py:enrich_table")
    deployment_id = flow.deploy(
        name=name,
        work_pool_name=pool,
        cron=cron or None,
        parameters={"job": job.model_dump(mode="json")},
        concurrency_limit=_ONE_AT_A_TIME,
        tags=["llm-enrich"],
        print_next_steps=False,
    )
    return str(deployment_id)
