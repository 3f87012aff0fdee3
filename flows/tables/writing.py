"""Atomic Parquet writes: a temp file in the same directory, then os.replace."""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import stat
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import polars as pl

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.tables.paths import is_remote, sibling
from llm_enrich.flows.tables.provenance import footer_metadata
from llm_enrich.schemas.errors import ConfigError, DiskFull, OutputError
from llm_enrich.transforms.enrichment import EnrichSpec

__all__ = [
    "publish_output",
    "is_disk_full",
    "write_failure",
    "publish_parquet",
    "rejected_path",
    "write_json_atomic",
    "write_parquet_dataset_atomic",
]

# Row groups of this size keep the final streaming write's memory small and readers' scans selective.
_ROW_GROUP = 100_000


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """True when a write failed because the file system (or the user's quota) is full."""
    for error in (exc, exc.__cause__, exc.__context__):
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if error is not None and any(text in str(error).lower() for text in _FULL_TEXT):
            return True
    return False


def write_failure(exc: BaseException, what: str, location: str, advice: str) -> OutputError:
    """The one translation of a failed write: DiskFull (what filled up, where) or OutputError."""
    if is_disk_full(exc):
        return DiskFull(
            f"the disk holding the {what} '{location}' is full. The previous output, if any, is intact and the "
            f"partial file was removed. Free some space, or {advice}, then rerun the same command: answers "
            "already in the cache are not paid for again."
        )
    return OutputError(f"cannot write the {what} '{location}': {exc}. {advice[0].upper()}{advice[1:]}.")


def rejected_path(destination: str) -> str:
    """Where quarantined rows go: <output stem>.rejected.parquet beside the output."""
    stem = posixpath.splitext(posixpath.basename(destination))[0]
    return sibling(destination, f"{stem}.rejected.parquet")


def publish_parquet(
    table: pl.LazyFrame, destination: str, metadata: dict[str, str] | None = None, storage: dict[str, str] | None = None
) -> None:
    """Stream a table into one Parquet file, published whole (a temp file and a rename, or one upload)."""
    options = {"compression": "zstd", "compression_level": 3, "metadata": metadata, "row_group_size": _ROW_GROUP}
    if is_remote(destination):
        # An object store publishes an object whole when its (multipart) upload completes.
        try:
            table.sink_parquet(destination, storage_options=storage, **options)  # type: ignore[call-overload]
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise write_failure(exc, "output", destination, "check the bucket and its credentials") from exc
        return
    _replace_atomically(destination, lambda tmp: table.sink_parquet(tmp, **options))  # type: ignore[call-overload]


def write_parquet_dataset_atomic(
    table: pl.DataFrame | pl.LazyFrame, destination: str, partition_by: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a Hive-partitioned dataset into a new directory, then swap it in for the old one."""
    dest = Path(destination)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp"
        staging.mkdir(mode=0o777)  # the umask decides, as for any folder the user makes (mkdtemp would give 0700)
    except OSError as exc:
        raise OutputError(f"cannot write '{destination}': {exc}. Check the directory and its permissions.") from exc
    old = dest.with_name(f".{dest.name}.old-{staging.name.rsplit('.', 2)[-2]}")
    try:
        table.lazy().sink_parquet(
            pl.PartitionBy(staging, key=partition_by, include_key=False),
            compression="zstd",
            compression_level=3,
            metadata=metadata,
            mkdir=True,
        )
        # Two renames: readers see the old dataset or the new one (or, for an instant, neither),
        # never a mix of old and new files.
        if dest.exists():
            os.replace(dest, old)
        os.replace(staging, dest)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        if isinstance(exc, (OSError, pl.exceptions.PolarsError)):
            raise write_failure(exc, "output dataset", destination, "write the output elsewhere") from exc
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(data: dict[str, Any], destination: str) -> None:
    """Write a JSON document atomically."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    _replace_atomically(destination, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _replace_atomically(destination: str, write: Any) -> None:
    dest = Path(destination)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp")
        # 0o666 less the umask, as for any file the user writes (mkstemp would give 0600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise OutputError(f"cannot write '{destination}': {exc}. Check the directory and its permissions.") from exc
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        with suppress(FileNotFoundError):  # a file rewritten in place keeps its permissions
            os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
        os.replace(tmp, dest)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, pl.exceptions.PolarsError)):
            raise write_failure(exc, "output", destination, "write the output elsewhere (`output_path`)") from exc
        raise


def publish_output(job: EnrichJob, enriched: pl.LazyFrame, spec: EnrichSpec, input_columns: list[str]) -> None:
    """Write the finished parts as the output, published whole."""
    added = [c for c in enriched.collect_schema().names() if c not in input_columns]
    metadata = footer_metadata(job, spec, added)
    if not job.output_partition_by:
        publish_parquet(enriched, job.destination, metadata=metadata, storage=job.storage())
        return
    columns = enriched.collect_schema().names()
    if job.output_partition_by not in columns:
        raise ConfigError(
            f"`output_partition_by` = {job.output_partition_by!r} is not a column of the output; "
            f"it has: {', '.join(columns)}."
        )
    write_parquet_dataset_atomic(enriched, job.destination, job.output_partition_by, metadata)
