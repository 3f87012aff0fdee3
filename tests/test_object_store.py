"""Input and output on an S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import obstore
import polars as pl
import pytest
from obstore.store import from_url
from prefect.client.orchestration import get_client

from llm_enrich.flows.cache.objects import ObjectStoreCache
from llm_enrich.flows.children import stop_process_group
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import INVALID_STATE, enrich_table
from llm_enrich.flows.tables.staging import Staging
from llm_enrich.transforms.outcome import Outcome
from tests.conftest import REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer
from tests.prefect_server import free_port, wait_for

pytestmark = pytest.mark.usefixtures("prefect_backend")


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `moto_server` with a bucket named `data`; yields its URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=60, what="moto_server")
        urllib.request.urlopen(urllib.request.Request(f"{url}/data", method="PUT"), timeout=10)
        yield url
    finally:
        stop_process_group(process)
        log.close()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and endpoint the way polars (object_store) reads them: from the environment."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("s3_env")
def test_a_job_reads_from_and_writes_to_a_bucket(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    topics = [f"cloud topic {i}" for i in range(20)]
    pl.DataFrame({"id": range(20), "topic": topics}).write_parquet("s3://data/in/topics.parquet")
    job = EnrichJob(
        input_path="s3://data/in/topics.parquet", output_path="s3://data/out/enriched.parquet",
        base_url=fake_llm.base_url, prompt="Explain {topic}", cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    summary = enrich_table(job)
    assert summary["rows_ok"] == 20
    out = pl.read_parquet("s3://data/out/enriched.parquet")
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    again = enrich_table(job.model_copy(update={"cache": False}))  # the previous output in the bucket is reused
    assert again["requests"] == 0 and again["rows_cached"] == 20


@pytest.mark.usefixtures("s3_env")
def test_a_failed_job_publishes_nothing_at_the_output_key(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    pl.DataFrame({"id": [1, 2], "topic": ["a", "b"]}).write_parquet("s3://data/in/small.parquet")
    fake_llm.behaviour.require_key = "sk-the-right-one"  # every request is refused mid-job
    state = enrich_table(
        EnrichJob(
            input_path="s3://data/in/small.parquet", output_path="s3://data/out/never.parquet",
            base_url=fake_llm.base_url, cache=False,
        ),
        return_state=True,
    )  # fmt: skip
    assert state.name == INVALID_STATE
    with pytest.raises((OSError, pl.exceptions.PolarsError)):
        pl.read_parquet("s3://data/out/never.parquet")


@pytest.mark.usefixtures("s3_env")
def test_a_missing_object_is_a_clear_input_error(fake_llm: FakeOpenAIServer) -> None:
    state = enrich_table(
        EnrichJob(
            input_path="s3://data/in/nope.parquet", output_path="s3://data/out/x.parquet", base_url=fake_llm.base_url
        ),
        return_state=True,
    )
    assert state.name == INVALID_STATE and "could not read 's3://data/in/nope.parquet'" in state.message


def test_storage_options_reach_polars_and_stay_secret(
    s3_endpoint: str, fake_llm: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(name, raising=False)  # everything comes from --storage-option
    secret = "s3-secret-DO-NOT-LEAK-77"
    options = {
        "aws_endpoint_url": s3_endpoint, "aws_access_key_id": "test", "aws_secret_access_key": secret,
        "aws_region": "us-east-1", "aws_allow_http": "true",
    }  # fmt: skip
    pl.DataFrame({"id": [1, 2, 3], "topic": ["x", "y", "z"]}).write_parquet(
        "s3://data/in/opts.parquet", storage_options=options
    )
    job = EnrichJob(
        input_path="s3://data/in/opts.parquet", output_path="s3://data/out/opts.parquet", base_url=fake_llm.base_url,
        prompt="Explain {topic}", cache_dir=str(tmp_path / "cache"), storage_options=options,
    )  # fmt: skip
    state = enrich_table(job, return_state=True)
    assert state.is_completed(), state.message
    out = pl.read_parquet("s3://data/out/opts.parquet", storage_options=options)
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in ["x", "y", "z"]]
    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert recorded["job"]["storage_options"]["aws_region"] != "us-east-1"  # masked, like every value
    assert secret not in json.dumps(recorded, default=str) and secret not in job.model_dump_json()
    again = enrich_table(job.model_copy(update={"cache": False}))  # the previous output is read back with them
    assert again["requests"] == 0


@pytest.mark.usefixtures("s3_env")
def test_the_response_cache_can_live_in_the_bucket(fake_llm: FakeOpenAIServer) -> None:
    topics = [f"cached topic {i}" for i in range(12)]
    pl.DataFrame({"id": range(12), "topic": topics}).write_parquet("s3://data/in/cache.parquet")
    job = EnrichJob(
        input_path="s3://data/in/cache.parquet", output_path="s3://data/run1/enriched.parquet",
        base_url=fake_llm.base_url, prompt="Explain {topic}", partition_rows=5,
    )  # fmt: skip
    assert enrich_table(job)["requests"] == 12
    segments = pl.scan_parquet("s3://data/run1/.enrich-cache/v1/seg-*.parquet").collect()
    assert sorted(segments["text"].to_list()) == sorted(expected_answer(f"Explain {t}") for t in topics)
    # Another output (say, another machine's run) is served from the bucket's cache alone.
    other = job.model_copy(
        update={"output_path": "s3://data/run2/enriched.parquet", "cache_dir": "s3://data/run1/.enrich-cache"}
    )
    again = enrich_table(other)
    assert again["requests"] == 0 and again["rows_cached"] == 12


@pytest.mark.usefixtures("s3_env")
def test_cache_segments_are_written_in_batches_and_on_close() -> None:
    cache = ObjectStoreCache("s3://data/batched-cache", flush_every=2, flush_seconds=3600)
    for n in range(3):
        cache.append(f"k{n}", Outcome(text=f"answer {n}", input_tokens=1, output_tokens=1), model="m")
    assert ObjectStoreCache("s3://data/batched-cache").load()["key"].to_list() == ["k0", "k1"]
    cache.close()
    assert ObjectStoreCache("s3://data/batched-cache").load()["key"].to_list() == ["k0", "k1", "k2"]


@pytest.mark.usefixtures("s3_env")
def test_staging_can_live_in_the_bucket_and_is_emptied(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": range(9), "topic": [f"s{i}" for i in range(9)]}).write_csv(source)
    job = EnrichJob(
        input_path=str(source), output_path=str(tmp_path / "out.parquet"), base_url=fake_llm.base_url,
        prompt="Explain {topic}", partition_rows=4, staging_dir="s3://data/staging", cache=False,
    )  # fmt: skip
    seen: list[str] = []
    original = Staging.write

    def spy(self: Staging, frame: pl.DataFrame, path: str) -> None:
        seen.append(path)
        original(self, frame, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Staging, "write", spy)
        summary = enrich_table(job)
    assert summary["rows_ok"] == 9
    assert pl.read_parquet(tmp_path / "out.parquet")["id"].to_list() == list(range(9))
    assert len(seen) == 6 and all(p.startswith("s3://data/staging/.out.parquet.staging-") for p in seen)
    store = from_url("s3://data/staging")
    assert [meta["path"] for batch in obstore.list(store) for meta in batch] == []


def _put_objects(prefix: str, objects: dict[str, bytes], storage: dict[str, str] | None = None) -> None:
    """Write raw bytes as objects under a prefix, as a crash or a broken uploader could leave them."""
    store = from_url(prefix, config=storage)
    for name, data in objects.items():
        obstore.put(store, name, data)


def _damaged_bucket_cache(prefix: str) -> tuple[set[str], dict[str, str]]:
    """Three segment objects of 10 answers, then damage; returns the keys that survive and the damage."""
    cache = ObjectStoreCache(prefix, flush_every=10, flush_seconds=3600)
    for n in range(30):
        cache.append(f"k{n}", Outcome(text=f"answer {n}", input_tokens=1, output_tokens=1), model="m")
    cache.close()
    names = [name for name, _ in cache.segments()]
    assert len(names) == 3
    half = pl.DataFrame(
        {
            "seq": [1, 2],
            "key": ["half0", "half1"],
            "text": ["kept", None],
            "input_tokens": [1, 1],
            "output_tokens": [1, 1],
        }
    )
    buffer = io.BytesIO()
    half.write_parquet(buffer)
    damage = {
        names[1]: b"PAR1\x00\x01garbage, not a Parquet file",  # its checksum fails: its 10 answers are lost
        "seg-oldhost-1-000000000000-000001.parquet": b"PAR1\x00\x01garbage",  # no checksum (older versions)
        "seg-otherhost-1-000000000000-000001.parquet": b"",  # a zero-length object
        "seg-otherhost-2-000000000000-000001.parquet": buffer.getvalue(),  # one half-written record
    }
    _put_objects(f"{prefix}/v1", damage)
    lost = {f"k{n}" for n in range(10, 20)}
    return {f"k{n}" for n in range(30)} - lost | {"half0"}, damage


@pytest.mark.usefixtures("s3_env")
def test_a_corrupt_empty_or_half_written_cache_object_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    survivors, damage = _damaged_bucket_cache("s3://data/damaged-cache")
    caplog.set_level(logging.WARNING)
    assert set(ObjectStoreCache("s3://data/damaged-cache").load()["key"]) == survivors
    assert set(ObjectStoreCache("s3://data/damaged-cache").load()["key"]) == survivors  # warned once, not twice
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in damage:
        assert sum(f"s3://data/damaged-cache/v1/{name}'" in message for message in warned) == 1, warned
    assert any("not a readable Parquet file" in m for m in warned) and any("(empty object)" in m for m in warned)
    assert any("do not match the checksum in its name" in m for m in warned)
    assert any("1 damaged record(s), skipped; 1 good record(s) kept" in m for m in warned)


def test_cache_verify_repairs_a_bucket_cache(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {
        "aws_endpoint_url": s3_endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
        "aws_region": "us-east-1", "aws_allow_http": "true",
    }  # fmt: skip
    for name, value in options.items():
        monkeypatch.setenv(name.upper(), value)
    survivors, _ = _damaged_bucket_cache("s3://data/verified-cache")
    for name in options:
        monkeypatch.delenv(name.upper())  # the command gets everything from --storage-option
    flags = [f"--storage-option={name}={value}" for name, value in options.items()]
    command = [
        sys.executable,
        "-m",
        "llm_enrich.flows.cli",
        "cache",
        "verify",
        "--cache-dir",
        "s3://data/verified-cache",
        *flags,
    ]

    def verify(*extra: str) -> tuple[int, str]:
        done = subprocess.run([*command, *extra], capture_output=True, text=True, cwd=REPO, timeout=300)
        return done.returncode, done.stdout + done.stderr

    code, output = verify()
    assert code == 1 and "records ok 21, records damaged 1, files unreadable 3" in output, output
    code, output = verify("--repair")
    assert code == 1 and output.count(": removed") == 3 and output.count("damaged: repaired") == 1, output
    code, output = verify()
    assert code == 0 and "clean; segments 3, records ok 21, records damaged 0, files unreadable 0" in output, output
    assert set(ObjectStoreCache("s3://data/verified-cache", options).load()["key"]) == survivors


@pytest.mark.usefixtures("s3_env")
def test_a_rerun_pays_only_for_a_corrupt_cache_object(fake_llm: FakeOpenAIServer) -> None:
    topics = [f"bucket topic {i}" for i in range(30)]
    pl.DataFrame({"id": range(30), "topic": topics}).write_parquet("s3://data/in/damaged.parquet")
    job = EnrichJob(
        input_path="s3://data/in/damaged.parquet", output_path="s3://data/dmg1/enriched.parquet",
        base_url=fake_llm.base_url, prompt="Explain {topic}", partition_rows=10, partition_workers=1,
    )  # fmt: skip
    assert enrich_table(job)["requests"] == 30  # one partition after another: a segment object each
    cache = ObjectStoreCache("s3://data/dmg1/.enrich-cache")
    segments = cache.segments()
    assert len(segments) >= 2
    name, _ = segments[0]
    lost, _ = cache.read_segment(name)
    assert 0 < lost.height < 30
    _put_objects("s3://data/dmg1/.enrich-cache/v1", {name: b"\x00" * 100})
    fake_llm.stats.prompts.clear()
    again = enrich_table(
        job.model_copy(
            update={"output_path": "s3://data/dmg2/enriched.parquet", "cache_dir": "s3://data/dmg1/.enrich-cache"}
        )
    )
    assert again["requests"] == lost.height and again["rows_ok"] == 30
    answers = {expected_answer(f"Explain {t}"): t for t in topics}
    assert set(fake_llm.stats.prompts) == {f"Explain {answers[text]}" for text in lost["text"]}


@pytest.mark.usefixtures("s3_env")
def test_a_flipped_byte_in_a_segment_costs_that_segment_and_never_a_wrong_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import obstore

    cache = ObjectStoreCache("s3://data/flipped-cache", flush_every=5, flush_seconds=3600)
    for n in range(10):
        cache.append(f"k{n}", Outcome(text=f"answer {n}", input_tokens=1, output_tokens=1), model="m")
    cache.close()
    names = [name for name, _ in cache.segments()]
    assert len(names) == 2 and all(re.search(r"-[0-9a-f]{16}\.parquet$", n) for n in names)
    store = cache._store()
    data = bytearray(obstore.get(store, names[0]).bytes())
    at = bytes(data).find(b"answer 3")
    data[at + 7] ^= 0x01  # "answer 3" becomes "answer 2" in the page: parseable, and wrong
    obstore.put(store, names[0], bytes(data))
    with caplog.at_level("WARNING"):
        loaded = ObjectStoreCache("s3://data/flipped-cache").load()
    assert sorted(loaded["key"].to_list()) == [f"k{n}" for n in range(5, 10)], "only the damaged object is lost"
    assert "answer 2" not in loaded.filter(pl.col("key") == "k3")["text"].to_list()
    assert "checksum" in caplog.text and names[0] in caplog.text


@pytest.mark.usefixtures("s3_env")
def test_a_batch_job_writing_to_a_bucket_keeps_its_manifest_there_and_never_submits_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.fakes.openai_server import Behaviour

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    topics = [f"batch topic {i}" for i in range(12)]
    pl.DataFrame({"id": range(12), "topic": topics}).write_parquet("s3://data/in/batch.parquet")
    fast = Behaviour(batch_validating_seconds=0.05, batch_line_seconds=0.0, batch_finalizing_seconds=0.05)
    store, name = from_url("s3://data/out"), ".batch.parquet.batches.json"
    with FakeOpenAIServer(fast) as server:
        job = EnrichJob(
            input_path="s3://data/in/batch.parquet", output_path="s3://data/out/batch.parquet",
            base_url=server.base_url, model="gpt-4o-mini", prompt="Explain {topic}", mode="batch", batch_wait=False,
            batch_poll_seconds=0.2, cache=False,  # only the manifest can keep the rerun from submitting again
        )  # fmt: skip
        first = enrich_table(job)
        assert first["batches_pending"] == 1 and first["rows_ok"] == 0
        manifest = json.loads(bytes(obstore.get(store, name).bytes()))
        assert [bool(e["batch_id"]) for e in manifest["entries"]] == [True]
        second = enrich_table(job.model_copy(update={"batch_wait": True}))
        assert second["rows_ok"] == 12 and server.stats.batches_created == 1, "the rerun collected, not resubmitted"
    out = pl.read_parquet("s3://data/out/batch.parquet")
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    with pytest.raises(FileNotFoundError):
        obstore.get(store, name)  # collected: the manifest is gone
