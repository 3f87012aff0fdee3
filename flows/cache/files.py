"""The persistent response cache: append-only segment files, one per writing process.

Layout: ``<cache dir>/v1/seg-<host>-<pid>-<random>.jsonl``; each line is one answer
``{"seq", "key", "text", "input_tokens", "output_tokens", "cached_input_tokens", "model", "at"}``
(``seq`` is the write time in nanoseconds, which orders entries across segments) keyed by
``transforms.keys.answer_key``; ``cached_input_tokens`` (of the input tokens, those the provider
read from its prompt cache) is optional: records written before it existed load with 0. Why this shape:

* several processes and machines can write at once with no server and no locks: each writes
  only its own file, and a file name is never reused;
* answers are appended and flushed as they arrive, so a run killed with SIGKILL keeps every
  answer it got (resume), and only a torn last line can be lost;
* it works on shared storage (NFS, a mounted bucket) because nothing is ever rewritten.

Damage costs only what is damaged: a segment is read record by record, so a torn last line,
garbage bytes, an undecodable or half-written line, or a zero-length file loses only that
record or file (``flows.cache_check`` reads the records and logs each damaged segment once as
a WARNING naming the file); ``enrich cache verify --repair`` rewrites it.

An entry is never invalid by age: the key covers model, endpoint family, system message,
rendered prompt, temperature, max tokens and output schema, so changing any of them simply
misses. ``--refresh-cache`` ignores existing entries (new answers are appended and win);
deleting the directory empties the cache.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

import polars as pl

from llm_enrich.flows.cache.reading import CACHE_SCHEMA, good_lines, read_segment, report_damage
from llm_enrich.flows.tables.paths import is_remote, sibling
from llm_enrich.schemas.errors import OutputError
from llm_enrich.transforms.outcome import Outcome

__all__ = ["CACHE_SCHEMA", "AnswerStore", "ResponseCache", "default_cache_dir", "open_cache"]


class AnswerStore(Protocol):
    """What the flow needs of a response cache, on a file system or on object storage."""

    written: int

    def load(self) -> pl.DataFrame:
        """Every cached answer, newest entry per key winning."""
        ...

    def append(self, key: str, outcome: Outcome, *, model: str) -> None:
        """Keep one answer."""
        ...

    def flush(self) -> None:
        """Make what was kept so far durable (a partition's answers, before its task returns)."""
        ...

    def close(self) -> None:
        """Make everything kept durable."""
        ...


def open_cache(directory: str, storage: dict[str, str] | None = None) -> AnswerStore:
    """The response cache in a directory, or under an object-store prefix (s3://, gs://, az://)."""
    if is_remote(directory):
        from llm_enrich.flows.cache.objects import ObjectStoreCache

        return ObjectStoreCache(directory, storage)
    return ResponseCache(directory)


def default_cache_dir(destination: str) -> str:
    """Beside the output: <output dir>/.enrich-cache, or <output prefix>/.enrich-cache in a bucket."""
    if is_remote(destination):
        return sibling(destination, ".enrich-cache")
    return str(Path(destination).parent / ".enrich-cache")


class ResponseCache:
    """Read all segments at once; append answers to this process's own segment."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory) / "v1"
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.written = 0

    def segments(self) -> list[Path]:
        """This cache's segment files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob("seg-*.jsonl"):
            try:
                found.append((path.stat().st_mtime, path.name, path))
            except FileNotFoundError:
                continue  # removed by a concurrent `cache verify --repair`
        return [path for *_, path in sorted(found)]

    def load(self) -> pl.DataFrame:
        """Every cached answer, newest entry per key winning; damaged records are skipped and logged."""
        frames = []
        for path in self.segments():
            frame, health = read_segment(path)
            report_damage(health, version=_version(path))
            if frame.height:
                frames.append(frame)
        if not frames:
            return pl.DataFrame(schema=CACHE_SCHEMA)
        # Order by when each entry was written (not by file), so a refreshed answer always wins
        # even while an older writer keeps appending to its own segment.
        merged = pl.concat(frames).sort("seq", nulls_last=False, maintain_order=True)
        return merged.unique("key", keep="last", maintain_order=True)

    def append(self, key: str, outcome: Outcome, *, model: str) -> None:
        """Persist one answer now (flushed to the OS, so it survives the process)."""
        line = json.dumps(
            {
                "seq": time.time_ns(),
                "key": key,
                "text": outcome.text,
                "input_tokens": outcome.input_tokens,
                "output_tokens": outcome.output_tokens,
                "cached_input_tokens": outcome.cached_input_tokens,
                "model": model,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            ensure_ascii=False,
        )
        data = (line + "\n").encode("utf-8")
        with self._lock:
            fd = self._open()
            # Whole lines with O_APPEND: a crash leaves at most a torn last line.
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                # The segment may now end in half a line (disk full, I/O error): never append to
                # it again, or the next record would be glued onto the torn one. The next answer
                # opens a fresh segment.
                self._fd = None
                os.close(fd)
                raise OutputError(
                    f"cannot write the response cache in '{self.directory}': {exc}. "
                    "Free some space, pass `cache_dir` somewhere writable, or `cache` = false."
                ) from exc
            self.written += 1

    def flush(self) -> None:
        """Nothing to do: every answer is written to the OS as it arrives."""

    def close(self) -> None:
        """Flush to disk and close this process's segment."""
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

    def replace_segment(self, path: Path) -> None:
        """Keep only the good records of a segment file, atomically; remove it when none is left."""
        try:
            data = path.read_bytes()
            keep = good_lines(data[: data.rfind(b"\n") + 1])
            if not keep:
                path.unlink(missing_ok=True)
            else:
                # Not named seg-*.jsonl, so no reader ever loads the temporary file.
                temporary = path.with_name(f".{path.name}.repair-{uuid.uuid4().hex[:8]}.tmp")
                try:
                    with temporary.open("wb") as f:
                        f.write(b"\n".join(keep) + b"\n")
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(temporary, path)
                finally:
                    temporary.unlink(missing_ok=True)
            # The rename (or the removal) is durable only once the directory is synced.
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise OutputError(f"cannot rewrite the cache segment '{path}': {exc}.") from exc

    def _open(self) -> int:
        if self._fd is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                # A new name every time: this process never appends to a file that another
                # process (or a crashed earlier write of its own) may have left torn.
                name = f"seg-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
                self._fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot write the response cache in '{self.directory}': {exc}. "
                    "Pass `cache_dir` somewhere writable, or `cache` = false."
                ) from exc
        return self._fd


def _version(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"
