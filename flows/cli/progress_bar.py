"""The rich progress bar the CLI shows on a terminal."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from llm_enrich.flows.cli.wording import as_flags

__all__ = ["RichProgress"]


class RichProgress:
    """A ProgressSink drawing rows done/total, rows per second, failures and ETA."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._lock = threading.Lock()
        self._failed = 0
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("starting", total=None, rate="", failed=0)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def notice(self, text: str) -> None:
        """Print a notice above the bar (job fields named as their flags)."""
        self._progress.console.print(f"[yellow]{escape(as_flags(text))}[/]", highlight=False)

    def start(self, total_rows: int) -> None:
        """Set the total once the valid rows are known."""
        self._progress.update(self._task, description="enriching", total=total_rows, completed=0)

    def advance(self, ok: int, failed: int) -> None:
        """Count finished rows."""
        with self._lock:
            self._failed += failed
            self._progress.advance(self._task, ok + failed)
            speed = self._progress.tasks[0].speed
            self._progress.update(self._task, failed=self._failed, rate=f"{speed:.1f} rows/s" if speed else "")
