"""One run at a time per output in object storage (s3://, gs://, az://): a lease object with an expiry.

An object store has no OS lock, and a holder that dies cannot release anything, so the lock is
an object ``.<name>.lock`` beside the output holding who holds it and until when. It is created
with a conditional put (If-None-Match), renewed every ``LEASE_SECONDS / 3`` by a background
thread while the run holds it, and deleted at the end. A lease that was not renewed in time
belongs to a dead run: it is replaced conditionally on its e_tag (If-Match), so of two runs
taking it over only one wins. A store without conditional writes gets a best-effort lease
(write, then read back), with a warning that two runs starting together may both proceed.

Expiry is judged on two clocks so that skew cannot block forever: the holder's ``expires_at``
(wall clock) and, as a backstop, a lease whose e_tag this run saw unchanged for longer than
its lease. A taker whose clock runs ahead of the holder's by more than two thirds of the lease
could take over a live lease; keep the machines' clocks synchronised (NTP).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from llm_enrich.flows.tables.paths import open_store, sibling
from llm_enrich.schemas.errors import DestinationBusy, DestinationError, EnrichError, OutputError

__all__ = ["LEASE_SECONDS", "POLL_SECONDS", "hold_lease", "lease_location"]

LEASE_SECONDS = 60.0
POLL_SECONDS = 1.0  # each poll is a request to the store: slower than the local lock's
# object_store client settings (not credentials or endpoints), which obstore takes apart
# (the same split as flows/tables/staging.py and flows/cache/objects.py).
# What obstore raises when the store (or how it is configured) has no conditional put.
_UNSUPPORTED: tuple[type[BaseException], ...] = (NotImplementedError,)

log = logging.getLogger(__name__)


def lease_location(destination: str) -> str:
    """The lease object of a remote output: ``.<name>.lock`` beside it."""
    name = PurePosixPath(destination.rstrip("/")).name
    return sibling(destination.rstrip("/"), f".{name}.lock")


@dataclass(frozen=True)
class _Seen:
    """A lease object as read: its holder's record and the version to replace it conditionally."""

    info: dict[str, Any]
    e_tag: str | None
    version: str | None
    modified: float  # the store's last-modified time, seconds since the epoch

    def length(self, default: float) -> float:
        """The holder's lease length in seconds (``default`` when its record does not say)."""
        value = self.info.get("lease_seconds")
        return float(value) if isinstance(value, int | float) and value > 0 else default

    def expires(self, default: float) -> float:
        """When the holder's lease runs out (wall clock); an unreadable record counts from its last write."""
        value = self.info.get("expires_at")
        return float(value) if isinstance(value, int | float) else self.modified + self.length(default)

    def describe(self) -> str:
        """The holder, in the words of the local lock's messages."""
        info = self.info
        if {"pid", "host", "since"} <= info.keys():
            return f"pid {info['pid']} on {info['host']}, started {info['since']}"
        return "a run that is starting"


class _Lease:
    """One run's hold on a lease object: take it, renew it in the background, give it back."""

    def __init__(self, store: Any, name: str, location: str, lease_seconds: float) -> None:
        self.store, self.name, self.location, self.lease_seconds = store, name, location, lease_seconds
        self.holder = uuid.uuid4().hex
        self.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.mode: dict[str, str] | None = None  # the e_tag (and version) of our last write
        self.conditional = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> bytes:
        """This run's record, valid for one lease from now."""
        info = {
            "holder": self.holder, "pid": os.getpid(), "host": socket.gethostname(), "since": self.since,
            "expires_at": time.time() + self.lease_seconds, "lease_seconds": self.lease_seconds,
        }  # fmt: skip
        return json.dumps(info).encode()

    def try_create(self) -> bool:
        """Create the lease object if there is none; False when another run's is there."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        if not self.conditional:
            return self._best_effort(None)
        try:
            self._wrote(obstore.put(self.store, self.name, self.record(), mode="create"))
            return True
        except (AlreadyExistsError, PreconditionError):
            return False
        except _UNSUPPORTED:
            self.conditional = False
            log.warning(
                "the store holding '%s' does not support conditional writes: the lease is best effort, and two "
                "runs starting within the same moment may both proceed (and pay twice)", self.location,
            )  # fmt: skip
            return self._best_effort(None)

    def try_take_over(self, seen: _Seen) -> bool:
        """Replace an expired lease, only if nobody renewed or took it since it was read."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        if not self.conditional or seen.e_tag is None:
            return self._best_effort(seen)
        try:
            self._wrote(obstore.put(self.store, self.name, self.record(), mode=_version(seen.e_tag, seen.version)))  # type: ignore[arg-type]
            return True
        except (PreconditionError, AlreadyExistsError, NotFoundError):
            return False

    def read(self) -> _Seen | None:
        """The lease object now, or None when there is none."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            got = obstore.get(self.store, self.name)
            data = bytes(got.bytes())
        except (FileNotFoundError, NotFoundError):
            return None
        try:
            info = json.loads(data)
            info = info if isinstance(info, dict) else {}
        except ValueError:
            info = {}  # a torn or foreign object: it expires a lease after its last write
        meta = got.meta
        return _Seen(info, meta.get("e_tag"), meta.get("version"), meta["last_modified"].timestamp())

    def start_renewing(self) -> None:
        """Renew the lease every third of its length until released."""
        self._thread = threading.Thread(target=self._renew_loop, name="enrich-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease object, unless another run has taken it over."""
        import obstore

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # one renewal in flight at most; never hang the run's end
        seen = self.read()
        if seen is None or seen.info.get("holder") != self.holder:
            return
        try:
            obstore.delete(self.store, self.name)
        except Exception:  # noqa: BLE001 - an undeleted lease only expires; never mask the run's outcome
            log.warning("could not delete the lease '%s'; it expires in %g s", self.location, self.lease_seconds)

    def _renew_loop(self) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        # Ends when the lease is released (the stop event); each put is bounded by obstore's client timeout.
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                if self.conditional and self.mode is not None:
                    self._wrote(obstore.put(self.store, self.name, self.record(), mode=self.mode))  # type: ignore[arg-type]
                else:
                    obstore.put(self.store, self.name, self.record())
            except (PreconditionError, AlreadyExistsError, NotFoundError):
                # Another run judged us dead (a pause longer than the lease) and took the output.
                log.error(
                    "another run took over the lease '%s' (this run was not heard from for %g s); two runs may now "
                    "write the output", self.location, self.lease_seconds,
                )  # fmt: skip
                return
            except Exception as exc:  # noqa: BLE001 - a blip in the network: the next renewal may succeed
                log.warning("could not renew the lease '%s' (%s); retrying", self.location, exc)

    def _wrote(self, result: Any) -> None:
        self.mode = _version(result.get("e_tag"), result.get("version")) if result.get("e_tag") else None

    def _best_effort(self, seen: _Seen | None) -> bool:
        """Without conditional writes: write, then read back; the last writer holds it."""
        import obstore

        current = self.read()
        if current is not None and (seen is None or current.e_tag != seen.e_tag):
            return False
        obstore.put(self.store, self.name, self.record())
        back = self.read()
        return back is not None and back.info.get("holder") == self.holder


