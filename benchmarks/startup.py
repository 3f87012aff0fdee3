"""Start-up: what an `enrich run` of the 30-row sample adds to its request phase (issue 11).

Run from the repository root (a script, not a test; about a minute)::

    .venv/bin/python -m benchmarks.startup
    .venv/bin/python -m benchmarks.startup --runs 5

Each run is the real command in its own process against the fake OpenAI server (no latency, no
limits), three ways: with no ``PREFECT_API_URL`` (the CLI starts and stops a temporary Prefect server
of its own), pointed at a Prefect server that is already running (``prefect server start
--background``), and the bare import of the CLI and the flow. The request phase is what the fake
server saw, first request received to last answer sent. Target: at most 5 s over the request phase.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ENRICH, REPO, ServerProcess
from tests.prefect_server import running_prefect_server

TARGET_OVERHEAD_S = 5.0
SAMPLE = REPO / "data" / "topics.csv"


def time_run(api_url: str | None) -> tuple[float, float]:
    """One `enrich run` of the sample against a fresh fake server: (wall seconds, its request phase)."""
    with ServerProcess(latency=0.0) as server:
        return _time_run(server, api_url)


def _time_run(server: ServerProcess, api_url: str | None) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="llm-enrich-startup-"))
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    start = time.perf_counter()
    try:
        subprocess.run(
            [str(ENRICH), "run", str(SAMPLE), "--output", str(out / "out.parquet"), "--base-url", server.base_url,
             "--model", "fake"],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seen = server.stats()
    assert seen["completions"] == 30, "every sample row is one request"
    return wall, seen["last"] - seen["first"]


def time_imports() -> float:
    """Seconds to import the CLI and the flow in a fresh interpreter (the floor of any run)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import llm_enrich.flows.cli.app, llm_enrich.flows.pipeline"], check=True, timeout=60
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per way (the median is reported)")
    args = parser.parse_args(argv)
    imports = statistics.median(time_imports() for _ in range(args.runs))
    rows = []
    home = Path(tempfile.mkdtemp(prefix="llm-enrich-startup-home-"))
    try:
        with running_prefect_server(home) as api_url:
            ways = (("temporary Prefect server (no PREFECT_API_URL)", None), ("running Prefect server", api_url))
            for name, url in ways:
                runs = [time_run(url) for _ in range(args.runs)]
                walls, phases = [w for w, _ in runs], [p for _, p in runs]
                rows.append((name, statistics.median(walls), statistics.median(phases)))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"\nimports of the CLI and the flow: {imports:.1f} s (median of {args.runs})")
    print("| way | wall | request phase | added | target |")
    print("|---|---:|---:|---:|---|")
    missed = 0
    for name, wall, phase in rows:
        added = wall - phase
        ok = added <= TARGET_OVERHEAD_S
        missed += not ok
        print(f"| {name} | {wall:.1f} s | {phase:.2f} s | {added:.1f} s | {'met' if ok else 'MISS'} |")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
