"""The fake Batch API's objects and helpers: files, batches, replies, multipart, input validation, service_tier.

Imports nothing from the server so ``openai_server`` can import it at module level.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import HTTP
from typing import Any

AnyReply = tuple[int, dict[str, str], bytes | None]  # the server's (None: drop the connection)
Reply = tuple[int, dict[str, str], bytes]  # the Files/Batch replies always have a body

SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast")
REQUIRED_KEYS = ("custom_id", "method", "url", "body")
ENQUEUED = ("validating", "in_progress", "finalizing")
STAMPS = {
    "in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
    "failed": "failed_at", "expired": "expired_at", "cancelling": "cancelling_at", "cancelled": "cancelled_at",
}  # fmt: skip
_UNFINISHED = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was cancelled before it could be executed."),
}
_SERVER_ERROR = {"message": "The server had an error while processing your request.", "type": "server_error"}
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')


def error_reply(
    status: int, message: str, code: str | None, kind: str = "invalid_request_error", param: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """An OpenAI error reply: ``{"error": {message, type, param, code}}``."""
    payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status, {}, json.dumps(payload).encode()


def parse_multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, bytes), byte-exact."""
    m = _BOUNDARY.search(content_type or "")
    if not content_type.startswith("multipart/form-data") or m is None:
        raise ValueError("expected a multipart/form-data body")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in raw.split(b"--" + m.group(1).encode())[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part without headers")
        headers = BytesHeaderParser(policy=HTTP).parsebytes(head.lstrip(b"\r\n") + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if name is None:
            raise ValueError("a multipart part without a name")
        content = content.removesuffix(b"\r\n")
        fields[str(name)] = (headers.get_filename(), content)
    return fields


def ok_reply(payload: Any) -> Reply:
    """A 200 JSON reply."""
    return 200, {}, json.dumps(payload).encode()


def missing_param(name: str) -> Reply:
    """The 400 for a missing required parameter."""
    return error_reply(400, f"Missing required parameter: '{name}'.", "missing_required_parameter", param=name)


def page_reply(data: list[dict[str, Any]], query: dict[str, str], most: int) -> Reply:
    """A cursor page: ``limit`` (default 20) items after the ``after`` id."""
    ids = [item["id"] for item in data]
    start = ids.index(query["after"]) + 1 if query.get("after") in ids else 0
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        return error_reply(400, f"Invalid 'limit': {query.get('limit')!r}.", "invalid_value", param="limit")
    if not 1 <= limit <= most:
        message = f"Invalid 'limit': integer must be between 1 and {most}, got {limit}."
        return error_reply(400, message, "integer_out_of_range", param="limit")
    page = data[start : start + limit]
    return ok_reply({
        "object": "list", "data": page, "has_more": start + limit < len(data),
        "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
    })  # fmt: skip


@dataclass
class StoredFile:
    """An uploaded (or generated) file."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict[str, Any]:
        """The File object."""
        return {
            "id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None,
            "expires_at": None,
        }  # fmt: skip


@dataclass
class BatchJob:
    """One batch and its progress."""

    id: str
    input_file_id: str
    endpoint: str
    window: str
    metadata: dict[str, str] | None
    auth: str | None
    lines: list[dict[str, Any]]  # in processing (shuffled) order
    errors: list[dict[str, Any]]
    model: str | None
    tokens: int
    record: dict[str, Any]
    status: str = "validating"
    created: float = field(default_factory=time.monotonic)
    changed: float = field(default_factory=time.monotonic)
    started: float = 0.0
    next: int = 0
    done: list[tuple[bool, dict[str, Any]]] = field(default_factory=list)
    stamps: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(STAMPS.values()))
    output_file_id: str | None = None
    error_file_id: str | None = None

    def describe(self) -> dict[str, Any]:
        """The Batch object."""
        created_at = int(self.record["created_at"])
        counted = self.status not in ("validating", "failed")
        completed = sum(ok for ok, _ in self.done)
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.status == "failed" else None,
            "input_file_id": self.input_file_id, "completion_window": self.window, "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id, "created_at": created_at,
            "expires_at": created_at + math.ceil(self.record["expire_seconds"]), **self.stamps,
            "request_counts": {
                "total": len(self.lines) if counted else 0,
                "completed": completed,
                "failed": len(self.done) - completed,
            },
            "metadata": self.metadata, "usage": self.usage(),
        }  # fmt: skip

    def usage(self) -> dict[str, Any]:
        """The tokens of the lines answered so far (OpenAI's BatchUsage)."""
        spent = [(r["response"]["body"].get("usage") or {}) for ok, r in self.done if ok]
        prompt = sum(u.get("prompt_tokens", 0) for u in spent)
        completion = sum(u.get("completion_tokens", 0) for u in spent)
        cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in spent)
        return {
            "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion,
        }  # fmt: skip


def line_record(custom_id: str, status: int, payload: bytes | None) -> tuple[bool, dict[str, Any]]:
    """(billed, the output or error file record) for one answered line, as OpenAI writes it."""
    try:
        body = json.loads(payload) if status and payload else None
    except ValueError:
        body = None
    if body is None:  # a dropped connection or a malformed body: the provider reports a server error
        status, body = 500, {"error": {**_SERVER_ERROR, "param": None, "code": None}}
    response = {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
    record = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": response}
    return status == 200, {**record, "error": None}


def result_files(batch: BatchJob, status: str) -> tuple[bytes, bytes]:
    """The output and error JSONL of an ending batch; unfinished lines of an expired/cancelled one are errors."""
    outputs = [record for ok, record in batch.done if ok]
    failures = [record for ok, record in batch.done if not ok]
    if status in _UNFINISHED:
        code, message = _UNFINISHED[status]
        for line in batch.lines[len(batch.done) :]:
            failures.append({
                "id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"], "response": None,
                "error": {"code": code, "message": message},
            })  # fmt: skip
    return _jsonl(outputs), _jsonl(failures)


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _line_error(line: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def validate_input(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """Check a batch input file as OpenAI does: (requests, errors with 1-based lines, the one model)."""
    requests: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    for number, text in enumerate(data.decode("utf-8", errors="replace").split("\n"), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            errors.append(_line_error(number, "invalid_json_line", "This line is not parseable as valid JSON."))
            continue
        if not isinstance(line, dict):
            errors.append(_line_error(number, "invalid_request", "The request must be a JSON object."))
            continue
        missing = next((key for key in REQUIRED_KEYS if line.get(key) in (None, "")), None)
        if missing is not None:
            message = f"Missing required parameter: '{missing}'."
            errors.append(_line_error(number, "missing_required_parameter", message, missing))
            continue
        custom_id, body = line["custom_id"], line["body"]
        if not isinstance(custom_id, str):
            errors.append(_line_error(number, "invalid_type", "custom_id must be a string.", "custom_id"))
        elif custom_id in seen:
            message = (
                "The custom_id for this request is a duplicate of another request. "
                "The custom_id parameter must be unique for each request in a batch."
            )
            errors.append(_line_error(number, "duplicate_custom_id", message, "custom_id"))
        elif line["method"] != "POST":
            errors.append(_line_error(number, "invalid_method", "The method must be 'POST'.", "method"))
        elif line["url"] != endpoint:
            message = f"The URL provided for this request does not match the batch endpoint '{endpoint}'."
            errors.append(_line_error(number, "invalid_url", message, "url"))
        elif not isinstance(body, dict) or not isinstance(body.get("model"), str):
            message = "Missing required parameter: 'body.model'."
            errors.append(_line_error(number, "missing_required_parameter", message, "body.model"))
        elif model is not None and body["model"] != model:
            message = (
                f"The provided model '{body['model']}' does not match the model '{model}' of the other requests "
                "in this batch. All requests in a batch must use the same model."
            )
            errors.append(_line_error(number, "mismatched_model", message, "body.model"))
        else:
            model = body["model"]
            requests.append(line)
        if isinstance(custom_id, str):
            seen.add(custom_id)
    if not requests and not errors:
        errors.append({"code": "empty_file", "message": "The batch input file is empty.", "param": None, "line": None})
    return requests, errors, model


def input_tokens(body: dict[str, Any], count_tokens: Callable[[str], int]) -> int:
    """The prompt tokens of a chat completion body (every message's content)."""
    parts = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else message
        parts.append(content if isinstance(content, str) else json.dumps(content))
    return count_tokens("".join(parts))


def service_tier_error(body: dict[str, Any]) -> Reply | None:
    """A 400 for a ``service_tier`` OpenAI does not accept, else None."""
    tier = body.get("service_tier")
    if tier is None or tier in SERVICE_TIERS:
        return None
    supported = ", ".join(f"'{t}'" for t in SERVICE_TIERS[:-1]) + f", and '{SERVICE_TIERS[-1]}'"
    message = f"Invalid value: '{tier}'. Supported values are: {supported}."
    return error_reply(400, message, "invalid_value", param="service_tier")


def echo_service_tier(body: dict[str, Any], reply: AnyReply) -> AnyReply:
    """Put the tier that served a requested ``service_tier`` into a 200 chat completion ("auto" -> "default")."""
    status, headers, payload = reply
    tier = body.get("service_tier")
    if tier is None or status != 200 or not payload:
        return reply
    try:
        completion = json.loads(payload)
    except ValueError:  # a deliberately malformed body stays malformed
        return reply
    if not isinstance(completion, dict) or completion.get("object") != "chat.completion":
        return reply
    completion["service_tier"] = "default" if tier == "auto" else tier
    return status, headers, json.dumps(completion).encode()
