"""The response cache on object storage (s3://, gs://, az://): immutable Parquet segment objects.

An object store cannot append, so each process buffers its answers and writes them as a new
object ``<prefix>/v1/seg-<host>-<pid>-<random>-<n>.parquet`` every ``flush_every`` answers or
``flush_seconds`` seconds (whichever comes first) and when it closes. Objects are never
rewritten, so any number of processes and machines can share one prefix. Compared with the
file-system cache, a process killed with SIGKILL loses the answers of its last unflushed
batch (at most ``flush_every`` answers or ``flush_seconds`` seconds of them); a rerun asks for
those again.

A zero-length or corrupt object costs only its own answers, and a record without a key, text
or token counts only itself: loading reads object by object when the one-scan fast path
fails, and logs each damaged object once as a WARNING naming it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase
from typing import Any

import polars as pl

from llm_enrich.flows.cache.reading import CACHE_SCHEMA as _SCHEMA
from llm_enrich.flows.cache.reading import OPTIONAL, REQUIRED, SegmentHealth, report_damage, with_defaults
from llm_enrich.flows.tables.paths import open_store
from llm_enrich.schemas.errors import OutputError
from llm_enrich.transforms.outcome import Outcome

__all__ = ["ObjectStoreCache", "parse_parquet"]

# object_store client settings (not credentials or endpoints), which obstore takes apart
# (the same split as flows/tables/staging.py).
_READERS = 8  # objects fetched at once when reading object by object
# polars panics (rather than raising) on some corrupt Parquet footers and pages.
_UNREADABLE = (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError)


class ObjectStoreCache:
    """Read every segment object at once; buffer this process's answers into new segment objects."""

    def __init__(
        self, prefix: str, storage: dict[str, str] | None = None, *, flush_every: int = 256, flush_seconds: float = 5.0
    ) -> None:
        self.prefix = f"{prefix.rstrip('/')}/v1"
        self.storage = storage
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.written = 0
        self._rows: list[dict[str, Any]] = []
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._name = f"seg-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._segments = 0

    def load(self) -> pl.DataFrame:
        """Every cached answer, newest entry per key winning; damaged objects are skipped and logged.

        Objects are fetched one by one (in parallel) and each one's bytes are checked against the
        checksum in its name before polars parses them: a flipped bit in a bucket must cost that
        object, not feed polars a page it could misread or crash on.
        """
        listed = self.segments()
        frames = []
        for (_, version), (frame, health) in zip(listed, self._read_all([n for n, _ in listed]), strict=True):
            report_damage(health, version=version)
            frames.append(frame)
        merged = pl.concat(frames) if frames else pl.DataFrame(schema=_SCHEMA)
        merged = merged.sort("seq", nulls_last=False, maintain_order=True)
        return merged.unique("key", keep="last", maintain_order=True)

    def segments(self) -> list[tuple[str, str]]:
        """This cache's segment objects as (name under the prefix, version), oldest first."""
        import obstore

        try:
            found = [meta for batch in obstore.list(self._store(), chunk_size=1_000) for meta in batch]
        except Exception as exc:  # obstore's errors have no common base besides Exception
            raise OutputError(
                f"cannot read the response cache at '{self.prefix}': {exc}. Check the credentials "
                "(environment or `storage_options`), pass another `cache_dir`, or `cache` = false."
            ) from exc
        found = [m for m in found if "/" not in m["path"] and fnmatchcase(m["path"], "seg-*.parquet")]
        found.sort(key=lambda m: (m["last_modified"], m["path"]))
        return [(m["path"], f"{m['size']}:{m.get('e_tag') or m['last_modified']}") for m in found]

    def read_segment(self, name: str) -> tuple[pl.DataFrame, SegmentHealth]:
        """The good records of one segment object and what was lost; never raises for a damaged object."""
        import obstore

        location = f"{self.prefix}/{name}"
        try:
            data = bytes(obstore.get(self._store(), name).bytes())
        except FileNotFoundError:
            return pl.DataFrame(schema=_SCHEMA), SegmentHealth(location)  # removed since it was listed
        except Exception as exc:  # noqa: BLE001 - one object that cannot be fetched costs only its answers
            return pl.DataFrame(schema=_SCHEMA), SegmentHealth(location, unreadable=f"cannot fetch it: {exc}")
        expected = _CHECKSUM.search(name)
        if expected is not None and _checksum(data) != expected.group(1):
            why = "its bytes do not match the checksum in its name (damaged in storage)"
            return pl.DataFrame(schema=_SCHEMA), SegmentHealth(location, unreadable=why)
        return parse_parquet(data, location)

    def replace_segment(self, name: str, frame: pl.DataFrame) -> str | None:
        """Write ``frame`` as a new segment object, then delete ``name``; returns the new name (None if empty)."""
        import obstore

        store = self._store()
        new = None
        try:
            # New object first, then the delete: a crash in between leaves the good records twice
            # (harmless, same answers), never zero times.
            if frame.height:
                data = _segment_bytes(frame.select(list(_SCHEMA)))
                tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
                new = f"seg-{tag}-repaired-{_checksum(data)}.parquet"
                obstore.put(store, new, data)
            obstore.delete(store, name)
        except Exception as exc:
            raise OutputError(f"cannot rewrite the cache segment '{self.prefix}/{name}': {exc}.") from exc
        return new

    def append(self, key: str, outcome: Outcome, *, model: str) -> None:
        """Buffer one answer; write a segment object when the batch is full or old enough."""
        row = {
            "seq": time.time_ns(),
            "key": key,
            "text": outcome.text,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "cached_input_tokens": outcome.cached_input_tokens,
        }
        with self._lock:
            self._rows.append(row)
            self.written += 1
            if len(self._rows) >= self.flush_every or time.monotonic() - self._last >= self.flush_seconds:
                self._flush()

    def flush(self) -> None:
        """Write what is buffered as one segment object."""
        with self._lock:
            self._flush()

    def close(self) -> None:
        """Write what is buffered."""
        with self._lock:
            self._flush()

    def _read_all(self, names: list[str]) -> list[tuple[pl.DataFrame, SegmentHealth]]:
        with ThreadPoolExecutor(max_workers=_READERS) as pool:
            return list(pool.map(self.read_segment, names))

    def _store(self) -> Any:
        return open_store(self.prefix, self.storage)

    def _flush(self) -> None:
        self._last = time.monotonic()
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        self._segments += 1
        data = _segment_bytes(pl.DataFrame(rows, schema=_SCHEMA))
        name = f"{self._name}-{self._segments:06d}-{_checksum(data)}.parquet"
        target = f"{self.prefix}/{name}"
        try:
            import obstore

            obstore.put(self._store(), name, data)
        except Exception as exc:
            raise OutputError(
                f"cannot write the response cache at '{target}': {exc}. Pass `cache_dir` somewhere "
                "writable, or `cache` = false."
            ) from exc


