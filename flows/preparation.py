"""Everything before the first request: load, validate, spec, and the plan of what to ask."""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

from flows.cache import ResponseCache, default_cache_dir
from flows.job import EnrichJob
from flows.llm import DEFAULT_REMOTE_MODEL, Endpoint
from flows.loading import detect_format, load_table
from flows.local_model import LOCAL_MODEL_NAME
from flows.planning import Plan, load_previous, plan_run
from flows.validation import Split, resolve_schema, split_valid
from schemas.enriched import added_columns
from schemas.errors import ConfigError
from transforms.enrichment import EnrichSpec
from transforms.keys import AnswerIdentity, endpoint_family
from transforms.prompts import parse_template

__all__ = ["LOCAL_MODEL_CONCURRENCY", "build_spec", "load_valid_rows", "plan_job"]

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
    frame = frame.drop([c for c in added_columns(job.output_column) if c in frame.columns])
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
    return EnrichSpec(
        template=parse_template(job.prompt),
        output_column=job.output_column,
        system=job.system,
        max_concurrency=concurrency,
        identity=identity,
    )


def plan_job(job: EnrichJob, valid: pl.DataFrame, spec: EnrichSpec) -> tuple[Plan, ResponseCache | None]:
    """Which rows are settled by the cache or the previous output, and which must be asked."""
    cache = ResponseCache(job.cache_dir or default_cache_dir(job.destination)) if job.cache else None
    reuse = not job.refresh_cache
    plan = plan_run(
        valid,
        spec,
        cached=cache.load() if cache is not None and reuse else None,
        previous=load_previous(job.destination, job.output_column) if reuse else None,
        retry_failed=job.retry_failed,
    )
    return plan, cache
