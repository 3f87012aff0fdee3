"""Memory benchmark: peak RSS of `enrich run` as the table grows, and Dask against one process.

Run from the repository root (a script, not a pytest test)::

    .venv/bin/python benchmarks/memory.py                                   # 1M, 5M, 20M rows
    .venv/bin/python benchmarks/memory.py --sizes 20000,50000 --distinct 500 --dask 2   # quick
    .venv/bin/python benchmarks/memory.py --json /tmp/memory.json --keep-workdir

For each size it writes (lazily, with polars' streaming ``sink_parquet``) an input Parquet file of
``id`` (0..n-1) and ``topic`` cycling over ``--distinct`` values, then runs the real ``enrich run``
command against ``tests.fakes.openai_server.FakeOpenAIServer`` (its own process, 127.0.0.1, no
latency) with a fresh cache, output and Prefect home, so every size sends exactly ``--distinct``
requests and the rest is run-wide dedup. It measures:

* tree peak RSS: the largest sum of RSS over the CLI process and all its descendants (the
  temporary Prefect server, Dask workers, ...), sampled from /proc every 0.2 s;
* enrich process peak: the CLI process's own high-water mark (VmHWM), exact;
* wall time, requests the fake server received, and rows ok: a lazy scan of the output counting
  rows whose answer is the one the server gives for the topic and whose ``enrich_error`` is null.

With ``--dask N`` (0 disables) the 1M size (or the smallest) runs twice more, with
``--dask-local N`` and without, to compare throughput (target: Dask within 15%).
Targets: peak RSS flat within 20% across sizes, and under 2 GB. Nothing is written inside the
repository; the temporary directory is removed at the end unless ``--keep-workdir``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ENRICH, REPO, TEMPLATE, ServerProcess, render
from llm_enrich.schemas.enriched import ERROR_COLUMN
from tests.fakes.openai_server import expected_answer

API_KEY = "sk-bench"
ANSWER_COLUMN = "explanation"
FLAT_TARGET = 0.20
PEAK_TARGET_MB = 2048.0
DASK_TARGET = 0.85


@dataclass
class Run:
    """One `enrich run`: what it cost and whether its output is right."""

    label: str
    size: int
    dask: int
    returncode: int | None = None
    wall_s: float = 0.0
    tree_peak_mb: float = 0.0
    enrich_peak_mb: float = 0.0
    max_processes: int = 0
    requests: int = 0
    rows_out: int = 0
    rows_ok: int = 0
    leftover_processes: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.size / self.wall_s if self.wall_s else 0.0


class TreeSampler:
    """Every 0.2 s: summed RSS of a process and its descendants, and the process's own VmHWM."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {pid: self.root}
        self.tree_peak = self.root_peak = self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            self.seen.setdefault(p.pid, p)
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.tree_peak = max(self.tree_peak, total)
        self.max_processes = max(self.max_processes, len(procs))
        with contextlib.suppress(OSError, ValueError, StopIteration):  # VmHWM: the process's own exact peak
            hwm = next(x for x in Path(f"/proc/{self.root.pid}/status").read_text().splitlines() if x[:6] == "VmHWM:")
            self.root_peak = max(self.root_peak, int(hwm.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def alive(self) -> list[psutil.Process]:
        """Processes of this tree that still run (psutil checks the pid was not reused)."""
        return [p for p in self.seen.values() if _running(p)]


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:100]}"
    except psutil.Error:
        return str(p.pid)


def stop_tree(proc: subprocess.Popen[bytes], sampler: TreeSampler) -> None:
    """Stop the CLI's process group and any process seen in its tree: TERM, then KILL."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGTERM)
    for action in ("terminate", "kill"):
        for p in sampler.alive():
            with contextlib.suppress(psutil.Error):
                getattr(p, action)()
        if psutil.wait_procs(sampler.alive(), timeout=10)[1] == []:
            break
    proc.wait(timeout=10)


def make_input(workdir: Path, size: int, distinct: int) -> Path:
    """The input Parquet file of `size` rows, generated once per run with polars' streaming engine."""
    path = workdir / "inputs" / f"in-{size}-{distinct}.parquet"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        frame = pl.LazyFrame().select(pl.int_range(0, size, dtype=pl.Int64).alias("id"))
        frame = frame.with_columns(topic=pl.format("topic number {}", pl.col("id") % distinct))
        frame.sink_parquet(path)
        print(f"   generated {path.name} in {time.perf_counter() - started:.1f}s", flush=True)
    return path


