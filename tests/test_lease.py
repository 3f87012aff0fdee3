"""One run per output in a bucket: lease objects on a real moto server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import obstore
import polars as pl
import pytest
from obstore.exceptions import PreconditionError

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import enrich_table
from llm_enrich.flows.tables.lease import _Lease, hold_lease, lease_location
from llm_enrich.flows.tables.paths import open_store
from llm_enrich.schemas.errors import DestinationBusy, RunInterrupted
from tests.conftest import REPO
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer, expected_answer
from tests.test_object_store import s3_endpoint, s3_env  # noqa: F401 - the moto_server fixtures

pytestmark = pytest.mark.usefixtures("s3_env")


def _never_stop() -> None:
    return None


def _lease_object(destination: str, storage: dict[str, str] | None = None) -> dict[str, object] | None:
    folder, _, name = lease_location(destination).rpartition("/")
    try:
        return json.loads(bytes(obstore.get(open_store(folder, storage), name).bytes()))
    except FileNotFoundError:
        return None


def _put_lease(destination: str, info: dict[str, object]) -> None:
    folder, _, name = lease_location(destination).rpartition("/")
    obstore.put(open_store(folder, None), name, json.dumps(info).encode())


@pytest.fixture
def dead_holder() -> Iterator[dict[str, object]]:
    """The record of a run that died holding a lease two minutes ago."""
    yield {
        "holder": "dead0000", "pid": 4242, "host": "gone-host", "since": "2026-01-01T00:00:00Z",
        "expires_at": time.time() - 60, "lease_seconds": 60,
    }  # fmt: skip


def test_the_lease_lives_beside_the_output() -> None:
    assert lease_location("s3://data/out/enriched.parquet") == "s3://data/out/.enriched.parquet.lock"
    assert lease_location("gs://bucket/dataset/") == "gs://bucket/.dataset.lock"


def test_a_second_run_waits_for_the_first_then_takes_the_lease() -> None:
    destination = "s3://data/two/enriched.parquet"
    told: list[str] = []
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with hold_lease(destination, wait=False, timeout=1, on_wait=told.append, check_stop=_never_stop):
            order.append("first in")
            first_in.set()
            assert release_first.wait(timeout=30)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    assert first_in.wait(timeout=30)
    holder = _lease_object(destination)
    assert holder is not None and holder["pid"] == os.getpid() and holder["expires_at"] > time.time()
    threading.Timer(1.5, release_first.set).start()
    polls: list[None] = []
    started = time.monotonic()
    with hold_lease(destination, wait=True, timeout=30, on_wait=told.append, check_stop=lambda: polls.append(None)):
        order.append("second in")
        waited = time.monotonic() - started
        assert _lease_object(destination)["holder"] != holder["holder"]  # type: ignore[index]
    thread.join(timeout=30)
    assert order == ["first in", "first out", "second in"]
    assert len(told) == 1 and f"pid {os.getpid()}" in told[0] and destination in told[0]
    assert len(polls) >= 1 and 1.0 < waited < 10
    assert _lease_object(destination) is None  # released: deleted


def test_no_wait_refuses_naming_the_holder_and_a_bounded_wait_gives_up() -> None:
    destination = "s3://data/busy/enriched.parquet"
    with hold_lease(destination, wait=False, timeout=1, on_wait=print, check_stop=_never_stop):
        with pytest.raises(DestinationBusy, match=f"another run \\(pid {os.getpid()} on "):
            with hold_lease(destination, wait=False, timeout=5, on_wait=print, check_stop=_never_stop):
                pass
        started = time.monotonic()
        with pytest.raises(DestinationBusy, match=r"waited 1\.5 s for another run"):
            with hold_lease(destination, wait=True, timeout=1.5, on_wait=print, check_stop=_never_stop):
                pass
        assert time.monotonic() - started < 5


def test_a_stop_while_waiting_ends_the_wait() -> None:
    destination = "s3://data/stop/enriched.parquet"

    def stop() -> None:
        raise RunInterrupted("interrupted", signal_number=2)

    with hold_lease(destination, wait=False, timeout=1, on_wait=print, check_stop=_never_stop):
        with pytest.raises(RunInterrupted):
            with hold_lease(destination, wait=True, timeout=60, on_wait=print, check_stop=stop):
                pass
    assert _lease_object(destination) is None


def test_the_holder_renews_its_lease_so_it_never_expires_while_it_runs() -> None:
    destination = "s3://data/renew/enriched.parquet"
    with hold_lease(destination, wait=False, timeout=1, on_wait=print, check_stop=_never_stop, lease_seconds=1.5):
        first = _lease_object(destination)
        time.sleep(2.5)  # longer than the lease: only renewals keep it alive
        later = _lease_object(destination)
        assert first is not None and later is not None and later["holder"] == first["holder"]
        assert later["expires_at"] > first["expires_at"] and later["expires_at"] > time.time()
        with pytest.raises(DestinationBusy):
            with hold_lease(destination, wait=False, timeout=1, on_wait=print, check_stop=_never_stop):
                pass


def test_an_expired_lease_is_taken_over(dead_holder: dict[str, object]) -> None:
    destination = "s3://data/expired/enriched.parquet"
    _put_lease(destination, dead_holder)
    told: list[str] = []
    with hold_lease(destination, wait=False, timeout=5, on_wait=told.append, check_stop=_never_stop):
        mine = _lease_object(destination)
        assert mine is not None and mine["pid"] == os.getpid() and mine["holder"] != "dead0000"
    assert told == [] and _lease_object(destination) is None


def test_a_holder_whose_lease_was_taken_over_says_so_and_leaves_the_new_lease(
    dead_holder: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    destination = "s3://data/lost/enriched.parquet"
    with hold_lease(destination, wait=False, timeout=1, on_wait=print, check_stop=_never_stop, lease_seconds=0.6):
        _put_lease(destination, dead_holder)  # another run judged this one dead and took the output
        deadline = time.monotonic() + 10
        while "another run took over the lease" not in caplog.text:  # the next renewal finds out
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    assert _lease_object(destination)["holder"] == "dead0000"  # type: ignore[index]


def test_of_two_runs_taking_over_one_expired_lease_only_one_wins(dead_holder: dict[str, object]) -> None:
    destination = "s3://data/race/enriched.parquet"
    _put_lease(destination, dead_holder)
    folder, _, name = lease_location(destination).rpartition("/")
    a, b = (_Lease(open_store(folder, None), name, destination, 60) for _ in range(2))
    seen_a, seen_b = a.read(), b.read()  # both saw the same dead lease
    assert seen_a is not None and seen_b is not None and seen_a.e_tag == seen_b.e_tag
    assert a.try_take_over(seen_a) is True
    assert b.try_take_over(seen_b) is False  # If-Match on the stale e_tag: 412
    assert _lease_object(destination)["holder"] == a.holder  # type: ignore[index]
    with pytest.raises(PreconditionError):  # the store really refuses, not our bookkeeping
        obstore.put(open_store(folder, None), name, b"x", mode={"e_tag": seen_b.e_tag or ""})


def test_a_lease_a_run_never_saw_renewed_is_taken_over_whatever_its_clock_says() -> None:
    destination = "s3://data/skewed/enriched.parquet"
    future = {"holder": "skewed", "pid": 1, "host": "ahead", "since": "x", "expires_at": time.time() + 3600}
    _put_lease(destination, {**future, "lease_seconds": 1})
    with hold_lease(destination, wait=True, timeout=10, on_wait=print, check_stop=_never_stop):
        assert _lease_object(destination)["pid"] == os.getpid()  # type: ignore[index]


def test_without_conditional_writes_the_lease_is_best_effort_and_says_so(
    s3_endpoint: str,  # noqa: F811 - the fixture imported above
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = {
        "aws_endpoint_url": s3_endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
        "aws_region": "us-east-1", "aws_allow_http": "true", "aws_conditional_put": "disabled",
    }  # fmt: skip
    destination = "s3://data/plain/enriched.parquet"
    with hold_lease(destination, wait=False, timeout=1, on_wait=print, check_stop=_never_stop, storage=storage):
        assert _lease_object(destination, storage)["pid"] == os.getpid()  # type: ignore[index]
        with pytest.raises(DestinationBusy, match=f"pid {os.getpid()}"):
            with hold_lease(destination, wait=False, timeout=1, on_wait=print, check_stop=_never_stop, storage=storage):
                pass
    assert "does not support conditional writes" in caplog.text
    assert _lease_object(destination, storage) is None


@pytest.mark.usefixtures("prefect_backend")
def test_a_run_on_a_bucket_output_holds_the_lease_and_gives_it_back(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": range(4), "topic": [f"t{i}" for i in range(4)]}).write_csv(source)
    destination = "s3://data/full/enriched.parquet"
    seen: list[dict[str, object] | None] = []
    original = _Lease.start_renewing

    def spy(self: _Lease) -> None:
        seen.append(_lease_object(destination))
        original(self)

    job = EnrichJob(
        input_path=str(source), output_path=destination, base_url=fake_llm.base_url, prompt="Explain {topic}",
        cache=False,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Lease, "start_renewing", spy)
        assert enrich_table(job)["rows_ok"] == 4
    assert len(seen) == 1 and seen[0] is not None and seen[0]["pid"] == os.getpid()
    assert _lease_object(destination) is None
    assert pl.read_parquet(destination)["explanation"].to_list() == [expected_answer(f"Explain t{i}") for i in range(4)]


@pytest.mark.usefixtures("prefect_backend")
def test_the_cli_with_no_wait_refuses_a_held_bucket_output_and_pays_nothing(
    prefect_backend: str, fake_llm: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": range(5), "topic": [f"s{i}" for i in range(5)]}).write_csv(source)
    destination = "s3://data/cli/enriched.parquet"
    command = [
        sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "--output", destination, "--base-url",
        fake_llm.base_url, "--no-wait", "--no-cache",
    ]  # fmt: skip
    with hold_lease(destination, wait=False, timeout=1, on_wait=print, check_stop=_never_stop):
        process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    output = process.stdout + process.stderr
    assert process.returncode == 2, output
    assert f"pid {os.getpid()}" in " ".join(output.split()) and "Traceback" not in output
    assert fake_llm.stats.requests == 0
    assert _lease_object(destination) is None
    with pytest.raises((OSError, pl.exceptions.PolarsError)):
        pl.read_parquet(destination)


@pytest.mark.usefixtures("prefect_backend")
def test_two_cli_runs_on_one_bucket_output_take_turns_and_pay_once(
    prefect_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    rows = 60
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": range(rows), "topic": [f"subject {i}" for i in range(rows)]}).write_csv(source)
    destination = "s3://data/turns/enriched.parquet"
    # Slow replies keep the first run holding the output until the second says it waits for it.
    with FakeOpenAIServer(Behaviour(latency=1.0)) as server:
        command = [
            sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "--output", destination, "--base-url",
            server.base_url, "--max-concurrency", "4", "--partition-rows", "30",
        ]  # fmt: skip
        first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while _lease_object(destination) is None:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.05)
        second = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        waiting = threading.Event()

        def read_second() -> None:
            assert second.stdout is not None
            for line in second.stdout:
                lines.append(line)
                if "waiting for another run" in line:
                    waiting.set()

        reader = threading.Thread(target=read_second, daemon=True)
        reader.start()
        assert waiting.wait(timeout=120), "".join(lines)
        server.behaviour.latency = 0.0  # now let the first finish
        first_output = first.communicate(timeout=300)[0]
        second.wait(timeout=300)
        reader.join(timeout=30)
        assert [first.returncode, second.returncode] == [0, 0], (first_output, "".join(lines))
        assert server.stats.completions == rows  # the second found every answer in the bucket's cache
    assert pl.read_parquet(destination).height == rows
    assert _lease_object(destination) is None
