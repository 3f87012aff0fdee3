"""Batch mode (--mode batch) through the real CLI against the fake Files and Batches API on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from llm_enrich.transforms.costs import DEFAULT_PRICES, price_for
from tests.conftest import REPO
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer, expected_answer

pytestmark = pytest.mark.usefixtures("prefect_backend")

FAST = {"batch_validating_seconds": 0.05, "batch_line_seconds": 0.0, "batch_finalizing_seconds": 0.05}
SYSTEM = "Be brief."


@pytest.fixture(autouse=True)
def _prefect_url(prefect_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


@contextmanager
def serving(**behaviour: Any) -> Iterator[FakeOpenAIServer]:
    """A fake server with fast batch timings (overridable)."""
    with FakeOpenAIServer(Behaviour(**{**FAST, **behaviour})) as server:
        yield server


def table(tmp_path: Path, rows: int = 30, distinct: int = 20, faults: dict[int, str] | None = None) -> Path:
    """``rows`` rows over ``distinct`` topics; ``faults`` puts a fault marker into a row's topic."""
    topics = [f"topic {i % distinct}" for i in range(rows)]
    for row, marker in (faults or {}).items():
        topics[row] = marker
    path = tmp_path / "in.csv"
    pl.DataFrame({"id": range(rows), "topic": topics}).write_csv(path)
    return path


def command(server: FakeOpenAIServer, source: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "-o", str(out), "--base-url",
        server.base_url, "--model", "gpt-4o-mini", "--summary-json", str(out.parent / "summary.json"),
        "--prompt", "Describe {topic}", "--system", SYSTEM, "--mode", "batch", "--batch-poll-seconds", "0.2", *extra,
    ]  # fmt: skip


def enrich(server: FakeOpenAIServer, source: Path, out: Path, *extra: str) -> tuple[int, str, dict[str, Any]]:
    """Run the real CLI in batch mode; (exit code, its output folded, the summary JSON or {})."""
    summary = out.parent / "summary.json"
    summary.unlink(missing_ok=True)
    result = subprocess.run(command(server, source, out, *extra), capture_output=True, text=True, cwd=REPO, timeout=120)
    text = " ".join((result.stdout + result.stderr).split())
    return result.returncode, text, json.loads(summary.read_text()) if summary.exists() else {}


def check_answers(out: Path) -> pl.DataFrame:
    frame = pl.read_parquet(out)
    for topic, answer in zip(frame.get_column("topic"), frame.get_column("explanation"), strict=True):
        assert answer == expected_answer(f"Describe {topic}", SYSTEM), "each row has its own answer"
    return frame


def test_a_batch_run_answers_every_row_at_half_the_online_price(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    with serving() as server:
        code, text, summary = enrich(server, source, out)
        stats = server.stats
        assert code == 0, text
        assert (stats.files_uploaded, stats.batches_created, stats.batch_lines_answered) == (1, 1, 20)
        assert stats.completions == stats.batch_lines_answered, "nothing was sent online"
        assert not stats.admissions
        code, text, again = enrich(server, source, out)  # a rerun: every answer from the cache
        assert code == 0, text
        assert stats.batches_created == 1 and again["rows_cached"] == 30 and again["requests"] == 0
    frame = check_answers(out)
    assert frame.height == 30 and frame.get_column("enrich_error").null_count() == 30
    assert summary["rows_ok"] == 30 and summary["requests"] == 20 and summary["unique_prompts_sent"] == 20
    listed = price_for("gpt-4o-mini", DEFAULT_PRICES)
    assert listed is not None
    online = listed.cost(summary["input_tokens"], summary["output_tokens"])
    assert summary["cost_usd"] == pytest.approx(online / 2, rel=1e-3)
    assert not (tmp_path / ".out.parquet.batches.json").exists(), "a finished run leaves no manifest"


def test_files_are_split_at_batch_max_requests(tmp_path: Path) -> None:
    source, out = table(tmp_path, rows=25, distinct=25), tmp_path / "out.parquet"
    with serving() as server:
        code, text, _ = enrich(server, source, out, "--batch-max-requests", "10")
        assert code == 0, text
        assert server.stats.batches_created == 3 and server.stats.batch_lines_answered == 25
        assert sorted(len(b["custom_ids"]) for b in server.stats.batches) == [5, 10, 10]
    check_answers(out)
