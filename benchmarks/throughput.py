"""Throughput benchmark: how close the request pipeline gets to the theoretical limit.

Run from the repository root (it is a script, not a pytest test)::

    .venv/bin/python -m benchmarks.throughput                       # everything (~15 minutes)
    .venv/bin/python -m benchmarks.throughput --scenario rpm --rows 500 --skip-reference
    .venv/bin/python -m benchmarks.throughput --json /tmp/throughput.json

Request scenarios (1-5) run ``transforms.enrichment.enrich_frame_async`` with a real
``ChatOpenAI`` against ``tests.fakes.openai_server.FakeOpenAIServer``, which runs in its own
process so that the server's threads do not compete with the client for the GIL. For each
scenario it prints:

* the request phase: from the first request the server received to the last answer it sent
  (measured by the server);
* the theoretical limit ``max(U*L/C, U/(RPM/60), T/(TPM/60))``: U unique prompts to ask,
  L the server latency, C the concurrency, T the tokens the server counts
  (``sum(count_tokens(prompt) + max_tokens)`` over the unique prompts);
* their ratio, the 429s, requests sent against U, rows lost (answer != expected_answer);
* the same rows through plain LangChain as the reference:
  ``(ChatPromptTemplate | ChatOpenAI(max_retries=6)).batch(..., max_concurrency=32)``.

CLI scenarios (6-7) run the real ``enrich run`` command (Prefect flow included): a rerun over a
fully cached table must send 0 requests, and a 1,000,000-row fully cached table (the cache is
pre-populated with the keys the flow computes) must finish end to end in under 60 s and 2 GB.

Nothing is written inside the repository: inputs, outputs, caches and the Prefect home of the CLI
runs live in a temporary directory that is removed at the end (``--keep-workdir`` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import polars as pl
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from flows.llm import classify_openai_error
from schemas.enriched import ERROR_COLUMN
from tests.fakes.openai_server import count_tokens, expected_answer
from transforms.calls import CallContext, CallStats, Failure, Outcome, RetryPolicy
from transforms.enrichment import AnswerMemo, EnrichSpec, enrich_frame_async, prompt_keys
from transforms.prompts import parse_template
from transforms.scheduling import Scheduler

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "Explain {topic}"
SCENARIOS = ("rpm", "tpm", "latency", "dupes", "faults", "rerun", "million")
REQUEST_SCENARIOS = SCENARIOS[:5]
RATIO_TARGET = 1.05
RATE_LIMITED_SHARE_TARGET = 0.01
MILLION_WALL_TARGET_S = 60.0
MILLION_RSS_TARGET_MB = 2048.0
ENRICH = REPO / ".venv" / "bin" / "enrich"
TIME_BIN = "/usr/bin/time"


# -- the fake server in its own process ---------------------------------------------------------

# Runs FakeOpenAIServer in a child process and answers "stats" / "stop" on stdin with JSON on
# stdout. It also records the request phase: first request received -> last real answer sent.
_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[2])
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer

server = FakeOpenAIServer(Behaviour(**json.loads(sys.argv[1])))
span_lock = threading.Lock()
span = {"first": None, "last": None}
inner = server.handle

def handle(body, auth):
    start = time.monotonic()
    result = inner(body, auth)
    end = time.monotonic()
    answered = result[0] == 200 and result[2] is not None and b'"chatcmpl-fake"' in result[2]
    with span_lock:
        if span["first"] is None or start < span["first"]:
            span["first"] = start
        if answered and (span["last"] is None or end > span["last"]):
            span["last"] = end
    return result

server.handle = handle
server.start()
print(server.base_url, flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "stats":
        with server._lock, span_lock:
            s = server.stats
            out = {
                "requests": s.requests,
                "completions": s.completions,
                "statuses": {str(k): v for k, v in s.statuses.items()},
                "prompts": dict(s.prompts),
                "max_in_flight": s.max_in_flight,
                "first": span["first"],
                "last": span["last"],
            }
        print(json.dumps(out), flush=True)
    elif command == "stop":
        break
server.stop()
"""


