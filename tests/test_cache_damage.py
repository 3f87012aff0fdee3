"""A damaged cache costs only what is damaged: torn, garbage, undecodable and half-written records, empty files."""

from __future__ import annotations

import errno
import io
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

import llm_enrich.flows.cache.files
from llm_enrich.flows.cache import reading as cache_check
from llm_enrich.flows.cache.files import ResponseCache
from llm_enrich.flows.cache.objects import parse_parquet
from llm_enrich.flows.cache.reading import parse_segment
from llm_enrich.flows.cache.verification import verify_cache
from llm_enrich.schemas.errors import ConfigError, OutputError
from llm_enrich.transforms.outcome import Outcome
from tests.conftest import REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer

GOOD = 40


def answer(text: str) -> Outcome:
    return Outcome(text=text, input_tokens=3, output_tokens=5)


def fill(directory: Path, count: int = GOOD, prefix: str = "k") -> Path:
    """A cache with one segment of ``count`` answers; returns the segment."""
    cache = ResponseCache(str(directory))
    for i in range(count):
        cache.append(f"{prefix}{i}", answer(f"answer {prefix}{i} é"), model="m")
    cache.close()
    [segment] = [s for s in (directory / "v1").glob("seg-*.jsonl") if f'"{prefix}0"' in s.read_text("utf-8", "replace")]
    return segment


def keys(directory: Path) -> set[str]:
    return set(ResponseCache(str(directory)).load()["key"])


def damage_line(segment: Path, number: int, replacement: bytes) -> None:
    lines = segment.read_bytes().split(b"\n")
    lines[number - 1] = replacement
    segment.write_bytes(b"\n".join(lines))


