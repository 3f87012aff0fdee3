"""At the provider's real limit (issue 11): every scenario under every way a server enforces it.

Run from the repository root (a script, not a test; about 6 minutes for everything)::

    .venv/bin/python -m benchmarks.limits
    .venv/bin/python -m benchmarks.limits --scenario rpm3000 --enforcement 1s-sliding
    .venv/bin/python -m benchmarks.limits --scale 0.25          # quick: a quarter of the rows

Each scenario runs ``transforms.enrichment.enrich_frame_async`` with our ``Scheduler`` (wired to the
HTTP client's response hook as ``flows/run/runtime.py`` wires it) against the fake OpenAI server in its
own process, told only ``--rpm``/``--tpm`` (nothing at all against the concurrency-capped server).
Enforcements: ``1s-sliding`` (a log of the last second), ``1s-bucket`` (a token bucket holding one
second of budget, refilled continuously) and ``60s-sliding`` (the old fake server); TPM is charged
as prompt + max_tokens at admission, and TPM workloads also run against ``1s-sliding-usage``, which
charges the tokens a reply used (as some providers do). It prints the request phase (server-measured,
first request received to last answer sent) against ``max(U*L/C, U/(RPM/60), T/(TPM/60))``, the
429s and rows lost.

Targets (checked here, never in timed tests): at per-second enforcement a ratio of at most 1.05,
at most 1% 429s and 0 rows lost; against a 60 s window, which admits a minute's budget at once,
at most the per-second time (the headroom the server reports is used).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.clients import Limit, Load, RunResult, run_ours, theoretical_limit
from benchmarks.common import RATE_LIMITED_SHARE_TARGET, RATIO_TARGET, make_topics, unique_prompts
from tests.fakes.openai_server import count_tokens, expected_answer

ENFORCEMENTS: dict[str, dict[str, Any]] = {
    "1s-sliding": {"window_seconds": 1.0, "limit_algorithm": "sliding"},
    "1s-bucket": {"window_seconds": 1.0, "limit_algorithm": "token_bucket"},
    "60s-sliding": {"window_seconds": 60.0, "limit_algorithm": "sliding"},
    # Some providers charge the tokens a reply used, not prompt + max_tokens (TPM workloads only).
    "1s-sliding-usage": {"window_seconds": 1.0, "limit_algorithm": "sliding", "tpm_charge": "usage"},
}


def scenarios(scale: float) -> dict[str, Load]:
    """The issue's five workloads (rows and distinct prompts scaled by ``scale``)."""

    def n(rows: int) -> int:
        return max(10, round(rows * scale))

    return {
        "rpm3000": Load("rpm3000", "2,000 rows (70% distinct), 3,000 RPM", n(2000), n(1400), rpm=3000),
        "rpm3000-faults": Load(
            "rpm3000-faults",
            "the same + 2% 500s + 1% malformed",
            n(2000),
            n(1400),
            rpm=3000,
            rate_500=0.02,
            rate_malformed=0.01,
        ),
        "rpm6000": Load("rpm6000", "5,000 rows (70% distinct), 6,000 RPM", n(5000), n(3500), rpm=6000),
        "tpm600k": Load(
            "tpm600k",
            "5,000 rows, 600,000 TPM, --max-tokens 64, 100 ms",
            n(5000),
            n(3500),
            latency=0.1,
            tpm=600_000,
            max_tokens=64,
        ),
        "cap8": Load(
            "cap8",
            "1,000 rows, server caps 8 in flight, nothing given, 100 ms",
            n(1000),
            n(1000),
            latency=0.1,
            max_in_flight=8,
            tell_limits=False,
        ),
    }


def limit_for(load: Load, topics: list[str]) -> Limit:
    """The formula's limit, with T as this server counts: the reply's tokens when it charges usage."""
    prompts = unique_prompts(topics)
    limit = theoretical_limit(prompts, load)
    if not (load.tpm and load.tpm_charge == "usage"):
        return limit
    tokens = sum(count_tokens(p) + count_tokens(expected_answer(p)) for p in prompts)
    terms = {**limit.terms, "tpm": tokens / (load.tpm / 60)}
    binding = max(terms, key=lambda k: terms[k])
    return Limit(terms[binding], binding, terms, limit.unique, tokens)