class ServerProcess:
    """A FakeOpenAIServer with the given Behaviour fields, in a child process on 127.0.0.1."""

    def __init__(self, **behaviour: Any) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(behaviour), str(REPO)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self.base_url = self._proc.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.close()
            raise RuntimeError(f"the fake server did not start (got {self.base_url!r})")

    def stats(self) -> dict[str, Any]:
        """What the server saw so far."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("stats\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def close(self) -> None:
        """Stop the server process (it is ours; stop it by its own handle)."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write("stop\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- request scenarios ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One request scenario: the rows, the server's behaviour and our concurrency."""

    name: str
    title: str
    rows: int
    unique: int
    latency: float = 0.2
    rpm: int | None = None
    tpm: int | None = None
    rate_500: float = 0.0
    rate_malformed: float = 0.0
    concurrency: int = 32
    max_tokens: int = 16
    ratio_target: float | None = None

    def behaviour(self) -> dict[str, Any]:
        return {
            "latency": self.latency,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "rate_500": self.rate_500,
            "rate_malformed": self.rate_malformed,
        }


def build_loads(args: argparse.Namespace) -> dict[str, Load]:
    """The issue's scenarios 1-5, capped at --rows."""

    def cap(n: int) -> int:
        return min(n, args.rows) if args.rows else n

    dupes_rows = cap(2000)
    return {
        "rpm": Load("rpm", "1. RPM-bound", cap(5000), cap(5000), rpm=3000, ratio_target=RATIO_TARGET),
        "tpm": Load("tpm", "2. TPM-bound", cap(5000), cap(5000), tpm=args.tpm, ratio_target=RATIO_TARGET),
        "latency": Load("latency", "3. Latency-bound", cap(2000), cap(2000)),
        "dupes": Load("dupes", "4. 30% duplicates", dupes_rows, round(dupes_rows * 0.7), rpm=3000),
        "faults": Load(
            "faults",
            "5. RPM + faults",
            cap(5000),
            cap(5000),
            rpm=3000,
            rate_500=0.02,
            rate_malformed=0.01,
            ratio_target=RATIO_TARGET,
        ),
    }


def make_topics(rows: int, unique: int, *, seed: int = 7, prefix: str = "topic") -> list[str]:
    """`unique` distinct topics, then repeats of them up to `rows`, shuffled reproducibly."""
    distinct = [f"{prefix} {i:05d}" for i in range(unique)]
    rng = random.Random(seed)
    topics = distinct + rng.choices(distinct, k=rows - unique)
    if rows > unique:
        rng.shuffle(topics)
    return topics


def render(topic: str) -> str:
    return TEMPLATE.format(topic=topic)


@dataclass
class Limit:
    """The theoretical limit of a request scenario and which term binds."""

    seconds: float
    binding: str
    terms: dict[str, float]
    unique: int
    tokens: int


def theoretical_limit(unique_prompts: list[str], load: Load) -> Limit:
    """max(U*L/C, U/(RPM/60), T/(TPM/60)) with T as the server counts tokens."""
    u = len(unique_prompts)
    tokens = sum(count_tokens(p) + load.max_tokens for p in unique_prompts)
    terms = {"latency": u * load.latency / load.concurrency}
    if load.rpm:
        terms["rpm"] = u / (load.rpm / 60)
    if load.tpm:
        terms["tpm"] = tokens / (load.tpm / 60)
    binding = max(terms, key=lambda k: terms[k])
    return Limit(terms[binding], binding, terms, u, tokens)


@dataclass
class RunResult:
    """One run (ours or the reference) of a request scenario."""

    rows: int
    phase_s: float | None
    wall_s: float
    ratio: float | None
    server_requests: int
    rate_limited_429: int
    statuses: dict[str, int]
    unique_prompts_seen: int
    rows_lost: int
    rows_with_error: int
    retries: int | None = None
    client_requests: int | None = None
    extra_requests: int | None = None
    max_in_flight_server: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def _server_numbers(stats: dict[str, Any], limit: Limit) -> dict[str, Any]:
    phase = stats["last"] - stats["first"] if stats["first"] is not None and stats["last"] is not None else None
    return {
        "phase_s": phase,
        "ratio": (phase / limit.seconds) if phase is not None and limit.seconds > 0 else None,
        "server_requests": stats["requests"],
        "rate_limited_429": stats["statuses"].get("429", 0),
        "statuses": stats["statuses"],
        "unique_prompts_seen": len(stats["prompts"]),
        "max_in_flight_server": stats["max_in_flight"],
    }


