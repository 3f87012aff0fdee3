"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks, as strict as a provider.

Answers are derived from the prompt (``expected_answer``), so a test can prove every row got
its own answer. Faults are injected two ways:

* by the prompt (``FAULT:kind``, first match wins):

  - status errors: ``400``/``401``/``403``/``404``/``422``/``500`` (``injected`` errors);
    ``badkey`` (401 ``invalid_api_key``); ``invalid_prompt`` (400 ``invalid_request_error``, the
    usage-policy refusal, same answer on every attempt); ``quota`` (429 ``insufficient_quota``, no
    retry headers: waiting never clears it); ``unavailable`` (429 ``resource_unavailable``, the flex
    tier out of capacity: retryable, no retry headers); ``echoauth`` (a 400 echoing the credentials);
  - bodies: ``empty``, ``malformed``, ``length`` (200, ``finish_reason`` "length", half the answer),
    ``content_filter`` (200, ``finish_reason`` "content_filter", partial answer); usage is present;
  - connections: ``drop`` (FIN without a reply), ``reset`` (TCP RST: SO_LINGER 0), ``slow``
    (answers after ``slow_seconds``), ``hang`` (reads the request, never answers until the server
    stops), ``trickle`` (status line and headers at once, then the body one byte every
    ``trickle_interval`` seconds);
  - flaky forms failing only the first N attempts of that prompt: ``flaky500:N``, ``flaky429:N``,
    ``flakyempty:N``, ``flakymalformed:N``, ``flakydrop:N``, ``flakyunavailable:N``;

* by ``Behaviour``: ``rate_500`` / ``rate_malformed`` / ``rate_empty`` fail that share of attempts,
  chosen by a hash of (prompt, attempt) so a run is reproducible; ``quota_after`` answers every
  request with the quota 429 once that many completions were served; ``trickle_all`` trickles
  every reply; ``require_key`` answers 401 to any other key.

Requests with ``tools`` (function calling) or a ``response_format`` of type ``json_schema`` /
``json_object`` get a structured answer built from the schema (``expected_object``); ``FAULT:badjson``,
``FAULT:wrongtype``, ``FAULT:outofrange`` and ``FAULT:badenum`` (or ``FAULT:flakywrongtype:N``, ...)
break it.

Limits, checked when a request arrives (before ``latency``):

* ``rpm`` / ``tpm`` enforced over ``window_seconds`` (the window holds ``rpm * window / 60``
  requests; OpenAI may enforce a per-minute limit per second) by ``limit_algorithm``: "sliding" (a
  log of admissions younger than the window) or "token_bucket" (a bucket of one window's budget,
  refilled continuously at the per-minute rate). TPM is charged as prompt + ``max_tokens`` at
  admission (``tpm_charge="reserve"``, as OpenAI does) or as the prompt at admission plus the
  completion when answered (``"usage"``). Over the limit: 429 ``rate_limit_exceeded``, type
  ``requests`` or ``tokens``, "Please try again in 20ms", ``retry-after-ms``; a request bigger
  than the whole token window gets a 429 "Request too large" with no retry header.
* ``max_in_flight``: requests beyond that many in flight get an immediate 429
  ``too_many_concurrent_requests`` with no retry header (vLLM/gateway style cap).
* With rpm/tpm set, EVERY response carries ``x-ratelimit-limit-{requests,tokens}`` (the per-minute
  limits), ``x-ratelimit-remaining-*`` (what the current enforcement window still admits) and
  ``x-ratelimit-reset-*`` (time until the budget is back to full, as ``1s``, ``20ms``, ``6m0s``).

``Stats.kinds`` counts what was answered per kind (``ok``, ``rate_limit_requests``, ``quota``,
``hang``, ...) beside ``Stats.statuses``; ``Stats.admissions`` keeps (time, tokens) of every
request the limits admitted; ``Stats.in_flight`` counts a request from its body being read until
its answer is ready (a hanging or trickling one until it ends), as a model server frees a slot.
Replies go out with TCP_NODELAY: without it Nagle's algorithm held every body back 40 ms.

