"""Find where a CSV or NDJSON file stops being parseable: the line, what was expected, what was found.

polars reads the input on the fast path, and its parse errors do not say where the problem is
(``found more fields than defined in 'Schema'``). Only after polars has failed, this module reads
the local file once more in Python, line by line in binary, and stops at the first bad line.
Memory stays bounded by the longest line or field (at most ``LINE_CAP`` bytes or characters), so
a 1 GB file is fine; the time is one pass up to the bad line (about 60 MB/s).

Line numbers are those a text editor shows: 1-based physical lines (split on ``\\n``), the CSV
header being line 1, and each newline inside a quoted field starting a new line.
"""

from __future__ import annotations

import csv
import json
import re
from codecs import BOM_UTF8
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path

__all__ = ["LINE_CAP", "ParseProblem", "locate_problem"]

LINE_CAP = 64 * 1024 * 1024
_SHOWN = 80
_QUOTE = '"'
# polars' messages for a value that does not fit the type inferred from the first rows.
_CSV_VALUE = re.compile(r"could not parse `(?P<value>.*?)` as dtype `(?P<dtype>[^`]+)` at column '(?P<column>.*?)' "
                        r"\(column number (?P<number>\d+)\)", re.DOTALL)  # fmt: skip
_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "an object"}
# How polars names a JSON value's kind in "cannot parse '1.5' (f64) as Int64".
_POLARS_KINDS = {"string": "a string", "i64": "an integer", "u64": "an integer", "f64": "a float", "bool": "a boolean",
                 "array": "an array", "object": "an object"}  # fmt: skip
_NDJSON_VALUE = re.compile(r"cannot parse '(?P<value>.*?)' \((?P<kind>\w+)\) as (?P<dtype>\w+)", re.DOTALL)


@dataclass(frozen=True)
class ParseProblem:
    """The first place a text input cannot be parsed."""

    line: int
    expected: str
    found: str
    byte_offset: int | None = None
    last_line: int | None = None
    note: str = ""

    def describe(self) -> str:
        """One sentence: where, what was expected, what was found."""
        where = f"line {self.line}"
        if self.last_line is not None and self.last_line != self.line:
            where = f"the record on lines {self.line}-{self.last_line}"
        if self.byte_offset is not None:
            where += f" (byte offset {self.byte_offset} from the start of the file, counting from 0)"
        return f"{where}: expected {self.expected}, found {self.found}{self.note}"


def locate_problem(path: str | Path, fmt: str, detail: str = "") -> ParseProblem | None:
    """The first unparseable line of a local CSV or NDJSON file, or None; ``detail`` is polars' message."""
    if fmt not in ("csv", "ndjson"):
        return None
    try:
        with open(path, "rb") as file:
            if fmt == "csv":
                return _csv_problem(file, detail)
            return _ndjson_problem(file, detail)
    except _Stop as stop:
        return stop.problem
    except OSError:
        return None  # unreadable now: the caller keeps polars' own message


class _Stop(Exception):
    """A problem found below the record level (bad UTF-8, a huge line, a quote error)."""

    def __init__(self, problem: ParseProblem) -> None:
        super().__init__(problem.describe())
        self.problem = problem


@dataclass
class _Position:
    """How far the line reader is: the last line handed out, its text, and quotes since the last record."""

    line: int = 0
    quotes: int = 0
    text: str = ""


