"""The provenance in an output's Parquet footer: written with every output, read to recognise our own columns.

A column of the input that this run would write again is replaced only when it is this tool's
own answer column from an earlier run: the file carries our footer (key ``llm_enrich``) and the
``enrich_key`` column, and the footer lists the column among those the run added (or, for a
table rewritten by another tool, which drops footers, the answer column stands beside its whole
set of bookkeeping columns). Any other clash would silently replace the user's values, so it is
refused before anything is sent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import polars as pl

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.tables.paths import is_remote
from llm_enrich.schemas.enriched import CACHED_TOKENS_COLUMN, KEY_COLUMN, bookkeeping_names
from llm_enrich.schemas.errors import ConfigError
from llm_enrich.transforms.enrichment import EnrichSpec
from llm_enrich.transforms.keys import KEY_VERSION

__all__ = ["PROVENANCE_KEY", "check_column_clashes", "footer_metadata", "read_provenance"]

PROVENANCE_KEY = "llm_enrich"


def footer_metadata(job: EnrichJob, spec: EnrichSpec, added: list[str]) -> dict[str, str]:
    """Provenance stored in the Parquet footer (never credentials), with the columns this run added."""
    info = {
        "model": spec.identity.model,
        "endpoint": spec.identity.endpoint,
        "prompt": job.prompt,
        "system": job.system,
        "output_column": job.output_column,
        "columns": added,
        "temperature": job.temperature,
        "max_tokens": job.max_tokens,
        "key_version": KEY_VERSION,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {PROVENANCE_KEY: json.dumps(info, ensure_ascii=False)}


def read_provenance(path: str, storage: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Our footer of a Parquet file (or of a dataset directory's first file); None when there is none."""
    source = path
    if not is_remote(path) and Path(path).is_dir():
        first = next(iter(sorted(Path(path).rglob("*.parquet"))), None)
        if first is None:
            return None
        source = str(first)
    try:
        raw = pl.read_parquet_metadata(source, storage_options=storage).get(PROVENANCE_KEY)
        info = json.loads(raw) if raw else None
    except (OSError, ValueError, pl.exceptions.PolarsError):
        return None
    return info if isinstance(info, dict) else None


def check_column_clashes(
    job: EnrichJob, columns: list[str], planned: dict[str, str], provenance: dict[str, Any] | None
) -> list[str]:
    """The input columns this run may replace (its own from an earlier run); refuse any other clash.

    ``planned`` maps each column the run writes to the option that names it, for the message.
    """
    clash = [c for c in columns if c in planned]
    if not clash:
        return []
    listed = provenance.get("columns") if provenance is not None and KEY_COLUMN in columns else None
    if isinstance(listed, list):
        own = {str(c) for c in listed}
        # The earlier run's primary answer column, if this run would not write it again, would be left
        # without its error and key columns (this run's primary writes the unsuffixed ones).
        earlier = provenance.get("output_column") if provenance is not None else None
        if isinstance(earlier, str) and earlier in columns and earlier not in planned and earlier in own:
            raise ConfigError(
                f"the input '{job.input_path}' holds the answers of an earlier run in '{earlier}', and this "
                "run's error and key columns (enrich_error, enrich_key, ...) would replace theirs. Rerun with "
                f"`output_column` = '{earlier}' to go on with those answers (add new columns as extra outputs in a "
                "job file), or write to another `output_path`. Nothing was sent or written."
            )
    else:
        # No footer list (an older output, or a table another tool rewrote, e.g. upstream appending
        # rows): an answer column counts as ours only beside its whole set of bookkeeping columns
        # (outputs written before the cached-token column existed lack that one).
        own = set()
        for number, single in enumerate(job.output_jobs()):
            names = bookkeeping_names(single.output_column, primary=number == 0)
            group = [single.output_column, *names.values()]
            if all(c in columns for c in group if c != names[CACHED_TOKENS_COLUMN]):
                own |= {*group, *(c for c, option in planned.items() if option == "`output_schema` field")}
    foreign = [c for c in clash if c not in own]
    if foreign:
        name = foreign[0]
        raise ConfigError(
            f"{planned[name]} '{name}' is already a column of the input '{job.input_path}': the answers would "
            f"replace its values{' for good' if job.in_place else ''}. Choose another name (for example "
            f"'{name}_llm'{', or `output_prefix` = ai_ for typed fields' if 'schema' in planned[name] else ''}). "
            "Nothing was sent or written."
        )
    return clash
