"""Stop when asked, never pay twice: real signals to real CLI processes, quota, two runs on one output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.tables.lock import hold_lock, lock_path
from tests.conftest import REPO
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer, expected_answer

pytestmark = pytest.mark.usefixtures("prefect_backend")

ROWS = 120


@pytest.fixture(autouse=True)
def _prefect_url(prefect_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def topics(folder: Path, rows: int = ROWS) -> Path:
    source = folder / "in.csv"
    pl.DataFrame({"id": list(range(rows)), "topic": [f"subject {i}" for i in range(rows)]}).write_csv(source)
    return source


def start(server: FakeOpenAIServer, source: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    """The real command in its own process, reporting to the session's Prefect server."""
    command = [
        sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "--output", str(out),
        "--base-url", server.base_url,
        "--max-concurrency", "4", "--partition-rows", "30", "--retry-base-delay", "0.05", *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_completions(server: FakeOpenAIServer, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while server.stats.completions < count:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.05)


def leftovers(folder: Path) -> list[str]:
    """Anything a run may leave beside its output: staging, temp files, the lock."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".enrich-cache")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_keeps_the_answers_and_a_rerun_pays_only_for_the_rest(
    sig: signal.Signals, code: int, tmp_path: Path
) -> None:
    source, out = topics(tmp_path), tmp_path / "out" / "enriched.parquet"
    out.parent.mkdir()
    pl.DataFrame({"previous": [1]}).write_parquet(out)
    previous = out.read_bytes()
    with FakeOpenAIServer(Behaviour(latency=0.25)) as server:
        process = start(server, source, out)
        wait_for_completions(server, 12, process)
        sent = time.monotonic()
        process.send_signal(sig)
        output, _ = process.communicate(timeout=60)
        stopped_in = time.monotonic() - sent
        answered = server.stats.completions
        assert process.returncode == code, output
        assert stopped_in < 15, f"took {stopped_in:.1f} s to stop"
        assert f"interrupted by {sig.name}" in output and "Traceback" not in output
        assert answered < ROWS
        assert out.read_bytes() == previous
        assert leftovers(out.parent) == []
        server.reset()
        process = start(server, source, out)
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
        # Every answer that came back before the stop was kept: the rerun asks only for the rest.
        assert server.stats.requests == ROWS - answered
    result = pl.read_parquet(out)
    assert result["explanation"].to_list() == [expected_answer(f"Explain this topic in two sentences: {t}")
                                               for t in result["topic"]]  # fmt: skip


def test_an_exhausted_quota_stops_the_run_at_once_and_keeps_what_was_answered(tmp_path: Path) -> None:
    source, out = topics(tmp_path), tmp_path / "enriched.parquet"
    with FakeOpenAIServer(Behaviour(quota_after=20)) as server:
        began = time.monotonic()
        process = start(server, source, out, "--max-retries", "6", "--retry-base-delay", "1")
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 2, output
        assert "quota" in output and "kept" in output and "Traceback" not in output
        assert time.monotonic() - began < 60
        assert not out.exists()
        # Quota 429s are not retried: a handful were in flight when it ran out, no more.
        assert server.stats.requests - server.stats.completions <= 8
        server.behaviour.quota_after = None
        server.reset()
        process = start(server, source, out)
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
        assert server.stats.requests == ROWS - 20


def test_two_runs_on_one_output_take_turns_and_pay_once(tmp_path: Path) -> None:
    source, out = topics(tmp_path), tmp_path / "enriched.parquet"
    with FakeOpenAIServer(Behaviour(latency=0.05)) as server:
        first = start(server, source, out)
        second = start(server, source, out)
        outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
        assert [first.returncode, second.returncode] == [0, 0], outputs
        assert server.stats.completions == ROWS
        assert sum("waiting for another run" in o for o in outputs) <= 1
    assert pl.read_parquet(out).height == ROWS
    assert leftovers(tmp_path) == []


def test_no_wait_refuses_naming_the_run_that_holds_the_output(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source, out = topics(tmp_path, rows=5), tmp_path / "enriched.parquet"
    with hold_lock(str(out), wait=False, timeout=1, on_wait=print, check_stop=lambda: None):
        process = start(fake_llm, source, out, "--no-wait")
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert f"pid {os.getpid()}" in " ".join(output.split()) and "Traceback" not in output
    assert fake_llm.stats.requests == 0
    assert not lock_path(str(out)).exists()


def test_debris_of_a_killed_run_is_swept_by_the_next(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source, out = topics(tmp_path, rows=5), tmp_path / "enriched.parquet"
    dead = tmp_path / ".enriched.parquet.staging-0123abcd-deadbeef0000"
    (dead / "in").mkdir(parents=True)
    (dead / "in" / "part-000000.parquet").write_bytes(b"a copy of the table")
    (tmp_path / ".enriched.parquet.x1y2.tmp").write_bytes(b"half a file")
    process = start(fake_llm, source, out)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert leftovers(tmp_path) == []


def _small_disk(folder: Path) -> Path:
    """A 1 MB tmpfs mounted for the test (needs root, as CI has); skipped elsewhere."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = folder / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    return disk


@pytest.mark.parametrize("fills", ["staging", "output"])
def test_a_full_disk_is_one_message_and_leaves_no_debris(fills: str, tmp_path: Path) -> None:
    disk = _small_disk(tmp_path)
    try:
        source = tmp_path / "wide.csv"
        # Incompressible values: the staged slices and the output are each bigger than the disk.
        values = [os.urandom(1_500).hex() for _ in range(1_000)]
        pl.DataFrame({"id": list(range(1_000)), "topic": values}).write_csv(source)
        out = disk / "enriched.parquet"
        elsewhere = ["--staging-dir", str(tmp_path / "staging"), "--cache-dir", str(tmp_path / "cache")]
        with FakeOpenAIServer() as server:
            process = start(server, source, out, "--max-concurrency", "16", *(elsewhere if fills == "output" else []))
            output, _ = process.communicate(timeout=300)
            assert process.returncode == 1, output
            assert f"the disk holding the {fills}" in " ".join(output.split()) and "is full" in output
            assert "Traceback" not in output
            if fills == "staging":
                assert server.stats.requests == 0  # staging fills during the survey, before any request
        assert sorted(p.name for p in disk.iterdir() if p.name != ".enrich-cache") == []
        assert not list((tmp_path / "staging").glob("*")) if fills == "output" else True
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_reply_that_trickles_is_cut_at_the_timeout_and_counted(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": [1, 2, 3], "topic": ["fine", "FAULT:trickle", "also fine"]}).write_csv(source)
    fake_llm.behaviour.trickle_interval = 0.5  # a 300-byte body would take minutes
    out, summary = tmp_path / "out.parquet", tmp_path / "run.json"
    began = time.monotonic()
    process = start(fake_llm, source, out, "--timeout", "2", "--max-retries", "1", "--summary-json", str(summary))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert time.monotonic() - began < 90
    result = pl.read_parquet(out)
    assert result["enrich_error"].to_list()[0] is None and result["enrich_error"].to_list()[2] is None
    assert "no complete reply within `timeout` 2 s" in result["enrich_error"][1]
    assert json.loads(summary.read_text())["timeouts"] == 2


@pytest.mark.parametrize(("number", "after"), [(signal.SIGINT, 0.5), (signal.SIGTERM, 0.5)])
def test_a_signal_while_the_command_starts_exits_quietly(tmp_path: Path, number: int, after: float) -> None:
    """The first second goes to imports: a signal there is the same quiet exit as later, nothing written."""
    out = tmp_path / "o.parquet"
    child = subprocess.Popen(
        [sys.executable, "-m", "llm_enrich.flows.cli", "run", str(REPO / "data" / "topics.csv"), "-o", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(after)
        child.send_signal(number)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert child.returncode == 128 + number, err
    assert "Traceback" not in err and "interrupted before the run started" in err
    assert list(tmp_path.iterdir()) == []


# A real SIGINT, sent by the process to itself from inside a pydantic serializer, so the KeyboardInterrupt
# surfaces where a badly timed Ctrl-C once did: wrapped in a serialization error. `where` picks the spot:
# Prefect's logging set-up at import (the wrapped error is raised) or the flow's parameters (Prefect
# catches the wrapped error and stores a placeholder, so the interrupt is swallowed).
_TRAP = """
import os, runpy, signal, sys, time
import fastapi.encoders, prefect.flows, prefect.settings.base
from pydantic import BaseModel, model_serializer

class Trap(BaseModel):
    @model_serializer(mode="wrap")
    def _spring(self, handler):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # the handler runs here, inside pydantic's call
        return handler(self)

sprung, armed = [], []

def spring():
    released = getattr(signal.getsignal(signal.SIGINT), "__qualname__", "").startswith("interrupt_on_signals")
    if released and not sprung:
        sprung.append(True)
        Trap().model_dump()

if sys.argv[1] == "import":
    to_env = prefect.settings.base.PrefectBaseSettings.to_environment_variables
    def to_environment_variables(self, *args, **kwargs):
        spring()
        return to_env(self, *args, **kwargs)
    prefect.settings.base.PrefectBaseSettings.to_environment_variables = to_environment_variables
else:
    encode, serialize = fastapi.encoders.jsonable_encoder, prefect.flows.Flow.serialize_parameters
    def jsonable_encoder(*args, **kwargs):
        if armed:
            spring()
        return encode(*args, **kwargs)
    def serialize_parameters(self, parameters):
        armed.append(True)
        try:
            return serialize(self, parameters)
        finally:
            armed.clear()
    fastapi.encoders.jsonable_encoder, prefect.flows.Flow.serialize_parameters = jsonable_encoder, serialize_parameters
sys.argv = ["enrich", *sys.argv[2:]]
runpy.run_module("llm_enrich.flows.cli", run_name="__main__")
"""


@pytest.mark.parametrize("where", ["import", "parameters"])
def test_an_interrupt_a_library_wraps_or_swallows_still_stops_the_command_cleanly(
    fake_llm: FakeOpenAIServer, tmp_path: Path, where: str
) -> None:
    source, out = topics(tmp_path, rows=20), tmp_path / "out.parquet"
    command = [
        sys.executable, "-c", _TRAP, where, "run", str(source), "--output", str(out), "--base-url", fake_llm.base_url,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    if where == "import":
        assert "interrupted before the run started; nothing was sent or written." in done.stderr
    else:  # the run noticed the swallowed interrupt and stopped before its first request
        assert "interrupted by SIGINT before the run sent anything; nothing was written." in done.stderr
    assert fake_llm.stats.requests == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".enrich-cache") == ["in.csv"]


_TWO_RUNS = """
import os, signal, time
from llm_enrich.flows.run.stopping import stop_on_signals
from llm_enrich.transforms.guards import StopSignal

for run in range(2):  # a notebook: two runs in one kernel, each stopped by one Ctrl-C
    stop = StopSignal()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not stop.is_set and time.monotonic() < deadline:
            time.sleep(0.01)
    print(run, stop.reason, flush=True)
"""


def test_each_run_in_one_process_gets_its_own_graceful_first_signal() -> None:
    done = subprocess.run([sys.executable, "-c", _TWO_RUNS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0 interrupted by SIGINT", "1 interrupted by SIGINT"]
