"""Checking a response cache record by record, and repairing it: damage costs only what is damaged.

``CACHE_SCHEMA`` and the one segment reader both caches use live here. A torn, undecodable,
mistyped or half-written record, or a zero-length or corrupt file, loses only itself, is logged
once as a WARNING naming the file (stdlib ``logging``: it shows inside a Prefect run and out),
and never fails a run. Checking and repairing a whole cache is ``flows.cache.verification``.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

__all__ = [
    "CACHE_SCHEMA",
    "OPTIONAL",
    "SegmentHealth",
    "line_numbers",
    "parse_segment",
    "read_segment",
    "report_damage",
    "with_defaults",
]

CACHE_SCHEMA = {
    "seq": pl.Int64,
    "key": pl.String,
    "text": pl.String,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "cached_input_tokens": pl.Int64,
}
# A record without any of these is half-written: it cannot serve an answer.
REQUIRED = ("key", "text", "input_tokens", "output_tokens")
# Fields added later: a record written before one existed lacks it and loads with the default.
OPTIONAL = {"cached_input_tokens": 0}
_INT64 = (-(2**63), 2**63)
_CHUNK = 1 << 20  # bytes of a damaged segment that polars re-reads at once

log = logging.getLogger(__name__)
_reported: set[tuple[str, str]] = set()
_reported_lock = threading.Lock()


@dataclass(frozen=True)
class SegmentHealth:
    """What reading one segment found: records kept, records lost, or why the whole file was lost."""

    location: str
    ok: int = 0
    damaged: int = 0
    damaged_lines: tuple[int, ...] = ()
    unreadable: str | None = None

    @property
    def clean(self) -> bool:
        """True when nothing in the segment was lost."""
        return self.damaged == 0 and self.unreadable is None


def read_segment(path: Path, *, exact: bool = False) -> tuple[pl.DataFrame, SegmentHealth]:
    """The good records of one segment file and what was lost; never raises for a damaged file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return pl.DataFrame(schema=CACHE_SCHEMA), SegmentHealth(str(path), unreadable=exc.strerror or str(exc))
    if not data:
        return pl.DataFrame(schema=CACHE_SCHEMA), SegmentHealth(str(path), unreadable="empty file")
    frame, damaged_lines = parse_segment(data, exact=exact)
    return frame, SegmentHealth(str(path), frame.height, len(damaged_lines), damaged_lines)


def parse_segment(data: bytes, *, exact: bool = False) -> tuple[pl.DataFrame, tuple[int, ...]]:
    """The good records of JSONL segment bytes, and the line numbers (from 1) of the damaged ones."""
    # ``exact`` (cache verify) checks every line instead of trusting polars where it parses.
    end = data.rfind(b"\n") + 1
    body, tail = data[:end], data[end:]
    # Bytes after the last newline are a record whose append never finished.
    torn = (body.count(b"\n") + 1,) if tail.strip() else ()
    if not body or body.isspace():
        return pl.DataFrame(schema=CACHE_SCHEMA), torn
    frame = None if exact else _parse_intact(body)
    if frame is not None:
        return with_defaults(frame), torn
    # Some record is bad. Re-read in chunks so that polars still parses the intact ones, and
    # go line by line (exact, but ten times slower) only through a chunk that holds damage.
    frames, bad, start, line = [], [], 0, 0
    while start < len(body):
        stop = body.find(b"\n", min(start + _CHUNK, len(body) - 1)) + 1
        chunk = body[start:stop]
        frame = None if exact else _parse_intact(chunk)
        if frame is None:
            good, numbers = parse_lines(chunk)
            frame = pl.DataFrame(good, schema=CACHE_SCHEMA, orient="row")
            bad += [line + n for n in numbers]
        frames.append(frame)
        line += chunk.count(b"\n")
        start = stop
    return with_defaults(pl.concat(frames)), (*bad, *torn)


def with_defaults(frame: pl.DataFrame) -> pl.DataFrame:
    """Records written before an optional field existed (null there) get its default."""
    return frame.with_columns(pl.col(name).fill_null(default) for name, default in OPTIONAL.items())


def parse_lines(body: bytes) -> tuple[list[tuple[Any, ...]], tuple[int, ...]]:
    """Each line checked on its own: the good records as rows, and the numbers of the bad lines."""
    good: list[tuple[Any, ...]] = []
    bad: list[int] = []
    for number, raw in enumerate(body.split(b"\n"), start=1):
        if not raw.strip():
            continue
        record = _decode(raw)
        if record is None:
            bad.append(number)
        else:
            good.append(tuple(record.get(name) for name in CACHE_SCHEMA))
    return good, tuple(bad)


def good_lines(body: bytes) -> list[bytes]:
    """The raw lines of the good records, as written (for a repair that keeps them byte for byte)."""
    return [raw for raw in body.split(b"\n") if raw.strip() and _decode(raw) is not None]


def report_damage(health: SegmentHealth, *, version: str = "") -> None:
    """Log a damaged segment as one WARNING naming it, once per process for each state of the file."""
    if health.clean:
        return
    with _reported_lock:
        # A run may load the cache more than once (every output, every worker); say it once.
        if (health.location, version) in _reported:
            return
        _reported.add((health.location, version))
    remedy = "their rows will be asked again; `enrich cache verify --repair` rewrites the segment"
    if health.unreadable is not None:
        log.warning("cache segment '%s' could not be read (%s): %s.", health.location, health.unreadable, remedy)
        return
    where = f" (line {line_numbers(health.damaged_lines, 5)})" if health.damaged_lines else ""
    log.warning(
        "cache segment '%s' has %d damaged record(s)%s, skipped; %d good record(s) kept; %s.",
        health.location, health.damaged, where, health.ok, remedy,
    )  # fmt: skip


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    for name in ("key", "text"):
        value = record.get(name)
        if not isinstance(value, str):
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
            return None
    for name in ("seq", "input_tokens", "output_tokens", *OPTIONAL):
        value = record.get(name)
        if value is None and (name == "seq" or name in OPTIONAL):
            continue  # entries written before seq (or an optional field) existed: sorted first, the default
        if not isinstance(value, int) or isinstance(value, bool) or not _INT64[0] <= value < _INT64[1]:
            return None
    return record


def _parse_intact(body: bytes) -> pl.DataFrame | None:
    """polars' parse of JSONL whose every record can serve an answer, or None when some cannot."""
    try:
        frame = pl.read_ndjson(body, schema=CACHE_SCHEMA)
    except pl.exceptions.PolarsError:
        return None
    # polars turns a lone surrogate escape into NUL, and a JSON object or array into a string
    # without complaint. Our writer writes the text as a JSON string, so when it looks converted
    # the raw bytes decide. (A key of the wrong type is harmless here: it matches no lookup.)
    nul = pl.col("text").str.contains("\x00", literal=True)
    if frame.select((pl.any_horizontal(pl.col(REQUIRED).is_null()) | nul).any()).item():
        return None
    text = pl.col("text")
    if frame.select((text.str.starts_with("{") | text.str.starts_with("[")).any()).item():
        if body.count(b'"text": "') != body.count(b"\n"):
            return None
    return frame


def line_numbers(numbers: tuple[int, ...], most: int) -> str:
    """'3, 7, 9, ...': at most ``most`` of the numbers."""
    return ", ".join(map(str, numbers[:most])) + (", ..." if len(numbers) > most else "")
