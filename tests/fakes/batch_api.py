"""OpenAI's Files and Batch APIs on the fake server, as strict as the provider.

Files: ``POST /v1/files`` (multipart, ``purpose`` + ``file``; a batch file must be ``.jsonl`` and at most
``batch_max_bytes``), ``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``DELETE /v1/files/{id}``. Batches: ``POST /v1/batches``, ``GET /v1/batches`` (newest first, ``limit`` and
``after``), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

A daemon thread moves batches through validating -> in_progress -> finalizing -> completed in real time
(``batch_validating_seconds``, ``batch_line_seconds`` per line, ``batch_finalizing_seconds``), or to
failed (a bad input line, or over ``batch_enqueued_tokens``), expired (``batch_expire_seconds``) or
cancelling -> cancelled. Each line is answered by the server's own answer logic (FAULT markers,
structured outputs) without the online rate limits, in a shuffled order: clients must map by custom_id.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.batch_support import (
    ENQUEUED,
    STAMPS,
    BatchJob,
    Reply,
    StoredFile,
    error_reply,
    input_tokens,
    line_record,
    missing_param,
    ok_reply,
    page_reply,
    parse_multipart,
    result_files,
    validate_input,
)
from tests.fakes.openai_server import count_tokens

if TYPE_CHECKING:
    from tests.fakes.openai_server import FakeOpenAIServer

FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
ENDPOINTS = ("/v1/chat/completions",)
_TICK = 0.005
_ROUTES = [
    ("POST", r"/v1/files", "_upload"),
    ("GET", r"/v1/files", "_list_files"),
    ("GET", r"/v1/files/([^/]+)", "_file"),
    ("DELETE", r"/v1/files/([^/]+)", "_delete_file"),
    ("GET", r"/v1/files/([^/]+)/content", "_content"),
    ("POST", r"/v1/batches", "_create"),
    ("GET", r"/v1/batches", "_list_batches"),
    ("GET", r"/v1/batches/([^/]+)", "_batch"),
    ("POST", r"/v1/batches/([^/]+)/cancel", "_cancel"),
]


@dataclass
class _Request:
    ids: tuple[str, ...]
    query: dict[str, str]
    headers: Any
    raw: bytes
    auth: str | None


class BatchAPI:
    """The Files and Batch endpoints of one FakeOpenAIServer, with the thread that runs its batches."""

    def __init__(self, server: FakeOpenAIServer) -> None:
        self.server = server
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, BatchJob] = {}
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def route(self, method: str, target: str, headers: Any, raw: bytes) -> Reply | None:
        """Answer a Files/Batches request; None for any other path."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        if not re.match(r"/v1/(files|batches)(/|$)", path):
            return None
        auth = headers.get("authorization")
        key = self.server.behaviour.require_key
        if key is not None and auth != f"Bearer {key}":
            return error_reply(401, f"Incorrect API key provided: {auth}.", "invalid_api_key")
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        for verb, pattern, name in _ROUTES:
            m = re.fullmatch(pattern, path)
            if m and verb == method:
                handler: Callable[[_Request], Reply] = getattr(self, name)
                return handler(_Request(m.groups(), query, headers, raw, auth))
        return error_reply(404, f"Invalid URL ({method} {path})", None)

    def stop(self) -> None:
        """Wait for the batch thread (it ends when the server stops)."""
        if self._worker is not None:
            self._worker.join(timeout=5)

    # -- files --------------------------------------------------------------------------------

    def _store(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        file = StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, data)
        self.files[file.id] = file
        return file

    def _upload(self, req: _Request) -> Reply:
        try:
            fields = parse_multipart(req.headers.get("content-type", ""), req.raw)
        except ValueError as exc:
            return error_reply(400, f"Could not parse multipart form: {exc}.", None)
        if "purpose" not in fields:
            return missing_param("purpose")
        if "file" not in fields:
            return missing_param("file")
        purpose = fields["purpose"][1].decode()
        filename, data = fields["file"]
        if purpose not in FILE_PURPOSES:
            message = f"'{purpose}' is not one of {list(FILE_PURPOSES)} - 'purpose'"
            return error_reply(400, message, "invalid_value", param="purpose")
        if purpose == "batch" and not (filename or "").endswith(".jsonl"):
            return error_reply(400, "Invalid file format for Batch API. Must be .jsonl", None, param="file")
        if purpose == "batch" and len(data) > self.server.behaviour.batch_max_bytes:
            return error_reply(400, "File is too large.", None, param="file")
        with self._lock:
            file = self._store(filename or "upload", purpose, data)
        with self.server._lock:
            self.server.stats.files_uploaded += 1
        return ok_reply(file.describe())

    def _get_file(self, file_id: str) -> StoredFile | Reply:
        file = self.files.get(file_id)
        return file or error_reply(404, f"No such File object: {file_id}", None, param="id")

    def _file(self, req: _Request) -> Reply:
        file = self._get_file(req.ids[0])
        return ok_reply(file.describe()) if isinstance(file, StoredFile) else file

    def _content(self, req: _Request) -> Reply:
        file = self._get_file(req.ids[0])
        return (200, {}, file.data) if isinstance(file, StoredFile) else file

    def _delete_file(self, req: _Request) -> Reply:
        with self._lock:
            file = self.files.pop(req.ids[0], None)
        if file is None:
            return error_reply(404, f"No such File object: {req.ids[0]}", None, param="id")
        return ok_reply({"id": file.id, "object": "file", "deleted": True})

    def _list_files(self, req: _Request) -> Reply:
        files = [f for f in self.files.values() if req.query.get("purpose") in (None, f.purpose)]
        if req.query.get("order", "desc") == "desc":
            files.reverse()
        return page_reply([f.describe() for f in files], req.query, 10_000)

    # -- batches ------------------------------------------------------------------------------

    def _create(self, req: _Request) -> Reply:
        try:
            body = json.loads(req.raw or b"{}")
        except ValueError:
            return error_reply(400, "We could not parse the JSON body of your request.", None)
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body, dict) or not body.get(name):
                return missing_param(name)
        endpoint, window, metadata = body["endpoint"], body["completion_window"], body.get("metadata")
        if endpoint not in ENDPOINTS:
            message = f"Invalid value: '{endpoint}'. This fake supports only {list(ENDPOINTS)}."
            return error_reply(400, message, "invalid_value", param="endpoint")
        if window != "24h":
            message = f"Invalid value: '{window}'. Supported values are: '24h'."
            return error_reply(400, message, "invalid_value", param="completion_window")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16):
            return error_reply(400, "metadata must be an object of at most 16 pairs.", "invalid_value", "metadata")
        file = self.files.get(body["input_file_id"])
        if file is None:
            message = f"Cannot find file {body['input_file_id']}, or organization org-fake does not have access to it."
            return error_reply(400, message, None, param="file_id")
        if file.purpose != "batch":
            message = f"File {file.id} has purpose '{file.purpose}'; a batch needs a file with purpose 'batch'."
            return error_reply(400, message, None, param="input_file_id")
        b = self.server.behaviour
        if len(file.data) > b.batch_max_bytes:
            return error_reply(400, "File is too large.", None, param="input_file_id")
        count = sum(1 for text in file.data.split(b"\n") if text.strip())
        if count > b.batch_max_requests:
            message = f"The input file has {count} requests; a batch may have at most {b.batch_max_requests}."
            return error_reply(400, message, None, param="input_file_id")
        lines, errors, model = validate_input(file.data, endpoint)
        order = list(range(len(lines)))
        random.Random(hashlib.sha256(file.data).digest()).shuffle(order)
        if len(order) > 1 and order == sorted(order):
            order = order[1:] + order[:1]
        tokens = sum(input_tokens(line["body"], count_tokens) for line in lines)
        with self._lock:
            return self._admit(body, file, [lines[i] for i in order], errors, model, tokens, req.auth)

    def _admit(
        self, body: dict[str, Any], file: StoredFile, lines: list[dict[str, Any]], errors: list[dict[str, Any]],
        model: str | None, tokens: int, auth: str | None,
    ) -> Reply:  # fmt: skip
        """Create the batch (lock held); over the enqueued-token limit it will fail after validating."""
        b = self.server.behaviour
        pending = sum(x.tokens for x in self.batches.values() if x.status in ENQUEUED and x.model == model)
        if not errors and b.batch_enqueued_tokens is not None and pending + tokens > b.batch_enqueued_tokens:
            message = (
                f"Enqueued token limit reached for {model} in organization org-fake. Limit: "
                f"{b.batch_enqueued_tokens} enqueued tokens. Please try again once some in_progress batches "
                "have been completed."
            )
            errors = [{"code": "token_limit_exceeded", "message": message, "param": None, "line": None}]
        expire = b.batch_expire_seconds if b.batch_expire_seconds is not None else 86_400.0
        record: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex[:24]}", "model": model, "status": "validating", "tokens": tokens,
            "total": len(lines), "completed": 0, "failed": 0, "created_at": time.time(), "expire_seconds": expire,
            "custom_ids": [line["custom_id"] for line in lines],
        }  # fmt: skip
        batch = BatchJob(
            record["id"], file.id, body["endpoint"], body["completion_window"], body.get("metadata"), auth,
            lines, errors, model, 0 if errors else tokens, record,
        )  # fmt: skip
        self.batches[batch.id] = batch
        with self.server._lock:
            stats = self.server.stats
            stats.batches_created += 1
            stats.batches.append(record)
            stats.batch_custom_ids.update(record["custom_ids"])
            if not errors:
                stats.max_enqueued_tokens = max(stats.max_enqueued_tokens, pending + tokens)
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="fake-batches", daemon=True)
            self._worker.start()
        return ok_reply(batch.describe())

    def _get_batch(self, batch_id: str) -> BatchJob | Reply:
        batch = self.batches.get(batch_id)
        return batch or error_reply(404, f"No batch found with id '{batch_id}'.", None, param="batch_id")

    def _batch(self, req: _Request) -> Reply:
        with self._lock:
            batch = self._get_batch(req.ids[0])
            return ok_reply(batch.describe()) if isinstance(batch, BatchJob) else batch

    def _list_batches(self, req: _Request) -> Reply:
        with self._lock:
            batches = [x.describe() for x in reversed(self.batches.values())]
        return page_reply(batches, req.query, 100)

    def _cancel(self, req: _Request) -> Reply:
        with self._lock:
            batch = self._get_batch(req.ids[0])
            if not isinstance(batch, BatchJob):
                return batch
            if batch.status not in ENQUEUED:
                return error_reply(409, f"Cannot cancel a batch with status '{batch.status}'.", None)
            self._set(batch, "cancelling")
            return ok_reply(batch.describe())

    # -- the batch thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self.server._stopping.wait(_TICK):
            with self._lock:
                active = [x for x in self.batches.values() if x.status in (*ENQUEUED, "cancelling")]
            for batch in active:
                self._step(batch)

    def _set(self, batch: BatchJob, status: str) -> None:
        batch.status = batch.record["status"] = status
        batch.changed = time.monotonic()
        batch.stamps[STAMPS[status]] = int(time.time())
        if status not in ENQUEUED:
            batch.tokens = 0  # no longer enqueued

    def _step(self, batch: BatchJob) -> None:
        b = self.server.behaviour
        now = time.monotonic()
        expired = b.batch_expire_seconds is not None and now - batch.created >= b.batch_expire_seconds
        with self._lock:
            if batch.status == "validating" and now - batch.created >= b.batch_validating_seconds:
                if batch.errors:
                    return self._set(batch, "failed")
                self._set(batch, "in_progress")
                batch.started = now
            if batch.status in ("validating", "in_progress") and expired:
                return self._finish(batch, "expired")
            if batch.status in ("finalizing", "cancelling"):
                if now - batch.changed >= b.batch_finalizing_seconds:
                    self._finish(batch, "completed" if batch.status == "finalizing" else "cancelled")
                return None
            if batch.status != "in_progress":
                return None
            per_line = b.batch_line_seconds
            due = len(batch.lines) if per_line <= 0 else min(len(batch.lines), int((now - batch.started) / per_line))
            todo, batch.next = batch.lines[batch.next : due], max(batch.next, due)
        results = [self._answer(batch, line) for line in todo]
        completed = sum(ok for ok, _ in results)
        with self.server._lock:
            self.server.stats.batch_lines_answered += completed
        with self._lock:
            batch.done.extend(results)
            batch.record["completed"] += completed
            batch.record["failed"] += len(results) - completed
            if batch.status == "in_progress" and len(batch.done) == len(batch.lines):
                self._set(batch, "finalizing")
        return None

    def _answer(self, batch: BatchJob, line: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """One line through the server's online answer logic, without the online limits."""
        status, _, payload = self.server._answer(line["body"], batch.auth, batch=True)
        return line_record(line["custom_id"], status, payload)

    def _finish(self, batch: BatchJob, status: str) -> None:
        """Write the output and error files (lock held) and end the batch."""
        outputs, failures = result_files(batch, status)
        if outputs:
            batch.output_file_id = self._store(f"{batch.id}_output.jsonl", "batch_output", outputs).id
        if failures:
            batch.error_file_id = self._store(f"{batch.id}_error.jsonl", "batch_output", failures).id
        self._set(batch, status)
