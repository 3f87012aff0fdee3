"""The run stage: partition tasks, their runtime (flow process and Dask worker), row assembly, dispatch.

Everything goes through the product's own builders (plan_outputs, survey_input, build_lane,
runtime_for) and asks the fake OpenAI server over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx2
import pandera.polars as pa
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from llm_enrich.flows.cache.files import AnswerStore, open_cache
from llm_enrich.flows.job import EnrichJob, ExtraOutput
from llm_enrich.flows.llm.endpoint import Endpoint, resolve_endpoint
from llm_enrich.flows.plan.known_answers import ROW_INDEX, LaneColumns
from llm_enrich.flows.plan.lanes import OutputRun, plan_outputs
from llm_enrich.flows.plan.specs import build_spec
from llm_enrich.flows.plan.survey import Survey, choose_input_schema, read_columns, survey_input
from llm_enrich.flows.report.artifacts import Progress
from llm_enrich.flows.run.assembly import assemble_slice
from llm_enrich.flows.run.dispatch import dispatch_partitions
from llm_enrich.flows.run.partitions import PartitionResult, PartitionWork, ask_partition, enrich_partition
from llm_enrich.flows.run.runtime import (
    EventLoopThread,
    Runtime,
    build_lane,
    forget_runtime,
    lookup_runtime,
    register_runtime,
)
from llm_enrich.flows.run.workers import counts_of, runtime_for
from llm_enrich.flows.tables.staging import Staging, open_staging
from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TRUNCATED_COLUMN,
    added_columns,
)
from llm_enrich.schemas.errors import OutputError
from llm_enrich.transforms.costs import Price
from llm_enrich.transforms.enrichment import prompt_keys
from llm_enrich.transforms.outcome import CallStats, Outcome, StatsCounts
from llm_enrich.transforms.prompts import parse_template
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer, expected_object

PROMPT = "Explain {topic}"
# Repeated topics, shuffled: a row that got its neighbour's answer would show.
SHUFFLED = ["beta", "alpha", "gamma", "alpha", "beta", "delta", "alpha", "gamma"]


def make_job(server: FakeOpenAIServer, tmp_path: Path, topics: list[str], **overrides: Any) -> EnrichJob:
    source = tmp_path / "in.parquet"
    pl.DataFrame({"id": list(range(len(topics))), "topic": topics}).write_parquet(source)
    values: dict[str, Any] = {
        "input_path": str(source),
        "output_path": str(tmp_path / "out" / "enriched.parquet"),
        "base_url": server.base_url,
        "prompt": PROMPT,
        "partition_rows": 100,
        "retry_base_delay": 0.01,
        "max_retries": 2,
        "cache": False,
    }
    values.update(overrides)
    return EnrichJob(**values)


@dataclass
class Planned:
    """What the flow has when it dispatches partitions: runs, survey and staged slices."""

    job: EnrichJob
    endpoint: Endpoint
    schema: pa.DataFrameSchema
    runs: list[OutputRun]
    cache: AnswerStore | None
    staging: Staging
    survey: Survey

    def work(self, runtime_key: str, workers: int = 1) -> PartitionWork:
        return PartitionWork(
            job=self.job, columns=tuple(self.survey.input_columns), staging_root=self.staging.root,
            runtime_key=runtime_key, local=self.endpoint.local, served_url=self.endpoint.base_url, workers=workers,
        )  # fmt: skip

    def part(self, result: PartitionResult) -> pl.DataFrame:
        return self.staging.read(result.path)


@contextmanager
def planned(job: EnrichJob) -> Iterator[Planned]:
    """Plan and stage the job's input as flows/pipeline.py does before dispatching."""
    template = parse_template(job.prompt)
    schema = choose_input_schema(job, template).schema
    endpoint = resolve_endpoint(job)
    runs, cache = plan_outputs(job, read_columns(job), endpoint)
    staging = open_staging(job.destination, job.staging_dir, shared=False, storage=job.storage())
    try:
        survey = survey_input(job, schema, template, runs, staging)
        yield Planned(job, endpoint, schema, runs, cache, staging, survey)
    finally:
        if cache is not None:
            cache.close()
        staging.remove()


