"""EnrichJob: one enrichment job as a pydantic model (the flow's parameter and the job file)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from llm_enrich.flows.form import present_form
from llm_enrich.schemas.errors import ConfigError

__all__ = ["DEFAULT_PROMPT", "EnrichJob", "ExtraOutput", "load_job_file", "make_job", "parse_duration"]

DEFAULT_PROMPT = "Explain this topic in two sentences: {topic}"


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


_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '30m', '6h' or '1d' (a ValueError names the forms otherwise)."""
    value = text.strip().lower()
    number, unit = (value[:-1], value[-1]) if value[-1:] in _UNITS else (value, "s")
    try:
        return float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; write seconds or 90s, 30m, 6h, 1d") from None


FLEX_TIMEOUT = 900.0
"""Seconds a flex-tier reply may take when the job sets no timeout (flex replies are slower)."""


class EnrichJob(BaseModel):
    """Everything that defines a run. No secrets: the API key is read from the environment or a Secret block."""

    model_config = ConfigDict(extra="forbid", title="Enrichment job", json_schema_extra=present_form)

    input_path: str = Field("data/topics.csv", description="Input table: a .csv, .parquet, .ndjson or .jsonl file.")
    input_format: Literal["auto", "csv", "parquet", "ndjson"] = Field(
        "auto", description="File format; 'auto' goes by the file extension."
    )
    output_path: str | None = Field(
        "data/out/topics_enriched.parquet",
        description="Enriched Parquet output (written atomically). Ignored with in_place.",
    )
    in_place: bool = Field(False, description="Rewrite the (Parquet) input file itself, atomically.")
    output_partition_by: str | None = Field(
        None,
        max_length=128,
        description="Write a Hive-partitioned dataset (a directory of column=value/ folders) by this column.",
    )
    prompt: str = Field(
        DEFAULT_PROMPT,
        min_length=1,
        max_length=100_000,
        description="Prompt template; {column} placeholders are filled from each row.",
    )
    system: str | None = Field(None, max_length=100_000, description="Optional system message.")
    output_schema: str | None = Field(
        None,
        max_length=20_000,
        description="Structured answer: an inline spec ('summary:str, difficulty:int[1..5], "
        "category:enum(a,b)'), a JSON Schema file (.json) or module:PydanticModel; one typed column per field.",
    )
    output_prefix: str = Field("", max_length=64, description="Prefix for the structured answer's column names.")
    structured_method: Literal["auto", "json_schema", "function_calling", "json_mode"] = Field(
        "auto",
        description="How to ask for structure; 'auto' uses json_schema on OpenAI, function calling elsewhere.",
    )
    output_column: str = Field("explanation", min_length=1, max_length=128, description="Name of the answer column.")
    model: str | None = Field(
        None,
        max_length=200,
        description="Model name; default gpt-4o-mini, or the bundled local model without a key.",
    )
    base_url: str | None = Field(
        None,
        max_length=2_000,
        description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:11434/v1 (else OPENAI_BASE_URL).",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (never the key itself).",
    )
    api_key_secret: str | None = Field(
        None,
        max_length=200,
        description="Name of a Prefect Secret block holding the API key (used instead of api_key_env).",
    )
    prefect_rate_limit: str | None = Field(
        None,
        max_length=200,
        description="Name of a Prefect global concurrency limit with slot decay, taken once per request, "
        "so runs and workers sharing one key stay under the provider's limit together.",
    )
    max_concurrency: int = Field(
        32, ge=1, le=512, description="Most requests in flight at once, run-wide (adapted down on 429s)."
    )
    rpm: int | None = Field(None, ge=1, le=10_000_000, description="Requests per minute allowed by the provider.")
    tpm: int | None = Field(None, ge=1, le=1_000_000_000, description="Tokens per minute allowed by the provider.")
    max_retries: int = Field(6, ge=0, le=50, description="Retries per row for transient failures.")
    retry_base_delay: float = Field(
        1.0, ge=0.0, le=120.0, description="First retry wait in seconds; doubles per retry (jittered)."
    )
    timeout: float = Field(60.0, gt=0, le=3_600, description="Seconds to wait for one reply.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(256, ge=1, le=131_072, description="Maximum tokens per answer.")
    partition_rows: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Rows per partition task (peak memory grows with this, not with the table).",
    )
    partition_workers: int = Field(
        4, ge=1, le=64, description="Partition tasks running at once (a bounded thread pool)."
    )
    on_invalid: Literal["fail", "quarantine"] = Field(
        "fail",
        description="Rows failing the input schema: stop the run, or set them aside and go on.",
    )
    max_error_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Stop sending once more than this share of the rows answered so far failed (judged after "
        "50 rows); the answers so far are kept. 1 turns it off.",
    )
    mode: Literal["online", "batch"] = Field(
        "online",
        description="online: one request per distinct prompt, now. batch: the provider's Batch API (half price, "
        "answers within 24 h); a rerun of the same job resumes the same batches and never submits twice.",
    )
    batch_wait: bool = Field(
        True,
        description="Batch mode: wait for the batches and write the output (default), or submit, record the "
        "manifest and end; a later run of the same job collects them.",
    )
    batch_max_requests: int = Field(50_000, ge=1, description="Batch mode: most requests per batch file.")
    batch_max_bytes: int = Field(200_000_000, ge=1_000, description="Batch mode: largest batch file in bytes.")
    batch_submit: bool = Field(
        True,
        description="Batch mode: submit new batches; false only collects the batches already submitted "
        "(what `enrich batch cancel` runs after cancelling).",
    )
    batch_poll_seconds: float = Field(
        30.0, gt=0, le=3_600, description="Batch mode: longest pause between two looks at a batch's state."
    )
    batch_deadline: float | None = Field(
        None,
        gt=0,
        le=30 * 86_400,
        description="Batch mode: seconds after the first batch was submitted (or 90s, 30m, 6h, 1d); then the "
        "batches still running are cancelled and their unanswered prompts go online, at online prices. A row's "
        "answer is written once, whichever came first.",
    )
    service_tier: Literal["auto", "default", "flex"] | None = Field(
        None,
        description="OpenAI service tier for online requests; flex: batch prices, slower replies, 429 "
        "resource_unavailable when capacity runs out (retried with backoff), a 15-minute timeout by default.",
    )
    prompt_cache_key: str | None = Field(
        None, description="Sent as prompt_cache_key so requests sharing a long prefix hit the provider's cache."
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Trial run: enrich only the first N valid rows and write <output stem>.trial.parquet beside "
        "the output (never the output itself); the answers go to the cache, so the full run pays only for the rest.",
    )
    sample: int | None = Field(
        None,
        ge=1,
        description="Trial run on N valid rows drawn uniformly at random (see seed); written like limit.",
    )
    seed: int = Field(0, ge=0, description="The seed of sample: the same seed picks the same rows.")
    on_truncated: Literal["keep", "error"] = Field(
        "keep",
        description="An answer cut off at max_tokens: keep it (flagged in enrich_truncated) or make it the "
        "row's error. A cut-off structured answer is always an error.",
    )
    wait: bool = Field(
        True,
        description="When another run is writing the same output, wait for it (then reuse its answers); "
        "false refuses at once.",
    )
    wait_timeout: float = Field(
        21_600, gt=0, le=604_800, description="Longest wait, in seconds, for another run writing the same output."
    )
    cache: bool = Field(True, description="Reuse and store answers in the persistent response cache.")
    cache_dir: str | None = Field(
        None, max_length=2_000, description="Response cache directory; default .enrich-cache beside the output."
    )
    refresh_cache: bool = Field(False, description="Ask again even for answers in the cache or the previous output.")
    retry_failed: bool = Field(True, description="On a rerun, ask again for rows whose last attempt failed.")
    max_cost: float | None = Field(
        None, ge=0, le=1_000_000, description="Stop sending before this many US dollars would be spent."
    )
    approve_above_usd: float | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="Ask a person first when the cost ceiling is above this many US dollars (the UI under a "
        "deployment, y/N on a terminal).",
    )
    approve_timeout: int = Field(
        3_600, ge=60, le=7 * 86_400, description="Seconds a deployment run waits for approval before it is cancelled."
    )
    input_price: float | None = Field(
        None, ge=0, le=10_000, description="USD per 1M input tokens, overriding the shipped price table."
    )
    output_price: float | None = Field(
        None, ge=0, le=10_000, description="USD per 1M output tokens, overriding the shipped price table."
    )
    dask_address: str | None = Field(
        None,
        pattern=r"^(tcp|tls|ucx|inproc)://\S+$",
        max_length=300,
        description="Run partition tasks on this existing Dask scheduler (e.g. tcp://10.0.0.5:8786).",
    )
    dask_local: int = Field(
        0, ge=0, le=64, description="Run partition tasks on a local Dask cluster of this many worker processes."
    )
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Object-store settings for polars (e.g. aws_endpoint_url, aws_region); values are kept "
        "secret in logs and parameters. Credentials are better left in the worker's environment.",
    )
    staging_dir: str | None = Field(
        None,
        max_length=4_096,
        description="Where slices and part files wait until the output is published (default: beside the "
        "output; must be storage every Dask worker shares).",
    )
    extra_outputs: list[ExtraOutput] = Field(
        default_factory=list,
        max_length=16,
        description="More answer columns computed in the same pass over the partitions, sharing the "
        "rate limits and the cache; each has its own prompt, model and schema.",
    )
    input_schema: str = Field(
        "auto",
        max_length=300,
        description="'auto' (default: 'topics' when the table has columns id and topic, else 'template'), "
        "'topics' (the bundled schema), 'template' (the template's columns must be present and non-null) "
        "or 'module:Class' (a pandera DataFrameModel of your own). The run's first log line says which was used.",
    )

    @field_validator("batch_deadline", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("output_column")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith("enrich_"):
            raise ValueError("names starting with 'enrich_' are reserved for the added columns")
        return value

    @model_validator(mode="after")
    def _has_destination(self) -> EnrichJob:
        if not self.in_place and not self.output_path:
            raise ValueError("give an output_path, or set in_place for a Parquet input")
        return self

    @model_validator(mode="after")
    def _one_trial(self) -> EnrichJob:
        if self.limit is not None and self.sample is not None:
            raise ValueError("limit and sample each choose the trial's rows: give one of them")
        return self

    @property
    def reply_timeout(self) -> float:
        """The whole-attempt deadline: timeout, or 15 minutes on the flex tier when none was given (OpenAI's advice)."""
        if self.service_tier == "flex" and "timeout" not in self.model_fields_set:
            return FLEX_TIMEOUT
        return self.timeout

    @property
    def trial(self) -> str | None:
        """How a trial run picks its rows ('the first 20 valid rows'), or None for a full run."""
        if self.limit is not None:
            return f"the first {self.limit} valid rows"
        if self.sample is not None:
            return f"{self.sample} valid rows drawn at random (seed {self.seed})"
        return None

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

    @model_validator(mode="after")
    def _local_dataset(self) -> EnrichJob:
        if self.output_partition_by and self.destination.lower().startswith(("s3://", "gs://", "az://", "abfs")):
            raise ValueError("a partitioned output (output_partition_by) must be a local directory for now")
        return self

    @model_validator(mode="after")
    def _distinct_outputs(self) -> EnrichJob:
        names = [self.output_column, *(e.output_column for e in self.extra_outputs)]
        if len(set(names)) != len(names):
            raise ValueError("every output needs its own output_column")
        return self

    def storage(self) -> dict[str, str] | None:
        """The object-store options in clear, for polars; None when there are none."""
        return {k: v.get_secret_value() for k, v in self.storage_options.items()} or None

    @property
    def destination(self) -> str:
        """Where the enriched table is written."""
        return self.input_path if self.in_place else str(self.output_path)


def make_job(values: dict[str, Any], *, source: str = "the options") -> EnrichJob:
    """Build a job, turning pydantic's errors into one readable ConfigError."""
    try:
        return EnrichJob(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid job in {source}: {problems}.") from exc


def load_job_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML job file into a dict of EnrichJob fields."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"job file '{path}' does not exist; pass a .toml or .yaml file to --config.")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".toml":
            data = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"job file '{path}' must end in .toml, .yaml or .yml.")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"job file '{path}' could not be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"job file '{path}' must hold a table of job fields at the top level.")
    return data.get("job", data) if isinstance(data.get("job"), dict) else data