def run_ours(load: Load, topics: list[str], limit: Limit, retry_base_delay: float) -> RunResult:
    """enrich_frame_async with our CallContext and Scheduler, against a fresh server."""
    frame = pl.DataFrame({"topic": topics})
    spec = EnrichSpec(template=parse_template(TEMPLATE), output_column="answer", max_concurrency=load.concurrency)
    scheduler = Scheduler(
        max_concurrency=load.concurrency,
        rpm=load.rpm,
        tpm=load.tpm,
        max_tokens=load.max_tokens,
        base_pause=max(retry_base_delay, 0.05),
    )
    failures: Counter[str] = Counter()

    def classify(exc: BaseException) -> Failure:
        failure = classify_openai_error(exc)
        failures[failure.message[:90]] += 1
        return failure

    ctx = CallContext(
        policy=RetryPolicy(max_retries=6, base_delay=retry_base_delay, classify=classify),
        stats=CallStats(),
        scheduler=scheduler,
        max_tokens=load.max_tokens,
    )

    async def go(base_url: str) -> tuple[pl.DataFrame, float]:
        # The client belongs to this event loop: created inside it, closed before it ends.
        client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=load.concurrency, max_keepalive_connections=load.concurrency),
            timeout=30,
        )
        try:
            model = ChatOpenAI(
                model="fake",
                base_url=base_url,
                api_key="sk-test",
                max_retries=0,
                timeout=30,
                use_responses_api=False,
                max_tokens=load.max_tokens,
                http_async_client=client,
            )
            started = time.perf_counter()
            out = await enrich_frame_async(frame, spec, model, ctx=ctx, memo=AnswerMemo())
            return out, time.perf_counter() - started
        finally:
            await client.aclose()

    with ServerProcess(**load.behaviour()) as server:
        out, wall = asyncio.run(go(server.base_url))
        stats = server.stats()
    answers = out.get_column("answer").to_list()
    lost = sum(1 for t, a in zip(topics, answers, strict=True) if a != expected_answer(render(t)))
    errors = out.get_column(ERROR_COLUMN).drop_nulls()
    cs = ctx.stats
    sample = unique_prompts(topics)[0]
    details = {
        "rows_deduplicated": cs.rows_deduplicated,
        "client_rate_limited": cs.rate_limited,
        "scheduler_rate_limited": scheduler.rate_limited,
        "scheduler_peak_in_flight": scheduler.peak_in_flight,
        "scheduler_final_limit": scheduler.limit,
        "scheduler_token_ratio": scheduler._token_ratio,
        # What one request reserves in our TPM bucket at the end vs what the server counts.
        "tpm_reserved_per_request": scheduler.estimate(sample) if load.tpm else None,
        "tpm_counted_per_request": count_tokens(sample) + load.max_tokens,
        "failed_attempts": failures.most_common(5),
        "error_samples": Counter(errors.to_list()).most_common(3),
    }
    return RunResult(
        rows=len(topics),
        wall_s=wall,
        rows_lost=lost,
        rows_with_error=errors.len(),
        retries=cs.retries,
        client_requests=cs.requests,
        extra_requests=stats["requests"] - limit.unique - cs.retries,
        details=details,
        **_server_numbers(stats, limit),
    )


def run_reference(load: Load, topics: list[str], limit: Limit) -> RunResult:
    """Plain LangChain: prompt | ChatOpenAI with the SDK's own retries, batch(max_concurrency=32)."""
    with ServerProcess(**load.behaviour()) as server:
        llm = ChatOpenAI(
            model="fake",
            base_url=server.base_url,
            api_key="sk-test",
            max_retries=6,
            timeout=30,
            use_responses_api=False,
            max_tokens=load.max_tokens,
        )
        chain = ChatPromptTemplate.from_messages([("human", TEMPLATE)]) | llm
        started = time.perf_counter()
        results = chain.batch(
            [{"topic": t} for t in topics], config={"max_concurrency": load.concurrency}, return_exceptions=True
        )
        wall = time.perf_counter() - started
        stats = server.stats()
    failures: Counter[str] = Counter()
    lost = 0
    for topic, result in zip(topics, results, strict=True):
        if isinstance(result, BaseException):
            failures[type(result).__name__] += 1
            lost += 1
        elif result.content != expected_answer(render(topic)):
            lost += 1
    return RunResult(
        rows=len(topics),
        wall_s=wall,
        rows_lost=lost,
        rows_with_error=sum(failures.values()),
        details={"exceptions": dict(failures)},
        **_server_numbers(stats, limit),
    )


