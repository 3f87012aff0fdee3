"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

Answers are derived from the prompt (``expected_answer``), so a test can prove every row got
its own answer. Faults are injected two ways:

* by the prompt: ``FAULT:400``, ``FAULT:401``, ``FAULT:500``, ``FAULT:empty``, ``FAULT:malformed``,
  ``FAULT:drop`` (close the connection), ``FAULT:slow`` (never answers in time),
  ``FAULT:echoauth`` (a 400 whose message echoes the Authorization header), and the
  flaky forms ``FAULT:flaky500:N`` / ``FAULT:flaky429:N`` / ``FAULT:flakyempty:N`` /
  ``FAULT:flakymalformed:N`` / ``FAULT:flakydrop:N`` that fail the first N attempts;
* by rates: ``Behaviour.rate_500`` / ``rate_malformed`` / ``rate_empty`` fail that share of
  attempts, chosen by a hash of (prompt, attempt) so a run is reproducible.

Requests with ``tools`` (function calling) or a ``response_format`` of type ``json_schema`` /
``json_object`` get a structured answer built from the schema (``expected_object``); ``FAULT:badjson``,
``FAULT:wrongtype``, ``FAULT:outofrange`` and ``FAULT:badenum`` (or ``FAULT:flakywrongtype:N``, ...)
break it.

``Behaviour.rpm`` / ``tpm`` make it a rate-limited provider that answers 429 with
``retry-after-ms`` once a one-minute sliding window is full.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Behaviour", "FakeOpenAIServer", "expected_answer", "expected_object"]

_FAULT = re.compile(r"FAULT:(flaky500|flaky429|flakyempty|flakymalformed|flakydrop):(\d+)|FAULT:(\w+)")


def expected_answer(prompt: str, system: str | None = None) -> str:
    """The answer the server gives for a prompt (and system message)."""
    digest = hashlib.sha256(f"{system or ''}\x00{prompt}".encode()).hexdigest()[:16]
    return f"answer-{digest}"


