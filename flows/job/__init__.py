"""The job: every field that defines a run, in sections (``sections``, ``operation``), whole (``model``), from files.

May import: pydantic, yaml, ``llm_enrich.schemas`` and ``llm_enrich.flows.form``; nothing else of ``flows``.
A builder that needs one part of the job takes that section's type (``LimitFields``, ``EndpointFields``, ...).
"""

from llm_enrich.flows.job.files import load_job_file, make_job
from llm_enrich.flows.job.model import EnrichJob, ExtraOutput
from llm_enrich.flows.job.operation import BatchFields, RerunFields, ScaleFields, TrialFields, parse_duration
from llm_enrich.flows.job.sections import (
    DEFAULT_KEY_ENV,
    DEFAULT_PROMPT,
    FLEX_TIMEOUT,
    AnswerFields,
    CostFields,
    EndpointFields,
    LimitFields,
    TableFields,
)

__all__ = [
    "DEFAULT_KEY_ENV",
    "DEFAULT_PROMPT",
    "FLEX_TIMEOUT",
    "AnswerFields",
    "BatchFields",
    "CostFields",
    "EndpointFields",
    "EnrichJob",
    "ExtraOutput",
    "LimitFields",
    "RerunFields",
    "ScaleFields",
    "TableFields",
    "TrialFields",
    "load_job_file",
    "make_job",
    "parse_duration",
]