def unique_prompts(topics: list[str]) -> list[str]:
    return [render(t) for t in dict.fromkeys(topics)]


def judge_request_scenario(load: Load, ours: RunResult, limit: Limit) -> list[str]:
    """The issue's targets; each miss as one line."""
    misses = []
    if load.ratio_target is not None and (ours.ratio is None or ours.ratio > load.ratio_target):
        shown = f"{ours.ratio:.3f}" if ours.ratio is not None else "n/a"
        misses.append(f"request phase {shown}x the limit (target <= {load.ratio_target}x)")
    if ours.rows_lost:
        misses.append(f"{ours.rows_lost} rows lost (target 0)")
    if (load.rpm or load.tpm) and ours.rate_limited_429 > RATE_LIMITED_SHARE_TARGET * max(ours.server_requests, 1):
        share = ours.rate_limited_429 / max(ours.server_requests, 1)
        misses.append(f"{ours.rate_limited_429} 429s = {share:.1%} of requests (target <= 1%)")
    if ours.extra_requests or ours.unique_prompts_seen != limit.unique:
        misses.append(
            f"requests {ours.server_requests} != U {limit.unique} + retries {ours.retries} "
            f"(unique prompts seen {ours.unique_prompts_seen})"
        )
    return misses


def run_request_scenario(load: Load, args: argparse.Namespace) -> dict[str, Any]:
    topics = make_topics(load.rows, load.unique)
    limit = theoretical_limit(unique_prompts(topics), load)
    print(
        f"\n== {load.title}: {load.rows} rows, U={limit.unique}, L={load.latency}s, C={load.concurrency}, "
        f"rpm={load.rpm}, tpm={load.tpm}, T={limit.tokens}, 500s={load.rate_500:.0%}, "
        f"malformed={load.rate_malformed:.0%}; limit {limit.seconds:.1f}s ({limit.binding}-bound)",
        flush=True,
    )
    ours = run_ours(load, topics, limit, args.retry_base_delay)
    print(f"   ours: {_one_line(ours)}", flush=True)
    if ours.details["failed_attempts"]:
        print(f"   ours, failed attempts: {ours.details['failed_attempts']}", flush=True)
    reference = None
    reference_note = None
    if not args.skip_reference:
        ref_topics = topics
        ref_limit = limit
        if args.reference_rows and args.reference_rows < len(topics):
            ref_topics = topics[: args.reference_rows]
            ref_limit = theoretical_limit(unique_prompts(ref_topics), load)
            reference_note = (
                f"reference scaled down to the first {len(ref_topics)} rows (--reference-rows); "
                f"its ratio is against its own limit of {ref_limit.seconds:.1f}s"
            )
        reference = run_reference(load, ref_topics, ref_limit)
        print(f"   reference: {_one_line(reference)}", flush=True)
    misses = judge_request_scenario(load, ours, limit)
    for miss in misses:
        print(f"   MISS: {miss}", flush=True)
    return {
        "scenario": load.name,
        "title": load.title,
        "load": asdict(load),
        "limit": asdict(limit),
        "ours": asdict(ours),
        "reference": asdict(reference) if reference is not None else None,
        "reference_note": reference_note,
        "misses": misses,
    }


def _one_line(r: RunResult) -> str:
    phase = f"{r.phase_s:.1f}s" if r.phase_s is not None else "n/a"
    ratio = f"{r.ratio:.3f}x" if r.ratio is not None else "n/a"
    retries = f" ({r.retries} retries)" if r.retries is not None else ""
    return (
        f"phase {phase} = {ratio} limit, wall {r.wall_s:.1f}s, {r.server_requests} requests{retries}, "
        f"{r.rate_limited_429} x 429, {r.rows_lost} rows lost, statuses {r.statuses}"
    )


