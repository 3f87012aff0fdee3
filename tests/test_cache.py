"""The persistent response cache: append-only segments, newest answer wins, torn lines, many writers."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.cache.files import CACHE_SCHEMA, ResponseCache
from llm_enrich.flows.cache.objects import parse_parquet
from llm_enrich.flows.cache.reading import parse_segment
from llm_enrich.schemas.errors import OutputError
from llm_enrich.transforms.outcome import Outcome

WRITERS = 4
KEYS_PER_WRITER = 200


def answer(text: str, tokens: tuple[int, int] = (3, 5)) -> Outcome:
    return Outcome(text=text, input_tokens=tokens[0], output_tokens=tokens[1])


def as_dict(frame: pl.DataFrame) -> dict[str, tuple[str, int, int]]:
    return {k: (t, i, o) for k, t, i, o in frame.select("key", "text", "input_tokens", "output_tokens").iter_rows()}


def segments(directory: Path) -> list[Path]:
    return sorted((directory / "v1").glob("seg-*.jsonl"))


def wait_for_mtime_tick(after: Path, scratch: Path) -> None:
    """Poll until the file system stamps a new write later than ``after`` (mtimes are coarse)."""
    deadline = time.monotonic() + 5
    probe = scratch / "mtime-probe"
    while time.monotonic() < deadline:
        probe.write_bytes(b"x")
        if probe.stat().st_mtime_ns > after.stat().st_mtime_ns:
            return
    raise AssertionError("the file system clock did not advance")


def test_empty_or_missing_cache_loads_as_an_empty_frame(tmp_path: Path) -> None:
    frame = ResponseCache(str(tmp_path / "never-created")).load()
    assert frame.height == 0
    assert dict(frame.schema) == CACHE_SCHEMA
    assert not (tmp_path / "never-created").exists()  # loading never creates the directory


def test_a_stored_answer_is_a_hit_and_anything_else_a_miss(tmp_path: Path) -> None:
    cache = ResponseCache(str(tmp_path))
    cache.append("k1", answer("first answer", (11, 22)), model="m")
    cache.append("k2", answer('второй ответ 🙂\nwith a newline and "quotes"', (1, 2)), model="m")
    cache.close()
    loaded = ResponseCache(str(tmp_path)).load()
    assert dict(loaded.schema) == CACHE_SCHEMA
    assert as_dict(loaded) == {
        "k1": ("first answer", 11, 22),
        "k2": ('второй ответ 🙂\nwith a newline and "quotes"', 1, 2),
    }
    assert loaded.filter(pl.col("key") == "k3").height == 0  # a miss
    assert cache.written == 2
    [segment] = segments(tmp_path)
    assert segment.name.startswith(f"seg-{socket.gethostname()}-{os.getpid()}-")


def test_the_newest_answer_for_a_key_wins(tmp_path: Path) -> None:
    # Within one writer: a refreshed answer is appended later in the same segment.
    cache = ResponseCache(str(tmp_path))
    cache.append("k", answer("old", (1, 1)), model="m")
    cache.append("other", answer("x"), model="m")
    cache.append("k", answer("new", (2, 2)), model="m")
    cache.close()
    loaded = ResponseCache(str(tmp_path)).load()
    assert loaded.height == 2
    assert as_dict(loaded)["k"] == ("new", 2, 2)


def test_cached_input_tokens_are_kept_and_a_record_written_before_them_loads_as_0(tmp_path: Path) -> None:
    cache = ResponseCache(str(tmp_path))
    cache.append("new", Outcome(text="fresh", input_tokens=1300, output_tokens=9, cached_input_tokens=1024), model="m")
    cache.close()
    # A record as versions before the prompt-cache column wrote it: no cached_input_tokens field.
    old = json.dumps({"seq": 1, "key": "old", "text": "kept", "input_tokens": 7, "output_tokens": 8, "model": "m"})
    (tmp_path / "v1" / "seg-older-1-abc.jsonl").write_text(old + "\n")
    loaded = ResponseCache(str(tmp_path)).load()
    assert dict(loaded.schema) == CACHE_SCHEMA
    tokens = dict(loaded.select("key", "cached_input_tokens").iter_rows())
    assert tokens == {"new": 1024, "old": 0}
    assert as_dict(loaded)["old"] == ("kept", 7, 8), "the old record still serves its answer"
    # Read line by line (as `cache verify` does), the old record is just as good.
    frame, damaged = parse_segment((old + "\n").encode(), exact=True)
    assert damaged == () and frame["cached_input_tokens"].to_list() == [0]


def test_an_object_store_segment_written_before_cached_input_tokens_loads_as_0() -> None:
    buffer = io.BytesIO()
    pl.DataFrame(
        {"seq": [1], "key": ["old"], "text": ["kept"], "input_tokens": [7], "output_tokens": [8]}
    ).write_parquet(buffer)
    frame, health = parse_parquet(buffer.getvalue(), "s3://bucket/cache/v1/seg-old.parquet")
    assert health.clean and health.ok == 1
    assert frame.row(0, named=True) == {
        "seq": 1, "key": "old", "text": "kept", "input_tokens": 7, "output_tokens": 8, "cached_input_tokens": 0,
    }  # fmt: skip


def test_a_refresh_by_a_later_run_wins(tmp_path: Path) -> None:
    first = ResponseCache(str(tmp_path / "cache"))
    first.append("k", answer("old"), model="m")
    first.append("kept", answer("kept"), model="m")
    first.close()
    wait_for_mtime_tick(segments(tmp_path / "cache")[0], tmp_path)
    second = ResponseCache(str(tmp_path / "cache"))  # e.g. a --refresh-cache run
    second.append("k", answer("new"), model="m")
    second.close()
    assert len(segments(tmp_path / "cache")) == 2  # one segment per writer, never shared
    loaded = as_dict(ResponseCache(str(tmp_path / "cache")).load())
    assert loaded["k"][0] == "new"
    assert loaded["kept"][0] == "kept"


def test_a_refresh_wins_even_while_an_older_writer_keeps_writing(tmp_path: Path) -> None:
    long_run = ResponseCache(str(tmp_path / "cache"))
    long_run.append("k", answer("old"), model="m")
    refresh = ResponseCache(str(tmp_path / "cache"))  # a --refresh-cache run answers k again, later
    refresh.append("k", answer("new"), model="m")
    refresh.close()
    [refreshed] = [s for s in segments(tmp_path / "cache") if '"new"' in s.read_text()]
    # The long run goes on answering other rows; its segment's mtime moves past the refresh's.
    wait_for_mtime_tick(refreshed, tmp_path)
    long_run.append("another row", answer("x"), model="m")
    long_run.close()
    assert as_dict(ResponseCache(str(tmp_path / "cache")).load())["k"][0] == "new"


def test_writes_are_visible_to_another_reader_before_close(tmp_path: Path) -> None:
    writer = ResponseCache(str(tmp_path))
    reader = ResponseCache(str(tmp_path))
    for i in range(5):
        writer.append(f"k{i}", answer(f"a{i}"), model="m")
        # No close, no flush call: every answer is on disk as soon as append returns.
        assert as_dict(reader.load()).get(f"k{i}") == (f"a{i}", 3, 5)
    assert reader.load().height == 5
    writer.close()


def test_a_torn_last_line_is_skipped_and_the_rest_loads(tmp_path: Path) -> None:
    cache = ResponseCache(str(tmp_path))
    for i in range(3):
        cache.append(f"k{i}", answer(f"a{i}"), model="m")
    cache.close()
    [segment] = segments(tmp_path)
    whole = segment.read_bytes()
    last_line = whole.splitlines(keepends=True)[-1]
    # A crash in the middle of the next append leaves half a line, without its newline.
    with segment.open("ab") as f:
        f.write(last_line[: len(last_line) // 2])
    loaded = as_dict(ResponseCache(str(tmp_path)).load())
    assert loaded == {f"k{i}": (f"a{i}", 3, 5) for i in range(3)}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"garbage",
        b"garbage\n",
        b"\x00\xff\xfe\n",
        b"[1, 2, 3]\n",
        b'{"key": "half',
        b"\n\n\n",
    ],
    ids=["empty", "newline", "garbage-no-newline", "garbage", "binary", "not-objects", "torn-only", "blank-lines"],
)
def test_an_empty_or_garbage_segment_does_not_break_load(tmp_path: Path, content: bytes) -> None:
    good = ResponseCache(str(tmp_path))
    good.append("k", answer("kept"), model="m")
    good.close()
    (tmp_path / "v1" / "seg-otherhost-1-deadbeef0000.jsonl").write_bytes(content)
    assert as_dict(ResponseCache(str(tmp_path)).load()) == {"k": ("kept", 3, 5)}


def test_files_that_are_not_segments_are_ignored(tmp_path: Path) -> None:
    cache = ResponseCache(str(tmp_path))
    cache.append("k", answer("kept"), model="m")
    cache.close()
    (tmp_path / "v1" / "notes.txt").write_text('{"key": "k", "text": "wrong"}\n')
    (tmp_path / "v1" / "seg-x.jsonl.tmp").write_text('{"key": "k", "text": "wrong"}\n')
    assert as_dict(ResponseCache(str(tmp_path)).load()) == {"k": ("kept", 3, 5)}


def _write_many(directory: str, writer: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    cache = ResponseCache(directory)
    barrier.wait(timeout=60)  # all writers start appending at the same moment
    for i in range(KEYS_PER_WRITER):
        cache.append(f"w{writer}-k{i}", answer(f"text of {writer}/{i} " + "é" * (i % 7), (writer, i)), model="m")
    cache.close()


def test_several_processes_can_write_one_cache_at_once(tmp_path: Path) -> None:
    # fork keeps the test fast (the children only append); spawn where fork does not exist.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), w, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    assert len({p.pid for p in procs}) == WRITERS
    assert len(segments(tmp_path)) == WRITERS  # one segment per process
    loaded = ResponseCache(str(tmp_path)).load()
    assert loaded.height == WRITERS * KEYS_PER_WRITER
    assert as_dict(loaded) == {
        f"w{w}-k{i}": (f"text of {w}/{i} " + "é" * (i % 7), w, i)
        for w in range(WRITERS)
        for i in range(KEYS_PER_WRITER)
    }


def test_an_unwritable_directory_is_an_output_error_naming_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = ResponseCache(str(blocker / "cache"))
    assert cache.load().height == 0  # reading an absent cache is fine
    with pytest.raises(OutputError, match="`cache_dir`") as info:
        cache.append("k", answer("x"), model="m")
    assert str(blocker / "cache") in str(info.value)
    assert cache.written == 0
