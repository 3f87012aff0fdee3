"""Look at an enriched output: its provenance, its first or failed rows, and its errors grouped by kind.

Everything is read lazily (a scan, then a filter and a head), so showing 20 rows of a
20-million-row output reads 20 rows, not the file.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import polars as pl
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from llm_enrich.flows.cli.wording import as_flags
from llm_enrich.flows.tables.paths import is_remote, literal_path, suffix_of
from llm_enrich.flows.tables.provenance import read_provenance
from llm_enrich.flows.tables.reading import scan_table
from llm_enrich.schemas.enriched import ERROR_COLUMN, KEY_COLUMN
from llm_enrich.schemas.errors import InputError

__all__ = ["EnrichedOutput", "error_kind", "open_output", "print_rows", "render_rows", "write_ndjson"]

# The footer fields worth showing; anything else in it (or added later) stays out of sight.
_SHOWN_FIELDS = ("model", "endpoint", "prompt", "system", "output_column", "temperature", "max_tokens", "written_at")
_BOOKKEEPING = re.compile(r"^enrich_")
_ERROR = re.compile(rf"^{ERROR_COLUMN}(_.+)?$")
_ATTEMPTS = re.compile(r"\s*\(after \d+ attempts?\)\s*$")
_STATUS = re.compile(r"^(HTTP \d{3})\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class EnrichedOutput:
    """An enriched output opened lazily: where it is, its scan, its columns and its footer."""

    path: str
    scan: pl.LazyFrame
    columns: list[str]
    provenance: dict[str, Any] | None

    @property
    def error_columns(self) -> list[str]:
        """The per-output error columns (``enrich_error``, ``enrich_error_<column>``)."""
        return [c for c in self.columns if _ERROR.match(c)]

    def pick(self, wanted: list[str] | None, *, failed: bool) -> list[str]:
        """The columns to show: the ones asked for (plus the errors with --failed), or a readable default."""
        if wanted:
            missing = [c for c in wanted if c not in self.columns]
            if missing:
                raise InputError(
                    f"column '{missing[0]}' is not in '{self.path}'; it has: {', '.join(self.columns)}. Fix --columns."
                )
            extra = [c for c in self.error_columns if c not in wanted] if failed else []
            return [*dict.fromkeys(wanted), *extra]
        errors = set(self.error_columns)
        # Keys, token counts and flags are for machines; they would squeeze the answers out of a terminal.
        hidden = {c for c in self.columns if _BOOKKEEPING.match(c) and c not in errors}
        if not failed:
            return [c for c in self.columns if c not in hidden]
        listed = self.provenance.get("columns") if self.provenance else None
        added = {str(c) for c in listed} if isinstance(listed, list) else set()
        # A failed row's answers are null: show what identifies the row, then why it failed.
        return [c for c in self.columns if c in errors or (c not in hidden and c not in added)]

    def failed_filter(self) -> pl.Expr:
        """True for a row with an error in any output."""
        if not self.error_columns:
            return pl.lit(False)
        return pl.any_horizontal(pl.col(c).is_not_null() for c in self.error_columns)

    def rows(self, columns: list[str], *, limit: int, failed: bool) -> pl.LazyFrame:
        """The rows to show, still lazy: the first ``limit`` (0: all), only failed ones with ``failed``."""
        scan = self.scan.filter(self.failed_filter()) if failed else self.scan
        scan = scan.select(columns)
        return scan.head(limit) if limit else scan

    def height(self) -> int:
        """The number of rows (from the Parquet metadata, not the data)."""
        return int(_collect(self.path, self.scan.select(pl.len())).item())

    def error_kinds(self) -> Counter[str]:
        """Failed outputs counted per error kind (prefixed by the output when there are several)."""
        if not self.error_columns:
            return Counter()
        several = len(self.error_columns) > 1
        counts: Counter[str] = Counter()
        for column in self.error_columns:
            # Counted per distinct message in polars, so only the distinct messages reach Python.
            grouped = _collect(self.path, self.scan.select(column).drop_nulls().group_by(column).len())
            label = f"{self._output_of(column)}: " if several else ""
            for message, count in grouped.iter_rows():
                counts[label + error_kind(message)] += count
        return counts

    def _output_of(self, error_column: str) -> str:
        if error_column == ERROR_COLUMN:
            return str((self.provenance or {}).get("output_column") or "answer")
        return error_column.removeprefix(f"{ERROR_COLUMN}_")


def error_kind(message: str) -> str:
    """An error message without its attempt count and numbers, so that alike errors group together."""
    text = _ATTEMPTS.sub("", message.strip())
    status = _STATUS.match(text)
    head, rest = (status.group(1), text[status.end() :]) if status else ("", text)
    # The HTTP status tells kinds apart; other numbers (ids, waits, sizes, rows) do not.
    return head + _NUMBER.sub("N", rest)


def open_output(path: str, storage: dict[str, str] | None = None) -> EnrichedOutput:
    """Open an enriched output lazily; raise InputError when it is missing, unreadable or not enriched."""
    if not is_remote(path) and not Path(path).exists():
        raise InputError(f"'{path}' does not exist (looked in {Path.cwd()}); give the output of an `enrich run`.")
    local_dir = not is_remote(path) and Path(path).is_dir()
    if is_remote(path) and not suffix_of(path):
        # An object-store prefix without an extension: a Hive-partitioned dataset.
        scan = pl.scan_parquet(
            f"{literal_path(path).rstrip('/')}/**/*.parquet", hive_partitioning=True, storage_options=storage
        )
    elif local_dir or suffix_of(path) in (".parquet", ".pq"):
        scan = scan_table(path, "parquet", storage)
    else:
        raise InputError(
            f"'{path}' is not a Parquet file or dataset directory; `enrich run` writes its outputs as Parquet."
        )
    schema = _collect_schema(path, scan)
    provenance = read_provenance(path, storage)
    if provenance is None and KEY_COLUMN not in schema:
        raise InputError(
            f"'{path}' is not an output of llm-enrich: it has no '{KEY_COLUMN}' column and no llm_enrich footer."
        )
    return EnrichedOutput(path=path, scan=scan, columns=list(schema), provenance=provenance)


def render_rows(output: EnrichedOutput, wanted: list[str] | None, *, limit: int, failed: bool) -> RenderableType:
    """The provenance, then the rows as a table that fits the console (long values wrap), then error kinds."""
    columns = output.pick(wanted, failed=failed)
    frame = _collect(output.path, output.rows(columns, limit=limit, failed=failed))
    parts: list[RenderableType] = [_provenance_text(output)]
    total = output.height()
    kinds: Counter[str] = Counter()
    if failed:
        kinds = output.error_kinds()
        failed_rows = int(_collect(output.path, output.scan.filter(output.failed_filter()).select(pl.len())).item())
        parts.append(Text(f"{failed_rows:,} of {total:,} rows failed; showing {frame.height:,}."))
    else:
        parts.append(Text(f"{total:,} rows; showing the first {frame.height:,}."))
    if frame.height:
        parts.append(_table(frame))
    if kinds:
        parts.append(_kinds_table(kinds))
    hidden = [c for c in output.columns if c not in columns]
    if not wanted and hidden:
        parts.append(Text(f"Not shown: {', '.join(hidden)} (choose columns with --columns).", style="dim"))
    return Group(*parts)


def write_ndjson(
    output: EnrichedOutput, wanted: list[str] | None, *, limit: int, failed: bool, out: TextIO = sys.stdout
) -> None:
    """One JSON object per row, nothing else, streamed in batches (for scripts)."""
    columns = output.pick(wanted, failed=failed)
    try:
        for batch in output.rows(columns, limit=limit, failed=failed).collect_batches(chunk_size=1_000):
            out.write(batch.write_ndjson())
        out.flush()
    except BrokenPipeError:
        # `enrich show --json | head`: the reader has gone; point stdout at /dev/null so that
        # Python's flush at exit does not print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(output.path, exc) from exc


def _provenance_text(output: EnrichedOutput) -> Text:
    info = output.provenance
    if info is None:
        return Text(f"{output.path}: no llm_enrich footer (rewritten by another tool?); provenance unknown.")
    fields = {name: info.get(name) for name in _SHOWN_FIELDS}
    text = Text()
    text.append(f"{output.path}\n", style="bold")
    text.append(f"model {fields['model']} at {_without_credentials(str(fields['endpoint']))}, ")
    text.append(f"written {fields['written_at']}\n")
    text.append(f"output column {fields['output_column']}; temperature {fields['temperature']}, ")
    text.append(f"max tokens {fields['max_tokens']}\n")
    text.append(f"prompt: {fields['prompt']}")
    if fields["system"]:
        text.append(f"\nsystem: {fields['system']}")
    return text


def _without_credentials(url: str) -> str:
    """A URL without user, password or query (where keys hide), whatever the footer holds."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _table(frame: pl.DataFrame) -> Table:
    table = Table(show_lines=True, expand=False)
    for name in frame.columns:
        longest = max([len(name), *(len(_cell(v)) for v in frame[name].to_list())])
        # Short columns (ids, counts) keep their width; long text folds over lines, never cut off.
        table.add_column(name, overflow="fold", no_wrap=longest <= 6)
    for row in frame.iter_rows():
        table.add_row(*(Text(_cell(v), style="dim") if v is None else Text(_cell(v)) for v in row))
    return table


