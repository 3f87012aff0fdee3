"""The public API for code that is not the CLI: a polars frame in, the enriched frame out, and a Prefect task.

Both run the same flow as ``enrich run`` (validation, dedup, limits, cache, per-row errors), so
they behave the same; only the input and output are a frame instead of files. Inside your own
Prefect flow, call ``enrich_table`` (a subflow) or ``enrich_task``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, cast

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import INVALID_STATE, enrich_table
from llm_enrich.flows.report.summary import RunSummary
from llm_enrich.schemas.errors import ConfigError, RunInterrupted, RuntimeFailure, UserError

__all__ = ["default_cache_dir", "enrich_frame", "enrich_task"]


def default_cache_dir() -> str:
    """Where frames enriched from code keep their answers: the user's cache directory, shared by runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "llm-enrich")


def enrich_frame(frame: pl.DataFrame, job: EnrichJob | None = None, **fields: Any) -> pl.DataFrame:
    """Enrich a polars DataFrame: the same rows and columns, plus the answer and bookkeeping columns.

    ``job`` (or keyword fields such as ``prompt=``, ``output_column=``, ``model=``) says what to ask;
    its input and output paths are ignored. Answers are cached in ``default_cache_dir()`` unless the
    job names another ``cache_dir``, so asking again for the same frame pays nothing.
    """
    base = job or EnrichJob()
    with tempfile.TemporaryDirectory(prefix="llm-enrich-") as folder:
        source, out = Path(folder) / "input.parquet", Path(folder) / "output.parquet"
        frame.write_parquet(source)
        try:
            run_job = EnrichJob(
                **{
                    **base.model_dump(),
                    **fields,
                    "input_path": str(source),
                    "input_format": "parquet",
                    "output_path": str(out),
                    "in_place": False,
                    "output_partition_by": None,
                    "cache_dir": fields.get("cache_dir") or base.cache_dir or default_cache_dir(),
                }
            )
        except ValueError as exc:
            raise ConfigError(f"invalid job for enrich_frame: {exc}") from exc
        state = enrich_table(run_job, return_state=True)
        if state.is_cancelled():
            raise RunInterrupted(state.message or "interrupted")
        if not state.is_completed():
            error = UserError if state.name == INVALID_STATE else RuntimeFailure
            raise error(state.message or f"the run ended {state.name}")
        return pl.read_parquet(out, glob=False)


@task(name="llm-enrich", cache_policy=NO_CACHE, persist_result=False)
def enrich_task(job: EnrichJob) -> RunSummary:
    """A Prefect task that runs one enrichment job (files in, Parquet out) inside your own flow."""
    state = enrich_table(job, return_state=True)
    if not state.is_completed():
        error = UserError if state.name == INVALID_STATE else RuntimeFailure
        raise error(state.message or f"the run ended {state.name}")
    return RunSummary(**cast(dict[str, Any], state.result()))
