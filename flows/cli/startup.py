"""The command's first second: a Ctrl-C or SIGTERM while it imports and parses exits quietly, nothing started."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["NOTHING_STARTED", "hold_signals_while_starting", "release_signals"]

NOTHING_STARTED = "interrupted before the run started; nothing was sent or written."
"""What an interrupt before the run says, from the first import on (and its exit code is 128 + the signal)."""
_NOTHING_STARTED_LINE = f"\n{NOTHING_STARTED}\n".encode()  # encoded now: the handler only writes it

_EARLY = (signal.SIGINT, signal.SIGTERM)
_previous: dict[int, Any] = {}  # what signal.signal returned: a handler, SIG_DFL/SIG_IGN or None


def _interrupted_while_starting(number: int, frame: FrameType | None) -> None:
    """The same one line a later interrupt before the run prints, and its exit code; no traceback."""
    os.write(2, _NOTHING_STARTED_LINE)
    os._exit(128 + number)  # nothing has started yet that would need stopping


def hold_signals_while_starting() -> None:
    """From the first import until a command begins, a signal ends the process at once and quietly.

    Only in the `enrich` command itself: a program that imports the CLI's modules keeps its own handlers.
    """
    command = Path(sys.argv[0]).name == "enrich" or "llm_enrich.flows.cli" in getattr(sys, "orig_argv", [])
    if command and threading.current_thread() is threading.main_thread():
        for number in _EARLY:
            _previous[number] = signal.signal(number, _interrupted_while_starting)


def release_signals() -> None:
    """A command begins: the signals go back to Python's own handling (each command takes them from there)."""
    if threading.current_thread() is threading.main_thread():
        for number, handler in list(_previous.items()):
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        _previous.clear()