def count_tokens(text: str) -> int:
    """The server's token count: one token per four characters, at least one."""
    return max(1, len(text) // 4)


@dataclass
class Behaviour:
    """Switches a test sets; read on every request."""

    latency: float = 0.0
    rate_500: float = 0.0
    rate_malformed: float = 0.0
    rate_empty: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    slow_seconds: float = 30.0
    require_key: str | None = None


@dataclass
class Stats:
    """What the server saw."""

    requests: int = 0
    completions: int = 0
    statuses: Counter = field(default_factory=Counter)
    prompts: Counter = field(default_factory=Counter)
    bodies: deque = field(default_factory=lambda: deque(maxlen=200))
    auth_headers: set = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0


class FakeOpenAIServer:
    """Serve the fake API in a thread; use as a context manager or start()/stop()."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._attempts: Counter = Counter()
        self._window: deque[tuple[float, int]] = deque()
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The /v1 base URL to give ChatOpenAI."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAIServer:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        """Forget counters and attempts (keeps the behaviour)."""
        with self._lock:
            self.stats = Stats()
            self._attempts.clear()
            self._window.clear()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling -------------------------------------------------------------

    def _rate_limited(self, tokens: int) -> float | None:
        """Seconds to wait if the window is full, else None (and the request is counted)."""
        b = self.behaviour
        if b.rpm is None and b.tpm is None:
            return None
        now = time.monotonic()
        with self._lock:
            while self._window and now - self._window[0][0] >= 60.0:
                self._window.popleft()
            used_requests = len(self._window)
            used_tokens = sum(t for _, t in self._window)
            full = (b.rpm is not None and used_requests + 1 > b.rpm) or (
                b.tpm is not None and used_tokens + tokens > b.tpm
            )
            if full:
                return max(0.001, 60.0 - (now - self._window[0][0])) if self._window else 1.0
            self._window.append((now, tokens))
            return None

    def handle(self, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, str], bytes | None]:
        """Return (status, headers, body); a None body means drop the connection."""
        b = self.behaviour
        messages = body.get("messages", [])
        # The first user message is the row's prompt (later ones are our schema corrections).
        prompt = next((m["content"] for m in messages if m.get("role") == "user"), "")
        system = next((m["content"] for m in messages if m.get("role") == "system"), None)
        if not isinstance(prompt, str):
            prompt = json.dumps(prompt)
        with self._lock:
            self.stats.requests += 1
            self.stats.prompts[prompt] += 1
            self.stats.bodies.append(body)
            self.stats.auth_headers.add(auth)
            self._attempts[prompt] += 1
            attempt = self._attempts[prompt]
        if b.require_key is not None and auth != f"Bearer {b.require_key}":
            # Like some real servers, the message echoes (part of) the key it got.
            return _error(401, f"Incorrect API key provided: {auth}.", "invalid_api_key")
        if b.latency:
            self._stopping.wait(b.latency)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        wait = self._rate_limited(count_tokens(prompt) + int(max_tokens))
        if wait is not None:
            status, headers, payload = _error(429, "Rate limit reached.", "rate_limit_exceeded")
            headers["retry-after-ms"] = str(int(wait * 1000))
            return status, headers, payload

        if "FAULT:echoauth" in prompt:  # a careless server that echoes the credentials back
            return _error(400, f"request with header {auth} is not allowed", "echo")
        fault = self._fault(prompt, attempt)
        if fault is not None:
            return fault
        if body.get("tools") or (body.get("response_format") or {}).get("type") in ("json_schema", "json_object"):
            return self._structured(body, prompt, attempt)
        answer = expected_answer(prompt, system)
        if _roll(prompt, attempt, "empty") < b.rate_empty:
            answer = ""
        usage = {
            "prompt_tokens": count_tokens((system or "") + prompt),
            "completion_tokens": count_tokens(answer),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with self._lock:
            self.stats.completions += 1
        return 200, {}, json.dumps(_completion(body.get("model", "fake"), answer, usage)).encode()

    def _structured(self, body: dict[str, Any], prompt: str, attempt: int) -> tuple[int, dict[str, str], bytes]:
        schema = _schema_of(body)
        obj = expected_object(schema, prompt)
        arguments = json.dumps(obj)
        for how in ("wrongtype", "outofrange", "badenum", "badjson"):
            m = re.search(rf"FAULT:(flaky)?{how}(?::(\d+))?", prompt)
            if m and (not m.group(1) or attempt <= int(m.group(2) or 1)):
                arguments = '{"summary": "unterminated' if how == "badjson" else json.dumps(_break(obj, schema, how))
        usage = {"prompt_tokens": count_tokens(prompt), "completion_tokens": count_tokens(arguments)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        completion = _completion(body.get("model", "fake"), arguments, usage)
        if body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            message = completion["choices"][0]["message"]
            message["content"] = None
            message["tool_calls"] = [
                {"id": "call_fake", "type": "function", "function": {"name": name, "arguments": arguments}}
            ]
            completion["choices"][0]["finish_reason"] = "tool_calls"
        with self._lock:
            self.stats.completions += 1
        return 200, {}, json.dumps(completion).encode()

    def _fault(self, prompt: str, attempt: int) -> tuple[int, dict[str, str], bytes | None] | None:
        b = self.behaviour
        for m in _FAULT.finditer(prompt):
            if m.group(1):
                kind, n = m.group(1), int(m.group(2))
                if attempt <= n:
                    return _flaky(kind, prompt)
            else:
                kind = m.group(3)
                if kind in ("400", "401", "403", "404", "422", "500"):
                    return _error(int(kind), f"injected {kind}", "injected")
                if kind == "empty":
                    return 200, {}, json.dumps(_completion("fake", "", {})).encode()
                if kind == "malformed":
                    return 200, {}, b'{"id": "chatcmpl-broken", "choices": [ {"mess'
                if kind == "drop":
                    return 0, {}, None
                if kind == "slow":
                    self._stopping.wait(b.slow_seconds)
        if _roll(prompt, attempt, "500") < b.rate_500:
            return _error(500, "injected random 500", "server_error")
        if _roll(prompt, attempt, "malformed") < b.rate_malformed:
            return 200, {}, b'{"choices": [{"message": {"content": '
        return None


class _Server(ThreadingHTTPServer):
    # The standard library's backlog of 5 resets bursts of new connections under load.
    request_queue_size = 1024


def expected_object(schema: dict[str, Any], prompt: str) -> dict[str, Any]:
    """The structured answer the server gives: every field derived from the prompt."""
    return {name: _value(spec, f"{prompt}\x00{name}") for name, spec in schema.get("properties", {}).items()}


def _value(spec: dict[str, Any], seed: str) -> Any:
    n = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)
    if "enum" in spec:
        return spec["enum"][n % len(spec["enum"])]
    kind = spec.get("type")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "integer":
        low, high = spec.get("minimum", 0), spec.get("maximum", 1000)
        return low + n % (high - low + 1)
    if kind == "number":
        low, high = spec.get("minimum", 0.0), spec.get("maximum", 1.0)
        return round(low + (n % 1000) / 999 * (high - low), 3)
    if kind == "boolean":
        return n % 2 == 0
    if kind == "array":
        return [_value(spec.get("items", {"type": "string"}), f"{seed}\x00{i}") for i in range(1 + n % 3)]
    if kind == "object":
        return expected_object(spec, seed)
    if "anyOf" in spec:
        return _value(next(s for s in spec["anyOf"] if s.get("type") != "null"), seed)
    return f"text-{n % 100000}"


def _schema_of(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("tools"):
        return body["tools"][0]["function"].get("parameters", {})
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return response_format["json_schema"].get("schema", {})
    return response_format.get("schema", {})


def _break(obj: dict[str, Any], schema: dict[str, Any], how: str) -> dict[str, Any]:
    """Make a structurally valid JSON object that violates the schema in one way."""
    broken = dict(obj)
    for name, spec in schema.get("properties", {}).items():
        if how == "wrongtype" and spec.get("type") == "integer":
            broken[name] = "not a number"
            return broken
        if how == "outofrange" and "maximum" in spec:
            broken[name] = spec["maximum"] + 10
            return broken
        if how == "badenum" and "enum" in spec:
            broken[name] = "no-such-value"
            return broken
    broken["unexpected_field"] = how
    return broken


def _flaky(kind: str, prompt: str) -> tuple[int, dict[str, str], bytes | None]:
    if kind == "flaky500":
        return _error(500, "injected flaky 500", "server_error")
    if kind == "flaky429":
        status, headers, body = _error(429, "Rate limit reached.", "rate_limit_exceeded")
        headers["retry-after-ms"] = "20"
        return status, headers, body
    if kind == "flakyempty":
        return 200, {}, json.dumps(_completion("fake", "", {})).encode()
    if kind == "flakydrop":
        return 0, {}, None
    return 200, {}, b"not json at all"


def _roll(prompt: str, attempt: int, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\x00{attempt}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _error(status: int, message: str, code: str) -> tuple[int, dict[str, str], bytes]:
    payload = {"error": {"message": message, "type": "injected", "param": None, "code": code}}
    return status, {}, json.dumps(payload).encode()


def _completion(model: str, answer: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
        ],
        "usage": usage or {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
    }


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:
            payload = {"object": "list", "data": [{"id": "fake", "object": "model"}]}
            self._send(200, {}, json.dumps(payload).encode())

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            raw = self.rfile.read(length)
            with server._lock:
                server.stats.in_flight += 1
                server.stats.max_in_flight = max(server.stats.max_in_flight, server.stats.in_flight)
            try:
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(*_error(400, "request body is not JSON", "bad_json"))
                    return
                status, headers, payload = server.handle(body, self.headers.get("authorization"))
                with server._lock:
                    server.stats.statuses[status or "drop"] += 1
                if payload is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(status, headers, payload)
            finally:
                with server._lock:
                    server.stats.in_flight -= 1

        def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

    return Handler
