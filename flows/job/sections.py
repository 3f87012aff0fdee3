"""The job's fields about data and requests, one section each: tables, answer, endpoint, limits, cost.

Each section is a pydantic model that ``EnrichJob`` inherits; a builder that needs only one section can say so
in its signature. The Prefect form groups the same fields (``flows/form.py``).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

__all__ = [
    "DEFAULT_KEY_ENV",
    "DEFAULT_PROMPT",
    "FLEX_TIMEOUT",
    "AnswerFields",
    "CostFields",
    "EndpointFields",
    "LimitFields",
    "TableFields",
]

DEFAULT_PROMPT = "Explain this topic in two sentences: {topic}"

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
"""The variable the API key is read from unless `api_key_env` names another (which must then be set)."""

_SECRET_PARAMETERS = {"key", "api_key", "apikey", "token", "access_token", "secret", "password", "sig", "signature"}

DEFAULT_TIMEOUT = 60.0
"""Seconds one reply may take when the job sets no timeout."""

FLEX_TIMEOUT = 900.0
"""Seconds a flex-tier reply may take when the job sets no timeout (flex replies are slower)."""


class TableFields(BaseModel):
    """Where the rows come from and where the enriched table goes."""

    input_path: str = Field("data/topics.csv", description="Input table: a .csv, .parquet, .ndjson or .jsonl file.")
    input_format: Literal["auto", "csv", "parquet", "ndjson"] = Field(
        "auto", description="File format; 'auto' goes by the file extension."
    )
    input_schema: str = Field(
        "auto",
        max_length=300,
        description="'auto' (default: 'topics' when the table has columns id and topic, else 'template'), "
        "'topics' (the bundled schema), 'template' (the template's columns must be present and non-null) "
        "or 'module:Class' (a pandera DataFrameModel of your own). The run's first log line says which was used.",
    )
    on_invalid: Literal["fail", "quarantine"] = Field(
        "fail",
        description="Rows failing the input schema: stop the run, or set them aside and go on.",
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

    @model_validator(mode="after")
    def _has_destination(self) -> TableFields:
        if not self.in_place and not self.output_path:
            raise ValueError("give an output_path, or set in_place for a Parquet input")
        return self

    @model_validator(mode="after")
    def _local_dataset(self) -> TableFields:
        if self.output_partition_by and self.destination.lower().startswith(("s3://", "gs://", "az://", "abfs")):
            raise ValueError("a partitioned output (output_partition_by) must be a local directory for now")
        return self

    @property
    def destination(self) -> str:
        """Where the enriched table is written."""
        return self.input_path if self.in_place else str(self.output_path)

    def storage(self) -> dict[str, str] | None:
        """The object-store options in clear, for polars; None when there are none."""
        return {k: v.get_secret_value() for k, v in self.storage_options.items()} or None


class AnswerFields(BaseModel):
    """What is asked of each row, and how its answer is kept."""

    prompt: str = Field(
        DEFAULT_PROMPT,
        min_length=1,
        max_length=100_000,
        description="Prompt template; {column} placeholders are filled from each row.",
    )
    system: str | None = Field(None, max_length=100_000, description="Optional system message.")
    output_column: str = Field("explanation", min_length=1, max_length=128, description="Name of the answer column.")
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
    on_truncated: Literal["keep", "error"] = Field(
        "keep",
        description="An answer cut off at max_tokens: keep it (flagged in enrich_truncated) or make it the "
        "row's error. A cut-off structured answer is always an error.",
    )

    @field_validator("output_column")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith("enrich_"):
            raise ValueError("names starting with 'enrich_' are reserved for the added columns")
        return value


class EndpointFields(BaseModel):
    """Which model answers, where, with which key, and how long a reply may take."""

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
        DEFAULT_KEY_ENV,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (never the key itself).",
    )
    api_key_secret: str | None = Field(
        None,
        max_length=200,
        description="Name of a Prefect Secret block holding the API key (used instead of api_key_env).",
    )
    service_tier: Literal["auto", "default", "flex"] | None = Field(
        None,
        description="OpenAI service tier for online requests; flex: batch prices, slower replies, 429 "
        "resource_unavailable when capacity runs out (retried with backoff), a 15-minute timeout by default.",
    )
    prompt_cache_key: str | None = Field(
        None, description="Sent as prompt_cache_key so requests sharing a long prefix hit the provider's cache."
    )
    timeout: float | None = Field(
        None, gt=0, le=3_600, description="Seconds to wait for one reply; unset: 60, or 900 on the flex tier."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(256, ge=1, le=131_072, description="Maximum tokens per answer.")

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        # A URL is logged, shown in the UI and stored as a Prefect parameter: a key in it would leak.
        if value is None:
            return value
        parts = urlsplit(value)
        named = {name.lower().replace("-", "_") for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
        if "@" in parts.netloc or named & _SECRET_PARAMETERS:
            raise ValueError(
                "holds credentials (user:password@ or a key in the query string), which would be logged and stored "
                "with the run; put the key in the environment variable `api_key_env` names, or in a Prefect Secret "
                "block (`api_key_secret`)"
            )
        return value

    @property
    def reply_timeout(self) -> float:
        """The whole-attempt deadline: timeout, or 15 minutes on the flex tier when none was given (OpenAI's advice)."""
        # An unset value, not model_fields_set: a job rebuilt from a dump (a deployment) sets every field.
        if self.timeout is not None:
            return self.timeout
        return FLEX_TIMEOUT if self.service_tier == "flex" else DEFAULT_TIMEOUT


class LimitFields(BaseModel):
    """The provider's limits, and how failed requests are retried or stop the run."""

    rpm: int | None = Field(None, ge=1, le=10_000_000, description="Requests per minute allowed by the provider.")
    tpm: int | None = Field(None, ge=1, le=1_000_000_000, description="Tokens per minute allowed by the provider.")
    max_concurrency: int = Field(
        32, ge=1, le=512, description="Most requests in flight at once, run-wide (adapted down on 429s)."
    )
    prefect_rate_limit: str | None = Field(
        None,
        max_length=200,
        description="Name of a Prefect global concurrency limit with slot decay, taken once per request, "
        "so runs and workers sharing one key stay under the provider's limit together.",
    )
    max_retries: int = Field(6, ge=0, le=50, description="Retries per row for transient failures.")
    retry_base_delay: float = Field(
        1.0, ge=0.0, le=120.0, description="First retry wait in seconds; doubles per retry (jittered)."
    )
    max_error_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Stop sending once more than this share of the rows answered so far failed (judged after "
        "50 rows); the answers so far are kept. 1 turns it off.",
    )


class CostFields(BaseModel):
    """What a run may spend, who approves it, and the prices it is counted at."""

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
