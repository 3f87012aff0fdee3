"""Batch API lines: one request line per answer key, and a result line back into an ``Outcome``.

Pure: dicts in, dicts or Outcomes out; the chat model (and a structured parser) are passed in,
so a batch line's answer is judged by the same rules as an online reply (``replies.judge_reply``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_enrich.transforms.calls import CallContext
from llm_enrich.transforms.outcome import Outcome
from llm_enrich.transforms.replies import judge_reply

__all__ = ["CHAT_URL", "cached_of", "line_outcome", "request_line", "split_lines"]

CHAT_URL = "/v1/chat/completions"

ReplyOf = Callable[[dict[str, Any]], Any]
"""A completion body -> what the model runnable returns online (an AIMessage or the structured dict)."""


def request_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """One JSONL request line of a chat completion batch."""
    return {"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body}


def split_lines(sizes: list[int], *, max_requests: int, max_bytes: int) -> list[tuple[int, int]]:
    """Ranges [start, end) of lines (each ``sizes[i]`` bytes) per file, within both limits (one line at least)."""
    ranges: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_requests or used + size > max_bytes):
            ranges.append((start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def line_outcome(
    record: dict[str, Any], reply_of: ReplyOf, ctx: CallContext, *, structured: bool, secret: str | None = None
) -> Outcome:
    """A result line (output or error file) as its key's Outcome; errors carry the HTTP status and message."""
    response = record.get("response") or {}
    status, body = response.get("status_code"), response.get("body") or {}
    error = record.get("error")
    if error or status != 200:
        detail = (body.get("error") if isinstance(body, dict) else None) or error or {}
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
        code = detail.get("code") if isinstance(detail, dict) else None
        where = f"HTTP {status}" if status else "batch line"
        text = f"{where}: {message or 'no message'}" + (f" ({code})" if code else "")
        return Outcome(error=text.replace(secret, "***") if secret else text, attempts=1)
    outcome = judge_reply(reply_of(body), ctx, structured=structured)
    outcome.cached_input_tokens = cached_of(body, outcome.input_tokens)
    return outcome


def cached_of(body: dict[str, Any], input_tokens: int) -> int:
    """The input tokens a completion body's usage says came from the prompt cache (0 where it says none)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    details = (usage or {}).get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = (details or {}).get("cached_tokens") if isinstance(details, dict) else None
    if not isinstance(cached, int) or isinstance(cached, bool) or cached < 0:
        return 0
    return min(cached, input_tokens)  # a part of the input: never more
