"""Pure transforms: polars frames and an injected chat model; no Prefect, no I/O, no env."""

from transforms.calls import CallStats, EmptyReply, Failure, Outcome, RetryPolicy, ask_model
from transforms.enrichment import EnrichSpec, enrich_frame, enrich_frame_async
from transforms.prompts import PromptTemplate, build_messages, parse_template, render_prompts

__all__ = [
    "CallStats",
    "EmptyReply",
    "EnrichSpec",
    "Failure",
    "Outcome",
    "PromptTemplate",
    "RetryPolicy",
    "ask_model",
    "build_messages",
    "enrich_frame",
    "enrich_frame_async",
    "parse_template",
    "render_prompts",
]
