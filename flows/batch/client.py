"""The one seam to the OpenAI Files and Batches API: openai errors become ours here."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import openai
from openai import OpenAI
from openai.types import Batch

from llm_enrich.schemas.errors import ConfigError, EndpointRejected, RuntimeFailure

__all__ = ["BatchClient", "BatchServiceError"]

T = TypeVar("T")


class BatchServiceError(RuntimeFailure):
    """The Batch API failed us (a 5xx, a dropped connection) after the SDK's own retries."""


class BatchClient:
    """Upload, create, look at, download and cancel batches; the SDK retries transient failures."""

    def __init__(self, base_url: str | None, api_key: str | None, *, timeout: float, secret: str | None) -> None:
        self._client = OpenAI(base_url=base_url, api_key=api_key or "sk-no-key", timeout=timeout, max_retries=3)
        self._secret = secret

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def upload(self, lines: list[dict[str, Any]]) -> str:
        """Upload JSONL request lines; the file id."""
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        return self._call(lambda: self._client.files.create(file=("batch.jsonl", data), purpose="batch").id)

    def create(self, file_id: str, metadata: dict[str, str]) -> Batch:
        """A batch over an uploaded file."""
        return self._call(
            lambda: self._client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
            )
        )

    def find(self, file_id: str) -> Batch | None:
        """A batch already created over ``file_id`` (a run killed between create and the manifest)."""
        for batch in self._call(lambda: list(self._client.batches.list(limit=100))):
            if batch.input_file_id == file_id:
                return batch
        return None

    def retrieve(self, batch_id: str) -> Batch:
        """The batch's current state."""
        return self._call(lambda: self._client.batches.retrieve(batch_id))

    def records(self, file_id: str | None) -> list[dict[str, Any]]:
        """The JSONL records of an output or error file (none for no file)."""
        if not file_id:
            return []
        text = self._call(lambda: self._client.files.content(file_id).text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def cancel(self, batch_id: str) -> bool:
        """Ask the provider to cancel a batch (finished lines are kept); False when it had already ended."""
        try:
            self._call(lambda: self._client.batches.cancel(batch_id))
        except BatchServiceError as exc:
            if isinstance(exc.__cause__, openai.ConflictError):  # 409: completed, failed or expired already
                return False
            raise
        return True

    def _call(self, step: Callable[[], T]) -> T:
        try:
            return step()
        except openai.APIStatusError as exc:
            message = self._redact(f"HTTP {exc.status_code}: {exc.message}")
            if exc.status_code in (401, 403, 404):
                raise EndpointRejected(
                    f"the Batch API refused the request ({message}); check the API key, the base URL (`base_url`) "
                    "and that the endpoint offers the Files and Batches API (or use `mode` = online)."
                ) from exc
            if exc.status_code in (400, 413, 422):
                raise ConfigError(f"the Batch API rejected the request ({message}).") from exc
            raise BatchServiceError(f"the Batch API failed ({message}); rerun the same command to resume.") from exc
        except openai.APIError as exc:
            raise BatchServiceError(
                f"the Batch API could not be reached ({self._redact(str(exc))}); rerun the same command to resume."
            ) from exc

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text
