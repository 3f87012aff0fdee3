"""Read the input table (CSV, Parquet, NDJSON) with polars; every failure becomes an InputError.

A CSV or NDJSON file polars cannot parse is scanned again (flows/tables/parse_errors.py) to name the bad line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl

from llm_enrich.flows.tables.parse_errors import locate_problem
from llm_enrich.flows.tables.paths import is_remote, literal_path, suffix_of
from llm_enrich.schemas.errors import InputError

__all__ = ["FORMATS", "detect_format", "format_of", "iter_partitions", "read_error", "scan_table"]

FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
}
_INFER_ROWS = 10_000


def detect_format(path: str, requested: str = "auto") -> str:
    """The format to read: the requested one, or the one the extension names."""
    if requested != "auto":
        return requested
    suffix = suffix_of(path)
    if suffix not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise InputError(
            f"cannot tell the format of '{path}' from its extension '{suffix or '(none)'}'; "
            f"known extensions are {known}. Pass `input_format` = csv|parquet|ndjson."
        )
    return FORMATS[suffix]


def scan_table(path: str, requested_format: str = "auto", storage: dict[str, str] | None = None) -> pl.LazyFrame:
    """A lazy scan of the input (nothing is read yet); raise InputError for a missing or empty file."""
    if is_remote(path):
        return _scan(path, detect_format(path, requested_format), storage)
    file = Path(path)
    try:
        file.stat()
    except FileNotFoundError:
        raise InputError(f"input file '{path}' does not exist (looked in {Path.cwd()}). Check the path.") from None
    except OSError as exc:  # a folder on the way without search permission, a broken mount
        raise InputError(
            f"cannot open the input '{path}': {exc.strerror or exc}. Check its folder's permissions."
        ) from exc
    if file.is_dir():
        if not any(file.rglob("*.parquet")):
            raise InputError(f"input directory '{path}' holds no .parquet files; pass a file or a Parquet dataset.")
        # A Hive-partitioned Parquet directory (key=value/ folders); the keys become columns.
        return _scan(path, "dataset")
    if not file.is_file():
        raise InputError(f"input '{path}' is not a file; pass a .csv, .parquet or .ndjson file.")
    fmt = detect_format(path, requested_format)
    if file.stat().st_size == 0:
        raise InputError(f"input file '{path}' is empty (0 bytes); there is nothing to enrich.")
    return _scan(path, fmt)


def iter_partitions(scan: pl.LazyFrame, rows: int, *, source: str, fmt: str) -> Iterator[pl.DataFrame]:
    """The table in consecutive slices of exactly ``rows`` rows (the last may be shorter), streamed."""
    pending: list[pl.DataFrame] = []
    held = 0
    seen = 0
    try:
        for batch in scan.collect_batches(chunk_size=rows):
            pending.append(batch)
            held += batch.height
            while held >= rows:
                merged = pl.concat(pending, rechunk=False)
                yield merged.head(rows)
                rest = merged.slice(rows)
                pending, held = ([rest] if rest.height else []), rest.height
                seen += rows
    except (pl.exceptions.PolarsError, OSError, ValueError, RuntimeError) as exc:
        raise read_error(source, fmt, exc) from exc
    if held:
        seen += held
        yield pl.concat(pending)
    if seen == 0:
        raise InputError(f"input file '{source}' has no data rows; there is nothing to enrich.")


def format_of(path: str, requested_format: str = "auto") -> str:
    """How the input will be read: 'csv', 'parquet', 'ndjson' or 'dataset' (a Parquet directory)."""
    return "dataset" if not is_remote(path) and Path(path).is_dir() else detect_format(path, requested_format)


def _scan(path: str, fmt: str, storage: dict[str, str] | None = None) -> pl.LazyFrame:
    # polars expands glob characters in a scanned path: a file named 'in[1].csv' must match only itself.
    source = literal_path(path)
    try:
        if fmt == "csv":
            return pl.scan_csv(source, infer_schema_length=_INFER_ROWS, storage_options=storage)
        if fmt == "parquet":
            return pl.scan_parquet(source, storage_options=storage)
        if fmt == "dataset":
            return pl.scan_parquet(
                f"{source.rstrip('/')}/**/*.parquet", hive_partitioning=True, storage_options=storage
            )
        return pl.scan_ndjson(source, infer_schema_length=_INFER_ROWS, storage_options=storage)
    except (pl.exceptions.PolarsError, OSError, ValueError, RuntimeError) as exc:
        raise read_error(path, fmt, exc) from exc


def read_error(path: str, fmt: str, exc: BaseException) -> InputError:
    """The InputError for a table polars could not read, naming the bad line of a local CSV or NDJSON file."""
    message = str(exc).strip()
    detail = message.splitlines()[0] if message else type(exc).__name__
    if fmt in ("csv", "ndjson") and is_remote(path):
        # Scanning an object again line by line would mean downloading it: say so instead of guessing.
        detail += (
            " (the line is not named for object-storage inputs; copy the file to a local disk and run on it "
            "to have the bad line named)"
        )
    elif fmt in ("csv", "ndjson"):
        problem = locate_problem(path, fmt, message)
        detail = problem.describe() if problem else f"{detail} (reading the file again did not find the bad line)"
    return InputError(
        f"could not read '{path}' as {fmt}: {detail}. Check that the file is valid {fmt} "
        "(UTF-8 for text formats), or pass `input_format` if the extension is misleading."
    )
