"""Loading: every format, and a clear InputError for every way a file can be wrong."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from llm_enrich.schemas.errors import InputError
from tests.support import load_table

FRAME = pl.DataFrame({"id": [1, 2], "topic": ["a", "인공지능"]})


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".pq", ".ndjson", ".jsonl"])
def test_each_format_loads_by_extension(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"in{suffix}"
    if suffix == ".csv":
        FRAME.write_csv(path)
    elif suffix in (".parquet", ".pq"):
        FRAME.write_parquet(path)
    else:
        FRAME.write_ndjson(path)
    assert load_table(str(path)).equals(FRAME)


def test_format_option_overrides_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "export.txt"
    FRAME.write_csv(path)
    assert load_table(str(path), "csv").equals(FRAME)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.csv", None, "does not exist"),
        ("empty.csv", b"", "is empty (0 bytes)"),
        ("header_only.csv", b"id,topic\n", "has no data rows"),
        ("ragged.csv", b"id,topic\n1,a\n2,b,c,d\n", "line 3: expected 2 fields"),
        ("latin1.csv", "id,topic\n1,caf\xe9\n".encode("latin-1"), "line 2 (byte offset 14"),
        ("corrupt.parquet", b"PAR1 this is not parquet at all", "could not read"),
        ("broken.ndjson", b'{"id": 1, "topic": "a"}\n{"id": 2, "topic": \n', "line 2: expected a JSON object"),
        ("table.xlsx", b"PK\x03\x04", "cannot tell the format"),
    ],
)
def test_bad_files_are_input_errors_naming_the_file(
    tmp_path: Path, name: str, content: bytes | None, fragment: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as err:
        load_table(str(path))
    assert str(path) in err.value.message
    assert fragment in err.value.message


def test_a_directory_without_parquet_files_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"holds no \.parquet files"):
        load_table(str(tmp_path))


def test_a_hive_partitioned_directory_is_read_with_its_keys(tmp_path: Path) -> None:
    FRAME.with_columns(pl.Series("lang", ["en", "ko"])).write_parquet(tmp_path / "ds", partition_by="lang")
    frame = load_table(str(tmp_path / "ds")).sort("id")
    assert frame["topic"].to_list() == ["a", "인공지능"] and frame["lang"].to_list() == ["en", "ko"]