def _kinds_table(kinds: Counter[str]) -> Table:
    table = Table(title="Errors by kind", title_justify="left", show_lines=False)
    table.add_column("rows", justify="right", no_wrap=True)
    table.add_column("error", overflow="fold")
    for kind, count in sorted(kinds.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(f"{count:,}", Text(as_flags(kind)))  # the errors name job fields; a terminal has flags
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _collect(path: str, frame: pl.LazyFrame) -> pl.DataFrame:
    try:
        return frame.collect(engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(path, exc) from exc


def _collect_schema(path: str, scan: pl.LazyFrame) -> pl.Schema:
    try:
        return scan.collect_schema()
    except (pl.exceptions.PolarsError, OSError, RuntimeError) as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: str, exc: BaseException) -> InputError:
    lines = str(exc).strip().splitlines()
    detail = lines[0] if lines else type(exc).__name__
    hint = " and the --storage-option values" if is_remote(path) else ""
    return InputError(f"could not read '{path}': {detail}. Check the path{hint}; give the output of an `enrich run`.")


def print_rows(console: Console, output: EnrichedOutput, wanted: list[str] | None, *, limit: int, failed: bool) -> None:
    """Print the table view on a rich console."""
    console.print(render_rows(output, wanted, limit=limit, failed=failed), highlight=False)
