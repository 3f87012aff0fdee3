"""Trial runs (--limit / --sample): a few rows into <stem>.trial.parquet, the whole table's estimate."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer

pytestmark = pytest.mark.usefixtures("prefect_backend")

ROWS, DISTINCT = 300, 200


@pytest.fixture(autouse=True)
def _prefect_url(prefect_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """300 rows, 200 distinct topics; ids start at 1."""
    path = tmp_path / "in.csv"
    pl.DataFrame({"id": range(1, ROWS + 1), "topic": [f"topic {i % DISTINCT}" for i in range(ROWS)]}).write_csv(path)
    return path


def enrich(server: FakeOpenAIServer, source: Path, out: Path, *extra: str) -> tuple[int, str, dict]:
    """Run the real CLI; (exit code, its output folded, the summary JSON or {})."""
    summary = out.parent / "summary.json"
    summary.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "-o", str(out), "--base-url",
         server.base_url, "--model", "gpt-4o-mini", "--summary-json", str(summary), "--prompt", "Describe {topic}",
         "--system", "Be brief.", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    text = " ".join((result.stdout + result.stderr).split())
    return result.returncode, text, json.loads(summary.read_text()) if summary.exists() else {}


def test_limit_enriches_the_first_rows_into_the_trial_file_and_the_full_run_pays_only_the_rest(
    fake_llm: FakeOpenAIServer, table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    code, text, summary = enrich(fake_llm, table, out, "--limit", "10")
    assert code == 0, text
    trial = tmp_path / "out.trial.parquet"
    assert not out.exists(), "a trial never writes the destination"
    got = pl.read_parquet(trial)
    assert got.get_column("id").to_list() == list(range(1, 11))
    for topic, answer in zip(got.get_column("topic"), got.get_column("explanation"), strict=True):
        assert answer == expected_answer(f"Describe {topic}", "Be brief."), "each row has its own answer"
    assert fake_llm.stats.completions == 10
    whole = summary["full_run_estimate"]
    assert summary["trial"] == "the first 10 valid rows" and summary["output"] == str(trial)
    assert whole["rows"] == ROWS and whole["distinct_prompts_to_send"] == DISTINCT - 10
    assert whole["based_on_prompts"] == 10
    # Scaled from what the trial really used, not from max_tokens: far below the ceiling.
    per_prompt_out = summary["output_tokens"] / 10
    assert whole["projected_output_tokens"] == round(per_prompt_out * (DISTINCT - 10))
    assert whole["projected_cost_usd"] < whole["ceiling_cost_usd"]
    assert "distinct prompts still to send" in text and str(trial) in text

    code, text, summary = enrich(fake_llm, table, out)
    assert code == 0, text
    assert fake_llm.stats.completions == DISTINCT, "the trial's answers came from the cache"
    assert summary["rows_ok"] == ROWS and summary.get("full_run_estimate") is None


def test_sample_is_random_repeatable_by_seed_and_never_the_output(
    fake_llm: FakeOpenAIServer, table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    picks = []
    for seed in ("0", "0", "7"):
        code, text, summary = enrich(fake_llm, table, out, "--sample", "25", "--seed", seed, "--no-cache")
        assert code == 0, text
        ids = pl.read_parquet(tmp_path / "out.trial.parquet").get_column("id").to_list()
        assert len(ids) == len(set(ids)) == 25 and summary["rows_valid"] == 25
        picks.append(ids)
    assert picks[0] == picks[1], "the same seed picks the same rows"
    assert picks[0] != picks[2], "another seed picks other rows"
    assert picks[0] != list(range(1, 26)) and max(picks[0]) > 100, "spread over the table, not its head"
    assert not out.exists()


def test_a_trial_in_place_writes_beside_the_input_and_leaves_it_alone(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    source = tmp_path / "table.parquet"
    pl.DataFrame({"id": range(1, 51), "topic": [f"t{i}" for i in range(50)]}).write_parquet(source)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "--in-place", "--limit", "5",
         "--base-url", fake_llm.base_url],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert pl.read_parquet(tmp_path / "table.trial.parquet").height == 5


def test_limit_and_sample_together_are_refused_before_anything_is_sent(
    fake_llm: FakeOpenAIServer, table: Path, tmp_path: Path
) -> None:
    code, text, _ = enrich(fake_llm, table, tmp_path / "out.parquet", "--limit", "5", "--sample", "5")
    assert code == 2, text
    assert "limit and sample" in text and "Traceback" not in text
    assert fake_llm.stats.requests == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
