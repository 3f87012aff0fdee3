"""The run's destination: checked whole before the first request, then held under a lock.

``check_destination`` refuses (exit 2, nothing touched, nothing sent) an output that would
overwrite the input (any spelling: ``..``, a symlink, a hard link), names another format, is a
directory, or sits where nothing can be written, and does the same for the staging and cache
locations. ``DestinationLock`` makes runs on one output take turns: the second waits (and then
finds every answer in the cache) or, with ``--no-wait``, refuses. Once the lock is held, debris of
runs that died (staging directories, temp files) is swept, since no live run can own it.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.tables.paths import is_remote
from llm_enrich.flows.tables.writing import rejected_path
from llm_enrich.schemas.errors import DestinationError

__all__ = ["OTHER_FORMATS", "check_destination", "same_location"]

OTHER_FORMATS = {
    ".csv": "CSV",
    ".tsv": "TSV",
    ".txt": "text",
    ".json": "JSON",
    ".ndjson": "NDJSON",
    ".jsonl": "NDJSON",
    ".xlsx": "Excel",
    ".xls": "Excel",
    ".avro": "Avro",
    ".orc": "ORC",
    ".feather": "Arrow IPC",
    ".arrow": "Arrow IPC",
    ".ipc": "Arrow IPC",
}
_PARQUET_MAGIC = b"PAR1"


def check_destination(job: EnrichJob) -> None:
    """Everything about where this run writes, checked before anything is read, sent or written."""
    try:
        _check_destination(job)
    except OSError as exc:
        # A path the checks cannot even look at (a folder without search permission, a broken mount).
        reason = exc.strerror or str(exc)
        raise DestinationError(
            f"cannot look at `output_path` = '{job.destination}' or the folders around it ({reason}: "
            f"'{exc.filename}'). Give a location this user can read and write. Nothing was sent or written."
        ) from exc


def _check_destination(job: EnrichJob) -> None:
    source, dest = job.input_path, job.destination
    if not job.in_place:
        if same_location(source, dest) or _contains(source, dest) or _contains(dest, source):
            raise DestinationError(
                f"`output_path` = '{dest}' is the input '{source}' (or holds it, or is held by it): writing there "
                "would destroy the input. Give another `output_path`, or use `in_place` = true to rewrite a Parquet "
                "input on purpose. Nothing was sent or written."
            )
        suffix = posixpath.splitext(dest.rstrip("/"))[1].lower()
        if suffix in OTHER_FORMATS:
            raise DestinationError(
                f"`output_path` = '{dest}' names a {OTHER_FORMATS[suffix]} file, but the output is always Parquet; "
                f"give a .parquet name instead (for example '{posixpath.splitext(dest)[0]}.parquet'). "
                "Nothing was sent or written."
            )
    if same_location(source, rejected_path(dest)):
        raise DestinationError(
            f"the rejected rows of `output_path` = '{dest}' would be written to '{rejected_path(dest)}', which is "
            "the input. Give another `output_path`. Nothing was sent or written."
        )
    if not is_remote(dest):
        _check_output_file(job, dest)
    if job.staging_dir is not None and not is_remote(job.staging_dir):
        _check_writable_directory(job.staging_dir, "the staging directory (`staging_dir`)", source)
    if job.cache and job.cache_dir is not None and not is_remote(job.cache_dir):
        _check_writable_directory(job.cache_dir, "the cache directory (`cache_dir`)", source)
    elif job.cache and job.cache_dir is None and not is_remote(dest):
        cache = Path(dest).parent / ".enrich-cache"
        if cache.exists() and not cache.is_dir():
            raise DestinationError(
                f"the cache directory '{cache}' beside the output is a file; move it away, or pass `cache_dir` or "
                "`cache` = false. Nothing was sent or written."
            )


def same_location(a: str, b: str) -> bool:
    """True when two paths or URIs name the same file: same spelling after normalising, symlinks, hard links."""
    if is_remote(a) or is_remote(b):
        return is_remote(a) and is_remote(b) and _normal_uri(a) == _normal_uri(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist yet


def _contains(outer: str, inner: str) -> bool:
    """True when ``inner`` lies inside the directory (or prefix) ``outer``."""
    if is_remote(outer) or is_remote(inner):
        if not (is_remote(outer) and is_remote(inner)):
            return False
        return _normal_uri(inner).startswith(_normal_uri(outer) + "/")
    if not Path(outer).is_dir():
        return False
    return os.path.realpath(inner).startswith(os.path.realpath(outer).rstrip(os.sep) + os.sep)


def _normal_uri(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    return f"{scheme.lower()}://{posixpath.normpath(rest.lstrip('/'))}".rstrip("/")


def _check_output_file(job: EnrichJob, dest: str) -> None:
    """The output path is a file we may replace (or a dataset directory), in a directory we can write."""
    path = Path(dest)
    option = "`in_place` input" if job.in_place else "`output_path` ="
    if job.output_partition_by:
        if path.exists() and not path.is_dir():
            raise DestinationError(
                f"{option} '{dest}' is a file, but `output_partition_by` writes a directory of Parquet files; "
                "give a directory path. Nothing was sent or written."
            )
    elif path.is_dir():
        raise DestinationError(
            f"{option} '{dest}' is a directory; give a file name inside it, such as '{path / 'enriched.parquet'}'. "
            "Nothing was sent or written."
        )
    elif path.is_file() and not job.in_place and not _is_parquet(path):
        raise DestinationError(
            f"`output_path` = '{dest}' already exists and is not a Parquet file, so it is not an earlier output of "
            "this tool; replacing it would destroy it. Give another `output_path` or move that file away. "
            "Nothing was sent or written."
        )
    _check_writable_directory(str(path.parent), f"the directory of {option} '{dest}'", job.input_path)


def _check_writable_directory(directory: str, what: str, source: str) -> None:
    """The directory exists or can be created, and a file can be created in it (probed, then removed)."""
    target = Path(directory)
    if same_location(directory, source):
        raise DestinationError(f"{what} '{directory}' is the input file. Nothing was sent or written.")
    probe = target
    while not probe.exists() and probe.parent != probe:  # bounded: one step per path component, up to /
        probe = probe.parent
    if not probe.is_dir():
        raise DestinationError(
            f"{what} '{directory}' cannot be created: '{probe}' is a file, not a directory. "
            "Choose another location. Nothing was sent or written."
        )
    try:
        handle, name = tempfile.mkstemp(dir=probe, prefix=".enrich-probe-")
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DestinationError(
            f"{what} '{directory}' cannot be written: creating a file in '{probe}' failed ({reason}). "
            "Choose a writable location. Nothing was sent or written."
        ) from exc


def _is_parquet(path: Path) -> bool:
    """An existing file that is Parquet (magic bytes at both ends) or empty."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
            if not head:
                return True
            handle.seek(-4, os.SEEK_END)
            return head == _PARQUET_MAGIC and handle.read(4) == _PARQUET_MAGIC
    except OSError:
        return False
