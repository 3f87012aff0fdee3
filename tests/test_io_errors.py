"""Nothing raw escapes the tables seam: every broken input or destination becomes one of our errors.

Each case builds a broken file in tmp_path and runs it through the run's own read-and-plan path
(``estimate_job``: scan, columns, schema, survey), the real flow, or the staging and publishing
functions, and asserts the exact llm-enrich error class and a message naming the path. A polars
error, OSError, ValueError, RuntimeError (or anything else) reaching the caller fails the case.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import INVALID_STATE, enrich_table
from llm_enrich.flows.plan.estimate import estimate_job
from llm_enrich.flows.tables.staging import Staging, open_staging
from llm_enrich.flows.tables.writing import publish_parquet
from llm_enrich.schemas.errors import EnrichError, InputError, OutputError, TemplateError, UserError, ValidationFailed
from tests.conftest import DATA
from tests.fakes.openai_server import FakeOpenAIServer

NOWHERE = "http://127.0.0.1:9/v1"  # an estimate never sends; a loopback address all the same
ROOT = os.geteuid() == 0
not_root = pytest.mark.skipif(ROOT, reason="root reads and writes past file permissions")
GOOD = pl.DataFrame({"id": list(range(1, 201)), "topic": [f"topic number {i}" for i in range(1, 201)]})
GARBAGE = bytes(range(256)) * 8


def parquet(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


PARQUET = parquet(GOOD)
NESTED = parquet(pl.DataFrame({"id": [1, 2], "topic": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]}))
LATE_TYPE_CHANGE = b"id,topic\n" + b"".join(b"%d,t%d\n" % (i, i) for i in range(12_000)) + b"oops,t\n"
DEEP_JSON = b'{"id": 1, "topic": "a", "x": ' + b"[" * 5_000 + b"]" * 5_000 + b"}\n"


def put(name: str, content: bytes, mode: int | None = None) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content)
        if mode is not None:
            path.chmod(mode)
        return path

    return build


def _directory(folder: Path) -> Path:
    (folder / "tables").mkdir()
    return folder / "tables"


def _in_unsearchable_directory(folder: Path) -> Path:
    put("in.csv", b"id,topic\n1,a\n")(_directory(folder))
    (folder / "tables").chmod(0o000)
    return folder / "tables" / "in.csv"


def _dataset_with_a_torn_part(folder: Path) -> Path:
    for key, content in (("a", PARQUET), ("b", PARQUET[: len(PARQUET) // 2])):
        (folder / "ds" / f"k={key}").mkdir(parents=True)
        (folder / "ds" / f"k={key}" / "part.parquet").write_bytes(content)
    return folder / "ds"


def _link(name: str, target: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / name).symlink_to(target)
        return folder / name

    return build


def case(name: str, build: Callable[[Path], Path], expected: type[EnrichError] | None, fmt: str = "auto",
         marks: Any = ()) -> Any:  # fmt: skip
    return pytest.param(build, fmt, expected, id=name, marks=marks)


SWEEP = [
    case("binary garbage .csv", put("g.csv", GARBAGE), TemplateError),  # the bytes read as a header without 'topic'
    case("binary garbage .parquet", put("g.parquet", GARBAGE), InputError),
    case("binary garbage .ndjson", put("g.ndjson", GARBAGE), InputError),
    case("binary garbage .jsonl", put("g.jsonl", GARBAGE), InputError),
    case("parquet cut in half", put("half.parquet", PARQUET[: len(PARQUET) // 2]), InputError),
    case("parquet with a wrong footer magic", put("m.parquet", PARQUET[:-4] + b"XXXX"), InputError),
    case("parquet with a wrong leading magic", put("h.parquet", b"XXXX" + PARQUET[4:]), None),  # polars reads footers
    case("parquet of 4 bytes", put("p.parquet", b"PAR1"), InputError),
    case("empty .csv", put("e.csv", b""), InputError),
    case("empty .parquet", put("e.parquet", b""), InputError),
    case("empty .ndjson", put("e.ndjson", b""), InputError),
    case("empty .jsonl", put("e.jsonl", b""), InputError),
    case("csv with ragged rows", put("r.csv", b"id,topic\n1,a\n2,b,c,d\n"), InputError),
    case("csv with an unclosed quote", put("q.csv", b'id,topic\n1,"a\n2,b\n'), InputError),
    case("csv with a stray quote", put("s.csv", b'id,topic\n1,a"b\n2,c\n'), InputError),
    case("csv that is blank lines", put("b.csv", b"\n\n\n"), InputError),
    case("csv with non-UTF-8 bytes", put("l.csv", "id,topic\n1,caf\xe9\n".encode("latin-1")), InputError),
    case("csv with a header only", put("h.csv", b"id,topic\n"), InputError),
    case("csv whose type changes after the inferred rows", put("late.csv", LATE_TYPE_CHANGE), InputError),
    case("ndjson with a non-JSON line", put("n.ndjson", b'{"id": 1, "topic": "a"}\nnot json\n'), InputError),
    case("ndjson of arrays", put("a.ndjson", b'[{"id": 1, "topic": "a"}]\n'), InputError),
    case("ndjson of numbers", put("i.ndjson", b"1\n2\n"), InputError),
    case("ndjson with a number out of range", put("big.ndjson", b'{"id": 1e400, "topic": "a"}\n'), InputError),
    case("ndjson nested past any depth", put("deep.ndjson", DEEP_JSON), InputError),
    case("parquet with a struct column", put("struct.parquet", NESTED), ValidationFailed),
    case("csv read as parquet", put("t.csv", b"id,topic\n1,a\n"), InputError, fmt="parquet"),
    case("parquet read as ndjson", put("t.parquet", PARQUET), InputError, fmt="ndjson"),
    case("unsupported extension", put("t.xlsx", b"PK\x03\x04"), InputError),
    case("directory without parquet files", _directory, InputError),
    case("dataset with a torn part", _dataset_with_a_torn_part, InputError),
    case("missing file", lambda folder: folder / "missing.csv", InputError),
    case("dangling symlink", _link("gone.csv", "nowhere.csv"), InputError),
    case("character device", _link("null.csv", os.devnull), InputError),
    case("file without read permission", put("locked.csv", b"id,topic\n1,a\n", 0o000), InputError, marks=not_root),
    case("file in an unsearchable directory", _in_unsearchable_directory, InputError, marks=not_root),
]
BY_ID = {param.id: param for param in SWEEP}


@pytest.mark.parametrize(("build", "fmt", "expected"), SWEEP)
def test_reading_and_planning_a_broken_input_raises_only_our_errors(
    tmp_path: Path, build: Callable[[Path], Path], fmt: str, expected: type[EnrichError] | None
) -> None:
    path = build(tmp_path)
    job = EnrichJob(input_path=str(path), input_format=fmt, output_path=str(tmp_path / "o.parquet"), base_url=NOWHERE)
    if expected is None:
        assert estimate_job(job).rows_valid == GOOD.height
        return
    with pytest.raises(EnrichError) as caught:
        estimate_job(job)
    assert type(caught.value) is expected, caught.value.message
    assert isinstance(caught.value, UserError)
    assert str(path) in caught.value.message


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under the folder: file bytes, symlink targets, directories."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return found


@pytest.fixture
def flow_env(prefect_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-io-errors")


FLOW_CASES = [
    "binary garbage .parquet", "parquet cut in half", "csv with ragged rows", "ndjson of arrays",
    "directory without parquet files", "missing file",
]  # fmt: skip
FLOW = [BY_ID[name] for name in FLOW_CASES]
FLOW.append(pytest.param(*BY_ID["ndjson nested past any depth"].values, id="ndjson nested"))


@pytest.mark.usefixtures("flow_env")
@pytest.mark.parametrize(("build", "fmt", "expected"), FLOW)
def test_a_broken_input_fails_the_flow_invalid_and_writes_nothing(
    fake_llm: FakeOpenAIServer, tmp_path: Path, build: Callable[[Path], Path], fmt: str, expected: type[EnrichError]
) -> None:
    path = build(tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path / "out" / "enriched.parquet"
    job = EnrichJob(input_path=str(path), input_format=fmt, output_path=str(out), base_url=fake_llm.base_url)
    state = enrich_table(job, return_state=True)
    assert state.is_failed() and state.name == INVALID_STATE, state.message
    assert str(path) in str(state.message)
    # No output, staging, lock or temp file left behind, nor the output's new (empty) folder.
    assert snapshot(tmp_path) == before
    assert fake_llm.stats.requests == 0


# What to create (a name ending in / is a directory with that mode), the job's paths, and the path the message names.
DESTINATIONS = [
    pytest.param({"notes.txt": "mine"}, {"output_path": "notes.txt/sub/out.parquet"}, "notes.txt",
                 id="output's grandparent is a file"),
    pytest.param({"results/keep.parquet": "mine"}, {"output_path": "results"}, "results",
                 id="output is a directory holding files"),
    pytest.param({"ro/": 0o555}, {"output_path": "ro/out.parquet"}, "ro",
                 id="output directory without write permission", marks=not_root),
    pytest.param({"hidden/": 0o000}, {"output_path": "hidden/out.parquet"}, "hidden",
                 id="output directory without search permission", marks=not_root),
    pytest.param({"scratch": "mine"}, {"output_path": "out.parquet", "staging_dir": "scratch"}, "scratch",
                 id="staging_dir is a file"),
    pytest.param({".enrich-cache": "mine"}, {"output_path": "out.parquet"}, ".enrich-cache",
                 id="the cache beside the output is a file"),
]  # fmt: skip


@pytest.mark.usefixtures("flow_env")
@pytest.mark.parametrize(("entries", "paths", "named"), DESTINATIONS)
def test_an_unusable_destination_is_refused_before_the_first_request(
    fake_llm: FakeOpenAIServer, tmp_path: Path, entries: dict[str, Any], paths: dict[str, str], named: str
) -> None:
    source = tmp_path / "table.csv"
    source.write_bytes((DATA / "topics.csv").read_bytes())
    for name, content in entries.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir(mode=content)
        else:
            (tmp_path / name).parent.mkdir(exist_ok=True)
            (tmp_path / name).write_text(content)
    before = snapshot(tmp_path)
    where = {option: str(tmp_path / path) for option, path in paths.items()}
    state = enrich_table(EnrichJob(input_path=str(source), base_url=fake_llm.base_url, **where), return_state=True)
    assert state.is_failed() and state.name == INVALID_STATE, state.message
    assert str(tmp_path / named) in str(state.message)
    assert fake_llm.stats.requests == 0
    assert snapshot(tmp_path) == before  # the input byte-identical, nothing created


@pytest.mark.usefixtures("flow_env")
def test_the_same_run_with_a_usable_destination_sends_and_writes(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    """The control: the refusals above are about the destination, not the input, key or endpoint."""
    source = tmp_path / "table.csv"
    source.write_bytes((DATA / "topics.csv").read_bytes())
    out = tmp_path / "results" / "out.parquet"
    job = EnrichJob(input_path=str(source), output_path=str(out), base_url=fake_llm.base_url)
    state = enrich_table(job, return_state=True)
    assert state.is_completed(), state.message
    assert fake_llm.stats.requests > 0 and pl.read_parquet(out).height == pl.read_csv(source).height


def _read_a_corrupt_part(folder: Path) -> tuple[Callable[[], object], Path]:
    part = put("part.parquet", GARBAGE)(folder)
    return lambda: Staging(str(folder)).read(str(part)), part


def _staging_dir_a_file(folder: Path) -> tuple[Callable[[], object], Path]:
    scratch = put("scratch", b"x")(folder)
    return lambda: open_staging(str(folder / "out.parquet"), str(scratch), shared=False, storage=None), scratch


def _publish_a_corrupt_part(folder: Path) -> tuple[Callable[[], object], Path]:
    part = put("part.parquet", PARQUET[:-8])(folder)
    out = folder / "out.parquet"
    return lambda: publish_parquet(Staging(str(folder)).scan([str(part)]), str(out)), out


def _publish_onto_a_directory(folder: Path) -> tuple[Callable[[], object], Path]:
    (folder / "out.parquet").mkdir()
    return lambda: publish_parquet(GOOD.lazy(), str(folder / "out.parquet")), folder / "out.parquet"


def _write_a_part_under_a_file(folder: Path) -> tuple[Callable[[], object], Path]:
    part = put("in", b"x")(folder) / "part-000000.parquet"
    return lambda: Staging(str(folder)).write(GOOD, str(part)), part


def _write_a_part_onto_a_directory(folder: Path) -> tuple[Callable[[], object], Path]:
    (folder / "part.parquet").mkdir()
    return lambda: Staging(str(folder)).write(GOOD, str(folder / "part.parquet")), folder / "part.parquet"


WRITES = [
    pytest.param(_read_a_corrupt_part, id="reading a corrupt staging part"),
    pytest.param(_staging_dir_a_file, id="opening staging in a file"),
    pytest.param(_publish_a_corrupt_part, id="publishing a scan of a corrupt part"),
    pytest.param(_publish_onto_a_directory, id="publishing onto a directory"),
    pytest.param(_write_a_part_under_a_file, id="writing a part under a file"),
    pytest.param(_write_a_part_onto_a_directory, id="writing a part onto a directory"),
]


@pytest.mark.parametrize("build", WRITES)
def test_staging_and_publishing_failures_are_output_errors(
    tmp_path: Path, build: Callable[[Path], tuple[Callable[[], object], Path]]
) -> None:
    act, named = build(tmp_path)
    with pytest.raises(EnrichError) as caught:
        act()
    assert type(caught.value) is OutputError, caught.value.message
    assert str(named) in caught.value.message
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
