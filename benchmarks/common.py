"""Shared pieces of the benchmarks: constants, topics, and the fake server in its own process."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

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
                "kinds": dict(s.kinds),
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


def unique_prompts(topics: list[str]) -> list[str]:
    return [render(t) for t in dict.fromkeys(topics)]