# -- CLI scenarios --------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    found, i = [pid], 0
    while i < len(found):
        for children in glob.glob(f"/proc/{found[i]}/task/*/children"):
            try:
                found.extend(int(c) for c in Path(children).read_text().split())
            except (OSError, ValueError):
                pass
        i += 1
    return found


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeRss:
    """Samples the summed RSS of a process and its descendants every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_total_kb = 0
        self.peak_single_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [_rss_kb(p) for p in _descendants(self.pid)]
            self.peak_total_kb = max(self.peak_total_kb, sum(sizes))
            self.peak_single_kb = max(self.peak_single_kb, max(sizes, default=0))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class CliRun:
    """One `enrich run` process: exit code, wall time, memory, its summary JSON."""

    returncode: int
    wall_s: float
    max_rss_mb: float | None
    tree_peak_rss_mb: float
    summary: dict[str, Any] | None
    output_tail: str


def run_cli(arguments: list[str], env: dict[str, str], summary_path: Path, timeout: float = 900) -> CliRun:
    """Run `enrich` and measure it; /usr/bin/time -v reports the peak RSS when present."""
    summary_path.unlink(missing_ok=True)
    use_time = os.access(TIME_BIN, os.X_OK)
    command = [TIME_BIN, "-v", str(ENRICH), *arguments] if use_time else [str(ENRICH), *arguments]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeRss(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    finally:
        sampler.stop()
    wall = time.perf_counter() - started
    max_rss_mb = None
    if use_time:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
        max_rss_mb = int(match.group(1)) / 1024 if match else None
    else:
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        max_rss_mb = after / 1024 if after > before else None
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    tail = " ".join((stdout + "\n" + re.sub(r"(?s)\tCommand being timed.*", "", stderr)).split())[-600:]
    return CliRun(proc.returncode, wall, max_rss_mb, sampler.peak_total_kb / 1024, summary, tail)


def _cli_args(inp: Path, out: Path, base_url: str, summary: Path, *extra: str) -> list[str]:
    return [
        "run", str(inp), "-o", str(out), "--base-url", base_url, "--schema", "template",
        "--prompt", TEMPLATE, "--summary-json", str(summary), *extra,
    ]  # fmt: skip


def _lost_in_output(out: Path, topics: list[str]) -> int:
    if not out.is_file():
        return len(topics)
    answers = pl.read_parquet(out, columns=["explanation"]).get_column("explanation").to_list()
    if len(answers) != len(topics):
        return len(topics)
    return sum(1 for t, a in zip(topics, answers, strict=True) if a != expected_answer(render(t)))


def scenario_rerun(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """6. A second run over the same table: everything is cached, 0 requests."""
    rows = min(2000, args.rows) if args.rows else 2000
    print(f"\n== 6. Rerun with everything cached: {rows} rows through `enrich run`, twice", flush=True)
    base = workdir / "rerun"
    base.mkdir(parents=True, exist_ok=True)
    topics = make_topics(rows, rows, prefix="rerun topic")
    inp, out, summary = base / "in.parquet", base / "out.parquet", base / "summary.json"
    pl.DataFrame({"id": range(rows), "topic": topics}).write_parquet(inp)
    with ServerProcess(latency=0.02) as server:
        arguments = _cli_args(inp, out, server.base_url, summary, "--max-concurrency", "32")
        first = run_cli(arguments, env, summary)
        after_first = server.stats()["requests"]
        print(f"   first run: exit {first.returncode}, {after_first} requests, {first.wall_s:.1f}s", flush=True)
        second = run_cli(arguments, env, summary)
        second_requests = server.stats()["requests"] - after_first
    lost = _lost_in_output(out, topics)
    s = second.summary or {}
    print(
        f"   second run: exit {second.returncode}, {second_requests} requests at the server, "
        f"summary requests={s.get('requests')} rows_cached={s.get('rows_cached')}, wall {second.wall_s:.1f}s "
        f"(flow {s.get('wall_seconds')}s), {lost} rows lost",
        flush=True,
    )
    misses = []
    if first.returncode or second.returncode:
        misses.append(f"exit codes {first.returncode}/{second.returncode}: {second.output_tail or first.output_tail}")
    if second_requests:
        misses.append(f"the rerun sent {second_requests} requests (target 0)")
    if lost:
        misses.append(f"{lost} rows lost (target 0)")
    for miss in misses:
        print(f"   MISS: {miss}", flush=True)
    return {
        "scenario": "rerun",
        "title": "6. Rerun, all cached",
        "rows": rows,
        "first_run": asdict(first),
        "first_run_requests": after_first,
        "second_run": asdict(second),
        "second_run_requests": second_requests,
        "rows_lost": lost,
        "misses": misses,
    }


def scenario_million(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """7. A fully cached table of --million-rows distinct prompts, end to end through `enrich run`."""
    from flows.cache import ResponseCache, default_cache_dir
    from flows.job import make_job
    from flows.llm import Endpoint
    from flows.pipeline import build_spec

    rows = args.million_rows
    print(f"\n== 7. {rows:,} cached rows end to end through `enrich run`", flush=True)
    base = workdir / "million"
    base.mkdir(parents=True, exist_ok=True)
    topics = [f"cached topic {i:07d}" for i in range(rows)]
    inp, out, summary = base / "in.parquet", base / "out.parquet", base / "summary.json"
    frame = pl.DataFrame({"id": range(rows), "topic": topics})
    frame.write_parquet(inp)
    with ServerProcess(latency=0.0) as server:
        # The keys the flow will compute: the same job, the same build_spec, the same endpoint.
        job = make_job(
            {
                "input_path": str(inp),
                "output_path": str(out),
                "base_url": server.base_url,
                "prompt": TEMPLATE,
                "input_schema": "template",
            }
        )
        spec = build_spec(job, Endpoint(base_url=server.base_url, api_key=None, local=False))
        started = time.perf_counter()
        prompts, keys = prompt_keys(frame, spec)
        cache = ResponseCache(job.cache_dir or default_cache_dir(job.destination))
        for key, prompt in zip(keys, prompts, strict=True):
            assert key is not None and prompt is not None
            answer = Outcome(text=expected_answer(prompt), input_tokens=count_tokens(prompt), output_tokens=5)
            cache.append(key, answer, model=spec.identity.model)
        cache.close()
        populate_s = time.perf_counter() - started
        del frame, prompts, keys
        print(f"   cache pre-populated with {rows:,} answers in {populate_s:.1f}s", flush=True)
        run = run_cli(_cli_args(inp, out, server.base_url, summary), env, summary)
        requests = server.stats()["requests"]
    lost = _lost_in_output(out, topics)
    s = run.summary or {}
    rss = run.max_rss_mb
    print(
        f"   exit {run.returncode}, wall {run.wall_s:.1f}s (flow {s.get('wall_seconds')}s), "
        f"peak RSS {rss if rss is None else round(rss)} MB (largest process), "
        f"{run.tree_peak_rss_mb:.0f} MB (process tree, sampled), {requests} requests, "
        f"rows_cached={s.get('rows_cached')}, {lost} rows lost",
        flush=True,
    )
    misses = []
    if run.returncode:
        misses.append(f"exit code {run.returncode}: {run.output_tail}")
    if run.wall_s >= MILLION_WALL_TARGET_S:
        misses.append(f"wall {run.wall_s:.1f}s (target < {MILLION_WALL_TARGET_S:.0f}s)")
    if rss is not None and rss >= MILLION_RSS_TARGET_MB:
        misses.append(f"peak RSS {rss:.0f} MB (target < {MILLION_RSS_TARGET_MB:.0f} MB)")
    if requests:
        misses.append(f"{requests} requests (target 0)")
    if lost:
        misses.append(f"{lost} rows lost (target 0)")
    for miss in misses:
        print(f"   MISS: {miss}", flush=True)
    return {
        "scenario": "million",
        "title": f"7. {rows:,} cached rows",
        "rows": rows,
        "populate_s": populate_s,
        "run": asdict(run),
        "requests": requests,
        "rows_lost": lost,
        "misses": misses,
    }


# -- report ---------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    request = [r for r in results if r["scenario"] in REQUEST_SCENARIOS]
    if request:
        print("\nRequest phase (server-measured: first request received -> last answer sent)")
        header = (
            f"{'scenario':<20}{'rows':>6}{'U':>6}{'limit s':>9}{'bind':>8}{'ours s':>8}{'ratio':>7}{'429s':>6}"
            f"{'req':>7}{'retry':>6}{'extra':>6}{'lost':>6} | {'ref s':>7}{'ratio':>7}{'429s':>7}{'req':>7}{'lost':>6}"
        )
        print(header)
        print("-" * len(header))
        for r in request:
            o, ref, lim = r["ours"], r["reference"] or {}, r["limit"]
            print(
                f"{r['title']:<20}{o['rows']:>6}{lim['unique']:>6}{lim['seconds']:>9.1f}{lim['binding']:>8}"
                f"{_f(o['phase_s'], '.1f'):>8}{_f(o['ratio'], '.3f'):>7}{o['rate_limited_429']:>6}"
                f"{o['server_requests']:>7}{o['retries']:>6}{o['extra_requests']:>6}{o['rows_lost']:>6} | "
                f"{_f(ref.get('phase_s'), '.1f'):>7}{_f(ref.get('ratio'), '.3f'):>7}"
                f"{ref.get('rate_limited_429', '-'):>7}{ref.get('server_requests', '-'):>7}"
                f"{ref.get('rows_lost', '-'):>6}"
            )
        print(
            "ratio = ours s / limit s (target <= 1.05 for RPM, TPM and faults); req = requests the server got; "
            "extra = req - U - retries (target 0); ref = plain LangChain batch(max_concurrency=32), SDK retries 6."
        )
        for r in request:
            if r["reference_note"]:
                print(f"note ({r['title']}): {r['reference_note']}")
    cli = [r for r in results if r["scenario"] not in REQUEST_SCENARIOS]
    if cli:
        print("\nEnd to end through `enrich run` (wall includes Prefect's start-up)")
        for r in cli:
            if r["scenario"] == "rerun":
                run, s = r["second_run"], r["second_run"]["summary"] or {}
                print(
                    f"{r['title']:<24} rows {r['rows']:>9,}  requests {r['second_run_requests']}  "
                    f"wall {run['wall_s']:.1f}s (flow {s.get('wall_seconds')}s)  lost {r['rows_lost']}"
                )
            else:
                run, s = r["run"], r["run"]["summary"] or {}
                print(
                    f"{r['title']:<24} rows {r['rows']:>9,}  requests {r['requests']}  wall {run['wall_s']:.1f}s "
                    f"(flow {s.get('wall_seconds')}s)  peak RSS {_f(run['max_rss_mb'], '.0f')} MB largest process, "
                    f"{run['tree_peak_rss_mb']:.0f} MB process tree  lost {r['rows_lost']}"
                )
    if args.rows:
        print(
            f"\nScaled down with --rows {args.rows}: the issue's sizes are 5,000 / 2,000 rows. Runs shorter than "
            "a minute with fewer requests than the RPM/TPM budget never fill the server's window."
        )
    misses = [(r["title"], m) for r in results for m in r["misses"]]
    print("\nTargets: " + ("all met" if not misses else f"{len(misses)} missed"))
    for title, miss in misses:
        print(f"  MISS {title}: {miss}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable); default: all of " + ", ".join(SCENARIOS),
    )
    parser.add_argument("--rows", type=int, help="cap the rows of scenarios 1-6 (quick runs)")
    parser.add_argument("--million-rows", type=int, default=1_000_000, help="rows of scenario 7")
    parser.add_argument("--tpm", type=int, default=60_000, help="server and scheduler TPM of scenario 2")
    parser.add_argument("--skip-reference", action="store_true", help="do not run the plain LangChain reference")
    parser.add_argument("--reference-rows", type=int, help="run the reference on only the first N rows")
    parser.add_argument("--retry-base-delay", type=float, default=0.1, help="our RetryPolicy.base_delay (s)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory of the CLI runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [s for s in SCENARIOS if s in (args.scenario or SCENARIOS)]
    workdir = Path(tempfile.mkdtemp(prefix="llm-enrich-bench-"))
    # The CLI runs (and the flow imports of scenario 7) use a Prefect home of their own.
    env = {
        **os.environ,
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "PREFECT_API_URL"):
        env.pop(name, None)
    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    started = time.perf_counter()
    loads = build_loads(args)
    results: list[dict[str, Any]] = []
    try:
        for name in chosen:
            if name in loads:
                results.append(run_request_scenario(loads[name], args))
            elif name == "rerun":
                results.append(scenario_rerun(args, workdir, env))
            else:
                results.append(scenario_million(args, workdir, env))
    finally:
        if args.keep_workdir:
            print(f"\nworking directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_tables(results, args)
    print(f"\nbenchmark took {time.perf_counter() - started:.0f}s")
    if args.json:
        document = {"argv": sys.argv, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
