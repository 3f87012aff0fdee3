"""Input files polars cannot parse: the message names the line, what was expected and what was found."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.tables import parse_errors
from llm_enrich.flows.tables.reading import read_error
from llm_enrich.schemas.errors import InputError
from tests.conftest import REPO
from tests.fakes.openai_server import FakeOpenAIServer
from tests.support import load_table

ROWS = 120_000
BAD_LINE = 87_654  # as an editor counts: the header is line 1


def good_lines(count: int, start: int = 0) -> bytes:
    """``count`` valid CSV data lines ``id,topic``."""
    return "".join(f"{i},topic {i}\n" for i in range(start, start + count)).encode()


def big_csv_with_an_extra_field(path: Path) -> Path:
    """A 120,000-line CSV (header included) whose line BAD_LINE has a third field."""
    before = BAD_LINE - 2  # data lines between the header and the bad line
    path.write_bytes(
        b"id,topic\n" + good_lines(before) + b"999999,oops,extra\n" + good_lines(ROWS - BAD_LINE, before + 1)
    )
    return path


def message_for(path: Path, fmt: str = "auto") -> str:
    """The InputError message load_table gives for ``path``."""
    with pytest.raises(InputError) as err:
        load_table(str(path), fmt)
    message = err.value.message
    assert str(path) in message and "\n" not in message  # one paragraph, naming the file
    assert "pass `input_format` if the extension is misleading" in message
    return message


def test_a_120000_line_csv_with_one_extra_field_names_the_line(tmp_path: Path) -> None:
    path = big_csv_with_an_extra_field(tmp_path / "big.csv")
    assert path.read_bytes().count(b"\n") == ROWS
    message = message_for(path)
    assert f"line {BAD_LINE}: expected 2 fields, as in the header on line 1, found 3 fields: '999999,oops,extra'" in (
        message
    )


def test_newlines_inside_quoted_fields_count_as_lines(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_bytes(b'id,topic\n1,"two\nlines"\n2,"three\n\nlines"\n3,b,c\n')
    assert "line 7: expected 2 fields" in message_for(path)


def test_a_record_that_a_quote_stretches_over_lines_names_them_all(tmp_path: Path) -> None:
    path = tmp_path / "stretched.csv"
    path.write_bytes(b'id,topic\n1,"a\n2,b\n3,c",x\n4,d\n')
    message = message_for(path)
    assert "the record on lines 2-4: expected 2 fields, as in the header on line 1, found 3 fields" in message
    assert "a quoted field runs from line 2 to line 4: is a closing quote missing?" in message


def test_windows_line_endings_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "crlf.csv"
    path.write_bytes(b"\xef\xbb\xbfid,topic\r\n1,a\r\n2,b,c\r\n")
    assert "line 3: expected 2 fields, as in the header on line 1, found 3 fields: '2,b,c'" in message_for(path)


def test_a_short_row_before_the_bad_one_is_mentioned(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_bytes(b"id,topic\n1,a\n2\n3,c\n4,d,e\n")
    message = message_for(path)
    assert "line 5: expected 2 fields" in message and "found 3 fields: '4,d,e'" in message
    assert "line 3 before it has only 1 of the 2 fields" in message


def test_short_rows_alone_are_read_with_nulls(tmp_path: Path) -> None:
    # polars pads a row with fewer fields than the header; the schema then judges the nulls.
    path = tmp_path / "short.csv"
    path.write_bytes(b"id,topic\n1,a\n2\n")
    assert load_table(str(path)).rows() == [(1, "a"), (2, None)]


def test_a_long_quoted_text_before_the_bad_line_is_no_open_quote(tmp_path: Path) -> None:
    path = tmp_path / "long_text.csv"
    path.write_bytes(b'id,topic\n1,"' + b"word " * 60_000 + b'\nmore"\n2,b,c\n')
    assert "line 4: expected 2 fields" in message_for(path)


def test_an_unterminated_quote_names_the_line_it_opens_on(tmp_path: Path) -> None:
    path = tmp_path / "open_quote.csv"
    path.write_bytes(b'id,topic\n1,a\n2,"never closed\n3,c\n4,d\n')
    message = message_for(path)
    assert 'line 3: expected a closing quote (") for the quoted field opened on line 3, found the end of the file' in (
        message
    )


def test_a_lone_quote_inside_an_unquoted_field(tmp_path: Path) -> None:
    path = tmp_path / "lone_quote.csv"
    path.write_bytes(b'id,topic\n1,a\n2,6" pipe\n3,c\n')
    message = message_for(path)
    assert "line 3: expected quote characters in pairs" in message and "found a lone quote" in message


def test_text_after_a_closing_quote(tmp_path: Path) -> None:
    path = tmp_path / "after_quote.csv"
    path.write_bytes(b'id,topic\n1,"a"b\n')
    assert 'line 2: expected a separator or the end of the line after a closing quote (")' in message_for(path)


def test_invalid_utf8_names_the_line_and_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    data = "id,topic\n1,a\n2,café\n".encode("latin-1")
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    message = message_for(path)
    assert f"line 3 (byte offset {offset} from the start of the file, counting from 0)" in message
    assert "expected UTF-8 text, found the byte 0xE9 at column 6" in message


def test_invalid_utf8_after_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfid,topic\n1,caf\xe9\n")
    assert "line 2 (byte offset 17 from the start of the file, counting from 0)" in message_for(path)
    path.write_bytes(b"\xef\xbb\xbfid,t\xe9\n1,a\n")  # polars reads this header; the scan alone is checked
    problem = parse_errors.locate_problem(path, "csv")
    assert problem is not None and (problem.line, problem.byte_offset) == (1, 7)
    assert "the byte 0xE9 at column 5" in problem.found


def test_a_value_that_breaks_the_inferred_type_far_down(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    path.write_bytes(b"id,topic\n" + good_lines(20_000) + b"abc,x\n")
    message = message_for(path)
    assert "line 20002: expected a value of type i64 in column 'id'" in message and "found 'abc'" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"id": 1, "topic": "a"}\n{"id": 2, "topic": \n', "line 2: expected a JSON object, found invalid JSON"),
        (b'{"id": 1}\n\n{"id": 2 "topic": "x"}\n', "line 3: expected a JSON object, found invalid JSON at column 10"),
        (b'{"id": 1}\n[1, 2]\n', "line 2: expected a JSON object, found an array: '[1, 2]'"),
        ('{"id": 1}\n{"id": 2, "topic": "café"}\n'.encode("latin-1"), "line 2 (byte offset 33 from the start"),
    ],
)
def test_ndjson_problems_name_the_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "in.ndjson"
    path.write_bytes(content)
    assert expected in message_for(path)


def test_ndjson_value_that_breaks_the_inferred_type(tmp_path: Path) -> None:
    path = tmp_path / "late.jsonl"
    path.write_bytes("".join(f'{{"id": {i}}}\n' for i in range(20_000)).encode() + b'{"id": "x"}\n')
    assert "line 20001: expected a value of type Int64 in field 'id'" in message_for(path)


@pytest.mark.parametrize(
    ("late", "expected"),
    [
        (b'{"id": 1.5}\n', "line 20001: expected a value of type Int64 in field 'id'"),
        (b'{"id": [1]}\n', "found an array: '{\"id\": [1]}'"),
    ],
)
def test_ndjson_kinds_that_break_the_inferred_type(tmp_path: Path, late: bytes, expected: str) -> None:
    path = tmp_path / "late.ndjson"
    path.write_bytes("".join(f'{{"id": {i}}}\n' for i in range(20_000)).encode() + late)
    assert expected in message_for(path)


def test_ndjson_shapes_that_clash_in_the_first_lines(tmp_path: Path) -> None:
    path = tmp_path / "clash.ndjson"
    # An array where a string was is kept as text by polars; an array where numbers were is the clash.
    path.write_bytes(b'{"n": "a", "m": null}\n{"n": ["a"], "m": 2}\n{"n": "b", "m": [3]}\n')
    assert "line 3: expected an integer in field 'm', as on line 2, found an array" in message_for(path)


def test_ndjson_object_where_numbers_were(tmp_path: Path) -> None:
    path = tmp_path / "clash.ndjson"
    path.write_bytes(b'{"id": 1, "n": {"a": 1}}\n{"id": 2, "n": 5}\n')
    assert "line 2: expected an object in field 'n', as on line 1, found an integer" in message_for(path)


def test_the_format_option_decides_how_the_file_is_scanned(tmp_path: Path) -> None:
    path = tmp_path / "export.txt"
    path.write_bytes(b"id,topic\n1,a\n2,b,c\n")
    assert "as csv: line 3: expected 2 fields" in message_for(path, "csv")


def test_an_over_long_line_stops_the_scan_with_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parse_errors, "LINE_CAP", 64)
    path = tmp_path / "long.csv"
    path.write_bytes(b"id,topic\n1,a\n2," + b"x" * 100 + b",extra\n")
    assert "line 3 (byte offset 13 from the start of the file, counting from 0): expected a line of at most 64" in (
        message_for(path)
    )


def test_object_storage_inputs_say_the_line_is_not_named() -> None:
    error = read_error("s3://bucket/in.csv", "csv", pl.exceptions.ComputeError("found more fields than defined"))
    assert "found more fields than defined (the line is not named for object-storage inputs" in error.message


def test_when_the_scan_finds_nothing_polars_words_stay(tmp_path: Path) -> None:
    path = tmp_path / "fine.csv"
    path.write_bytes(b"id,topic\n1,a\n")
    error = read_error(str(path), "csv", pl.exceptions.ComputeError("something else\nmore"))
    assert "as csv: something else (reading the file again did not find the bad line)." in error.message


def test_a_file_that_parses_gives_no_problem(tmp_path: Path) -> None:
    path = tmp_path / "fine.csv"
    path.write_bytes(b'id,topic\n1,"multi\nline"\n\n2,"say ""hi"""\n')
    assert parse_errors.locate_problem(path, "csv") is None
    assert parse_errors.locate_problem(path, "parquet") is None


def lone_quote_csv(path: Path) -> Path:
    """A CSV whose line BAD_LINE has an unquoted field with one quote (polars fails on its first pass)."""
    path.write_bytes(b"id,topic\n" + good_lines(BAD_LINE - 2) + b'999999,6" pipe\n' + good_lines(10, BAD_LINE))
    return path


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (
            big_csv_with_an_extra_field,
            "expected 2 fields, as in the header on line 1, found 3 fields: '999999,oops,extra'",
        ),
        (lone_quote_csv, "expected quote characters in pairs"),
    ],
)
def test_the_cli_refuses_before_any_request_and_names_the_line(
    fake_llm: FakeOpenAIServer, prefect_backend: str, tmp_path: Path, make: Callable[[Path], Path], found: str
) -> None:
    source = make(tmp_path / "big.csv")
    out = tmp_path / "out.parquet"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_backend,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OPENAI_BASE_URL": fake_llm.base_url,
    }
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "-o", str(out), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"line {BAD_LINE}: {found}" in result.stderr
    assert "pass --format" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert fake_llm.stats.requests == 0
    assert not out.exists()
