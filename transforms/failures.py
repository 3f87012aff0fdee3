"""How one failed attempt is handled: retried, failed for its row, or fatal for the job.

``classify_status`` is the one rule for HTTP errors (status, and the error code in the body where
the client read one); ``classify_generic`` applies it to any exception that carries a status, and
the OpenAI seam (flows/llm/endpoint.py) to the SDK's errors after reading their body and headers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from llm_enrich.transforms.replies import EmptyReply

__all__ = ["CAPACITY_CODES", "AttemptDeadline", "Classifier", "Failure", "classify_generic", "classify_status"]


class AttemptDeadline(Exception):
    """One attempt (connect, headers and the whole body) took longer than the policy allows."""


@dataclass(frozen=True)
class Failure:
    """How one failed attempt is handled: retried, failed for its row, or fatal for the job."""

    kind: Literal["retry", "row", "fatal"]
    message: str
    retry_after: float | None = None
    rate_limited: bool = False
    unreachable: bool = False
    timed_out: bool = False
    explained: bool = False  # a fatal message that already says what happened and what to do


Classifier = Callable[[BaseException], Failure]


# 429 codes about the provider's capacity (e.g. the flex tier), not about our rate.
CAPACITY_CODES = ("resource_unavailable", "capacity_exceeded", "overloaded")


def classify_status(status: int, detail: str, *, code: str | None = None, retry_after: float | None = None) -> Failure:
    """The one rule for an HTTP error: its status, and the error code in its body where one was read."""
    if status in (401, 403, 404):
        return Failure("fatal", f"HTTP {status}: {detail}")
    if status == 429 and code == "insufficient_quota":
        # A billing or quota problem: unlike a rate limit it never clears by waiting.
        return Failure(
            "fatal",
            f"the provider says the quota or billing of this API key is exhausted (HTTP 429 insufficient_quota: "
            f"{detail}). Waiting will not help: add credit or raise the limit in the provider's billing settings, "
            "then rerun the same command. The answers received so far are kept in the cache and will not be paid "
            "for again.",
            explained=True,
        )
    if status == 429 and code in CAPACITY_CODES:
        # Capacity is not our rate: back off this request, do not pause the run.
        return Failure("retry", f"HTTP 429 {code}: {detail}", retry_after)
    if status == 429:
        return Failure("retry", f"HTTP 429 rate limited: {detail}", retry_after, rate_limited=True)
    if 400 <= status < 500 and status not in (408, 409):
        return Failure("row", f"HTTP {status}: {detail}")
    return Failure("retry", f"HTTP {status}: {detail}", retry_after)


def classify_generic(exc: BaseException) -> Failure:
    """Classify by HTTP status where the exception carries one (``classify_status``); anything else is retried."""
    if isinstance(exc, EmptyReply):
        return Failure("retry", "the model returned an empty reply")
    if isinstance(exc, AttemptDeadline):
        return Failure("retry", str(exc), timed_out=True)
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return classify_status(status, str(exc), code=getattr(exc, "code", None))
    return Failure("retry", f"{type(exc).__name__}: {exc}")
