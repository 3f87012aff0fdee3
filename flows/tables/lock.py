"""One run at a time per output: an OS lock beside a local output, a lease object in a bucket.

Two runs on one output (two schedules, a manual run during the nightly one) would both pay
for every prompt. The second run waits for the first (then finds its answers in the cache and
pays nothing) or, with ``--no-wait``, refuses naming the other run. Every wait is bounded
(``--wait-timeout``). A holder that dies releases an OS lock at once; a lease in object storage
expires ``LEASE_SECONDS`` after its last renewal. Once the lock is held, debris of dead runs
(staging directories, temp files, a dataset swap cut in half) is swept: no live run owns it.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_enrich.schemas.errors import DestinationBusy

__all__ = ["POLL_SECONDS", "hold_lock", "lock_path", "staging_tag", "sweep_debris"]

POLL_SECONDS = 0.5


def lock_path(destination: str) -> Path:
    """The lock file of a local output: ``.<name>.lock`` beside it (removed when released)."""
    dest = Path(destination.rstrip("/"))
    return dest.with_name(f".{dest.name}.lock")


def staging_tag(destination: str) -> str:
    """A short fingerprint of the output, so a shared --staging-dir tells runs' staging apart."""
    return hashlib.sha256(os.path.realpath(destination).encode()).hexdigest()[:8]


@contextmanager
def hold_lock(
    destination: str,
    *,
    wait: bool,
    timeout: float,
    on_wait: Callable[[str], None],
    check_stop: Callable[[], None],
) -> Iterator[None]:
    """Hold the output's lock for the block; wait for another holder (bounded) or refuse."""
    path = lock_path(destination)
    created = _missing_folders(path.parent)
    deadline = time.monotonic() + timeout
    told = False
    while True:  # bounded: the deadline below raises, and every pass sleeps POLL_SECONDS
        # Made on every pass: a holder whose run wrote nothing removes the empty folders it made.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if not wait:
                raise DestinationBusy(
                    f"another run ({holder}) is writing '{destination}' right now. Rerun with `wait` = true to wait "
                    "for it (this run then pays only for what it did not already answer), or give another "
                    "`output_path`."
                ) from None
            if time.monotonic() >= deadline:
                raise DestinationBusy(
                    f"waited {timeout:g} s for another run ({holder}) writing '{destination}' to finish; it still "
                    "holds the output. Try again later or raise `wait_timeout`."
                ) from None
            if not told:
                on_wait(f"waiting for another run ({holder}) that is writing '{destination}' (at most {timeout:g} s)")
                told = True
            check_stop()
            time.sleep(POLL_SECONDS)
            continue
        # A holder that finished removed the file it locked; locking a removed file proves nothing.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        _write_holder(fd)
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)
        # A run that wrote nothing (bad input, a stop) leaves no empty folders it made for the output.
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the output (or the cache) is in it, and so in every folder above


def _missing_folders(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``folder``, deepest first."""
    missing: list[Path] = []
    while not folder.exists() and folder.parent != folder:  # bounded: one step per path component
        missing.append(folder)
        folder = folder.parent
    return missing


def sweep_debris(destination: str, staging_dir: str | None) -> list[str]:
    """Remove what runs that died left for this output (call with the lock held); the names removed."""
    dest = Path(destination.rstrip("/"))
    name = glob.escape(dest.name)  # the patterns below match this output's own debris, whatever its name holds
    removed: list[str] = []
    parent = dest.parent
    patterns = [f".{name}.staging-*", f".{name}.*.tmp"]
    bases = [(parent, patterns)]
    if staging_dir is not None:
        bases.append((Path(staging_dir), [f".{name}.staging-{staging_tag(destination)}-*"]))
    old_datasets = sorted(parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime) if parent.is_dir() else []
    if old_datasets and not dest.exists():
        # A dataset swap was cut between its two renames: the old dataset goes back in place.
        os.replace(old_datasets.pop(), dest)
    for base, globs in bases:
        if not base.is_dir():
            continue
        for pattern in globs:
            for leftover in base.glob(pattern):
                _remove(leftover)
                removed.append(str(leftover))
    for leftover in old_datasets:
        _remove(leftover)
        removed.append(str(leftover))
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is starting"
