"""The job's fields about running it, one section each: batch mode, trial, reruns, scale."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

__all__ = ["BatchFields", "RerunFields", "ScaleFields", "TrialFields", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '30m', '6h' or '1d' (a ValueError names the forms otherwise)."""
    value = text.strip().lower()
    number, unit = (value[:-1], value[-1]) if value[-1:] in _UNITS else (value, "s")
    try:
        return float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; write seconds or 90s, 30m, 6h, 1d") from None


class BatchFields(BaseModel):
    """Online requests or the provider's Batch API, and how batches are waited for."""

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

    @field_validator("batch_deadline", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value


class TrialFields(BaseModel):
    """A trial run on a few rows before the whole table."""

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

    @model_validator(mode="after")
    def _one_trial(self) -> TrialFields:
        if self.limit is not None and self.sample is not None:
            raise ValueError("limit and sample each choose the trial's rows: give one of them")
        return self

    @property
    def trial(self) -> str | None:
        """How a trial run picks its rows ('the first 20 valid rows'), or None for a full run."""
        if self.limit is not None:
            return f"the first {self.limit} valid rows"
        if self.sample is not None:
            return f"{self.sample} valid rows drawn at random (seed {self.seed})"
        return None


class RerunFields(BaseModel):
    """What a rerun reuses, and how it waits for another run writing the same output."""

    cache: bool = Field(True, description="Reuse and store answers in the persistent response cache.")
    cache_dir: str | None = Field(
        None, max_length=2_000, description="Response cache directory; default .enrich-cache beside the output."
    )
    refresh_cache: bool = Field(False, description="Ask again even for answers in the cache or the previous output.")
    retry_failed: bool = Field(True, description="On a rerun, ask again for rows whose last attempt failed.")
    wait: bool = Field(
        True,
        description="When another run is writing the same output, wait for it (then reuse its answers); "
        "false refuses at once.",
    )
    wait_timeout: float = Field(
        21_600, gt=0, le=604_800, description="Longest wait, in seconds, for another run writing the same output."
    )


class ScaleFields(BaseModel):
    """How the table is cut into partitions, and where they run."""

    partition_rows: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Rows per partition task (peak memory grows with this, not with the table).",
    )
    partition_workers: int = Field(
        4, ge=1, le=64, description="Partition tasks running at once (a bounded thread pool)."
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
