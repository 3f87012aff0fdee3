"""EnrichJob: the whole job (the flow's parameter and the job file), made of the sections plus extra outputs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm_enrich.flows.form import present_form
from llm_enrich.flows.job.operation import BatchFields, RerunFields, ScaleFields, TrialFields
from llm_enrich.flows.job.sections import AnswerFields, CostFields, EndpointFields, LimitFields, TableFields

__all__ = ["EnrichJob", "ExtraOutput"]


class ExtraOutput(BaseModel):
    """One more answer column computed in the same pass (its own prompt, model and schema)."""

    model_config = ConfigDict(extra="forbid", title="Extra output")

    prompt: str = Field(min_length=1, max_length=100_000, description="Prompt template for this output.")
    output_column: str = Field(min_length=1, max_length=128, description="Name of this output's answer column.")
    system: str | None = Field(None, max_length=100_000, description="System message (default: none).")
    model: str | None = Field(None, max_length=200, description="Model name (default: the job's model).")
    output_schema: str | None = Field(None, max_length=20_000, description="Structured answer spec, as for the job.")
    output_prefix: str = Field("", max_length=64, description="Prefix for this output's typed columns.")
    structured_method: Literal["auto", "json_schema", "function_calling", "json_mode"] = Field(
        "auto", description="How to ask for structure."
    )


# Pydantic orders inherited fields from the last base to the first, so the sections are listed
# backwards to keep the job's fields (and its dumps) in reading order.
class EnrichJob(
    ScaleFields,
    RerunFields,
    TrialFields,
    BatchFields,
    CostFields,
    LimitFields,
    EndpointFields,
    AnswerFields,
    TableFields,
):
    """Everything that defines a run. No secrets: the API key is read from the environment or a Secret block."""

    model_config = ConfigDict(
        extra="forbid", title="Enrichment job", json_schema_extra=present_form, allow_inf_nan=False
    )

    extra_outputs: list[ExtraOutput] = Field(
        default_factory=list,
        max_length=16,
        description="More answer columns computed in the same pass over the partitions, sharing the "
        "rate limits and the cache; each has its own prompt, model and schema.",
    )

    @model_validator(mode="after")
    def _distinct_outputs(self) -> EnrichJob:
        names = [self.output_column, *(e.output_column for e in self.extra_outputs)]
        if len(set(names)) != len(names):
            raise ValueError("every output needs its own output_column")
        return self

    def trial_job(self) -> EnrichJob:
        """The same job writing ``<output stem>.trial.parquet`` beside the output (for in_place, the input)."""
        target = self.destination
        stem = target[: -len(".parquet")] if target.lower().endswith(".parquet") else target.rstrip("/")
        suffix = ".trial.parquet" if target.lower().endswith(".parquet") or not self.output_partition_by else ".trial"
        return self.model_copy(update={"output_path": stem + suffix, "in_place": False})

    def output_jobs(self) -> list[EnrichJob]:
        """This job's outputs as single-output jobs; the first is the primary one."""
        extras = [
            self.model_copy(update={**extra.model_dump(), "model": extra.model or self.model, "extra_outputs": []})
            for extra in self.extra_outputs
        ]
        return [self.model_copy(update={"extra_outputs": []}), *extras]
