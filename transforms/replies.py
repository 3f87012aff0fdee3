"""What one model reply says: its text, why it is not a whole answer, and the tokens it cost.

The rules are the same for an online reply (``calls.ask_model``, which retries) and a Batch API
result line (``batch_lines``, judged once by ``judge_reply``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Protocol

from langchain_core.messages import BaseMessage
from pydantic import BaseModel

from llm_enrich.schemas.errors import EmptyReply, InvalidStructuredReply
from llm_enrich.transforms.outcome import CallStats, Outcome

__all__ = [
    "EmptyReply",
    "InvalidStructuredReply",
    "ReplyRules",
    "cached_tokens",
    "finish_reason",
    "incomplete",
    "judge_reply",
    "plain_text",
    "structured_text",
    "usage",
]


class ReplyRules(Protocol):
    """What judging a reply reads from the run's ``CallContext``: its counters and the max_tokens rules."""

    stats: CallStats
    max_tokens: int
    on_truncated: Literal["keep", "error"]


def judge_reply(reply: Any, ctx: ReplyRules, *, structured: bool = False) -> Outcome:
    """One finished reply (a batch line's) as an Outcome, by the rules ``ask_model`` applies; never retried.

    ``reply`` is what the model runnable returns: an AIMessage, or with ``structured`` the
    ``{"raw", "parsed", "parsing_error"}`` dict of ``with_structured_output(..., include_raw=True)``.
    """
    raw = reply["raw"] if structured else reply
    tokens = usage(raw)
    outcome = Outcome(input_tokens=tokens[0], output_tokens=tokens[1], attempts=1)
    if (verdict := incomplete(reply, ctx, structured=structured)) is not None:
        outcome.error = verdict
        return outcome
    outcome.truncated = finish_reason(raw) == "length"
    if outcome.truncated:
        ctx.stats.bump(truncated=1)
    try:
        outcome.text = structured_text(reply) if structured else plain_text(reply)
    except InvalidStructuredReply as exc:
        outcome.error = f"the reply does not match the output schema: {exc}"
    except EmptyReply:
        outcome.error = "the model returned an empty reply"
    return outcome


def finish_reason(reply: Any) -> str | None:
    """Why the model stopped (``stop``, ``length``, ``content_filter``, ...), where the reply says."""
    metadata = getattr(reply, "response_metadata", None) or {}
    return metadata.get("finish_reason")


def incomplete(reply: Any, ctx: ReplyRules, *, structured: bool) -> str | None:
    """Why a reply is not a whole answer (content filter, refusal, cut off where that is an error), or None."""
    raw = reply.get("raw") if structured else reply
    finish = finish_reason(raw)
    refusal = (getattr(raw, "additional_kwargs", None) or {}).get("refusal")
    if finish == "content_filter" or refusal:
        ctx.stats.bump(filtered=1)
        why = (
            f"the model refused: {' '.join(str(refusal).split())[:300]}"
            if refusal
            else ("the provider's content filter stopped the answer (finish_reason content_filter)")
        )
        return f"{why}; not retried, since the same prompt gets the same verdict"
    if finish == "length" and (structured or ctx.on_truncated == "error"):
        ctx.stats.bump(truncated=1)
        if structured:
            return (
                f"the reply was cut off at max_tokens ({ctx.max_tokens}) before the structured answer was complete, "
                "so it cannot be parsed; raise `max_tokens`"
            )
        return f"the answer was cut off at max_tokens ({ctx.max_tokens}); raise `max_tokens`"
    return None


def plain_text(reply: BaseMessage) -> str:
    """The reply's text; raises ``EmptyReply`` when there is none."""
    text = reply.content if isinstance(reply.content, str) else reply.text()
    if not text or not text.strip():
        raise EmptyReply("empty reply")
    return text


def structured_text(reply: dict[str, Any]) -> str:
    """The validated object as canonical JSON (how it is cached and stored)."""
    parsed, error = reply.get("parsed"), reply.get("parsing_error")
    if error is None and parsed is None:
        broken = getattr(reply.get("raw"), "invalid_tool_calls", None)
        error = f"the arguments are not valid JSON ({broken[0].get('error')})" if broken else "no answer in the reply"
    if error is not None:
        detail = " ".join(str(error).split())
        raise InvalidStructuredReply(re.sub(r"For further information visit \S+", "", detail).strip()[:500])
    data = parsed.model_dump(mode="json") if isinstance(parsed, BaseModel) else parsed
    return json.dumps(data, ensure_ascii=False)


def usage(reply: BaseMessage) -> tuple[int, int]:
    """The (input, output) tokens the reply's usage metadata reports; zeros where it reports none."""
    metadata = getattr(reply, "usage_metadata", None) or {}
    return int(metadata.get("input_tokens", 0)), int(metadata.get("output_tokens", 0))


def cached_tokens(reply: Any) -> int:
    """Input tokens the provider read from its prompt cache (flex replies name them ``flex_cache_read``)."""
    details = (getattr(reply, "usage_metadata", None) or {}).get("input_token_details") or {}
    return sum(int(v or 0) for k, v in details.items() if k.endswith("cache_read"))
