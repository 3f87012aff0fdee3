"""The `enrich` command: typer commands, terminal progress, `enrich show`.

Owns: parsing flags into an ``EnrichJob``, mapping job fields back to flag names in messages,
exit codes, and what a terminal shows. May import every other part of ``flows``; nothing
imports it (the CLI is a thin layer over the flow).
"""

import os
import signal
import threading
from types import FrameType


def _interrupted_while_importing(number: int, frame: FrameType | None) -> None:
    """Ctrl-C in the second the command spends importing: the same quiet exit as later, no traceback."""
    os.write(2, b"\ninterrupted before the run started; nothing was sent or written.\n")
    os._exit(128 + number)  # nothing has started yet that would need stopping


_MAIN = threading.current_thread() is threading.main_thread()
_previous = signal.signal(signal.SIGINT, _interrupted_while_importing) if _MAIN else None

from llm_enrich.flows.cli import batches as _batches  # noqa: E402, F401 - registers `batch cancel`
from llm_enrich.flows.cli import deployments as _deployments  # noqa: E402, F401 - registers `serve` and `deploy`
from llm_enrich.flows.cli import inspect as _inspect  # noqa: E402, F401 - registers `show` and `cache verify`
from llm_enrich.flows.cli.app import app  # noqa: E402

if _MAIN:
    signal.signal(signal.SIGINT, _previous if _previous is not None else signal.default_int_handler)

__all__ = ["app"]
