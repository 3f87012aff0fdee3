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
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.cli_scenarios import scenario_million, scenario_rerun
from benchmarks.clients import Limit, Load, RunResult, run_ours, run_reference, theoretical_limit
from benchmarks.common import (
    RATE_LIMITED_SHARE_TARGET,
    RATIO_TARGET,
    REQUEST_SCENARIOS,
    SCENARIOS,
    make_topics,
    unique_prompts,
)

# -- request scenarios ----------------------------------------------------------------------------


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