def parse_parquet(data: bytes, location: str) -> tuple[pl.DataFrame, SegmentHealth]:
    """The good records of one Parquet segment's bytes and what was lost."""
    empty = pl.DataFrame(schema=_SCHEMA)
    if not data:
        return empty, SegmentHealth(location, unreadable="empty object")
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except _UNREADABLE as exc:
        return empty, SegmentHealth(location, unreadable=f"not a readable Parquet file: {_first_line(exc)}")
    missing = [name for name in REQUIRED if name not in frame.columns]
    if missing:
        return empty, SegmentHealth(location, unreadable=f"not a cache segment: no column {', '.join(missing)}")
    # Segments written before seq (or an optional field) existed lack the column: null, then the default.
    frame = frame.with_columns(pl.lit(None, pl.Int64).alias(n) for n in ("seq", *OPTIONAL) if n not in frame.columns)
    # A value of the wrong type becomes null and costs only its record (an optional field's too).
    typed = {name: pl.col(name).cast(dtype, strict=False) for name, dtype in _SCHEMA.items()}
    mistyped = pl.any_horizontal(pl.col(n).is_not_null() & typed[n].is_null() for n in OPTIONAL)
    holes = frame.select(pl.any_horizontal(typed[n].is_null() for n in REQUIRED) | mistyped).to_series()
    good = with_defaults(frame.select(typed.values()).filter(~holes))
    return good, SegmentHealth(location, ok=good.height, damaged=frame.height - good.height)


_CHECKSUM = re.compile(r"-([0-9a-f]{16})\.parquet$")


def _checksum(data: bytes) -> str:
    """The first 16 hex digits of the bytes' SHA-256: in a segment's name, checked on every read."""
    return hashlib.sha256(data).hexdigest()[:16]


def _segment_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
