"""`run`'s options as an EnrichJob: the flag-to-field map, --config underneath, KEY=VALUE pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_enrich.flows.cli.running import fail
from llm_enrich.flows.job import EnrichJob, load_job_file, make_job
from llm_enrich.schemas.errors import ConfigError, EnrichError

__all__ = ["job_from_config", "job_from_options", "parse_pairs"]

# CLI option name -> EnrichJob field, for the options that map one to one.
_FIELD_OF = {
    "input_path": "input_path",
    "output": "output_path",
    "in_place": "in_place",
    "output_partition_by": "output_partition_by",
    "input_format": "input_format",
    "prompt": "prompt",
    "system": "system",
    "output_column": "output_column",
    "model": "model",
    "base_url": "base_url",
    "api_key_env": "api_key_env",
    "api_key_block": "api_key_secret",
    "max_concurrency": "max_concurrency",
    "max_retries": "max_retries",
    "retry_base_delay": "retry_base_delay",
    "timeout": "timeout",
    "temperature": "temperature",
    "max_tokens": "max_tokens",
    "partition_rows": "partition_rows",
    "partition_workers": "partition_workers",
    "on_invalid": "on_invalid",
    "schema": "input_schema",
    "output_schema": "output_schema",
    "output_prefix": "output_prefix",
    "structured_method": "structured_method",
    "dask_address": "dask_address",
    "dask_local": "dask_local",
    "staging_dir": "staging_dir",
    "rpm": "rpm",
    "tpm": "tpm",
    "on_truncated": "on_truncated",
    "max_error_rate": "max_error_rate",
    "limit": "limit",
    "mode": "mode",
    "batch_wait": "batch_wait",
    "batch_max_requests": "batch_max_requests",
    "batch_max_bytes": "batch_max_bytes",
    "batch_poll_seconds": "batch_poll_seconds",
    "deadline": "batch_deadline",
    "service_tier": "service_tier",
    "prompt_cache_key": "prompt_cache_key",
    "sample": "sample",
    "seed": "seed",
    "wait": "wait",
    "wait_timeout": "wait_timeout",
    "cache": "cache",
    "cache_dir": "cache_dir",
    "refresh_cache": "refresh_cache",
    "retry_failed": "retry_failed",
    "max_cost": "max_cost",
    "approve_above": "approve_above_usd",
    "input_price": "input_price",
    "output_price": "output_price",
}


def job_from_config(config: Path | None) -> EnrichJob:
    """The job in a TOML/YAML file (or the sample job), or exit 2 naming what is wrong."""
    return job_from_options({"config": config}, without_config="the defaults")


def job_from_options(options: dict[str, Any], *, without_config: str = "the options") -> EnrichJob:
    """The job that `run`'s options (over --config's file) describe, or exit 2 naming what is wrong."""
    config = options.get("config")
    try:
        values: dict[str, Any] = load_job_file(str(config)) if config else {}
        values.update({_FIELD_OF[k]: v for k, v in options.items() if k in _FIELD_OF and v is not None})
        if options.get("columns"):
            values["input_schema"] = "template"
        if pairs := options.get("storage_option"):
            values["storage_options"] = {**values.get("storage_options", {}), **parse_pairs(pairs)}
        return make_job(values, source=str(config) if config else without_config)
    except EnrichError as err:
        fail(err.message, err.exit_code)
        raise  # unreachable: fail exits


def parse_pairs(items: list[str]) -> dict[str, str]:
    """KEY=VALUE strings as a dict; a malformed one is a ConfigError."""
    pairs = {}
    for number, item in enumerate(items, start=1):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # The value is not echoed: it may be a credential.
            raise ConfigError(
                f"--storage-option number {number} must look like KEY=VALUE (for example aws_region=us-east-1)."
            )
        pairs[key.strip()] = value
    return pairs
