"""Client capacity: requests per second and CPU per request, ours beside plain LangChain and the raw SDK.

Run from the repository root (a script, not a test; under a minute)::

    .venv/bin/python -m benchmarks.capacity
    .venv/bin/python -m benchmarks.capacity --requests 4000 --concurrency 64

Each client sends the same distinct prompts to the fake OpenAI server in its own process, with no
latency and no limits, so what binds is the client (and the server's own CPU, which all three
share alike). CPU is this process's user + system time over the run, per request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx2
import openai
from langchain_openai import ChatOpenAI

from benchmarks.clients import Load, run_ours, theoretical_limit
from benchmarks.common import ServerProcess, make_topics, render, unique_prompts


def measure(name: str, run: Callable[[], tuple[int, float | None]]) -> dict[str, Any]:
    """Rate and CPU time of one client run; ``run`` returns (requests sent, seconds they took or None)."""
    cpu, wall = time.process_time(), time.perf_counter()
    sent, seconds = run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"client": name, "requests": sent, "per_second": sent / (seconds or wall), "cpu_ms": 1000 * cpu / sent}


def ours(prompts: int, concurrency: int) -> tuple[int, float | None]:
    """The product's path: enrich_frame_async, our scheduler and retries, the response hook."""
    load = Load("capacity", "capacity", prompts, prompts, latency=0.0, concurrency=concurrency)
    topics = make_topics(prompts, prompts, prefix="capacity")
    result = run_ours(load, topics, theoretical_limit(unique_prompts(topics), load), 1.0)
    # The request phase the server saw: the wall here also holds starting the server process.
    return result.server_requests, result.phase_s


def plain_abatch(base_url: str, prompts: list[str], concurrency: int) -> tuple[int, float | None]:
    """LangChain's own batching: ChatOpenAI.abatch(max_concurrency=...)."""

    async def go() -> int:
        async with httpx2.AsyncClient(timeout=30) as client:  # the SDK's own HTTP library
            model = ChatOpenAI(
                model="fake", base_url=base_url, api_key="sk-test", max_retries=0, use_responses_api=False,
                http_async_client=client,
            )  # fmt: skip
            replies = await model.abatch(prompts, config={"max_concurrency": concurrency})
            return len(replies)

    return asyncio.run(go()), None


def raw_sdk(base_url: str, prompts: list[str], concurrency: int) -> tuple[int, float | None]:
    """The openai async client with a semaphore: the floor any wrapper adds to."""

    async def go() -> int:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> None:
            async with gate:
                await client.chat.completions.create(model="fake", messages=[{"role": "user", "content": prompt}])

        await asyncio.gather(*(one(p) for p in prompts))
        await client.close()
        return len(prompts)

    return asyncio.run(go()), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="distinct prompts per client")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    prompts = [render(t) for t in make_topics(args.requests, args.requests, prefix="capacity")]
    rows = [measure("ours (enrich_frame_async + Scheduler)", lambda: ours(args.requests, args.concurrency))]
    with ServerProcess(latency=0.0) as server:
        rows.append(
            measure("plain ChatOpenAI.abatch", lambda: plain_abatch(server.base_url, prompts, args.concurrency))
        )
    with ServerProcess(latency=0.0) as server:
        rows.append(measure("raw openai.AsyncOpenAI", lambda: raw_sdk(server.base_url, prompts, args.concurrency)))
    raw_cpu = rows[-1]["cpu_ms"]
    title = f"client ({args.requests:,} requests, {args.concurrency} at once)"
    print(f"\n| {title} | requests/s | CPU ms/request | x raw SDK CPU |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['client']} | {r['per_second']:.0f} | {r['cpu_ms']:.2f} | {r['cpu_ms'] / raw_cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
