"""One rule for HTTP failures: the OpenAI seam and the generic classifier decide alike (transforms/failures.py)."""

from __future__ import annotations

import httpx2
import openai
import pytest

from llm_enrich.flows.llm.endpoint import classify_openai_error
from llm_enrich.transforms.failures import classify_generic

_REQUEST = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")


class _StatusError(Exception):
    """Any client's error that carries an HTTP status and (maybe) the body's error code."""

    def __init__(self, status: int, code: str | None = None) -> None:
        super().__init__(f"status {status}")
        self.status_code, self.code = status, code


def _openai_error(status: int, code: str | None) -> openai.APIStatusError:
    body = {"error": {"message": f"status {status}", "type": "x", "code": code}}
    response = httpx2.Response(status, json=body, request=_REQUEST)
    return openai.APIStatusError(f"status {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "code", "kind", "rate_limited"),
    [
        (400, None, "row", False),
        (401, None, "fatal", False),
        (403, None, "fatal", False),
        (404, None, "fatal", False),
        (408, None, "retry", False),
        (409, None, "retry", False),
        (422, None, "row", False),
        (429, None, "retry", True),
        (429, "insufficient_quota", "fatal", False),
        (429, "resource_unavailable", "retry", False),
        (500, None, "retry", False),
        (503, None, "retry", False),
    ],
)
def test_both_classifiers_apply_the_same_rule(status: int, code: str | None, kind: str, rate_limited: bool) -> None:
    seam, generic = classify_openai_error(_openai_error(status, code)), classify_generic(_StatusError(status, code))
    assert (seam.kind, seam.rate_limited) == (generic.kind, generic.rate_limited) == (kind, rate_limited)
    assert f"HTTP {status}" in seam.message or "insufficient_quota" in seam.message