def check_output(out: Path, distinct: int) -> tuple[int, int]:
    """(rows, rows with the server's answer for their topic and no error), by a lazy scan."""
    topics = [f"topic number {i}" for i in range(distinct)]
    expected = pl.LazyFrame({"topic": topics, "_expected": [expected_answer(render(t)) for t in topics]})
    ok = (pl.col(ANSWER_COLUMN) == pl.col("_expected")) & pl.col(ERROR_COLUMN).is_null()
    scan = pl.scan_parquet(out).select("topic", ANSWER_COLUMN, ERROR_COLUMN).join(expected, on="topic", how="left")
    rows = pl.scan_parquet(out).select(pl.len()).collect().item()
    good = scan.select(ok.fill_null(False).sum()).collect(engine="streaming").item()
    return int(rows), int(good)


def run_cli(args: argparse.Namespace, server: ServerProcess, workdir: Path, size: int, dask: int, label: str) -> Run:
    """Run `enrich run` over a size with a fresh cache/output/Prefect home and measure it."""
    run = Run(label=label, size=size, dask=dask)
    inp = make_input(workdir, size, args.distinct)
    base = workdir / "runs" / label
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    out, summary = base / "out.parquet", base / "summary.json"
    command = [
        str(ENRICH), "run", str(inp), "-o", str(out), "--prompt", TEMPLATE, "--output-column", ANSWER_COLUMN,
        "--base-url", server.base_url, "--model", "fake-model", "--api-key-env", "OPENAI_API_KEY",
        "--cache-dir", str(base / "cache"), "--summary-json", str(summary),
    ]  # fmt: skip
    if args.partition_rows:
        command += ["--partition-rows", str(args.partition_rows)]
    if dask:
        command += ["--dask-local", str(dask)]
    command += shlex.split(args.cli_args)
    # As benchmarks/throughput.py: a Prefect home of its own (temporary local server, no network).
    env = {**os.environ, "PREFECT_HOME": str(base / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "PREFECT_API_URL"):
        env.pop(name, None)
    env |= {"OPENAI_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
    before = server.stats()["requests"]
    print(f"-- {label}: {size:,} rows{f', --dask-local {dask}' if dask else ''}", flush=True)
    with open(base / "cli.log", "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = TreeSampler(proc.pid)
        try:
            run.returncode = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            run.problems.append(f"timed out after {args.timeout:.0f}s")
        finally:
            run.wall_s = time.perf_counter() - started
            sampler.stop()
            run.leftover_processes = [_describe(p) for p in sampler.alive() if p.pid != proc.pid]
            stop_tree(proc, sampler)
    run.tree_peak_mb, run.enrich_peak_mb = sampler.tree_peak / 2**20, sampler.root_peak / 2**20
    run.max_processes = sampler.max_processes
    run.requests = server.stats()["requests"] - before
    run.summary = json.loads(summary.read_text()) if summary.is_file() else None
    if run.returncode:
        tail = (base / "cli.log").read_text(errors="replace").strip().splitlines()[-15:]
        run.problems.append(f"exit code {run.returncode}: " + " | ".join(tail))
    if out.exists():
        run.rows_out, run.rows_ok = check_output(out, args.distinct)
    if run.rows_out != size or run.rows_ok != size:
        run.problems.append(f"rows out {run.rows_out:,}, rows ok {run.rows_ok:,} (want {size:,})")
    if run.requests != min(size, args.distinct):
        run.problems.append(f"{run.requests} requests (want {min(size, args.distinct)})")
    if run.leftover_processes:
        run.problems.append(f"processes of the tree outlived the CLI (stopped): {run.leftover_processes}")
    print(
        f"   exit {run.returncode}, {run.wall_s:.1f}s, tree peak {run.tree_peak_mb:.0f} MB, "
        f"enrich peak {run.enrich_peak_mb:.0f} MB, {run.max_processes} processes, {run.requests} requests",
        flush=True,
    )
    for problem in run.problems:
        print(f"   PROBLEM: {problem}", flush=True)
    return run


def report(runs: list[Run], dask_runs: list[Run], dask: int) -> dict[str, Any]:
    """Print the markdown table and verdicts; return the verdicts."""
    print("\n| size | wall s | flow s | rows/s | tree peak RSS MB | enrich process peak MB | requests | rows ok |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs + dask_runs:
        size = f"{r.size:,}" + (f" (dask {r.dask})" if r.dask else " (single)" if r in dask_runs else "")
        flow = (r.summary or {}).get("wall_seconds", "-")
        cells = [size, f"{r.wall_s:.1f}", flow, f"{r.rows_per_s:,.0f}", f"{r.tree_peak_mb:.0f}"]
        cells += [f"{r.enrich_peak_mb:.0f}", r.requests, f"{r.rows_ok:,}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    verdicts: dict[str, Any] = {}
    peaks = [r.tree_peak_mb for r in runs]
    if peaks:
        low, high = min(peaks), max(peaks)
        verdicts["flat"] = high <= low * (1 + FLAT_TARGET)
        verdicts["under_2gb"] = high < PEAK_TARGET_MB
        print(f"\npeak RSS flat within 20% across sizes: {'yes' if verdicts['flat'] else 'no'} "
              f"(min {low:.0f} MB, max {high:.0f} MB)")  # fmt: skip
        print(f"peak under 2 GB: {'yes' if verdicts['under_2gb'] else 'no'} (max {high:.0f} MB)")
    if len(dask_runs) == 2 and dask_runs[1].rows_per_s:
        with_dask, single = dask_runs
        ratio = with_dask.rows_per_s / single.rows_per_s
        verdicts["dask_ratio"] = ratio
        verdicts["dask_within_15pct"] = ratio >= DASK_TARGET
        print(
            f"dask {dask} workers vs single: {ratio:.2f} ({with_dask.rows_per_s:,.0f} vs "
            f"{single.rows_per_s:,.0f} rows/s; within 15%: {'yes' if ratio >= DASK_TARGET else 'no'})"
        )
    return verdicts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,5000000,20000000", help="comma-separated row counts")
    parser.add_argument("--distinct", type=int, default=20_000, help="distinct topics (= requests per size)")
    parser.add_argument("--partition-rows", type=int, help="pass --partition-rows N to `enrich run`")
    parser.add_argument("--dask", type=int, default=2, help="Dask workers of the comparison run (0: skip it)")
    parser.add_argument("--cli-args", default="", help="extra options for `enrich run`, one shell-quoted string")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per CLI run")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.size_list = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    if not args.size_list or args.distinct < 1:
        parser.error("need at least one size and --distinct >= 1")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a plain kill cleans up like Ctrl-C
    workdir = Path(tempfile.mkdtemp(prefix="llm-enrich-memory-"))
    runs: list[Run] = []
    dask_runs: list[Run] = []
    started = time.perf_counter()
    try:
        with ServerProcess(latency=0.0, require_key=API_KEY) as server:
            print(f"fake server at {server.base_url}; work dir {workdir}", flush=True)
            for size in args.size_list:
                runs.append(run_cli(args, server, workdir, size, 0, f"size-{size}"))
            if args.dask:
                size = 1_000_000 if 1_000_000 in args.size_list else min(args.size_list)
                dask_runs.append(run_cli(args, server, workdir, size, args.dask, f"dask{args.dask}-{size}"))
                dask_runs.append(run_cli(args, server, workdir, size, 0, f"single-{size}"))
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", flush=True)
        return 130
    finally:
        if args.keep_workdir:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    verdicts = report(runs, dask_runs, args.dask)
    print(f"\nbenchmark took {time.perf_counter() - started:.0f}s")
    failed = [r for r in runs + dask_runs if r.problems]
    if args.json:
        document = {
            "argv": sys.argv,
            "args": {k: str(v) for k, v in vars(args).items()},
            "runs": [asdict(r) | {"rows_per_s": r.rows_per_s} for r in runs],
            "dask_runs": [asdict(r) | {"rows_per_s": r.rows_per_s} for r in dask_runs],
            "verdicts": verdicts,
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
