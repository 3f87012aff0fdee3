"""The enrich CLI: options, job files, exit codes, messages and the summary JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import DATA, REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer
from tests.prefect_server import free_port

pytestmark = pytest.mark.usefixtures("prefect_backend")

SUMMARY_KEYS = {
    "rows_cached",
    "rows_deduplicated",
    "cost_usd",
    "rate_limited",
    "rows_in", "rows_valid", "rows_rejected", "rows_ok", "rows_failed", "requests",
    "input_tokens", "output_tokens", "wall_seconds", "output",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _prefect_url(prefect_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI subprocesses report to the session's Prefect server instead of starting their own."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def invoke(*args: str) -> tuple[int, str]:
    """Run the real `enrich` command; returns its exit code and output with white space folded."""
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def test_run_writes_the_output_and_the_summary_json(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    out, summary_path = tmp_path / "out.parquet", tmp_path / "run.json"
    code, output = invoke(
        "run", str(DATA / "topics.csv"), "--output", str(out), "--base-url", fake_llm.base_url,
        "--prompt", "Describe {topic} ({category})", "--output-column", "description",
        "--system", "You are a concise teacher.", "--model", "gpt-4o-mini", "--max-concurrency", "4",
        "--max-retries", "2", "--timeout", "5", "--temperature", "0", "--max-tokens", "64",
        "--partition-rows", "8", "--on-invalid", "fail", "--summary-json", str(summary_path),
        "--rpm", "6000", "--tpm", "1000000", "--no-cache", "--max-cost", "5",
    )  # fmt: skip
    assert code == 0, output
    assert f"into {out}: 30 ok, 0 failed" in output
    summary = json.loads(summary_path.read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["rows_ok"] == 30 and summary["requests"] == 30 and summary["rate_limited"] == 0
    assert 0 < summary["cost_usd"] < 5
    assert not (tmp_path / ".enrich-cache").exists()
    frame = pl.read_parquet(out)
    first = frame.row(0, named=True)
    assert first["description"] == expected_answer("Describe 인공지능 (ai)", "You are a concise teacher.")
    body = fake_llm.stats.bodies[0]
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0
    assert body["max_completion_tokens"] == 64 and body["max_tokens"] == 64


def test_a_job_file_with_overrides(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input_path: {DATA / 'topics.csv'}\noutput_path: {tmp_path / 'a.parquet'}\n"
        f"base_url: {fake_llm.base_url}\noutput_column: first_try\npartition_rows: 10\n"
    )
    code, output = invoke("run", "--config", str(config), "--output-column", "overridden")
    assert code == 0, output
    assert "overridden" in pl.read_parquet(tmp_path / "a.parquet").columns


def test_bad_rows_exit_2_with_the_report_and_no_traceback(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    code, output = invoke("run", str(DATA / "topics_bad.csv"), "-o", str(out), "--base-url", fake_llm.base_url)
    assert code == 2
    assert "error:" in output and "7 of 9 rows fail" in output and "row 7: column 'topic'" in output
    assert "Traceback" not in output
    assert not out.exists()


def test_quarantine_exits_0_and_names_the_rejected_file(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    code, output = invoke(
        "run",
        str(DATA / "topics_bad.csv"),
        "-o",
        str(out),
        "--base-url",
        fake_llm.base_url,
        "--on-invalid",
        "quarantine",
    )
    assert code == 0, output
    assert "7 rejected" in output and "out.rejected.parquet" in output


def test_rows_that_fail_at_the_model_still_exit_0(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": [1, 2, 3], "topic": ["a", "FAULT:400", "c"]}).write_csv(source)
    code, output = invoke("run", str(source), "-o", str(tmp_path / "o.parquet"), "--base-url", fake_llm.base_url)
    assert code == 0, output
    assert "2 ok, 1 failed" in output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-concurrency", "0"], "max_concurrency: Input should be greater than or equal to 1"),
        (["--on-invalid", "ignore"], "on_invalid"),
        (["--prompt", "Explain {title}"], "'title', which is not a column"),
        (["--schema", "nowhere:Nothing"], "could not be loaded"),
        (["--format", "xml"], "input_format"),
        (["--output-column", "enrich_error"], "reserved"),
        (["--storage-option", "aws_region"], "--storage-option number 1 must look like KEY=VALUE"),
        (["--output-schema", "score:int[5..1]"], "the range of field 'score' (int[5..1]) is empty"),
        (["--api-key-env", "LLM_ENRICH_NO_SUCH_KEY"], "LLM_ENRICH_NO_SUCH_KEY, which is not set"),
        (["--max-cost", "nan"], "max_cost: Input should be a finite number"),
    ],
)
def test_configuration_mistakes_exit_2_with_a_message(
    fake_llm: FakeOpenAIServer, tmp_path: Path, args: list[str], fragment: str
) -> None:
    code, output = invoke(
        "run",
        str(DATA / "topics.csv"),
        "-o",
        str(tmp_path / "o.parquet"),
        "--base-url",
        fake_llm.base_url,
        *args,
    )
    assert code == 2, output
    assert fragment in output
    assert "Traceback" not in output
    assert fake_llm.stats.requests == 0


def test_there_is_no_way_to_pass_a_key_as_an_argument() -> None:
    code, output = invoke("run", str(DATA / "topics.csv"), "--api-key", "sk-nope")
    assert code == 2 and "No such option" in output


def test_a_missing_file_exits_2_without_a_traceback(tmp_path: Path) -> None:
    code, output = invoke("run", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o.parquet"))
    assert code == 2
    assert "missing.csv' does not exist" in output
    assert "Traceback" not in output


def test_an_endpoint_that_never_answers_stops_the_run_early(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    out = tmp_path / "o.parquet"
    code, output = invoke("run", str(DATA / "topics.csv"), "-o", str(out), "--base-url", dead, "--max-retries", "6")
    assert code == 2, output
    assert re.search(r"error: could not reach the LLM endpoint: \d+ attempts in a row failed", output)
    assert "Traceback" not in output and not out.exists()


def test_a_key_in_the_base_url_is_refused_and_never_printed(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    secret = "sk-in-the-url-123"
    host = fake_llm.base_url.removeprefix("http://")
    for url in (f"http://user:{secret}@{host}", f"{fake_llm.base_url}?api-key={secret}"):
        code, output = invoke("run", str(DATA / "topics.csv"), "-o", str(tmp_path / "o.parquet"), "--base-url", url)
        assert code == 2, output
        assert "holds credentials" in output and "--api-key-env" in output
        assert secret not in output
    assert fake_llm.stats.requests == 0
    assert not (tmp_path / "o.parquet").exists()


def test_paths_with_glob_and_markup_characters_work_and_are_printed_whole(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    """'[x]' in a path is neither a polars glob nor rich markup: the run works and messages keep it."""
    folder = tmp_path / "[x] data*"
    folder.mkdir()
    source = folder / "in[1].csv"
    source.write_bytes((DATA / "topics.csv").read_bytes())
    out = tmp_path / "out[1]" / "o[x].parquet"
    code, output = invoke("run", str(source), "-o", str(out), "--base-url", fake_llm.base_url)
    assert code == 0, output
    assert f"into {out}: 30 ok, 0 failed" in output
    assert pl.read_parquet(out, glob=False).height == 30
    # A rerun finds its previous answers and cache beside an output whose path has brackets.
    code, output = invoke("run", str(source), "-o", str(out), "--base-url", fake_llm.base_url)
    assert code == 0 and fake_llm.stats.requests == 30, output
    for missing in (tmp_path / "[x]" / "nope.csv", tmp_path / "[" / "x]" / "nope.csv"):
        code, output = invoke("run", str(missing), "-o", str(tmp_path / "o2.parquet"))
        assert code == 2, output
        assert f"'{missing}' does not exist" in output and "Traceback" not in output
