"""Pure transforms: polars frames and an injected chat model; no Prefect, no I/O, no env."""

from llm_enrich.transforms.admission import Scheduler, estimate_tokens
from llm_enrich.transforms.calls import CallContext, Failure, RetryPolicy, ask_model
from llm_enrich.transforms.costs import DEFAULT_PRICES, Budget, Price, price_for
from llm_enrich.transforms.enrichment import (
    AnswerMemo,
    EnrichSpec,
    charge_first,
    enrich_frame,
    enrich_frame_async,
    prompt_keys,
)
from llm_enrich.transforms.keys import KEY_VERSION, AnswerIdentity, answer_key, endpoint_family
from llm_enrich.transforms.outcome import CallStats, Outcome
from llm_enrich.transforms.prompts import PromptTemplate, build_messages, parse_template, render_prompts
from llm_enrich.transforms.replies import EmptyReply

__all__ = [
    "DEFAULT_PRICES",
    "KEY_VERSION",
    "AnswerIdentity",
    "AnswerMemo",
    "Budget",
    "CallContext",
    "CallStats",
    "EmptyReply",
    "EnrichSpec",
    "Failure",
    "Outcome",
    "Price",
    "PromptTemplate",
    "RetryPolicy",
    "Scheduler",
    "answer_key",
    "ask_model",
    "build_messages",
    "charge_first",
    "endpoint_family",
    "enrich_frame",
    "enrich_frame_async",
    "estimate_tokens",
    "parse_template",
    "price_for",
    "prompt_keys",
    "render_prompts",
]
