"""Batch mode (--mode batch) through the real CLI against the fake Files and Batches API on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from llm_enrich.transforms.batch_lines import split_lines
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


def test_batch_lines_count_their_cached_tokens_per_row_and_in_the_price(tmp_path: Path) -> None:
    # A long static system message (given last, it wins): every prompt shares a 1,024-token prefix, so
    # the first line writes the prompt cache and the others read it.
    system = "You describe topics for an encyclopedia. " + "Follow the house style carefully. " * 150
    source, out = table(tmp_path, rows=8, distinct=4), tmp_path / "out.parquet"
    with serving() as server:
        code, text, summary = enrich(server, source, out, "--system", system)
        assert code == 0, text
        assert server.stats.batch_lines_answered == 4 and server.stats.completions == 4
        [batch] = server.batch_api.batches.values()
        assert batch.usage()["input_tokens_details"]["cached_tokens"] == 3 * 1024  # as the Batch object reports
    assert summary["cached_input_tokens"] == 3 * 1024
    frame = pl.read_parquet(out)
    cached = frame["enrich_cached_tokens"].to_list()
    assert sorted(cached[:4]) == [0, 1024, 1024, 1024] and cached[4:] == [0] * 4, "repeats paid nothing"
    assert frame["enrich_cached_tokens"].sum() == summary["cached_input_tokens"]
    assert (frame["enrich_cached_tokens"] <= frame["enrich_input_tokens"]).all()
    # Batch prices, with the cached input at the (halved) cached-input price.
    listed = price_for("gpt-4o-mini", DEFAULT_PRICES)
    assert listed is not None
    paid = listed.discounted(0.5).cost(summary["input_tokens"], summary["output_tokens"], 3 * 1024)
    assert summary["cost_usd"] == pytest.approx(paid, abs=1e-6)
    assert summary["cost_usd"] < listed.cost(summary["input_tokens"], summary["output_tokens"]) / 2


def test_files_are_split_at_batch_max_requests_and_failed_lines_become_row_errors(tmp_path: Path) -> None:
    faults = {3: "FAULT:invalid_prompt", 7: "FAULT:500", 11: "FAULT:content_filter"}
    source, out = table(tmp_path, rows=25, distinct=25, faults=faults), tmp_path / "out.parquet"
    with serving() as server:
        code, text, summary = enrich(server, source, out, "--batch-max-requests", "10")
        assert code == 0, text
        assert server.stats.batches_created == 3 and server.stats.batch_lines_answered == 23
        assert sorted(len(b["custom_ids"]) for b in server.stats.batches) == [5, 10, 10]
    frame = pl.read_parquet(out)
    errors = dict(zip(frame.get_column("id"), frame.get_column("enrich_error"), strict=True))
    assert errors[3] is not None and errors[3].startswith("HTTP 400") and "invalid_prompt" in errors[3]
    assert errors[7] is not None and errors[7].startswith("HTTP 500")
    assert errors[11] is not None and "content filter" in errors[11]  # judged as online: finish_reason
    assert [i for i, e in errors.items() if e is not None] == [3, 7, 11] and summary["rows_failed"] == 3
    good = frame.filter(pl.col("enrich_error").is_null())
    for topic, answer in zip(good.get_column("topic"), good.get_column("explanation"), strict=True):
        assert answer == expected_answer(f"Describe {topic}", SYSTEM)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_goes_through_a_batch(tmp_path: Path, method: str) -> None:
    source, out = table(tmp_path, rows=6, distinct=6), tmp_path / "out.parquet"
    with serving() as server:
        code, text, summary = enrich(
            server, source, out, "--output-schema", "summary:str, level:int[1..5]", "--output-prefix", "ai_",
            "--structured-method", method,
        )  # fmt: skip
        assert code == 0, text
        assert server.stats.batch_lines_answered == 6 and server.stats.kinds["structured"] == 6
    frame = pl.read_parquet(out)
    assert frame.schema["ai_level"] == pl.Int64 and summary["rows_ok"] == 6
    assert frame.get_column("ai_summary").null_count() == 0
    assert frame.get_column("ai_level").is_between(1, 5).all()


def test_no_wait_submits_and_a_second_run_collects(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    manifest = tmp_path / ".out.parquet.batches.json"
    with serving(batch_line_seconds=0.02) as server:
        code, text, summary = enrich(server, source, out, "--batch-no-wait")
        assert code == 0, text
        assert "submitted 1 batches for 20 prompts" in text and "run the same command again to collect" in text
        assert summary["batches_pending"] == 1 and not out.exists() and manifest.exists()
        [pending] = latest_batches_artifact()
        batch_id = json.loads(manifest.read_text())["entries"][0]["batch_id"]
        assert (pending["batch"], pending["lines"], pending["state"]) == (batch_id, 20, "submitted")
        code, text, summary = enrich(server, source, out)
        assert code == 0, text
        assert server.stats.batches_created == 1 and server.stats.batch_lines_answered == 20
    check_answers(out)
    assert summary["rows_ok"] == 30 and not manifest.exists()
    [collected] = latest_batches_artifact()
    assert (collected["batch"], collected["state"], collected["provider status"]) == (batch_id, "done", "completed")


def latest_batches_artifact() -> list[dict[str, Any]]:
    """The rows of the last run's `enrich-batches` table artifact."""
    from prefect.artifacts import Artifact

    found = Artifact.get("enrich-batches")
    assert found is not None and isinstance(found.data, str)
    return list(json.loads(found.data))


