"""Everything about a job's outputs that is settled before the input is read: specs and column names."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from pydantic import BaseModel

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.job.references import import_reference
from llm_enrich.flows.llm.endpoint import DEFAULT_REMOTE_MODEL, Endpoint
from llm_enrich.flows.llm.local_model import LOCAL_MODEL_NAME
from llm_enrich.schemas.enriched import added_columns, bookkeeping_names
from llm_enrich.schemas.errors import ConfigError
from llm_enrich.transforms.enrichment import EnrichSpec
from llm_enrich.transforms.keys import AnswerIdentity, endpoint_family
from llm_enrich.transforms.prompts import parse_template
from llm_enrich.transforms.structured import StructuredOutput, model_from_json_schema, parse_inline_spec

__all__ = [
    "LOCAL_MODEL_CONCURRENCY",
    "build_spec",
    "check_structured_fields",
    "output_columns",
    "planned_columns",
    "resolve_structured",
]

# llama.cpp's server answers one request at a time; more in flight would only queue into timeouts.
LOCAL_MODEL_CONCURRENCY = 2


def build_spec(job: EnrichJob, endpoint: Endpoint) -> EnrichSpec:
    """The transform's spec, with the identity that keys cached answers."""
    model_name = LOCAL_MODEL_NAME if endpoint.local else job.model or DEFAULT_REMOTE_MODEL
    identity = AnswerIdentity(
        model=model_name,
        endpoint=endpoint_family(endpoint.base_url, bundled=endpoint.local),
        temperature=job.temperature,
        max_tokens=job.max_tokens,
    )
    concurrency = min(job.max_concurrency, LOCAL_MODEL_CONCURRENCY) if endpoint.local else job.max_concurrency
    structured = resolve_structured(job, endpoint)
    if structured is not None:
        identity = replace(identity, output_schema=structured.fingerprint)
    return EnrichSpec(
        template=parse_template(job.prompt),
        output_column=job.output_column,
        system=job.system,
        max_concurrency=concurrency,
        identity=identity,
        structured=structured,
    )


def resolve_structured(job: EnrichJob, endpoint: Endpoint) -> StructuredOutput | None:
    """The job's output schema as a StructuredOutput, or None for a free-text answer."""
    if not job.output_schema:
        return None
    ref = job.output_schema.strip()
    if ref.endswith(".json"):
        try:
            model = model_from_json_schema(json.loads(Path(ref).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"`output_schema`: cannot read the JSON Schema file '{ref}': {exc}") from exc
    elif _MODULE_REF.match(ref):
        model = _import_model(ref)
    else:
        model = parse_inline_spec(ref)
    method = job.structured_method
    if method == "auto":
        # llama.cpp rejects response_format json_schema but honours forced function calling.
        method = (
            "json_schema"
            if endpoint_family(endpoint.base_url, bundled=endpoint.local) == "openai"
            else "function_calling"
        )
    return StructuredOutput(model=model, method=method, prefix=job.output_prefix)


def check_structured_fields(spec: EnrichSpec, columns: list[str]) -> None:
    """The typed answer columns must not overwrite input or bookkeeping columns."""
    if spec.structured is None:
        return
    taken = {*columns, *added_columns(spec.output_column)}
    clash = [f"{spec.structured.prefix}{n}" for n in spec.structured.model.model_fields]
    clash = [name for name in clash if name in taken]
    if clash:
        raise ConfigError(
            f"`output_schema` field {clash[0]!r} would overwrite a column of the same name; "
            "pass `output_prefix` (e.g. `output_prefix` = ai_) or rename the field."
        )


_MODULE_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Z]\w*$")


def _import_model(ref: str) -> type[BaseModel]:
    found = import_reference(ref, "output_schema", "myproject.answers:Summary")
    if not (isinstance(found, type) and issubclass(found, BaseModel)):
        raise ConfigError(f"`output_schema` = {ref!r} is not a pydantic model class.")
    return found


def planned_columns(job: EnrichJob) -> dict[str, str]:
    """Every column the job writes, mapped to the option that names it (for clash messages)."""
    planned: dict[str, str] = {}
    offline = Endpoint(base_url=None, api_key=None, local=False)  # field names do not depend on the endpoint
    for number, single in enumerate(job.output_jobs()):
        option = "`output_column`" if number == 0 else "the extra output's output_column"
        planned.setdefault(single.output_column, option)
        for name in bookkeeping_names(single.output_column, primary=number == 0).values():
            planned.setdefault(name, "the bookkeeping column")
        structured = resolve_structured(single, offline)
        if structured is not None:
            for field_name in structured.model.model_fields:
                planned.setdefault(f"{structured.prefix}{field_name}", "`output_schema` field")
    return planned


def output_columns(job: EnrichJob) -> list[str]:
    """Every column the job's outputs write besides typed fields (dropped from the input on a rerun)."""
    columns = []
    for number, single in enumerate(job.output_jobs()):
        columns.append(single.output_column)
        columns.extend(bookkeeping_names(single.output_column, primary=number == 0).values())
    return columns
