"""The `enrich` command: typer commands, terminal progress, `enrich show`.

Owns: parsing flags into an ``EnrichJob``, mapping job fields back to flag names in messages,
exit codes, and what a terminal shows. May import every other part of ``flows``; nothing
imports it (the CLI is a thin layer over the flow).
"""

from llm_enrich.flows.cli import batches as _batches  # noqa: F401 - registers `batch cancel`
from llm_enrich.flows.cli import deployments as _deployments  # noqa: F401 - registers `serve` and `deploy`
from llm_enrich.flows.cli import inspect as _inspect  # noqa: F401 - registers `show` and `cache verify`
from llm_enrich.flows.cli.app import app

__all__ = ["app"]
