"""A lane's prompts as Batch API request lines (as ChatOpenAI would send them), and result lines back as replies."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from langchain_openai import ChatOpenAI
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import ValidationError

from llm_enrich.flows.batch.manifest import BatchEntry
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.plan.lanes import OutputRun
from llm_enrich.flows.run.runtime import Lane
from llm_enrich.transforms.batch_lines import request_line, split_lines
from llm_enrich.transforms.calls import budget_refusal, reserve_attempt
from llm_enrich.transforms.outcome import Outcome
from llm_enrich.transforms.prompts import build_messages

__all__ = ["LaneBatch", "lane_batch", "line_of", "split_keys", "within_budget"]


@dataclass
class LaneBatch:
    """One lane's way to and from batch lines."""

    number: int
    lane: Lane
    todo: dict[str, str]  # key -> prompt still to ask
    body_of: Callable[[str], dict[str, Any]]
    reply_of: Callable[[dict[str, Any]], Any]


def lane_batch(number: int, run: OutputRun, lane: Lane) -> LaneBatch:
    """How one lane's prompts become request bodies, and result bodies become replies (as ChatOpenAI does)."""
    chat = cast(ChatOpenAI, lane.model)
    spec = lane.spec
    kwargs: dict[str, Any] = {}
    parser: Any = None
    if spec.structured is not None:
        structured: Any = chat.with_structured_output(
            spec.structured.model, method=spec.structured.method, include_raw=True
        )
        kwargs = dict(structured.first.steps__["raw"].kwargs)
        parser = structured.last

    def body_of(prompt: str) -> dict[str, Any]:
        payload = chat._get_request_payload(build_messages(prompt, spec.system), **kwargs)
        for name in ("stream", "ls_structured_output_format"):
            payload.pop(name, None)
        payload.update(payload.pop("extra_body", None) or {})
        if isinstance(payload.get("response_format"), type):
            payload["response_format"] = type_to_response_format_param(payload["response_format"])
        return cast(dict[str, Any], payload)

    def reply_of(body: dict[str, Any]) -> Any:
        generation = chat._create_chat_result(body).generations[0]
        message = generation.message
        # What BaseChatModel.generate adds online: finish_reason and the rest of the generation info.
        message.response_metadata = {**(generation.generation_info or {}), **message.response_metadata}
        if spec.structured is not None and spec.structured.method == "json_schema":
            # Online, the SDK's parse() fills additional_kwargs["parsed"]; a batch line is parsed here.
            try:
                parsed = spec.structured.model.model_validate_json(message.text)
            except ValidationError as exc:
                return {"raw": message, "parsed": None, "parsing_error": exc}
            return {"raw": message, "parsed": parsed, "parsing_error": None}
        return parser.invoke({"raw": message}) if parser is not None else message

    todo = {k: p for k, p in run.tally.todo.items() if k not in lane.memo.done}
    return LaneBatch(number, lane, todo, body_of, reply_of)


def within_budget(w: LaneBatch, keys: list[str]) -> list[str]:
    """The keys whose worst case (prompt + max_tokens at batch prices) fits --max-cost; the rest are not sent."""
    ctx = w.lane.ctx
    prefix = f"{w.lane.spec.system}\n" if w.lane.spec.system else ""
    kept = []
    for key in keys:
        # The same reservation an online attempt makes; held, since a line is paid when its batch runs.
        if reserve_attempt(ctx, prefix + w.todo[key]) is not None:
            kept.append(key)
        else:
            w.lane.memo.done[key] = Outcome(error=budget_refusal(ctx))
    return kept


def split_keys(w: LaneBatch, keys: list[str], job: EnrichJob, *, resubmitted: bool = False) -> list[BatchEntry]:
    """New entries for ``keys``, each file within --batch-max-requests and --batch-max-bytes."""
    sizes = [len(json.dumps(line_of(w, k), ensure_ascii=False).encode()) + 1 for k in keys]
    ranges = split_lines(sizes, max_requests=job.batch_max_requests, max_bytes=job.batch_max_bytes)
    return [BatchEntry(lane=w.number, custom_ids=keys[a:b], resubmitted=resubmitted) for a, b in ranges]


def line_of(w: LaneBatch, key: str) -> dict[str, Any]:
    """The request line for one key: its custom_id and the body ChatOpenAI would send."""
    return request_line(key, w.body_of(w.todo[key]))
