"""The CLI scenarios of the throughput benchmark: a fully cached rerun and 1,000,000 cached rows."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks.common import (
    ENRICH,
    MILLION_RSS_TARGET_MB,
    MILLION_WALL_TARGET_S,
    REPO,
    TEMPLATE,
    TIME_BIN,
    ServerProcess,
    make_topics,
    render,
)
from llm_enrich.transforms.enrichment import prompt_keys
from llm_enrich.transforms.outcome import Outcome
from tests.fakes.openai_server import count_tokens, expected_answer

# --- -----------------------------------------------------------------------------


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
    from llm_enrich.flows.cache.files import ResponseCache, default_cache_dir
    from llm_enrich.flows.job import make_job
    from llm_enrich.flows.llm.endpoint import Endpoint
    from llm_enrich.flows.plan.specs import build_spec

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