def started(server: FakeOpenAIServer, source: Path, out: Path, ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
    """The CLI in batch mode as a child process, once ``ready()`` holds (within 60 s)."""
    child = subprocess.Popen(
        command(server, source, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not ready():
        if time.monotonic() > deadline or child.poll() is not None:
            child.kill()
            child.wait(timeout=10)
            raise AssertionError("the run never got there")
        time.sleep(0.02)
    return child


def test_a_killed_run_resumes_its_batch_instead_of_submitting_again(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    manifest = tmp_path / ".out.parquet.batches.json"
    with serving(batch_line_seconds=0.4) as server:
        child = started(server, source, out, lambda: manifest.exists() and '"submitted"' in manifest.read_text())
        try:
            assert server.stats.batches_created == 1
            os.kill(child.pid, signal.SIGKILL)  # a real SIGKILL: nothing runs after it
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
        assert server.stats.batch_lines_answered < 20, "killed before the batch completed"
        # The rerun polls the same batch; Ctrl-C there stops it at once (exit 130) and writes nothing.
        killed_at = manifest.stat().st_mtime
        child = started(server, source, out, lambda: manifest.stat().st_mtime > killed_at)
        try:
            time.sleep(0.3)
            os.kill(child.pid, signal.SIGINT)
            asked = time.monotonic()
            assert child.wait(timeout=15) == 130
            stopped_after = time.monotonic() - asked
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
        assert stopped_after < 5 and not out.exists() and manifest.exists()
        code, text, _ = enrich(server, source, out)
        assert code == 0, text
        assert server.stats.batches_created == 1 and server.stats.batch_lines_answered == 20
    check_answers(out)


def test_an_expired_batch_keeps_its_answers_and_resubmits_the_rest_once(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    with serving(batch_line_seconds=0.05, batch_expire_seconds=0.4) as server:
        code, text, summary = enrich(server, source, out)
        assert code == 0, text
        stats = server.stats
        assert stats.batches_created == 2 and [b["status"] for b in stats.batches] == ["expired", "expired"]
        second = set(stats.batches[1]["custom_ids"])
        assert second < set(stats.batches[0]["custom_ids"]), "only the unfinished lines went again"
    frame = pl.read_parquet(out)
    answered = frame.filter(pl.col("enrich_error").is_null())
    assert 0 < summary["rows_failed"] < 30 and answered.height == 30 - summary["rows_failed"]
    for topic, answer in zip(answered.get_column("topic"), answered.get_column("explanation"), strict=True):
        assert answer == expected_answer(f"Describe {topic}", SYSTEM)
    failed = frame.filter(pl.col("enrich_error").is_not_null()).get_column("enrich_error")
    assert all("ended expired" in e for e in failed)


def test_the_enqueued_token_limit_sends_the_files_in_waves(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"  # 20 prompts of 6 tokens: 30 a file of 5
    with serving(batch_enqueued_tokens=40, batch_line_seconds=0.01) as server:
        code, text, _ = enrich(server, source, out, "--batch-max-requests", "5")
        assert code == 0, text
        stats = server.stats
        assert stats.batch_lines_answered == 20 and stats.max_enqueued_tokens <= 40
        refused = [b for b in stats.batches if b["status"] == "failed"]
        assert refused and stats.batches_created == 4 + len(refused)
    check_answers(out)


def test_a_request_the_batch_api_rejects_is_a_user_error(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    with serving(batch_max_requests=5) as server:  # the provider's limit is below --batch-max-requests
        code, text, _ = enrich(server, source, out)
    assert code == 2, text
    assert "the Batch API rejected the request (HTTP 400" in text and "at most 5" in text
    assert not out.exists()
    manifest = json.loads((tmp_path / ".out.parquet.batches.json").read_text())
    assert manifest["entries"] == [], "a rerun with a smaller --batch-max-requests splits afresh"


def test_lines_are_split_within_both_limits() -> None:
    assert split_lines([10] * 5, max_requests=2, max_bytes=1_000) == [(0, 2), (2, 4), (4, 5)]
    assert split_lines([400, 400, 400, 100], max_requests=10, max_bytes=1_000) == [(0, 2), (2, 4)]
    assert split_lines([5_000, 10], max_requests=10, max_bytes=1_000) == [(0, 1), (1, 2)]  # one line at least
    assert split_lines([], max_requests=10, max_bytes=1_000) == []


def test_batch_cancel_keeps_what_finished_and_a_rerun_pays_only_for_the_rest(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    manifest = tmp_path / ".out.parquet.batches.json"
    # A line a second: the cancel lands mid-batch even on a slow, busy machine.
    with serving(batch_line_seconds=1.0) as server:
        code, text, _ = enrich(server, source, out, "--batch-no-wait")
        assert code == 0, text
        deadline = time.monotonic() + 60
        while server.stats.batch_lines_answered < 2:
            assert time.monotonic() < deadline, "the batch never started answering"
            time.sleep(0.02)
        cancel = command(server, source, out)
        cancel[3:4] = ["batch", "cancel"]  # `enrich batch cancel` with the run's own options
        result = subprocess.run(cancel, capture_output=True, text=True, cwd=REPO, timeout=120)
        folded = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 0, folded
        assert "cancelled 1 batches" in folded
        finished = server.stats.batch_lines_answered
        assert 2 <= finished < 20, "cancelled while it was running"
        frame = pl.read_parquet(out)
        answered = frame.filter(pl.col("explanation").is_not_null())
        assert answered["topic"].n_unique() == finished  # every finished line is kept, in its own rows
        for topic, answer in zip(answered["topic"], answered["explanation"], strict=True):
            assert answer == expected_answer(f"Describe {topic}", SYSTEM)
        rest = frame.filter(pl.col("explanation").is_null())
        assert rest.height == 30 - answered.height
        assert rest["enrich_error"].str.contains("enrich batch cancel").all()
        assert server.stats.batches_created == 1 and not manifest.exists()
        # The rerun sends only the prompts the cancelled batch did not answer.
        code, text, summary = enrich(server, source, out)
        assert code == 0, text
        assert server.stats.batches_created == 2 and server.stats.batch_lines_answered == 20
    check_answers(out)
    assert summary["rows_ok"] == 30


def test_batch_cancel_without_batches_is_a_clear_error(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    with serving() as server:
        cancel = command(server, source, out)
        cancel[3:4] = ["batch", "cancel"]
        result = subprocess.run(cancel, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "no batches to cancel" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_max_cost_caps_what_a_batch_submits_and_a_rerun_sends_the_rest(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    # $1,000 per million tokens: each line reserves about (12 + 16) tokens -> ~$0.028 at worst.
    priced = ["--input-price", "1000", "--output-price", "1000", "--max-tokens", "16"]
    with serving() as server:
        code, text, summary = enrich(server, source, out, *priced, "--max-cost", "0.2")
        assert code == 0, text
        sent = server.stats.batch_lines_answered
        assert 0 < sent < 20 and summary["cost_usd"] <= 0.2
        frame = pl.read_parquet(out)
        not_sent = frame.filter(pl.col("enrich_error").str.starts_with("not sent: the `max_cost` budget"))
        assert not_sent["topic"].n_unique() == 20 - sent and not_sent["explanation"].null_count() == not_sent.height
        code, text, summary = enrich(server, source, out, *priced, "--max-cost", "10")
        assert code == 0, text
        assert server.stats.batch_lines_answered == 20 and summary["rows_failed"] == 0
    check_answers(out)


def test_past_the_batch_deadline_the_rest_goes_online_and_each_prompt_is_paid_once(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    manifest = tmp_path / ".out.parquet.batches.json"
    # A line every half second: the batch alone would take 10 s; the deadline cuts in after 2.
    with serving(batch_line_seconds=0.5) as server:
        code, text, summary = enrich(server, source, out, "--deadline", "2s")
        assert code == 0, text
        by_batch = server.stats.batch_lines_answered
        online = server.stats.completions - by_batch
        assert 1 <= by_batch < 20, "the deadline cut the batch short"
        assert online == 20 - by_batch, "what the batch did not answer went online, nothing twice"
        assert max(server.stats.prompts.values()) == 1, "no prompt was asked both by batch and online"
        assert server.stats.batches_created == 1 and server.stats.batches[0]["status"] == "cancelled"
    check_answers(out)
    assert summary["rows_ok"] == 30 and summary["rows_failed"] == 0
    assert any(f"{online} prompts were sent online" in note for note in summary["notes"]), summary["notes"]
    assert not manifest.exists()


def test_a_later_run_past_the_deadline_stops_waiting_for_a_submitted_batch(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    manifest = tmp_path / ".out.parquet.batches.json"
    with serving(batch_line_seconds=1.0) as server:  # 20 s for the whole batch
        code, text, _ = enrich(server, source, out, "--batch-no-wait", "--deadline", "1")
        assert code == 0, text
        assert json.loads(manifest.read_text())["first_submitted"] is not None
        time.sleep(1.5)
        # The scheduled rerun: the deadline counts from the first submission, recorded in the manifest.
        code, text, summary = enrich(server, source, out, "--deadline", "1")
        assert code == 0, text
        by_batch = server.stats.batch_lines_answered
        assert by_batch < 20 and server.stats.completions - by_batch == 20 - by_batch
        assert max(server.stats.prompts.values()) == 1 and server.stats.batches_created == 1
    check_answers(out)
    assert summary["rows_ok"] == 30
    assert not manifest.exists()


def test_a_deadline_reads_as_a_duration() -> None:
    from llm_enrich.flows.job import EnrichJob, parse_duration

    assert [parse_duration(t) for t in ("90", "90s", "30m", "6h", "1d", " 1.5H ")] == [90, 90, 1800, 21600, 86400, 5400]
    assert EnrichJob(batch_deadline="45m").batch_deadline == 2700
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_collect_writes_the_submitted_batches_answers_and_sends_nothing_new(tmp_path: Path) -> None:
    source, out = table(tmp_path), tmp_path / "out.parquet"
    manifest = tmp_path / ".out.parquet.batches.json"

    def collect(path: Path) -> tuple[int, str, dict[str, Any]]:
        argv = command(server, path, out)
        argv[3:4] = ["collect"]  # `enrich collect` with the run's own options
        (out.parent / "summary.json").unlink(missing_ok=True)
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
        summary = out.parent / "summary.json"
        return (
            result.returncode,
            " ".join((result.stdout + result.stderr).split()),
            (json.loads(summary.read_text()) if summary.exists() else {}),
        )

    with serving(batch_line_seconds=0.05) as server:
        code, text = collect(source)[:2]
        assert code == 2 and "there are no batches to collect" in text and not out.exists()
        code, text, _ = enrich(server, source, out, "--batch-no-wait")
        assert code == 0 and manifest.exists(), text
        # Rows added since: collecting never pays for them.
        grown = tmp_path / "grown.csv"
        pl.concat([pl.read_csv(source), pl.DataFrame({"id": [30, 31], "topic": ["new a", "new b"]})]).write_csv(grown)
        code, text, summary = collect(grown)
        assert code == 0, text
        assert server.stats.batches_created == 1 and server.stats.completions == 20, "nothing new was sent"
    frame = pl.read_parquet(out)
    new = frame.filter(pl.col("id") >= 30)
    assert new["explanation"].null_count() == 2
    assert new["enrich_error"].str.starts_with("not sent: collecting submits no new batch").all()
    old = frame.filter(pl.col("id") < 30)
    for topic, answer in zip(old["topic"], old["explanation"], strict=True):
        assert answer == expected_answer(f"Describe {topic}", SYSTEM)
    assert summary["rows_ok"] == 30 and summary["rows_failed"] == 2 and not manifest.exists()
