"""The `enrich` command: typer commands, terminal progress, `enrich show`.

Owns: parsing flags into an ``EnrichJob``, mapping job fields back to flag names in messages,
exit codes, and what a terminal shows. May import every other part of ``flows``; nothing
imports it (the CLI is a thin layer over the flow).
"""

from llm_enrich.flows.cli.startup import hold_signals_while_starting

hold_signals_while_starting()  # before the heavy imports below; `app`'s callback releases them

from llm_enrich.flows.cli import batches as _batches  # noqa: E402, F401 - registers `batch cancel`
from llm_enrich.flows.cli import deployments as _deployments  # noqa: E402, F401 - registers `serve` and `deploy`
from llm_enrich.flows.cli import inspect as _inspect  # noqa: E402, F401 - registers `show` and `cache verify`
from llm_enrich.flows.cli.app import app  # noqa: E402

__all__ = ["app"]
