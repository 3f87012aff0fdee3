"""The concurrency-cap row beside clients that are told the cap (issue 11).

Run from the repository root (a script, not a test; about 1 minute per round)::

    .venv/bin/python -m benchmarks.concurrency_cap --rounds 2

A fake server that answers 429 to a ninth request in flight, 100 ms per reply, 1,000 distinct prompts;
the limit is U*L/C = 12.5 s. Three clients: the raw ``openai`` SDK behind a semaphore of 8,
``ChatOpenAI.abatch(max_concurrency=8)``, and ours, told nothing, which learns the cap from the 429s.
The request phase is the server's (first request received to last answer sent).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

import httpx2
import openai
from langchain_openai import ChatOpenAI

from benchmarks.clients import Load, run_ours, theoretical_limit
from benchmarks.common import ServerProcess, make_topics, render, unique_prompts

CAP, LATENCY, PROMPTS = 8, 0.1, 1000


def _phase(stats: dict[str, Any]) -> tuple[float, int]:
    return stats["last"] - stats["first"], stats["statuses"].get("429", 0)


def raw_sdk(prompts: list[str]) -> tuple[float, int]:
    """The openai async client with a semaphore of exactly the cap."""
    with ServerProcess(latency=LATENCY, max_in_flight=CAP) as server:

        async def go() -> None:
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
            gate = asyncio.Semaphore(CAP)

            async def one(prompt: str) -> None:
                async with gate:
                    messages: Any = [{"role": "user", "content": prompt}]
                    await client.chat.completions.create(model="fake", messages=messages, max_tokens=16)

            await asyncio.gather(*(one(p) for p in prompts))
            await client.close()

        asyncio.run(go())
        return _phase(server.stats())


def plain_abatch(prompts: list[str]) -> tuple[float, int]:
    """LangChain's own batching, told the cap."""
    with ServerProcess(latency=LATENCY, max_in_flight=CAP) as server:

        async def go() -> None:
            async with httpx2.AsyncClient(timeout=30) as client:  # the SDK's own HTTP library
                model = ChatOpenAI(
                    model="fake", base_url=server.base_url, api_key="sk-test", max_retries=0,
                    use_responses_api=False, http_async_client=client, max_tokens=16,
                )  # fmt: skip
                await model.abatch(prompts, config={"max_concurrency": CAP})

        asyncio.run(go())
        return _phase(server.stats())


def ours(topics: list[str]) -> tuple[float, int]:
    """The product's path, told nothing: it learns the cap."""
    load = Load("cap", "cap", len(topics), len(topics), latency=LATENCY, max_in_flight=CAP, tell_limits=False)
    result = run_ours(load, topics, theoretical_limit(unique_prompts(topics), load), 1.0)
    return result.phase_s or 0.0, result.rate_limited_429


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    topics = make_topics(PROMPTS, PROMPTS, prefix="cap")
    prompts = [render(t) for t in topics]
    limit = PROMPTS * LATENCY / CAP
    clients: dict[str, Callable[[], tuple[float, int]]] = {
        "raw openai SDK, semaphore of 8": lambda: raw_sdk(prompts),
        "ChatOpenAI.abatch, max_concurrency=8": lambda: plain_abatch(prompts),
        "ours, told nothing": lambda: ours(topics),
    }
    print(f"| client (limit {limit:.1f} s) | round | request phase | ratio | 429s |\n|---|---:|---:|---:|---:|")
    for number in range(1, args.rounds + 1):
        for name, run in clients.items():
            phase, rejected = run()
            print(f"| {name} | {number} | {phase:.2f} s | {phase / limit:.3f} | {rejected} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