def _version(e_tag: str | None, version: str | None) -> dict[str, str]:
    mode = {"e_tag": e_tag} if e_tag else {}
    if version:  # GCS matches on the object's generation
        mode["version"] = version
    return mode


@contextmanager
def hold_lease(
    destination: str,
    *,
    wait: bool,
    timeout: float,
    on_wait: Callable[[str], None],
    check_stop: Callable[[], None],
    storage: dict[str, str] | None = None,
    lease_seconds: float = LEASE_SECONDS,
) -> Iterator[None]:
    """Hold the remote output's lease for the block; wait for another holder (bounded) or refuse."""
    location = lease_location(destination)
    folder, _, name = location.rpartition("/")
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    try:
        lease = _Lease(open_store(folder, storage), name, location, lease_seconds)
        _acquire(lease, destination, wait=wait, timeout=timeout, on_wait=on_wait, check_stop=check_stop)
    except EnrichError:
        raise  # busy, or a stop that came while waiting
    except Exception as exc:  # obstore's errors have no common base besides Exception
        kind = DestinationError if isinstance(exc, PermissionDeniedError | UnauthenticatedError) else OutputError
        raise kind(
            f"cannot take the lease '{location}' that keeps two runs off '{destination}': {exc}. Check the "
            "credentials and that the bucket is writable (environment or `storage_options`)."
        ) from exc
    lease.start_renewing()
    try:
        yield
    finally:
        lease.release()


def _acquire(
    lease: _Lease,
    destination: str,
    *,
    wait: bool,
    timeout: float,
    on_wait: Callable[[str], None],
    check_stop: Callable[[], None],
) -> None:
    deadline = time.monotonic() + timeout
    told = False
    first_seen: dict[str | None, float] = {}  # e_tag -> when this run first saw it (monotonic)
    while True:  # bounded: past the deadline a pass returns or raises DestinationBusy
        if lease.try_create():
            return
        seen = lease.read()
        if seen is None and time.monotonic() < deadline:
            continue  # released between our create and our read: try again at once
        seen = seen or _Seen({}, None, None, time.time())
        length = seen.length(lease.lease_seconds)
        observed = time.monotonic() - first_seen.setdefault(seen.e_tag, time.monotonic())
        expired = seen.e_tag is not None and (seen.expires(length) < time.time() or observed > length)
        if expired and lease.try_take_over(seen):
            log.warning(
                "took over the lease of a run that stopped renewing it (%s) on '%s'", seen.describe(), destination
            )
            return
        holder = seen.describe()
        if not wait:
            raise DestinationBusy(
                f"another run ({holder}) is writing '{destination}' right now. Rerun with `wait` = true to wait "
                "for it (this run then pays only for what it did not already answer), or give another `output_path`."
            )
        if time.monotonic() >= deadline:
            raise DestinationBusy(
                f"waited {timeout:g} s for another run ({holder}) writing '{destination}' to finish; it still "
                "holds the output. Try again later or raise `wait_timeout`."
            )
        if not told:
            on_wait(f"waiting for another run ({holder}) that is writing '{destination}' (at most {timeout:g} s)")
            told = True
        check_stop()
        time.sleep(min(POLL_SECONDS, lease.lease_seconds / 3, max(deadline - time.monotonic(), 0.0)))
