"""The user's data is sacred: a destination that would damage it is refused before anything is sent.

Every case runs the real `enrich` command and checks: exit code 2, one message and no traceback,
zero requests at the server, and every file in the folder byte-identical afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import DATA, REPO
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("prefect_backend")


@pytest.fixture(autouse=True)
def _prefect_url(prefect_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def enrich(server: FakeOpenAIServer, *args: str, cwd: Path = REPO) -> tuple[int, str]:
    """Run the real command against the fake server; exit code and folded output."""
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", "run", *args, "--base-url", server.base_url],
        capture_output=True, text=True, cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under the folder: file bytes, symlink targets, directories."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = path.read_bytes()
    return found


def table(folder: Path) -> Path:
    """A small CSV input with a topic and a category column."""
    source = folder / "table.csv"
    source.write_bytes((DATA / "topics.csv").read_bytes())
    return source


def _same_file(folder: Path) -> list[str]:
    return [str(folder / "table.csv"), "--output", str(folder / "table.csv")]


def _other_spelling(folder: Path) -> list[str]:
    (folder / "sub").mkdir()
    return [str(folder / "table.csv"), "--output", str(folder / "sub" / ".." / "table.csv"), "--format", "csv"]


def _symlinked_input(folder: Path) -> list[str]:
    (folder / "link.parquet").symlink_to(folder / "table.csv")
    return [str(folder / "table.csv"), "--output", str(folder / "link.parquet")]


def _hard_link(folder: Path) -> list[str]:
    os.link(folder / "table.csv", folder / "hard.parquet")
    return [str(folder / "table.csv"), "--output", str(folder / "hard.parquet")]


def _csv_extension(folder: Path) -> list[str]:
    return [str(folder / "table.csv"), "--output", str(folder / "enriched.csv")]


def _existing_directory(folder: Path) -> list[str]:
    (folder / "outdir").mkdir()
    return [str(folder / "table.csv"), "--output", str(folder / "outdir")]


def _parent_is_a_file(folder: Path) -> list[str]:
    (folder / "notes.txt").write_text("mine")
    return [str(folder / "table.csv"), "--output", str(folder / "notes.txt" / "out.parquet")]


def _uncreatable_parent(folder: Path) -> list[str]:
    return [str(folder / "table.csv"), "--output", "/proc/llm-enrich-test/out.parquet"]


def _unwritable_staging(folder: Path) -> list[str]:
    return [str(folder / "table.csv"), "--output", str(folder / "out.parquet"), "--staging-dir", "/proc/x"]


def _not_parquet_output(folder: Path) -> list[str]:
    (folder / "report.parquet").write_text("a report someone saved under the wrong name")
    return [str(folder / "table.csv"), "--output", str(folder / "report.parquet")]


def _output_column_clash(folder: Path) -> list[str]:
    return [
        str(folder / "table.csv"), "--output", str(folder / "out.parquet"),
        "--prompt", "Describe {category}", "--output-column", "topic",
    ]  # fmt: skip


def _template_uses_the_clashing_column(folder: Path) -> list[str]:
    return [
        str(folder / "table.csv"), "--output", str(folder / "out.parquet"),
        "--prompt", "Describe {topic}", "--output-column", "topic",
    ]  # fmt: skip


def _structured_field_clash(folder: Path) -> list[str]:
    return [
        str(folder / "table.csv"), "--output", str(folder / "out.parquet"), "--output-schema", "category:str",
    ]  # fmt: skip


def _cached_tokens_column_clash(folder: Path) -> list[str]:
    # A column of the user's that happens to bear the name of one the run adds.
    pl.read_csv(folder / "table.csv").with_columns(enrich_cached_tokens=pl.lit(7)).write_csv(folder / "mine.csv")
    return [str(folder / "mine.csv"), "--output", str(folder / "out.parquet")]


def _summary_over_the_input(folder: Path) -> list[str]:
    return [
        str(folder / "table.csv"),
        "--output",
        str(folder / "out.parquet"),
        "--summary-json",
        str(folder / "table.csv"),
    ]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "output is the input": (_same_file, "is the input"),
    "output is the input through '..'": (_other_spelling, "is the input"),
    "output is a symlink to the input": (_symlinked_input, "is the input"),
    "output is a hard link to the input": (_hard_link, "is the input"),
    "output names another format": (_csv_extension, "names a CSV file"),
    "output is a directory": (_existing_directory, "is a directory"),
    "output's parent is a file": (_parent_is_a_file, "is a file, not a directory"),
    "output's parent cannot be created": (_uncreatable_parent, "cannot be written"),
    "staging cannot be written": (_unwritable_staging, "staging directory"),
    "output exists and is not Parquet": (_not_parquet_output, "is not a Parquet file"),
    "output column is an input column": (_output_column_clash, "--output-column 'topic' is already a column"),
    "template uses the clashing column": (_template_uses_the_clashing_column, "is already a column"),
    "structured field is an input column": (_structured_field_clash, "'category' is already a column"),
    "an input column bears an added column's name": (
        _cached_tokens_column_clash,
        "the bookkeeping column 'enrich_cached_tokens' is already a column",
    ),
    "summary would overwrite the input": (_summary_over_the_input, "--summary-json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_destination_that_would_damage_data_is_refused_before_anything_is_sent(
    case: str, fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    table(tmp_path)
    build, expected = CASES[case]
    args = build(tmp_path)
    before = snapshot(tmp_path)
    code, output = enrich(fake_llm, *args, "--partition-rows", "8")
    assert code == 2, output
    assert expected in output, output
    assert "Traceback" not in output and "Nothing was sent or written" in output
    assert fake_llm.stats.requests == 0
    assert snapshot(tmp_path) == before


def test_in_place_on_parquet_is_the_one_way_to_rewrite_the_input(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "table.parquet"
    pl.read_csv(DATA / "topics.csv").write_parquet(source)
    code, output = enrich(fake_llm, str(source), "--in-place", "--no-cache")
    assert code == 0, output
    assert "explanation" in pl.read_parquet(source).columns
    # The second run replaces its own answer column (footer + enrich_key), pays nothing more.
    fake_llm.reset()
    code, output = enrich(fake_llm, str(source), "--in-place", "--no-cache")
    assert code == 0, output
    assert fake_llm.stats.requests == 0
    assert pl.read_parquet(source).columns.count("explanation") == 1


def test_an_in_place_rerun_with_another_answer_column_is_refused(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    """The earlier answers would lose their enrich_error and key columns to the new column's."""
    source = tmp_path / "table.parquet"
    pl.read_csv(DATA / "topics.csv").write_parquet(source)
    code, output = enrich(fake_llm, str(source), "--in-place", "--no-cache")
    assert code == 0, output
    before, fake_llm_requests = source.read_bytes(), fake_llm.stats.requests
    code, output = enrich(fake_llm, str(source), "--in-place", "--no-cache", "--output-column", "other")
    assert code == 2, output
    assert "answers of an earlier run in 'explanation'" in output and "--output-column 'explanation'" in output
    assert "Traceback" not in output
    assert fake_llm.stats.requests == fake_llm_requests
    assert source.read_bytes() == before


def test_in_place_over_an_output_written_before_the_cached_token_column(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    source = tmp_path / "table.parquet"
    pl.read_csv(DATA / "topics.csv").write_parquet(source)
    code, output = enrich(fake_llm, str(source), "--in-place", "--no-cache")
    assert code == 0, output
    # As an older version wrote it and another tool rewrote it: no enrich_cached_tokens, no footer.
    older = pl.read_parquet(source).drop("enrich_cached_tokens")
    older.write_parquet(source)
    fake_llm.reset()
    code, output = enrich(fake_llm, str(source), "--in-place", "--no-cache")
    assert code == 0, output
    assert fake_llm.stats.requests == 0, "its own columns are recognised and every answer is reused"
    again = pl.read_parquet(source)
    assert again.columns.count("explanation") == 1 and again["enrich_cached_tokens"].to_list() == [0] * again.height
    assert again.drop("enrich_cached_tokens").equals(older)