def tear_tail(segment: Path, garbage: bytes = b"\x00\x00\xfe\xff junk") -> None:
    """What a crash mid-append leaves: the last record cut in half, then stray bytes."""
    data = segment.read_bytes()
    last = data[:-1].rfind(b"\n") + 1
    segment.write_bytes(data[: last + (len(data) - last) // 2] + garbage)


def warnings_about(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


LINE = '{{"seq": 1, "key": "k{n}", "text": "t", "input_tokens": 1, "output_tokens": 2}}'
BAD_LINES = {
    "bad-json": b'{"seq": 1, "key": "k9", "text": "t",,}',
    "invalid-utf8": b'{"seq": 1, "key": "k9", "text": "\xff\xfe", "input_tokens": 1, "output_tokens": 2}',
    "text-an-object": b'{"seq": 1, "key": "k9", "text": {"a": 1}, "input_tokens": 1, "output_tokens": 2}',
    "tokens-a-string": b'{"seq": 1, "key": "k9", "text": "t", "input_tokens": "1", "output_tokens": 2}',
    "tokens-a-bool": b'{"seq": 1, "key": "k9", "text": "t", "input_tokens": true, "output_tokens": 2}',
    "cached-tokens-a-string": (
        b'{"seq": 1, "key": "k9", "text": "t", "input_tokens": 1, "output_tokens": 2, "cached_input_tokens": "1"}'
    ),
    "half-written": b'{"seq": 1, "key": "k9"}',
    "not-an-object": b"[1, 2, 3]",
    "lone-surrogate": b'{"seq": 1, "key": "k9", "text": "\\ud800", "input_tokens": 1, "output_tokens": 2}',
    "nul-bytes": b"\x00" * 64,
    "glued-onto-torn": b'{"seq": 1, "key": "k8", "te{"seq": 1, "key": "k9", "text": "t", "input_tokens": 1}',
}


@pytest.mark.parametrize("exact", [False, True], ids=["load", "verify"])
@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_one_bad_line_costs_only_that_record(bad: bytes, exact: bool) -> None:
    lines = [LINE.format(n=n).encode() for n in range(20)]
    lines[9] = bad
    frame, damaged = parse_segment(b"\n".join(lines) + b"\n", exact=exact)
    assert damaged == (10,)
    assert set(frame["key"]) == {f"k{n}" for n in range(20)} - {"k9"}
    assert frame.filter(pl.col("key") == "k3").row(0) == (1, "k3", "t", 1, 2, 0)  # no cached tokens written: 0


def test_a_key_of_the_wrong_type_is_damage_to_verify_and_harmless_to_load() -> None:
    lines = [LINE.format(n=n).encode() for n in range(3)]
    lines[1] = b'{"seq": 1, "key": 9, "text": "t", "input_tokens": 1, "output_tokens": 2}'
    body = b"\n".join(lines) + b"\n"
    assert parse_segment(body, exact=True)[1] == (2,)
    frame, damaged = parse_segment(body)  # polars reads 9 as "9": a key that no prompt hashes to
    assert damaged == () and set(frame["key"]) == {"k0", "9", "k2"}


def test_a_clean_segment_is_read_by_polars_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_path(body: bytes) -> None:
        raise AssertionError("a clean segment must not be read line by line")

    monkeypatch.setattr(cache_check, "parse_lines", slow_path)
    body = b"".join(LINE.format(n=n).encode() + b"\n" for n in range(1000))
    typed = json.dumps({"seq": 2, "key": "typed", "text": '{"a": 1}', "input_tokens": 1, "output_tokens": 2})
    body += typed.encode() + b"\n"  # a typed answer is JSON text in a string, not an object
    frame, damaged = parse_segment(body + b'{"seq": 1, "key": "torn')  # a torn tail alone keeps the fast path
    assert frame.height == 1001 and damaged == (1002,)
    assert frame.filter(pl.col("key") == "typed")["text"].item() == '{"a": 1}'


def test_only_the_chunks_that_hold_damage_are_read_line_by_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_check, "_CHUNK", 4096)
    slow: list[int] = []
    real = cache_check.parse_lines

    def counted(body: bytes) -> tuple[list[tuple[object, ...]], tuple[int, ...]]:
        slow.append(body.count(b"\n"))
        return real(body)

    monkeypatch.setattr(cache_check, "parse_lines", counted)
    lines = [LINE.format(n=n).encode() for n in range(3000)]
    for number in (7, 1500, 1501, 2999):
        lines[number - 1] = b"\x00garbage"
    frame, damaged = parse_segment(b"\n".join(lines) + b"\n")
    assert damaged == (7, 1500, 1501, 2999)
    assert frame.height == 2996 and frame["key"].n_unique() == 2996
    assert len(slow) <= 4 and sum(slow) < 600  # three or four chunks of ~55 lines, not 3,000 lines


def test_a_torn_last_record_with_garbage_costs_one_record_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment = fill(tmp_path)
    tear_tail(segment)
    caplog.set_level(logging.WARNING)
    assert keys(tmp_path) == {f"k{i}" for i in range(GOOD - 1)}
    assert keys(tmp_path) == {f"k{i}" for i in range(GOOD - 1)}  # a second load does not warn again
    [message] = warnings_about(caplog, segment)
    assert f"1 damaged record(s) (line {GOOD})" in message and f"{GOOD - 1} good record(s) kept" in message
    assert "enrich cache verify --repair" in message


def test_a_bad_line_in_the_middle_and_a_torn_tail_cost_two_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment = fill(tmp_path)
    damage_line(segment, 17, b"\x00\xff garbage \xc3\x28 not json")
    tear_tail(segment)
    caplog.set_level(logging.WARNING)
    assert keys(tmp_path) == {f"k{i}" for i in range(GOOD - 1)} - {"k16"}
    [message] = warnings_about(caplog, segment)
    assert f"2 damaged record(s) (line 17, {GOOD})" in message


def test_a_zero_length_segment_costs_only_itself(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fill(tmp_path)
    empty = tmp_path / "v1" / "seg-otherhost-7-000000000000.jsonl"
    empty.write_bytes(b"")
    caplog.set_level(logging.WARNING)
    assert keys(tmp_path) == {f"k{i}" for i in range(GOOD)}
    [message] = warnings_about(caplog, empty)
    assert "could not be read (empty file)" in message


def test_a_new_process_never_appends_to_a_torn_segment(tmp_path: Path) -> None:
    torn = fill(tmp_path)
    tear_tail(torn)
    before = torn.read_bytes()
    fill(tmp_path, count=3, prefix="new")  # the next run
    assert torn.read_bytes() == before
    assert len(list((tmp_path / "v1").glob("seg-*.jsonl"))) == 2
    assert keys(tmp_path) == {f"k{i}" for i in range(GOOD - 1)} | {"new0", "new1", "new2"}


def test_after_a_failed_write_the_next_answer_starts_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ResponseCache(str(tmp_path))
    cache.append("before", answer("kept"), model="m")
    real_write = llm_enrich.flows.cache.files.os.write

    def disk_full(fd: int, data: memoryview) -> int:
        if len(data) > 10:
            return real_write(fd, data[: len(data) // 2])  # half a record reaches the disk...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full

    monkeypatch.setattr(llm_enrich.flows.cache.files.os, "write", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        cache.append("lost", answer("torn"), model="m")
    monkeypatch.setattr(llm_enrich.flows.cache.files.os, "write", real_write)
    cache.append("after", answer("kept"), model="m")  # space is back
    cache.close()
    segments = sorted((tmp_path / "v1").glob("seg-*.jsonl"), key=lambda p: p.stat().st_size)
    assert len(segments) == 2
    assert segments[0].read_bytes().startswith(b'{"seq"') and segments[0].read_bytes().endswith(b"\n")
    assert keys(tmp_path) == {"before", "after"}  # "after" was not glued onto the torn record


def test_verify_reports_and_repair_keeps_every_good_record(tmp_path: Path) -> None:
    segment = fill(tmp_path)
    damage_line(segment, 5, b"garbage")
    tear_tail(segment)
    (tmp_path / "v1" / "seg-otherhost-7-000000000000.jsonl").write_bytes(b"")
    good = {line for i, line in enumerate(segment.read_bytes().split(b"\n")[: GOOD - 1]) if i != 4}
    report = verify_cache(str(tmp_path))
    assert (report.records_ok, report.records_damaged, report.files_unreadable) == (GOOD - 2, 2, 1)
    assert not report.clean and not report.repaired
    repaired = verify_cache(str(tmp_path), repair=True)
    assert len(repaired.repaired) == 2
    assert set(segment.read_bytes().split(b"\n")[:-1]) == good  # the good records, byte for byte
    assert [p.name for p in (tmp_path / "v1").iterdir()] == [segment.name]  # no temporary file, empty one gone
    again = verify_cache(str(tmp_path))
    assert again.clean and again.records_ok == GOOD - 2


def test_verify_needs_an_existing_cache(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no response cache"):
        verify_cache(str(tmp_path / "nowhere"))


def invoke(*args: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    return result.returncode, result.stdout + result.stderr


def test_the_verify_command_exits_1_on_damage_and_repairs(tmp_path: Path) -> None:
    segment = fill(tmp_path / "cache")
    damage_line(segment, 3, b'{"seq": 1, "key": "k2"}')
    code, output = invoke("cache", "verify", "--cache-dir", str(tmp_path / "cache"))
    assert code == 1, output
    assert f"{segment.name}: {GOOD - 1} ok, 1 damaged (line 3)" in output and "--repair" in output
    code, output = invoke("cache", "verify", "--cache-dir", str(tmp_path / "cache"), "--repair")
    assert code == 1 and f"{segment.name}: {GOOD - 1} ok, 1 damaged (line 3): repaired" in output, output
    code, output = invoke("cache", "verify", "--cache-dir", str(tmp_path / "cache"))
    assert (
        code == 0 and f"clean; segments 1, records ok {GOOD - 1}, records damaged 0, files unreadable 0." in output
    ), output
    code, output = invoke("cache", "verify", str(tmp_path / "elsewhere" / "out.parquet"))
    assert code == 2 and "no response cache" in output and "Traceback" not in output


@pytest.mark.usefixtures("prefect_backend")
def test_a_rerun_pays_only_for_the_damaged_records(
    fake_llm: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_backend: str
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_backend)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    topics = [f"damaged topic {i}" for i in range(60)]
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": range(60), "topic": topics}).write_csv(source)
    common = ["--base-url", fake_llm.base_url, "--prompt", "Explain {topic}", "--partition-rows", "25"]
    code, output = invoke("run", str(source), "-o", str(tmp_path / "one" / "out.parquet"), *common)
    assert code == 0 and fake_llm.stats.requests == 60, output
    cache = tmp_path / "one" / ".enrich-cache"
    [segment] = (cache / "v1").glob("seg-*.jsonl")
    records = [json.loads(line) for line in segment.read_text("utf-8").splitlines()]
    topic_of = {expected_answer(f"Explain {t}"): t for t in topics}
    lost = {topic_of[records[20]["text"]], topic_of[records[-1]["text"]]}
    damage_line(segment, 21, b"\x00\x00\x00 garbage")
    tear_tail(segment)
    empty = cache / "v1" / "seg-otherhost-7-000000000000.jsonl"
    empty.write_bytes(b"")
    fake_llm.stats.prompts.clear()
    code, output = invoke(
        "run", str(source), "-o", str(tmp_path / "two" / "out.parquet"), "--cache-dir", str(cache), *common
    )
    assert code == 0, output
    assert fake_llm.stats.requests == 62  # two more: the damaged records, nothing else
    assert set(fake_llm.stats.prompts) == {f"Explain {t}" for t in lost}
    assert output.count(str(segment)) == 1 and "2 damaged record(s) (line 21, 60)" in output
    assert output.count(str(empty)) == 1 and "could not be read (empty file)" in output
    out = pl.read_parquet(tmp_path / "two" / "out.parquet")
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]


def _parquet_segment(rows: int = 50) -> bytes:
    buffer = io.BytesIO()
    pl.DataFrame(
        {"seq": range(rows), "key": [f"k{i}" for i in range(rows)], "text": [f"answer {i}" for i in range(rows)],
         "input_tokens": [1] * rows, "output_tokens": [2] * rows},
    ).write_parquet(buffer)  # fmt: skip
    return buffer.getvalue()


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b[:100] + bytes(512) + b[612:], lambda b: b + b"\x00garbage", lambda b: b""],
    ids=["truncated", "zeroed-block", "trailing-garbage", "empty"],
)
def test_a_corrupt_parquet_segment_is_unreadable_not_fatal(damage: Callable[[bytes], bytes]) -> None:
    frame, health = parse_parquet(damage(_parquet_segment()), "s3://bucket/cache/v1/seg-x.parquet")
    assert frame.height == 0 and health.unreadable and not health.clean
    assert parse_parquet(_parquet_segment(), "s3://b/seg-y.parquet")[1].ok == 50
