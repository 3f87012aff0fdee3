"""Read the input table (CSV, Parquet, NDJSON) with polars; every failure becomes an InputError."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from flows.storage import is_remote, suffix_of
from schemas.errors import InputError

__all__ = ["FORMATS", "detect_format", "load_table"]

FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
}


def detect_format(path: str, requested: str = "auto") -> str:
    """The format to read: the requested one, or the one the extension names."""
    if requested != "auto":
        return requested
    suffix = suffix_of(path)
    if suffix not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise InputError(
            f"cannot tell the format of '{path}' from its extension '{suffix or '(none)'}'; "
            f"known extensions are {known}. Pass --format csv|parquet|ndjson."
        )
    return FORMATS[suffix]


def load_table(path: str, requested_format: str = "auto") -> pl.DataFrame:
    """Load the whole table; raise InputError naming the file and what to do."""
    if is_remote(path):
        return _read(path, detect_format(path, requested_format))
    file = Path(path)
    if not file.exists():
        raise InputError(f"input file '{path}' does not exist (looked in {Path.cwd()}). Check the path.")
    if file.is_dir():
        return _read_dataset(path)
    if not file.is_file():
        raise InputError(f"input '{path}' is not a file; pass a .csv, .parquet or .ndjson file.")
    fmt = detect_format(path, requested_format)
    if file.stat().st_size == 0:
        raise InputError(f"input file '{path}' is empty (0 bytes); there is nothing to enrich.")
    return _read(path, fmt)


def _read_dataset(path: str) -> pl.DataFrame:
    """A Hive-partitioned Parquet directory (key=value/ folders); the keys become columns."""
    if not any(Path(path).rglob("*.parquet")):
        raise InputError(f"input directory '{path}' holds no .parquet files; pass a file or a Parquet dataset.")
    return _read(f"{path.rstrip('/')}/**/*.parquet", "dataset")


def _read(path: str, fmt: str) -> pl.DataFrame:
    try:
        if fmt == "csv":
            frame = pl.read_csv(path, infer_schema_length=10_000)
        elif fmt == "parquet":
            frame = pl.read_parquet(path)
        elif fmt == "dataset":
            frame = pl.read_parquet(path, hive_partitioning=True)
        else:
            frame = pl.read_ndjson(path, infer_schema_length=10_000)
    except (pl.exceptions.PolarsError, OSError, ValueError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"could not read '{path}' as {fmt}: {detail}. Check that the file is valid {fmt} "
            "(UTF-8 for text formats), or pass --format if the extension is misleading."
        ) from exc
    if frame.width == 0 or frame.height == 0:
        raise InputError(f"input file '{path}' has no data rows; there is nothing to enrich.")
    return frame