@contextmanager
def flow_runtime(plan: Planned) -> Iterator[Runtime]:
    """The runtime the flow builds and registers for its partition tasks (as in flows/pipeline.py)."""
    with ExitStack() as stack:
        loop = EventLoopThread()
        stack.callback(loop.close)
        lanes = []
        for run in plan.runs:
            lane, http = build_lane(
                run.job, run.spec, run.ctx, plan.endpoint, base_url=plan.endpoint.base_url, cache=plan.cache
            )
            stack.callback(close_on, loop, http)
            lanes.append(lane)
        runtime = Runtime(lanes=lanes, loop=loop, secret=plan.endpoint.secret, cache=plan.cache, schema=plan.schema)
        stack.callback(forget_runtime, register_runtime(runtime))
        yield runtime


def close_on(loop: EventLoopThread, http: httpx2.AsyncClient) -> None:
    """Close a lane's HTTP client on the loop it was used from."""
    loop.run(http.aclose())


def worker_key() -> str:
    """The key of a run this process has never registered: runtime_for builds it as a Dask worker would."""
    return uuid.uuid4().hex


def added_up(results: list[Any]) -> StatsCounts:
    """Counters measured on workers, added up as dispatch does into the flow's CallStats."""
    total = CallStats()
    for result in results:
        for counts in result.stats:
            total.merge(counts)
    return total.snapshot()


# -- EventLoopThread ----------------------------------------------------------------------------


def test_the_event_loop_thread_serves_any_thread_and_close_leaves_no_thread_running() -> None:
    before = set(threading.enumerate())
    loop = EventLoopThread()
    started = [t for t in threading.enumerate() if t not in before and t.name == "enrich-loop"]
    assert len(started) == 1 and started[0].is_alive()

    async def where(n: int) -> tuple[int, threading.Thread]:
        await asyncio.sleep(0.01)
        return n * n, threading.current_thread()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: loop.run(where(n)), range(8)))
    assert [n for n, _ in answers] == [n * n for n in range(8)]
    assert {thread for _, thread in answers} == {started[0]}  # every coroutine ran on the one loop thread

    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        loop.run(fail())

    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    pending = asyncio.run_coroutine_threadsafe(forever(), loop.loop)
    time.sleep(0.05)
    loop.close()
    assert cancelled.is_set() and pending.cancelled()  # what was left was cancelled, not abandoned
    assert loop.loop.is_closed() and not started[0].is_alive()
    assert [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name == "enrich-loop"] == []
    loop.close()  # a second close is harmless


# -- runtime_for: the flow's runtime, or one built on a worker ----------------------------------


