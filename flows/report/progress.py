"""Where the flow reports progress: the CLI's rich bar when it runs the flow, else nowhere."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["ProgressSink", "current_sink", "reporting_to"]


class ProgressSink(Protocol):
    """Receives progress from a run in this process."""

    def notice(self, text: str) -> None:
        """Show a message the user should read (e.g. that the local model is in use)."""

    def start(self, total_rows: int) -> None:
        """The run is about to ask for this many rows."""

    def advance(self, ok: int, failed: int) -> None:
        """So many more rows finished, answered or failed."""


class _Silent:
    def notice(self, text: str) -> None:
        pass

    def start(self, total_rows: int) -> None:
        pass

    def advance(self, ok: int, failed: int) -> None:
        pass


_sink: ProgressSink = _Silent()


def current_sink() -> ProgressSink:
    """The sink installed by the caller (a no-op one by default)."""
    return _sink


@contextmanager
def reporting_to(sink: ProgressSink) -> Iterator[None]:
    """Send progress of runs in this process to ``sink`` while the block runs."""
    global _sink
    previous, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = previous
