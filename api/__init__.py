"""llm-enrich: enrich tables with an LLM, from the `enrich` command, a Prefect deployment or your own code.

    from llm_enrich import EnrichJob, enrich_frame

    enriched = enrich_frame(frame, prompt="Summarize {description}", output_column="summary")

The names below are loaded on first use (PEP 562), so ``import llm_enrich`` stays light and
Prefect reads its settings only when a flow is about to run. The stages live in
``llm_enrich.schemas`` <- ``llm_enrich.transforms`` <- ``llm_enrich.flows``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_enrich.flows.frames import enrich_frame, enrich_task
    from llm_enrich.flows.job import EnrichJob, ExtraOutput
    from llm_enrich.flows.pipeline import enrich_table
    from llm_enrich.flows.report.summary import RunSummary
    from llm_enrich.schemas.errors import EnrichError

__all__ = ["EnrichError", "EnrichJob", "ExtraOutput", "RunSummary", "enrich_frame", "enrich_table", "enrich_task"]

_WHERE = {
    "EnrichError": "llm_enrich.schemas.errors",
    "EnrichJob": "llm_enrich.flows.job",
    "ExtraOutput": "llm_enrich.flows.job",
    "RunSummary": "llm_enrich.flows.report.summary",
    "enrich_frame": "llm_enrich.flows.frames",
    "enrich_table": "llm_enrich.flows.pipeline",
    "enrich_task": "llm_enrich.flows.frames",
}


def __getattr__(name: str) -> Any:
    """Load a public name from its module the first time it is used."""
    if name not in _WHERE:
        raise AttributeError(f"module 'llm_enrich' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