def test_in_the_flow_process_runtime_for_returns_the_registered_runtime_unbuilt(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    job = make_job(fake_llm, tmp_path, ["one"])
    with planned(job) as plan, flow_runtime(plan) as runtime:
        assert lookup_runtime(runtime.key) is runtime
        found, built_here = runtime_for(runtime.key, job, local=False, served_url=fake_llm.base_url)
        assert found is runtime and built_here is False
        # The flow's lanes keep the flow's call contexts, so its counters see every request.
        assert all(lane.ctx is run.ctx for lane, run in zip(found.lanes, plan.runs, strict=True))
    with pytest.raises(KeyError):
        lookup_runtime(runtime.key)  # forgotten when the run ended


def test_a_worker_builds_the_runtime_from_the_job_once_and_reuses_it(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    job = make_job(
        fake_llm, tmp_path, ["one"], extra_outputs=[ExtraOutput(prompt="Name {topic}", output_column="name")]
    )
    key = worker_key()
    first, built_here = runtime_for(key, job, local=False, served_url=fake_llm.base_url, columns=["id", "topic"])
    again, built_again = runtime_for(key, job, local=False, served_url=fake_llm.base_url, columns=["id", "topic"])
    assert built_here and built_again and again is first
    with pytest.raises(KeyError):
        lookup_runtime(key)  # built for this process, not registered as the flow's
    assert [lane.spec.output_column for lane in first.lanes] == ["explanation", "name"]
    assert [lane.spec.template.text for lane in first.lanes] == [PROMPT, "Name {topic}"]
    # Outputs share one scheduler (one rate budget) but count apart.
    assert first.lanes[1].ctx.scheduler is first.lanes[0].ctx.scheduler
    assert first.lanes[1].ctx.stats is not first.lanes[0].ctx.stats
    # 'auto' chooses the schema from the flow's columns, as the flow did, without reading the input.
    assert first.schema is not None and first.schema.name == "TopicsInput"
    other, _ = runtime_for(worker_key(), job, local=False, served_url=fake_llm.base_url, columns=["topic"])
    assert other is not first and other.schema is not None and other.schema.name != "TopicsInput"


def test_a_worker_keeps_only_the_runtimes_of_a_few_recent_runs(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    job = make_job(fake_llm, tmp_path, ["one"])
    keys = [worker_key() for _ in range(8)]
    built = [runtime_for(key, job, local=False, served_url=fake_llm.base_url)[0] for key in keys]
    still_open = [rt for rt in built if not rt.loop.loop.is_closed()]
    assert 1 <= len(still_open) <= 4
    assert still_open == built[-len(still_open) :]  # the oldest go first
    assert built[0].loop.loop.is_closed()  # an evicted runtime's loop is closed, not leaked
    assert runtime_for(keys[-1], job, local=False, served_url=fake_llm.base_url)[0] is built[-1]
    rebuilt, built_here = runtime_for(keys[0], job, local=False, served_url=fake_llm.base_url)
    assert built_here and rebuilt is not built[0] and not rebuilt.loop.loop.is_closed()


@pytest.mark.parametrize(
    ("workers", "limits"),
    [(1, (1_000, 90_001)), (3, (333, 30_000)), (2_000, (1, 45))],
)
def test_each_worker_paces_at_its_share_of_the_runs_limits(
    fake_llm: FakeOpenAIServer, tmp_path: Path, workers: int, limits: tuple[int, int]
) -> None:
    job = make_job(
        fake_llm, tmp_path, ["one"], rpm=1_000, tpm=90_001,
        extra_outputs=[ExtraOutput(prompt="Name {topic}", output_column="name")],
    )  # fmt: skip
    runtime, _ = runtime_for(worker_key(), job, local=False, served_url=fake_llm.base_url, workers=workers)
    for lane in runtime.lanes:
        assert lane.ctx.scheduler is not None
        assert (lane.ctx.scheduler.rpm, lane.ctx.scheduler.tpm) == limits
    assert (job.rpm, job.tpm) == (1_000, 90_001)  # the run's job is not changed


def test_a_worker_without_limits_sets_none(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    job = make_job(fake_llm, tmp_path, ["one"])
    runtime, _ = runtime_for(worker_key(), job, local=False, served_url=fake_llm.base_url, workers=3)
    scheduler = runtime.lanes[0].ctx.scheduler
    assert scheduler is not None and (scheduler.rpm, scheduler.tpm) == (None, None)


# -- assemble_slice -----------------------------------------------------------------------------


def test_assembly_writes_each_answer_to_its_own_row_whatever_order_the_answers_come_in(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    topics = [*SHUFFLED, "broken"]
    job = make_job(fake_llm, tmp_path, topics)
    secret = "sk-test-must-not-show-7731"
    with planned(job) as plan:
        (piece,) = plan.survey.slices
        staged = plan.staging.read(piece.path)
        lane = LaneColumns.of(0)
        broken = pl.col("topic") == "broken"
        # Answers as the model lane returns them, but in a shuffled row order, and a distinct text per row.
        answers = (
            staged.filter(pl.col(lane.ask))
            .sample(fraction=1.0, shuffle=True, seed=7)
            .select(
                ROW_INDEX,
                pl.when(broken).then(None).otherwise(pl.format("row {}", pl.col(ROW_INDEX))).alias("explanation"),
                pl.when(broken).then(pl.lit(f"HTTP 400: bad key {secret}")).alias(ERROR_COLUMN),
                pl.lit(False).alias(TRUNCATED_COLUMN),
                (pl.col(ROW_INDEX) + 100).cast(pl.Int64).alias(INPUT_TOKENS_COLUMN),
                pl.lit(7, dtype=pl.Int64).alias(OUTPUT_TOKENS_COLUMN),
                pl.lit(0, dtype=pl.Int64).alias(CACHED_TOKENS_COLUMN),
                pl.col(lane.key).alias(KEY_COLUMN),
            )
        )
        assert answers[ROW_INDEX].to_list() != sorted(answers[ROW_INDEX].to_list())
        specs = [(run.job, run.spec, run.names) for run in plan.runs]
        out, failed = assemble_slice(staged, [answers], specs, ["id", "topic"], plan.schema, secret)
    assert out.columns == ["id", "topic", *added_columns("explanation")]
    assert out["topic"].to_list() == topics
    assert out["explanation"].to_list() == [f"row {i}" for i in range(len(SHUFFLED))] + [None]
    assert out[ERROR_COLUMN].to_list() == [None] * len(SHUFFLED) + ["HTTP 400: bad key ***"]
    assert failed == [1]
    # Tokens show on the first row of each prompt only; rows that reused its answer show 0.
    first = {topic: topics.index(topic) for topic in topics}
    assert out[INPUT_TOKENS_COLUMN].to_list() == [100 + i if first[t] == i else 0 for i, t in enumerate(topics)]
    assert out[OUTPUT_TOKENS_COLUMN].to_list() == [7 if first[t] == i else 0 for i, t in enumerate(topics)]
    keys = out[KEY_COLUMN].to_list()
    assert [keys[topics.index(t)] for t in topics] == keys and len(set(keys)) == len(set(topics))


def test_structured_answers_expand_to_typed_columns_on_their_own_rows(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    job = make_job(fake_llm, tmp_path, SHUFFLED, output_schema="summary:str, difficulty:int[1..5]")
    with planned(job) as plan, flow_runtime(plan) as runtime:
        result = enrich_partition.fn(plan.survey.slices[0], plan.work(runtime.key))
        out = plan.part(result)
    assert out.columns == ["id", "topic", "explanation", "summary", "difficulty", *added_columns("explanation")[1:]]
    assert out.schema["summary"] == pl.String and out.schema["difficulty"] == pl.Int64
    body = fake_llm.stats.bodies[0]
    if body.get("tools"):  # function calling (a local server) or json_schema, whichever the run chose
        schema = body["tools"][0]["function"]["parameters"]
    else:
        schema = body["response_format"]["json_schema"]["schema"]
    expected = [expected_object(schema, f"Explain {t}") for t in SHUFFLED]
    assert out["summary"].to_list() == [e["summary"] for e in expected]
    assert out["difficulty"].to_list() == [e["difficulty"] for e in expected]
    assert all(1 <= d <= 5 for d in out["difficulty"])
    assert result.failed == [0] and fake_llm.stats.requests == len(set(SHUFFLED))


# -- enrich_partition on the flow's runtime -----------------------------------------------------


def test_a_partition_writes_one_row_per_input_row_and_asks_each_prompt_once(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    job = make_job(fake_llm, tmp_path, SHUFFLED)
    with planned(job) as plan, flow_runtime(plan) as runtime:
        (piece,) = plan.survey.slices
        result = enrich_partition.fn(piece, plan.work(runtime.key))
        out = plan.part(result)
        stats = plan.runs[0].ctx.stats.snapshot()
    assert result.path == plan.staging.path("out", piece.number)
    assert (result.number, result.rows, out.height) == (piece.number, len(SHUFFLED), len(SHUFFLED))
    assert_frame_equal(out.select("id", "topic"), pl.DataFrame({"id": range(len(SHUFFLED)), "topic": SHUFFLED}))
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in SHUFFLED]
    assert (result.failed, result.failed_any, result.truncated_any, result.problems) == ([0], 0, 0, [])
    assert [row["explanation"] for row in result.sample] == out["explanation"].to_list()
    assert result.stats is None  # the flow's own lanes counted the requests
    distinct = len(set(SHUFFLED))
    assert fake_llm.stats.requests == distinct
    assert sorted(fake_llm.stats.prompts.values()) == [1] * distinct
    assert (stats.requests, stats.rows_deduplicated) == (distinct, len(SHUFFLED) - distinct)
    assert out[INPUT_TOKENS_COLUMN].sum() == stats.input_tokens > 0


def test_failed_rows_carry_their_error_and_are_counted_by_the_partition(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    topics = ["fine", "bad FAULT:400", "also fine", "bad FAULT:400", "cut FAULT:length"]
    job = make_job(fake_llm, tmp_path, topics)
    with planned(job) as plan, flow_runtime(plan) as runtime:
        result = enrich_partition.fn(plan.survey.slices[0], plan.work(runtime.key))
        out = plan.part(result)
    assert out["explanation"].to_list()[:4] == [
        expected_answer("Explain fine"), None, expected_answer("Explain also fine"), None,
    ]  # fmt: skip
    refused = "HTTP 400: injected 400 (after 1 attempt)"
    assert out[ERROR_COLUMN].to_list() == [None, refused, None, refused, None]
    assert out[TRUNCATED_COLUMN].to_list() == [False, False, False, False, True]
    assert (result.failed, result.failed_any, result.truncated_any) == ([2], 2, 1)
    assert [(p["id"], p["why"]) for p in result.problems] == [(1, out[ERROR_COLUMN][1]), (3, out[ERROR_COLUMN][3])]
    assert fake_llm.stats.prompts["Explain bad FAULT:400"] == 1  # asked once for both rows


def test_slices_of_one_run_share_its_answers(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    topics = [f"shared {i % 4}" for i in range(12)]
    job = make_job(fake_llm, tmp_path, topics, partition_rows=3)
    with planned(job) as plan, flow_runtime(plan) as runtime:
        assert len(plan.survey.slices) == 4
        work = plan.work(runtime.key)
        results = [enrich_partition.fn(piece, work) for piece in reversed(plan.survey.slices)]
        out = pl.concat([plan.part(r) for r in sorted(results, key=lambda r: r.number)])
        stats = plan.runs[0].ctx.stats.snapshot()
    assert [r.rows for r in results] == [3, 3, 3, 3]
    assert out["id"].to_list() == list(range(12))
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    assert fake_llm.stats.requests == stats.requests == 4
    assert stats.rows_deduplicated == 8
    # Slices ran last to first, yet each prompt's tokens show once, on its first row in the table.
    assert out.filter(pl.col(INPUT_TOKENS_COLUMN) > 0)["id"].to_list() == [0, 1, 2, 3]


def test_answers_already_in_the_cache_fill_their_rows_and_only_the_rest_is_asked(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    cache_dir = str(tmp_path / "cache")
    job = make_job(fake_llm, tmp_path, SHUFFLED, cache=True, cache_dir=cache_dir)
    spec = build_spec(job, resolve_endpoint(job))
    remembered = ["alpha", "delta"]
    _, keys = prompt_keys(pl.DataFrame({"topic": remembered}), spec)
    store = open_cache(cache_dir)
    for topic, key in zip(remembered, keys, strict=True):
        assert key is not None
        store.append(key, Outcome(text=f"remembered {topic}", input_tokens=11, output_tokens=5), model="m")
    store.close()
    with planned(job) as plan, flow_runtime(plan) as runtime:
        result = enrich_partition.fn(plan.survey.slices[0], plan.work(runtime.key))
        out = plan.part(result)
    assert out["explanation"].to_list() == [
        f"remembered {t}" if t in remembered else expected_answer(f"Explain {t}") for t in SHUFFLED
    ]
    assert sorted(fake_llm.stats.prompts) == ["Explain beta", "Explain gamma"]
    assert fake_llm.stats.requests == 2
    # A cached answer's tokens show on its first row in the table, 0 on the rows that reuse it.
    alpha = [i for i, t in enumerate(SHUFFLED) if t == "alpha"]
    assert [(out[INPUT_TOKENS_COLUMN][i], out[OUTPUT_TOKENS_COLUMN][i]) for i in alpha] == [(11, 5), (0, 0), (0, 0)]
    # The new answers are in the cache when the task returns.
    cached = open_cache(cache_dir).load()
    assert set(cached["text"].to_list()) == {
        "remembered alpha", "remembered delta", expected_answer("Explain beta"), expected_answer("Explain gamma"),
    }  # fmt: skip


# -- enrich_partition and ask_partition on a worker's runtime -----------------------------------


def test_partitions_on_a_worker_report_their_own_counts_and_they_add_up(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    topics = [f"counted {i % 5}" for i in range(15)]
    job = make_job(fake_llm, tmp_path, topics, partition_rows=4)
    with planned(job) as plan:
        work = plan.work(worker_key())
        results = [enrich_partition.fn(piece, work) for piece in plan.survey.slices]
        out = pl.concat([plan.part(r) for r in results])
        flow_stats = plan.runs[0].ctx.stats.snapshot()
    assert all(r.stats is not None and len(r.stats) == 1 for r in results)
    per_task = [r.stats[0].requests for r in results if r.stats]
    assert per_task == [4, 1, 0, 0]  # each task counts only the prompts it asked
    total = added_up(results)
    assert total.requests == fake_llm.stats.requests == 5
    assert total.rows_deduplicated == 10
    assert total.input_tokens == out[INPUT_TOKENS_COLUMN].sum() > 0
    assert total.output_tokens == out[OUTPUT_TOKENS_COLUMN].sum() > 0
    assert flow_stats == StatsCounts()  # the flow's lanes saw nothing: its counts come back with the results
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]


def test_a_workers_runtime_counts_like_its_results_say(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    job = make_job(fake_llm, tmp_path, SHUFFLED)
    with planned(job) as plan:
        key = worker_key()
        result = enrich_partition.fn(plan.survey.slices[0], plan.work(key))
        runtime, _ = runtime_for(key, job, local=False, served_url=fake_llm.base_url)
    assert result.stats == counts_of(runtime)  # the first task on a fresh worker: its delta is everything


def test_a_worker_stores_its_answers_in_the_runs_cache(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    cache_dir = str(tmp_path / "cache")
    job = make_job(fake_llm, tmp_path, SHUFFLED, cache=True, cache_dir=cache_dir)
    with planned(job) as plan:
        result = enrich_partition.fn(plan.survey.slices[0], plan.work(worker_key()))
        out = plan.part(result)
    cached = open_cache(cache_dir).load()
    assert dict(zip(cached["key"], cached["text"], strict=True)) == dict(
        zip(out[KEY_COLUMN], out["explanation"], strict=True)
    )
    assert cached.height == len(set(SHUFFLED))


def test_two_phases_on_workers_ask_each_prompt_once_and_count_like_one_machine(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    topics = [f"phase {i % 4}" for i in range(10)]
    job = make_job(fake_llm, tmp_path, topics, partition_rows=3)
    with planned(job) as plan:
        work = plan.work(worker_key(), workers=2)
        owning = [piece for piece in plan.survey.slices if piece.owned]
        assert len(owning) < len(plan.survey.slices)  # later slices own nothing: all their prompts came earlier
        asked = [ask_partition.fn(piece, work) for piece in owning]
        assert fake_llm.stats.requests == 4
        # Another worker process, which asked nothing itself, loads the staged answers and fills every slice.
        other = replace(work.with_answers([a.path for a in asked if a.path]), runtime_key=worker_key())
        results = [enrich_partition.fn(piece, other) for piece in plan.survey.slices]
        out = pl.concat([plan.part(r) for r in results])
    assert fake_llm.stats.requests == 4  # nothing asked twice
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    assert sum(r.rows for r in results) == 10 and all(r.failed == [0] for r in results)
    total = added_up([*asked, *results])
    assert (total.requests, total.rows_deduplicated) == (4, 6)
    assert total.input_tokens == out[INPUT_TOKENS_COLUMN].sum() > 0


def test_call_stats_snapshots_merge_into_sums() -> None:
    first, second, flow = CallStats(), CallStats(), CallStats()
    first.add(requests=3, retries=1, tokens=(30, 12))
    first.bump(rows_deduplicated=4, cached_input_tokens=8, rate_limited=2)
    second.add(requests=5, tokens=(50, 20))
    second.bump(timeouts=1, rows_deduplicated=-1, in_flight=3, answered=5)
    before = second.snapshot()
    second.add(requests=2, tokens=(10, 4))
    for counts in (first.snapshot(), second.snapshot().minus(before)):
        flow.merge(counts)
    assert flow.snapshot() == StatsCounts(
        requests=5, retries=1, input_tokens=40, output_tokens=16, rate_limited=2, timeouts=0,
        rows_deduplicated=4, cached_input_tokens=8,
    )  # fmt: skip
    assert (flow.in_flight, flow.answered) == (0, 0)  # live gauges are not part of what travels


# -- dispatch_partitions inside a flow ----------------------------------------------------------


@pytest.mark.usefixtures("prefect_backend")
def test_dispatch_runs_every_slice_as_a_task_and_returns_them_in_slice_order(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    from prefect import flow

    fake_llm.behaviour.slow_seconds = 0.4
    topics = [f"dispatched {i % 6}" for i in range(14)]
    topics[0] = "FAULT:slow"  # the first slice finishes last
    job = make_job(fake_llm, tmp_path, topics, partition_rows=3, partition_workers=3)
    done: list[int] = []
    with planned(job) as plan, flow_runtime(plan) as runtime:

        @flow(persist_result=False)
        def run_slices() -> list[PartitionResult]:
            progress = Progress(plan.survey.rows_valid, 0)
            results = dispatch_partitions(plan.survey, plan.job, progress, plan.runs, plan.work(runtime.key))
            done.append(progress.done)
            return results

        results = run_slices()
        out = pl.concat([plan.part(r) for r in results])
    assert [r.number for r in results] == [piece.number for piece in plan.survey.slices] == [0, 1, 2, 3, 4]
    assert out["explanation"].to_list() == [expected_answer(f"Explain {t}") for t in topics]
    assert out["id"].to_list() == list(range(14))
    assert done == [14]  # every slice's rows advanced the progress
    assert fake_llm.stats.requests == len(set(topics)) == 7


@pytest.mark.usefixtures("prefect_backend")
def test_dispatch_stops_at_the_first_failed_partition_and_raises_its_error(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    from prefect import flow

    topics = [f"stopping {i}" for i in range(9)]
    job = make_job(fake_llm, tmp_path, topics, partition_rows=3, partition_workers=1)
    with planned(job) as plan, flow_runtime(plan) as runtime:
        Path(plan.survey.slices[1].path).unlink()  # the second slice's staged rows are gone

        @flow(persist_result=False)
        def run_slices() -> None:
            dispatch_partitions(plan.survey, plan.job, Progress(9, 0), plan.runs, plan.work(runtime.key))

        with pytest.raises(OutputError, match="cannot read the staging file"):
            run_slices()
        assert plan.runs[0].ctx.stop.is_set
    # The first slice was answered; the third never started.
    assert sorted(fake_llm.stats.prompts) == [f"Explain stopping {i}" for i in range(3)]


# -- bugs ---------------------------------------------------------------------------------------


def test_a_worker_never_closes_the_runtime_of_a_run_it_is_still_working_on(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    fake_llm.behaviour.latency = 0.5
    job = make_job(fake_llm, tmp_path, ["slow one", "slow two"])
    with planned(job) as plan:
        work = plan.work(worker_key())
        outcome: list[object] = []

        def partition() -> None:
            try:
                outcome.append(enrich_partition.fn(plan.survey.slices[0], work))
            except BaseException as exc:  # noqa: BLE001 - the test reports what the task raised
                outcome.append(exc)

        thread = threading.Thread(target=partition)
        thread.start()
        deadline = time.monotonic() + 5
        while fake_llm.stats.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Four more runs reach this worker while the first one's partition waits for its answers.
        for _ in range(4):
            runtime_for(worker_key(), job, local=False, served_url=fake_llm.base_url)
        thread.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], PartitionResult), outcome


def test_workers_of_one_run_together_stay_under_max_cost(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    topics = [f"priced topic {i}" for i in range(40)]
    price = Price(10_000.0, 10_000.0)
    job = make_job(
        fake_llm, tmp_path, topics, partition_rows=20, max_cost=1.0, max_tokens=16, max_concurrency=1,
        input_price=price.input_per_million, output_price=price.output_per_million,
    )  # fmt: skip
    with planned(job) as plan:
        first, second = plan.survey.slices
        # Two worker processes of one run (workers=2), each given one slice.
        results = [enrich_partition.fn(piece, plan.work(worker_key(), workers=2)) for piece in (first, second)]
    total = added_up(results)
    assert total.requests > 0
    assert price.cost(total.input_tokens, total.output_tokens) <= 1.0