``service_tier`` is checked ("auto", "default", "flex", "scale", "priority"; else 400) and echoed in a
200 completion ("auto" -> "default"); ``flex_unavailable_rate`` refuses that share of flex requests
(by prompt and attempt) with the 429 ``resource_unavailable``; ``Stats.flex_requests`` counts them.
The Files and Batch APIs (``/v1/files``, ``/v1/batches``, the ``batch_*`` switches and stats) live
in ``batch_api.py``; batch lines go through ``_answer`` without the online limits.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from tests.fakes.batch_support import echo_service_tier, service_tier_error

__all__ = ["Behaviour", "FakeOpenAIServer", "Stats", "expected_answer", "expected_object", "format_duration"]

_FLAKY = "flaky500|flaky429|flakyempty|flakymalformed|flakydrop|flakyunavailable"
_FAULT = re.compile(rf"FAULT:({_FLAKY}):(\d+)|FAULT:(\w+)")
# A private header by which ``handle`` tells the HTTP handler how to deliver a reply; never sent.
_DELIVERY = "x-fake-delivery"

Reply = tuple[int, dict[str, str], bytes | None]


def expected_answer(prompt: str, system: str | None = None) -> str:
    """The answer the server gives for a prompt (and system message)."""
    digest = hashlib.sha256(f"{system or ''}\x00{prompt}".encode()).hexdigest()[:16]
    return f"answer-{digest}"


