"""The response cache on object storage (s3://, gs://, az://): immutable Parquet segment objects.

An object store cannot append, so each process buffers its answers and writes them as a new
object ``<prefix>/v1/seg-<host>-<pid>-<random>-<n>.parquet`` every ``flush_every`` answers or
``flush_seconds`` seconds (whichever comes first) and when it closes. Objects are never
rewritten, so any number of processes and machines can share one prefix. Compared with the
file-system cache, a process killed with SIGKILL loses the answers of its last unflushed
batch (at most ``flush_every`` answers or ``flush_seconds`` seconds of them); a rerun asks for
those again.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import polars as pl

from flows.cache import CACHE_SCHEMA as _SCHEMA
from schemas.errors import OutputError
from transforms.calls import Outcome

__all__ = ["ObjectStoreCache"]


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
        """Every cached answer, newest entry per key winning."""
        try:
            merged = pl.scan_parquet(f"{self.prefix}/seg-*.parquet", storage_options=self.storage).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            if "expanded paths were empty" in str(exc) or "not found" in str(exc).lower():
                return pl.DataFrame(schema=_SCHEMA)
            raise OutputError(
                f"cannot read the response cache at '{self.prefix}': {exc}. Check the credentials "
                "(environment or --storage-option), pass another --cache-dir, or --no-cache."
            ) from exc
        merged = merged.select(list(_SCHEMA)).sort("seq", maintain_order=True)
        return merged.unique("key", keep="last", maintain_order=True)

    def append(self, key: str, outcome: Outcome, *, model: str) -> None:
        """Buffer one answer; write a segment object when the batch is full or old enough."""
        row = {
            "seq": time.time_ns(),
            "key": key,
            "text": outcome.text,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
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

    def _flush(self) -> None:
        self._last = time.monotonic()
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        self._segments += 1
        target = f"{self.prefix}/{self._name}-{self._segments:06d}.parquet"
        try:
            pl.DataFrame(rows, schema=_SCHEMA).write_parquet(target, storage_options=self.storage)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise OutputError(
                f"cannot write the response cache at '{target}': {exc}. Pass --cache-dir somewhere "
                "writable, or --no-cache."
            ) from exc
