"""Everything before the first request: load, validate, spec, and the plan of what to ask."""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pandera.polars as pa
import polars as pl
from pydantic import BaseModel

from flows.cache import ResponseCache, default_cache_dir
from flows.job import EnrichJob
from flows.llm import DEFAULT_REMOTE_MODEL, Endpoint
from flows.loading import detect_format, load_table
from flows.local_model import LOCAL_MODEL_NAME
from flows.planning import Plan, load_previous, plan_run
from flows.validation import Split, resolve_schema, split_valid
from schemas.enriched import added_columns, bookkeeping_names
from schemas.errors import ConfigError
from transforms.enrichment import EnrichSpec
from transforms.keys import AnswerIdentity, endpoint_family
from transforms.prompts import parse_template
from transforms.structured import StructuredOutput, model_from_json_schema, parse_inline_spec

__all__ = [
    "LOCAL_MODEL_CONCURRENCY",
    "build_spec",
    "check_structured_fields",
    "load_valid_rows",
    "output_columns",
    "plan_job",
    "resolve_structured",
]

# llama.cpp's server answers one request at a time; more in flight would only queue into timeouts.
LOCAL_MODEL_CONCURRENCY = 2


def load_valid_rows(job: EnrichJob) -> tuple[pl.DataFrame, pa.DataFrameSchema, Split]:
    """Load the input and validate it; raises UserError before anything is sent or written."""
    template = parse_template(job.prompt)
    if job.in_place and detect_format(job.input_path, job.input_format) != "parquet":
        raise ConfigError(
            f"--in-place rewrites the input, which must then be Parquet; '{job.input_path}' is not. "
            "Pass --output PATH.parquet instead."
        )
    frame = load_table(job.input_path, job.input_format)
    # A rerun over an enriched file replaces the old answer columns rather than nesting them.
    frame = frame.drop([c for c in output_columns(job) if c in frame.columns])
    template.check_columns(frame.columns, source=f"'{job.input_path}'")
    schema = resolve_schema(job.input_schema, template)
    quarantine = job.on_invalid == "quarantine"
    return frame, schema, split_valid(frame, schema, source=job.input_path, quarantine=quarantine)


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
            raise ConfigError(f"--output-schema: cannot read the JSON Schema file '{ref}': {exc}") from exc
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
            f"--output-schema field {clash[0]!r} would overwrite a column of the same name; "
            "pass --output-prefix (e.g. --output-prefix ai_) or rename the field."
        )


_MODULE_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Z]\w*$")


def _import_model(ref: str) -> type[BaseModel]:
    module_name, _, attr = ref.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--output-schema {ref!r} could not be loaded ({exc}); is the module importable?") from exc
    if not (isinstance(found, type) and issubclass(found, BaseModel)):
        raise ConfigError(f"--output-schema {ref!r} is not a pydantic model class.")
    return found


def output_columns(job: EnrichJob) -> list[str]:
    """Every column the job's outputs write besides typed fields (dropped from the input on a rerun)."""
    columns = []
    for number, single in enumerate(job.output_jobs()):
        columns.append(single.output_column)
        columns.extend(bookkeeping_names(single.output_column, primary=number == 0).values())
    return columns


def plan_job(
    job: EnrichJob, valid: pl.DataFrame, spec: EnrichSpec, names: dict[str, str] | None = None
) -> tuple[Plan, ResponseCache | None]:
    """Which rows are settled by the cache or the previous output, and which must be asked."""
    cache = ResponseCache(job.cache_dir or default_cache_dir(job.destination)) if job.cache else None
    reuse = not job.refresh_cache
    plan = plan_run(
        valid,
        spec,
        cached=cache.load() if cache is not None and reuse else None,
        previous=load_previous(job.destination, job.output_column, names) if reuse else None,
        retry_failed=job.retry_failed,
    )
    return plan, cache