def _lines(file: BufferedReader, position: _Position) -> Iterator[str]:
    """Each physical line decoded as UTF-8, newline kept; raise _Stop at bad bytes or a huge line."""
    offset = 0
    while raw := file.readline(LINE_CAP + 1):
        position.line += 1
        if len(raw) > LINE_CAP:
            expected = f"a line of at most {LINE_CAP} bytes (the search for the bad line stops there)"
            raise _Stop(ParseProblem(position.line, expected, "a longer one", byte_offset=offset))
        # A byte order mark is skipped by hand: the utf-8-sig codec would shift the offsets of bad bytes.
        skip = len(BOM_UTF8) if offset == 0 and raw.startswith(BOM_UTF8) else 0
        try:
            # "\n" never occurs inside a multi-byte UTF-8 sequence, so splitting before decoding is safe.
            text = raw[skip:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Stop(_bad_utf8(raw, exc.start + skip, exc.end + skip, position.line, offset)) from exc
        position.quotes += text.count(_QUOTE)
        position.text = text
        offset += len(raw)
        yield text


def _bad_utf8(raw: bytes, start: int, end: int, line: int, offset: int) -> ParseProblem:
    bad = raw[start:end]
    column = len(raw[:start].decode("utf-8-sig", errors="replace")) + 1
    shown = " ".join(f"0x{byte:02X}" for byte in bad[:4])
    return ParseProblem(
        line,
        "UTF-8 text",
        f"the byte {shown} at column {column}, which is not UTF-8 "
        "(was the file saved as Latin-1 or Windows-1252? Re-save it as UTF-8)",
        byte_offset=offset + start,
    )


def _records(file: BufferedReader, position: _Position) -> Iterator[tuple[int, list[str], int]]:
    """Each CSV record with the line it starts on and its count of quote characters."""
    # strict=True refuses what polars refuses: text after a closing quote, a quote open at the end.
    reader = csv.reader(_lines(file, position), strict=True)
    first = 1
    # The csv module's default field limit (128 Ki characters) would take a long text for an open quote.
    limit = csv.field_size_limit(max(csv.field_size_limit(), LINE_CAP))
    try:
        for record in reader:
            start, first = first, position.line + 1
            quotes, position.quotes = position.quotes, 0
            yield start, record, quotes
    except csv.Error as exc:
        raise _Stop(_quote_problem(str(exc), first, position)) from exc
    finally:
        csv.field_size_limit(limit)


def _quote_problem(message: str, start: int, position: _Position) -> ParseProblem:
    if "expected after" in message:
        return ParseProblem(
            position.line,
            f"a separator or the end of the line after a closing quote ({_QUOTE})",
            f"more text: {_shown(position.text)} (inside a quoted field, write {_QUOTE} as {_QUOTE}{_QUOTE})",
        )
    # "unexpected end of data", or a field over the csv module's size limit: a quote that never closes.
    end = "the end of the file" if "end of data" in message else f"no closing quote by line {position.line}"
    return ParseProblem(start, f"a closing quote ({_QUOTE}) for the quoted field opened on line {start}", end)


def _csv_problem(file: BufferedReader, detail: str) -> ParseProblem | None:
    position = _Position()
    value = _CSV_VALUE.search(detail)
    width: int | None = None
    short = ""
    for start, record, quotes in _records(file, position):
        end = position.line
        if not record:
            continue  # a blank line: polars reads it as a row of nulls
        if width is None:
            width = len(record)
            continue
        if quotes % 2:
            # The csv module keeps a quote inside an unquoted field; polars takes it as an opening quote.
            return ParseProblem(
                start,
                f"quote characters in pairs (a field holding {_QUOTE} must be quoted, and the {_QUOTE} doubled)",
                f"a lone quote ({_QUOTE}): {_shown(position.text)}",
                note=short,
            )
        if len(record) > width:
            found = f"{len(record)} fields: {_shown(','.join(record))}"
            if end > start:
                found += f" (a quoted field runs from line {start} to line {end}: is a closing quote missing?)"
            return ParseProblem(start, f"{width} fields, as in the header on line 1", found, last_line=end, note=short)
        if len(record) < width and not short:
            # polars pads a short row with nulls, so it is not what failed; still worth knowing.
            short = f" (line {start} before it has only {len(record)} of the {width} fields; it is read with nulls)"
        if value and _matches(record, int(value["number"]) - 1, value["value"]):
            return ParseProblem(
                start,
                f"a value of type {value['dtype']} in column '{value['column']}' "
                "(the type polars inferred from the first rows)",
                repr(record[int(value["number"]) - 1]),
                note=short,
            )
    return None


def _matches(record: list[str], index: int, value: str) -> bool:
    return index < len(record) and record[index] in (value, value.strip(_QUOTE))


def _ndjson_problem(file: BufferedReader, detail: str) -> ParseProblem | None:
    position = _Position()
    value = _NDJSON_VALUE.search(detail)
    # polars' words when an array or object meets a number or boolean in one field.
    shapes_clash = "supertype" in detail or "while building Series" in detail
    first_kinds: dict[str, tuple[str, int]] = {}
    for text in _lines(file, position):
        if not text.strip():
            continue  # polars skips blank lines
        try:
            row = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            return ParseProblem(
                position.line, "a JSON object", f"invalid JSON at column {exc.colno} ({exc.msg}): {_shown(text)}"
            )
        except RecursionError:
            return ParseProblem(position.line, "a JSON object", f"a value nested too deeply to read: {_shown(text)}")
        if not isinstance(row, dict):
            return ParseProblem(position.line, "a JSON object", f"{_kind(row)}: {_shown(text)}")
        for key, item in row.items():
            kind = _kind(item)
            first, seen_on = first_kinds.setdefault(key, (kind, position.line))
            if kind == first or kind == "null":
                continue
            if first == "null":
                first_kinds[key] = (kind, position.line)
            elif value and _is_polars_value(item, kind, value):
                return ParseProblem(
                    position.line,
                    f"a value of type {value['dtype']} in field '{key}' "
                    "(the type polars inferred from the first lines)",
                    f"{kind}: {_shown(text)}",
                )
            elif shapes_clash and _clash(first, kind):
                return ParseProblem(
                    position.line, f"{first} in field '{key}', as on line {seen_on}", f"{kind}: {_shown(text)}"
                )
    return None


def _is_polars_value(item: object, kind: str, value: re.Match[str]) -> bool:
    """Whether ``item`` is the value polars' "cannot parse" message names (arrays and objects by kind alone)."""
    if _POLARS_KINDS.get(value["kind"]) != kind:
        return False
    return kind in ("an array", "an object") or value["value"] in (str(item), json.dumps(item))


def _kind(value: object) -> str:
    return "null" if value is None else _KINDS.get(type(value), "a value")


def _clash(first: str, kind: str) -> bool:
    """Whether polars cannot hold both kinds in one column (a string column takes arrays and objects as text)."""
    nested = ("an array", "an object")
    return (first in nested or kind in nested) and first != kind and "a string" not in (first, kind)


def _shown(text: str) -> str:
    text = text.rstrip("\r\n")
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")
