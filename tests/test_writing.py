"""Atomic writes: readers see the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.tables.writing import rejected_path, write_json_atomic, write_parquet_dataset_atomic
from llm_enrich.schemas.errors import OutputError
from tests.support import write_parquet_atomic


def test_write_creates_directories_and_zstd_parquet_with_metadata(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "out.parquet"
    write_parquet_atomic(pl.DataFrame({"x": [1, 2]}), str(dest), metadata={"llm_enrich": "{}"})
    assert pl.read_parquet(dest)["x"].to_list() == [1, 2]
    assert pl.read_parquet_metadata(dest)["llm_enrich"] == "{}"
    assert list(dest.parent.iterdir()) == [dest]


def test_a_failure_mid_write_leaves_the_previous_output_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out.parquet"
    write_parquet_atomic(pl.DataFrame({"x": [1]}), str(dest))
    before = dest.read_bytes()

    def torn_write(self: pl.LazyFrame, file: str, **kwargs: object) -> None:
        Path(file).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", torn_write)
    with pytest.raises(OutputError, match="is full"):
        write_parquet_atomic(pl.DataFrame({"x": [2]}), str(dest))
    assert dest.read_bytes() == before
    assert list(tmp_path.iterdir()) == [dest]  # no temp file left behind


def test_an_interrupt_mid_write_also_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out.parquet"

    def interrupted(self: pl.LazyFrame, file: str, **kwargs: object) -> None:
        Path(file).write_bytes(b"PAR1")
        raise KeyboardInterrupt

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_parquet_atomic(pl.DataFrame({"x": [2]}), str(dest))
    assert list(tmp_path.iterdir()) == []


def test_rejected_rows_go_beside_the_output() -> None:
    assert rejected_path("data/out/topics_enriched.parquet") == "data/out/topics_enriched.rejected.parquet"


def test_a_partitioned_dataset_is_swapped_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "ds"
    write_parquet_dataset_atomic(pl.DataFrame({"k": ["a", "b"], "x": [1, 2]}), str(dest), "k")
    assert sorted(p.name for p in dest.iterdir()) == ["k=a", "k=b"]
    write_parquet_dataset_atomic(pl.DataFrame({"k": ["c"], "x": [3]}), str(dest), "k")
    assert sorted(p.name for p in dest.iterdir()) == ["k=c"]  # no stale partitions from the old dataset

    def torn(self: pl.LazyFrame, target: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", torn)
    with pytest.raises(OutputError, match="previous output, if any, is intact"):
        write_parquet_dataset_atomic(pl.DataFrame({"k": ["z"], "x": [9]}), str(dest), "k")
    assert sorted(p.name for p in dest.iterdir()) == ["k=c"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no staging or backup directories left


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("umask_022")
def test_outputs_get_the_umasks_permissions_and_a_rewrite_keeps_the_files_own(tmp_path: Path) -> None:
    """Not mkstemp's 0600: people sharing a data folder keep reading what a run wrote."""
    dest, summary = tmp_path / "out.parquet", tmp_path / "run.json"
    write_parquet_atomic(pl.DataFrame({"x": [1]}), str(dest))
    write_json_atomic({"rows": 1}, str(summary))
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert stat.S_IMODE(summary.stat().st_mode) == 0o644
    dest.chmod(0o640)  # as an in-place rewrite finds its input
    write_parquet_atomic(pl.DataFrame({"x": [2]}), str(dest))
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert pl.read_parquet(dest)["x"].to_list() == [2]
    dataset = tmp_path / "dataset"
    write_parquet_dataset_atomic(pl.DataFrame({"k": ["a"], "x": [1]}), str(dataset), "k")
    assert stat.S_IMODE(dataset.stat().st_mode) == 0o755
