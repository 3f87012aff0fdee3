"""The job as a form in the Prefect UI: the fields a run needs first, in headed groups, human titles, bounds shown.

Prefect renders the parameter's JSON schema as the Custom run form in property order, and labels each
field with its ``title``. The job's Python fields keep their names and order; only the schema changes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FORM_SECTIONS", "present_form"]

# (section, [(field, title)]): the form's order. A field missing here still shows, last, titled from its name.
FORM_SECTIONS: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "Essentials",
        [
            ("input_path", "Input table (CSV, Parquet, NDJSON)"),
            ("output_path", "Output Parquet file"),
            ("prompt", "Prompt template"),
            ("output_column", "Answer column"),
            ("input_schema", "Input schema"),
            ("model", "Model"),
        ],
    ),
    (
        "Endpoint and key",
        [
            ("base_url", "Endpoint URL (OpenAI-compatible)"),
            ("api_key_env", "API key environment variable"),
            ("api_key_secret", "API key Prefect Secret block"),
            ("service_tier", "Service tier"),
        ],
    ),
    (
        "Answer",
        [
            ("system", "System message"),
            ("temperature", "Temperature"),
            ("max_tokens", "Max tokens per answer"),
            ("output_schema", "Structured answer spec"),
            ("output_prefix", "Structured column prefix"),
            ("structured_method", "Structured output method"),
            ("on_truncated", "Answers cut at max tokens"),
            ("extra_outputs", "Extra answer columns"),
        ],
    ),
    (
        "Cost",
        [
            ("max_cost", "Budget (USD)"),
            ("approve_above_usd", "Ask approval above (USD)"),
            ("approve_timeout", "Approval wait (seconds)"),
            ("input_price", "Input price (USD per 1M tokens)"),
            ("output_price", "Output price (USD per 1M tokens)"),
            ("mode", "Mode (online or Batch API)"),
            ("batch_wait", "Batch mode: wait for results"),
            ("batch_max_requests", "Batch mode: requests per file"),
            ("batch_max_bytes", "Batch mode: bytes per file"),
            ("batch_poll_seconds", "Batch mode: poll interval (seconds)"),
            ("batch_submit", "Batch mode: submit new batches"),
            ("batch_deadline", "Batch mode: deadline, then online (seconds)"),
            ("prompt_cache_key", "Prompt cache key"),
        ],
    ),
    (
        "Provider limits",
        [
            ("rpm", "Requests per minute (RPM)"),
            ("tpm", "Tokens per minute (TPM)"),
            ("max_concurrency", "Requests in flight at once"),
            ("prefect_rate_limit", "Prefect global rate limit"),
            ("max_retries", "Retries per row"),
            ("retry_base_delay", "First retry delay (seconds)"),
            ("timeout", "Reply timeout (seconds)"),
            ("max_error_rate", "Stop above this error rate (0-1)"),
        ],
    ),
    (
        "Rows",
        [
            ("limit", "Trial: first N rows"),
            ("sample", "Trial: N random rows"),
            ("seed", "Trial: sample seed"),
            ("on_invalid", "Invalid rows"),
            ("input_format", "Input format"),
        ],
    ),
    (
        "Reruns and cache",
        [
            ("cache", "Use the response cache"),
            ("cache_dir", "Cache directory"),
            ("refresh_cache", "Ask again (ignore cache)"),
            ("retry_failed", "Retry rows that failed last time"),
            ("wait", "Wait for a run holding the output"),
            ("wait_timeout", "Wait for the output lock (seconds)"),
        ],
    ),
    (
        "Output and scale",
        [
            ("in_place", "Rewrite the Parquet input in place"),
            ("output_partition_by", "Partition the output by column"),
            ("partition_rows", "Rows per partition"),
            ("partition_workers", "Partitions at once"),
            ("staging_dir", "Staging directory"),
            ("storage_options", "Object storage options"),
            ("dask_address", "Dask scheduler address"),
            ("dask_local", "Local Dask workers"),
        ],
    ),
]


def present_form(schema: dict[str, Any]) -> None:
    """Reorder the job schema's properties into the form's sections, title them, and show their bounds."""
    properties: dict[str, dict[str, Any]] = schema.get("properties", {})
    ordered: dict[str, dict[str, Any]] = {}
    for section, fields in FORM_SECTIONS:
        for name, title in fields:
            if name in properties:
                ordered[name] = {**properties[name], "title": f"{section}: {title}"}
    for name, spec in properties.items():
        ordered.setdefault(name, {**spec, "title": name.replace("_", " ").capitalize()})
    for spec in ordered.values():
        bounds = _bounds(spec)
        if bounds and "description" in spec:
            spec["description"] = f"{spec['description']} {bounds}"
    schema["properties"] = ordered


def _bounds(spec: dict[str, Any]) -> str | None:
    """'Allowed: 1 to 512.' from a number's limits, also inside an optional's anyOf."""
    for option in [spec, *spec.get("anyOf", [])]:
        low = option.get("minimum", option.get("exclusiveMinimum"))
        high = option.get("maximum", option.get("exclusiveMaximum"))
        if low is not None or high is not None:
            above = "more than" if "exclusiveMinimum" in option else "at least"
            if low is not None and high is not None:
                if "exclusiveMinimum" in option:
                    return f"Allowed: more than {_number(low)}, up to {_number(high)}."
                return f"Allowed: {_number(low)} to {_number(high)}."
            return f"Allowed: {above} {_number(low)}." if low is not None else f"Allowed: up to {_number(high)}."
    return None


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"