def run_one(load: Load, enforcement: str, retry_base_delay: float) -> dict[str, Any]:
    """One scenario under one enforcement; the result with the targets it misses."""
    topics = make_topics(load.rows, load.unique)
    limit = limit_for(load, topics)
    ours: RunResult = run_ours(load, topics, limit, retry_base_delay)
    misses = []
    per_second = load.window_seconds < 60 or not (load.rpm or load.tpm)
    if per_second and (ours.ratio is None or ours.ratio > RATIO_TARGET):
        misses.append(f"ratio {ours.ratio or float('nan'):.3f} > {RATIO_TARGET}")
    if ours.rate_limited_429 > RATE_LIMITED_SHARE_TARGET * max(ours.server_requests, 1):
        misses.append(f"{ours.rate_limited_429} 429s > 1% of {ours.server_requests} requests")
    if ours.rows_lost:
        misses.append(f"{ours.rows_lost} rows lost")
    return {
        "scenario": load.name,
        "title": load.title,
        "enforcement": enforcement,
        "load": asdict(load),
        "limit": asdict(limit),
        "ours": asdict(ours),
        "misses": misses,
    }


def client_capacity(scale: float) -> float:
    """Requests per second this machine's client sustains right now, when no server limit binds."""
    rows = max(200, round(1500 * scale))
    load = Load("capacity", "client capacity", rows, rows, latency=0.05)  # 640/s allowed by C/L
    topics = make_topics(rows, rows, prefix="capacity")
    limit = theoretical_limit(unique_prompts(topics), load)
    ours = run_ours(load, topics, limit, 1.0)
    return rows / ours.phase_s if ours.phase_s else float("nan")


def progress(result: dict[str, Any]) -> str:
    """One line per run, with what the scheduler ended with."""
    o, d = result["ours"], result["ours"]["details"]
    return (
        f"{result['title']} [{result['enforcement']}]: phase {o['phase_s'] or 0:.1f}s vs limit "
        f"{result['limit']['seconds']:.1f}s = {o['ratio'] or 0:.3f}x, {o['rate_limited_429']} x 429 "
        f"{d['scheduler_rejections']}, {o['server_requests']} requests, {o['rows_lost']} lost; pace "
        f"{d['scheduler_pace']:.3f}, concurrency {d['scheduler_final_limit']:.1f}, "
        f"rpm/tpm {d['scheduler_rpm_tpm_in_force']}"
    )


def print_table(results: list[dict[str, Any]], capacity: float) -> None:
    """The README table; the client floor is U at the client capacity measured in the same session."""
    print("\n| scenario | server enforces | U | limit | client floor | ours | ratio | 429s | requests | lost |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        o, lim = r["ours"], r["limit"]
        share = o["rate_limited_429"] / max(o["server_requests"], 1)
        phase = f"{o['phase_s']:.1f} s" if o["phase_s"] is not None else "-"
        ratio = f"{o['ratio']:.3f}" if o["ratio"] is not None else "-"
        print(
            f"| {r['title']} | {r['enforcement']} | {lim['unique']:,} | {lim['seconds']:.1f} s ({lim['binding']}) "
            f"| {lim['unique'] / capacity:.1f} s | {phase} | {ratio} | {o['rate_limited_429']} ({share:.1%}) | "
            f"{o['server_requests']:,} | {o['rows_lost']} |"
        )
    misses = [(r["title"], r["enforcement"], m) for r in results for m in r["misses"]]
    print("\nTargets: " + ("all met" if not misses else f"{len(misses)} missed"))
    for title, enforcement, miss in misses:
        print(f"  MISS {title} [{enforcement}]: {miss}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", help="only this scenario (repeatable)")
    parser.add_argument("--enforcement", action="append", choices=list(ENFORCEMENTS), help="only this enforcement")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the rows (0.25 for a quick run)")
    parser.add_argument("--retry-base-delay", type=float, default=1.0, help="RetryPolicy.base_delay (the CLI default)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    loads = scenarios(args.scale)
    capacity = client_capacity(args.scale)
    print(f"client capacity now: {capacity:.0f} requests/s (no server limit, 50 ms latency, 32 in flight)", flush=True)
    results = []
    for name, base in loads.items():
        if args.scenario and name not in args.scenario:
            continue
        # A concurrency cap does not depend on a rate window: it runs once.
        wanted = [e for e in ENFORCEMENTS if e in (args.enforcement or ENFORCEMENTS)]
        enforcements = ["cap"] if base.max_in_flight else [e for e in wanted if base.tpm or "usage" not in e]
        for enforcement in enforcements:
            load = replace(base, **ENFORCEMENTS.get(enforcement, {}))
            result = run_one(load, enforcement, args.retry_base_delay)
            print(progress(result), flush=True)
            results.append(result)
    after = client_capacity(args.scale)
    print(f"client capacity at the end: {after:.0f} requests/s")
    print_table(results, max(capacity, after))
    print(f"\nbenchmark took {time.perf_counter() - started:.0f}s")
    if args.json:
        document = {"argv": sys.argv, "client_capacity": [capacity, after], "results": results}
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
