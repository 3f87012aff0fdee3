"""What stops a run early on purpose: a stop request, and too many failed rows.

``StopSignal`` is set once (a signal, a cancel, a fatal failure, too many errors); every call
checks it before sending. ``ErrorRate`` watches the share of failed rows among those answered so
far and sets the stop when a broken prompt or a refusing model would otherwise be paid for on
every row.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from llm_enrich.schemas.errors import EndpointRejected, EnrichError, RunAborted, RunInterrupted

__all__ = ["ErrorRate", "StopSignal", "error_kind"]


class StopSignal:
    """Set once (a signal, a cancel, a fatal failure, too many errors); every call checks it before sending.

    Callbacks registered with ``on_set`` run in the thread that sets it, so the flow can
    drain and cancel work on its event loop.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.signal_number: int | None = None
        self.error: type[EnrichError] | None = None
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def is_set(self) -> bool:
        """True once a stop was requested."""
        return self._event.is_set()

    def set(
        self,
        reason: str,
        *,
        signal_number: int | None = None,
        fatal: bool = False,
        error: type[EnrichError] | None = None,
    ) -> bool:
        """Request a stop; only the first request counts. True if this call set it."""
        with self._lock:
            if self._event.is_set():
                return False
            self.reason, self.signal_number = reason, signal_number
            self.error = error or (EndpointRejected if fatal else None)
            self._event.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()
        return True

    def check(self) -> None:
        """Raise once a stop was requested: its own error (fatal answer, error rate), else RunInterrupted."""
        if not self._event.is_set():
            return
        if self.error is not None:
            raise self.error(self.reason or "the run was stopped")
        raise RunInterrupted(self.reason or "stopped", signal_number=self.signal_number)

    def on_set(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the stop is requested (at once if it already was)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


def error_kind(message: str) -> str:
    """A row error without what varies between rows (attempt counts), to group errors by kind."""
    return re.sub(r"\s*\(after \d+ attempts?\)$", "", message).strip()


@dataclass
class ErrorRate:
    """Stops the run once more than ``limit`` of the rows answered so far failed (after ``minimum`` rows)."""

    limit: float = 1.0
    minimum: int = 50
    rows: int = 0
    failed: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, rows: int, error: str | None, stop: StopSignal) -> None:
        """Count ``rows`` rows with one outcome; set ``stop`` when the share of failures passes the limit."""
        if self.limit >= 1.0 or (error is not None and error.startswith("not sent:")):
            return  # off, or a budget refusal: nothing was asked, nothing failed at the model
        with self._lock:
            self.rows += rows
            if error is not None:
                self.failed += rows
                self.kinds[error_kind(error)] += rows
            if self.rows < self.minimum or self.failed <= self.limit * self.rows:
                return
            kind, count = self.kinds.most_common(1)[0]
            message = (
                f"{self.failed:,} of {self.rows:,} rows failed, more than max_error_rate ({self.limit:g}) allows; "
                f"the most common error ({count:,} rows): {kind}. Nothing more was sent: fix the prompt or the "
                "model and rerun (the answers so far are kept in the cache), or raise `max_error_rate` "
                "(1 turns the check off)."
            )
        stop.set(message, error=RunAborted)