def count_tokens(text: str) -> int:
    """The server's token count: one token per four characters, at least one."""
    return max(1, len(text) // 4)


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it: ``20ms``, ``1s``, ``1.5s``, ``6m0s``."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


@dataclass
class Behaviour:
    """Switches a test sets; read on every request."""

    latency: float = 0.0
    rate_500: float = 0.0
    rate_malformed: float = 0.0
    rate_empty: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    window_seconds: float = 60.0
    limit_algorithm: Literal["sliding", "token_bucket"] = "sliding"
    tpm_charge: Literal["reserve", "usage"] = "reserve"
    max_in_flight: int | None = None
    quota_after: int | None = None
    slow_seconds: float = 30.0
    trickle_interval: float = 0.5
    trickle_all: bool = False
    require_key: str | None = None
    flex_unavailable_rate: float = 0.0  # share of service_tier="flex" requests refused 429 resource_unavailable
    # The Files and Batch APIs (tests/fakes/batch_api.py).
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_max_requests: int = 50_000
    batch_validating_seconds: float = 0.2
    batch_line_seconds: float = 0.001
    batch_finalizing_seconds: float = 0.2
    batch_expire_seconds: float | None = None
    batch_enqueued_tokens: int | None = None


@dataclass
class Stats:
    """What the server saw."""

    requests: int = 0
    completions: int = 0
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    prompts: Counter = field(default_factory=Counter)
    bodies: deque = field(default_factory=lambda: deque(maxlen=200))
    auth_headers: set = field(default_factory=set)
    admissions: deque = field(default_factory=lambda: deque(maxlen=200_000))
    in_flight: int = 0
    max_in_flight: int = 0
    flex_requests: int = 0
    files_uploaded: int = 0
    batches_created: int = 0
    batch_lines_answered: int = 0  # billed (status 200) batch lines
    batches: list[dict[str, Any]] = field(default_factory=list)  # one record per batch, updated as it runs
    batch_custom_ids: Counter[str] = field(default_factory=Counter)  # over every batch created
    max_enqueued_tokens: int = 0


class _Meter:
    """One budget (requests or tokens) enforced over a window by a sliding log or a token bucket."""

    def __init__(self, per_minute: int, window: float, algorithm: str) -> None:
        self.per_minute = per_minute
        self.window = window
        self.sliding = algorithm == "sliding"
        self.capacity = per_minute * window / 60.0
        self.rate = per_minute / 60.0
        self.log: deque[list[float]] = deque()  # [admitted at, amount]
        self.used = 0.0
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refresh(self, now: float) -> None:
        if self.sliding:
            while self.log and now - self.log[0][0] >= self.window:
                self.used -= self.log.popleft()[1]
            if not self.log:
                self.used = 0.0  # no float drift across a long run
        else:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def remaining(self, now: float) -> float:
        """What the window admits right now."""
        self._refresh(now)
        return max(0.0, self.capacity - self.used if self.sliding else self.level)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` fits (0 if it fits now); only call with amount <= capacity."""
        self._refresh(now)
        if self.sliding:
            excess = self.used + amount - self.capacity
            if excess <= 1e-9:
                return 0.0
            for admitted, taken in self.log:
                excess -= taken
                if excess <= 1e-9:
                    return admitted + self.window - now
            return self.window
        missing = amount - self.level
        return 0.0 if missing <= 1e-9 else missing / self.rate

    def charge(self, amount: float, now: float) -> list[float]:
        """Take ``amount``; returns the log entry so a later ``add`` keeps its admission time."""
        self._refresh(now)
        entry = [now, amount]
        if self.sliding:
            self.log.append(entry)
            self.used += amount
        else:
            self.level -= amount
        return entry

    def add(self, entry: list[float], amount: float, now: float) -> None:
        """Charge more to an admitted request (actual usage known after the answer)."""
        self._refresh(now)
        if self.sliding:
            if entry in self.log:
                entry[1] += amount
                self.used += amount
        else:
            self.level -= amount

    def reset_in(self, now: float) -> float:
        """Seconds until the budget is back to its initial (full) state."""
        self._refresh(now)
        if self.sliding:
            return self.log[-1][0] + self.window - now if self.log else 0.0
        return max(0.0, (self.capacity - self.level) / self.rate)


class FakeOpenAIServer:
    """Serve the fake API in a thread; use as a context manager or start()/stop()."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._attempts: Counter = Counter()
        self._cached_prefixes: set[tuple[Any, str]] = set()
        self._meters: dict[str, _Meter] = {}
        self._meter_config: tuple[Any, ...] | None = None
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        from tests.fakes.batch_api import BatchAPI  # imports this module

        self.batch_api = BatchAPI(self)

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
        """Stop serving and release the port (hanging and trickling replies end here)."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self.batch_api.stop()

    def reset(self) -> None:
        """Forget counters, attempts and the limits' state (keeps the behaviour)."""
        with self._lock:
            self.stats = Stats()
            self._attempts.clear()
            self._meters.clear()
            self._meter_config = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- limits (call with self._lock held) ---------------------------------------------------

    def _limit_meters(self) -> dict[str, _Meter]:
        b = self.behaviour
        config = (b.rpm, b.tpm, b.window_seconds, b.limit_algorithm)
        if config != self._meter_config:  # a test changed the behaviour: start the limits afresh
            self._meter_config = config
            self._meters = {}
            if b.rpm:
                self._meters["requests"] = _Meter(b.rpm, b.window_seconds, b.limit_algorithm)
            if b.tpm:
                self._meters["tokens"] = _Meter(b.tpm, b.window_seconds, b.limit_algorithm)
        return self._meters

    def _admit(self, prompt_tokens: int, max_tokens: int) -> tuple[Reply | None, list[float] | None]:
        """Check and charge the limits: (a 429 or None, the token entry to charge usage to)."""
        with self._lock:
            meters = self._limit_meters()
            if not meters:
                self.stats.admissions.append((time.monotonic(), prompt_tokens + max_tokens))
                return None, None
            now = time.monotonic()
            reserve = self.behaviour.tpm_charge == "reserve"
            amounts = {"requests": 1.0, "tokens": float(prompt_tokens + (max_tokens if reserve else 0))}
            tokens = meters.get("tokens")
            if tokens is not None and amounts["tokens"] > tokens.capacity:
                return self._too_large(tokens, int(amounts["tokens"])), None
            for kind, meter in meters.items():
                wait = meter.wait(amounts[kind], now)
                if wait > 0:
                    return self._over_limit(kind, meter, int(amounts[kind]), wait, now), None
            entries = {kind: meter.charge(amounts[kind], now) for kind, meter in meters.items()}
            self.stats.admissions.append((now, int(amounts["tokens"])))
            return None, entries.get("tokens")

    def _over_limit(self, kind: str, meter: _Meter, requested: int, wait: float, now: float) -> Reply:
        abbr = "RPM" if kind == "requests" else "TPM"
        used = round(meter.capacity - meter.remaining(now))
        message = (
            f"Rate limit reached for fake in organization org-fake on {kind} per min ({abbr}): "
            f"Limit {meter.per_minute}, Used {used}, Requested {requested}. "
            f"Please try again in {format_duration(wait)}. Visit https://platform.openai.com/account/rate-limits."
        )
        status, headers, payload = _error(429, message, "rate_limit_exceeded", kind)
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        self.stats.kinds[f"rate_limit_{kind}"] += 1
        return status, headers, payload

    def _too_large(self, meter: _Meter, requested: int) -> Reply:
        message = (
            f"Request too large for fake in organization org-fake on tokens per min (TPM): Limit "
            f"{meter.per_minute}, Requested {requested}. The input or output tokens must be reduced in order to run "
            "successfully."
        )
        self.stats.kinds["request_too_large"] += 1
        return _error(429, message, "rate_limit_exceeded", "tokens")

    def _charge_usage(self, entry: list[float] | None, completion_tokens: int) -> None:
        if entry is None or self.behaviour.tpm_charge != "usage":
            return
        with self._lock:
            meter = self._meters.get("tokens")
            if meter is not None:
                meter.add(entry, completion_tokens, time.monotonic())

    def _limit_headers(self) -> dict[str, str]:
        with self._lock:
            meters = self._limit_meters()
            now = time.monotonic()
            headers: dict[str, str] = {}
            for kind, meter in meters.items():
                headers[f"x-ratelimit-limit-{kind}"] = str(meter.per_minute)
                headers[f"x-ratelimit-remaining-{kind}"] = str(math.floor(meter.remaining(now) + 1e-9))
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(meter.reset_in(now))
            return headers

    # -- request handling ---------------------------------------------------------------------

    def handle(self, body: dict[str, Any], auth: str | None) -> Reply:
        """Return (status, headers, body); a None body means drop the connection."""
        status, headers, payload = echo_service_tier(body, self._answer(body, auth))
        if self.behaviour.rpm or self.behaviour.tpm:
            headers = {**self._limit_headers(), **headers}
        return status, headers, payload

    def _answer(self, body: dict[str, Any], auth: str | None, batch: bool = False) -> Reply:
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
            in_flight = self.stats.in_flight
            quota_spent = b.quota_after is not None and self.stats.completions >= b.quota_after
        if (b.require_key is not None and auth != f"Bearer {b.require_key}") or "FAULT:badkey" in prompt:
            # Like some real servers, the message echoes (part of) the key it got.
            return self._count("badkey", _error(401, f"Incorrect API key provided: {auth}.", "invalid_api_key"))
        if quota_spent or "FAULT:quota" in prompt:
            return self._count("quota", _quota())
        if not batch and body.get("service_tier") is not None:  # a batch line's tier is the batch's
            flex = self._flex(body, prompt, attempt)
            if flex is not None:
                return flex
        if not batch and b.max_in_flight is not None and in_flight > b.max_in_flight:
            message = f"Too many concurrent requests: this server handles at most {b.max_in_flight} at once."
            return self._count("concurrency", _error(429, message, "too_many_concurrent_requests", "requests"))
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        rejected, entry = (None, None) if batch else self._admit(count_tokens((system or "") + prompt), max_tokens)
        if rejected is not None:
            return rejected
        if b.latency and not batch:
            self._stopping.wait(b.latency)
        if "FAULT:echoauth" in prompt:  # a careless server that echoes the credentials back
            return self._count("echoauth", _error(400, f"request with header {auth} is not allowed", "echo"))
        fault = self._fault(prompt, system, attempt, max_tokens)
        if fault is not None:
            return fault
        if body.get("tools") or (body.get("response_format") or {}).get("type") in ("json_schema", "json_object"):
            return self._structured(body, prompt, attempt, entry)
        answer = expected_answer(prompt, system)
        if _roll(prompt, attempt, "empty") < b.rate_empty:
            answer = ""
        reply = self._completion(body, system, prompt, answer, "stop", entry)
        if b.trickle_all:
            reply[1][_DELIVERY] = "trickle"
        return self._count("ok" if answer else "empty", reply)

    def _flex(self, body: dict[str, Any], prompt: str, attempt: int) -> Reply | None:
        invalid = service_tier_error(body)
        if invalid is not None:
            return self._count("invalid_service_tier", invalid)
        if body["service_tier"] != "flex":
            return None
        with self._lock:
            self.stats.flex_requests += 1
        if _roll(prompt, attempt, "flex") < self.behaviour.flex_unavailable_rate:
            return self._count("flex_unavailable", _unavailable())
        return None

    def _count(self, kind: str, reply: Reply) -> Reply:
        with self._lock:
            self.stats.kinds[kind] += 1
        return reply

    def _completion(
        self, body: dict[str, Any], system: str | None, prompt: str, answer: str, finish: str,
        entry: list[float] | None, completion_tokens: int | None = None,
    ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        usage = {
            "prompt_tokens": count_tokens((system or "") + prompt),
            "completion_tokens": completion_tokens if completion_tokens is not None else count_tokens(answer),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if (cached := self._prompt_cache(body, (system or "") + prompt, usage["prompt_tokens"])) is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        self._charge_usage(entry, usage["completion_tokens"])
        with self._lock:
            self.stats.completions += 1
        return 200, {}, json.dumps(_completion(body.get("model", "fake"), answer, usage, finish)).encode()

    def _prompt_cache(self, body: dict[str, Any], text: str, tokens: int) -> int | None:
        """OpenAI's automatic prompt caching: prompts of 1,024 tokens and more, routed by key and prefix.

        A request whose first 1,024 tokens (and ``prompt_cache_key``) an earlier request shared reads
        those 1,024 from the cache; the first one only writes them. None below 1,024 tokens.
        """
        if tokens < 1024:
            return None
        route = (body.get("prompt_cache_key"), text[: 1024 * 4])
        with self._lock:
            seen = route in self._cached_prefixes
            self._cached_prefixes.add(route)
        return 1024 if seen else 0

    def _structured(self, body: dict[str, Any], prompt: str, attempt: int, entry: list[float] | None) -> Reply:
        schema = _schema_of(body)
        obj = expected_object(schema, prompt)
        arguments = json.dumps(obj)
        for how in ("wrongtype", "outofrange", "badenum", "badjson"):
            m = re.search(rf"FAULT:(flaky)?{how}(?::(\d+))?", prompt)
            if m and (not m.group(1) or attempt <= int(m.group(2) or 1)):
                arguments = '{"summary": "unterminated' if how == "badjson" else json.dumps(_break(obj, schema, how))
        usage = {"prompt_tokens": count_tokens(prompt), "completion_tokens": count_tokens(arguments)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._charge_usage(entry, usage["completion_tokens"])
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
            self.stats.kinds["structured"] += 1
        headers = {_DELIVERY: "trickle"} if self.behaviour.trickle_all else {}
        return 200, headers, json.dumps(completion).encode()

    def _fault(self, prompt: str, system: str | None, attempt: int, max_tokens: int) -> Reply | None:
        b = self.behaviour
        for m in _FAULT.finditer(prompt):
            if m.group(1):
                kind, n = m.group(1), int(m.group(2))
                if attempt <= n:
                    return self._count(kind, _flaky(kind))
                continue
            kind = m.group(3)
            if kind in ("400", "401", "403", "404", "422", "500"):
                return self._count(kind, _error(int(kind), f"injected {kind}", "injected"))
            if kind == "invalid_prompt":
                message = "Invalid prompt: your prompt was flagged as potentially violating our usage policy."
                return self._count(kind, _error(400, message, "invalid_prompt", "invalid_request_error"))
            if kind == "unavailable":
                return self._count(kind, _unavailable())
            if kind in ("length", "content_filter"):
                full = expected_answer(prompt, system)
                cut = full[: len(full) // 2] if kind == "length" else full[: len(full) // 4]
                tokens = max_tokens if kind == "length" else None
                return self._count(kind, self._completion({}, system, prompt, cut, kind, None, tokens))
            if kind == "empty":
                return self._count(kind, (200, {}, json.dumps(_completion("fake", "", {})).encode()))
            if kind == "malformed":
                return self._count(kind, (200, {}, b'{"id": "chatcmpl-broken", "choices": [ {"mess'))
            if kind == "drop":
                return self._count(kind, (0, {}, None))
            if kind in ("reset", "hang"):
                return self._count(kind, (0, {_DELIVERY: kind}, b""))
            if kind == "trickle":
                answer = expected_answer(prompt, system)
                status, headers, payload = self._completion({}, system, prompt, answer, "stop", None)
                return self._count(kind, (status, {**headers, _DELIVERY: "trickle"}, payload))
            if kind == "slow":
                self._stopping.wait(b.slow_seconds)
        if _roll(prompt, attempt, "500") < b.rate_500:
            return self._count("500", _error(500, "injected random 500", "server_error", "server_error"))
        if _roll(prompt, attempt, "malformed") < b.rate_malformed:
            return self._count("malformed", (200, {}, b'{"choices": [{"message": {"content": '))
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


def _flaky(kind: str) -> Reply:
    if kind == "flaky500":
        return _error(500, "injected flaky 500", "server_error", "server_error")
    if kind == "flaky429":
        status, headers, body = _error(429, "Rate limit reached. Please try again in 20ms.", "rate_limit_exceeded")
        headers["retry-after-ms"] = "20"
        return status, headers, body
    if kind == "flakyunavailable":
        return _unavailable()
    if kind == "flakyempty":
        return 200, {}, json.dumps(_completion("fake", "", {})).encode()
    if kind == "flakydrop":
        return 0, {}, None
    return 200, {}, b"not json at all"


def _quota() -> Reply:
    message = "You exceeded your current quota, please check your plan and billing details."
    return _error(429, message, "insufficient_quota", "insufficient_quota")


def _unavailable() -> Reply:
    message = "Resource unavailable: the flex processing tier has no capacity right now. Please retry later."
    return _error(429, message, "resource_unavailable", "resource_unavailable")


def _roll(prompt: str, attempt: int, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\x00{attempt}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _error(status: int, message: str, code: str, kind: str = "injected") -> tuple[int, dict[str, str], bytes]:
    payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return status, {}, json.dumps(payload).encode()


def _completion(model: str, answer: str, usage: dict[str, int], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
        "usage": usage or {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
    }


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in two writes: with Nagle's algorithm the second waits for the
            # client's delayed ACK, adding 40 ms to every reply, which no real provider does.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:
            reply = server.batch_api.route("GET", self.path, self.headers, b"")
            payload = {"object": "list", "data": [{"id": "fake", "object": "model"}]}
            self._send(*(reply or (200, {}, json.dumps(payload).encode())))

        def do_DELETE(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            reply = server.batch_api.route("DELETE", self.path, self.headers, raw)
            self._send(*(reply or _error(404, f"Invalid URL (DELETE {self.path})", "unknown_url")))

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            raw = self.rfile.read(length)
            reply = server.batch_api.route("POST", self.path, self.headers, raw)
            if reply is not None:  # the Files and Batch APIs
                self._send(*reply)
                return
            with server._lock:
                server.stats.in_flight += 1
                server.stats.max_in_flight = max(server.stats.max_in_flight, server.stats.in_flight)
            busy = True
            try:
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(*_error(400, "request body is not JSON", "bad_json"))
                    return
                status, headers, payload = server.handle(body, self.headers.get("authorization"))
                delivery = headers.pop(_DELIVERY, None)
                with server._lock:
                    server.stats.statuses[status or delivery or "drop"] += 1
                    if delivery not in ("hang", "trickle"):
                        # Like a model server, the slot frees when the answer is ready, before it is sent.
                        server.stats.in_flight -= 1
                        busy = False
                if payload is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif delivery == "hang":
                    server._stopping.wait()
                    self.close_connection = True
                elif delivery == "reset":
                    # SO_LINGER 0 makes close() send a RST instead of a FIN.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                elif delivery == "trickle":
                    self._trickle(status, headers, payload)
                else:
                    self._send(status, headers, payload)
            finally:
                if busy:
                    with server._lock:
                        server.stats.in_flight -= 1

        def _head(self, status: int, headers: dict[str, str], length: int) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(length))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()

        def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
            self._head(status, headers, len(payload))
            self.wfile.write(payload)

        def _trickle(self, status: int, headers: dict[str, str], payload: bytes) -> None:
            self._head(status, headers, len(payload))
            self.wfile.flush()
            for i in range(len(payload)):
                if server._stopping.wait(server.behaviour.trickle_interval):
                    self.close_connection = True
                    return
                try:
                    self.wfile.write(payload[i : i + 1])
                except OSError:  # the client gave up (its deadline): stop writing
                    self.close_connection = True
                    return

    return Handler
