"""The LLM endpoint: read credentials once, build ChatOpenAI, translate openai errors."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Self

import httpx2
import openai
from langchain_openai import ChatOpenAI
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm_enrich.flows.job import DEFAULT_KEY_ENV, EndpointFields
from llm_enrich.flows.tables.paths import strip_credentials
from llm_enrich.schemas.errors import ConfigError, UserError
from llm_enrich.transforms.failures import CAPACITY_CODES, AttemptDeadline, Failure, classify_status
from llm_enrich.transforms.replies import EmptyReply

__all__ = [
    "DEFAULT_REMOTE_MODEL",
    "MAX_SERVER_WAIT",
    "Endpoint",
    "ModelSettings",
    "build_chat_model",
    "classify_openai_error",
    "describe_endpoint",
    "describe_url",
    "redacting",
    "resolve_endpoint",
]

DEFAULT_REMOTE_MODEL = "gpt-4o-mini"
MAX_SERVER_WAIT = 120.0
"""Longest single wait a server's retry-after / x-ratelimit-reset-* can impose (seconds)."""
# Local servers accept any key, but the OpenAI client insists on one.
_PLACEHOLDER_KEY = "sk-local-no-key"


class _EnvSettings(BaseSettings):
    """The environment variables we read (once, here)."""

    model_config = SettingsConfigDict(extra="ignore")
    openai_base_url: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and with which key; ``local`` means the bundled model must be started."""

    base_url: str | None
    api_key: SecretStr | None
    local: bool

    @property
    def secret(self) -> str | None:
        """The key's value, for the places that must redact it or send it."""
        return self.api_key.get_secret_value() if self.api_key is not None else None


def resolve_endpoint(job: EndpointFields) -> Endpoint:
    """Job base URL, else OPENAI_BASE_URL; key from a Secret block or the named variable; else local."""
    base_url = job.base_url or _EnvSettings().openai_base_url or None
    raw_key = _secret_block_value(job.api_key_secret) if job.api_key_secret else os.environ.get(job.api_key_env)
    if not raw_key and not job.api_key_secret and job.api_key_env != DEFAULT_KEY_ENV:
        # Another variable named and unset is a mistake; only the default may be absent (a keyless server).
        # (Not model_fields_set: a job rebuilt from a dump, as deployments and enrich_frame do, sets every field.)
        raise ConfigError(
            f"`api_key_env` names the environment variable {job.api_key_env}, which is not set (or empty) here; "
            "export it, or name the variable that holds the key. Nothing was sent."
        )
    key = SecretStr(raw_key) if raw_key else None
    return Endpoint(base_url=base_url, api_key=key, local=base_url is None and key is None)


@dataclass(frozen=True)
class ModelSettings:
    """What building the chat model reads: the model, where it is, its key, and how replies are asked for."""

    model: str
    base_url: str | None
    api_key: SecretStr | None = field(default=None, repr=False)
    timeout: float = 60.0  # the whole reply (httpx and the SDK); transforms.calls bounds each attempt too
    max_tokens: int = 512
    temperature: float = 0.0
    max_concurrency: int = 8
    service_tier: str | None = None
    prompt_cache_key: str | None = None

    @classmethod
    def of(
        cls, job: EndpointFields, endpoint: Endpoint, *, base_url: str | None, model: str, max_concurrency: int
    ) -> Self:
        """The settings of one output of ``job`` (its model), sent to ``base_url``."""
        return cls(
            model=model, base_url=base_url, api_key=endpoint.api_key, timeout=job.reply_timeout,
            max_tokens=job.max_tokens, temperature=job.temperature, max_concurrency=max_concurrency,
            service_tier=job.service_tier, prompt_cache_key=job.prompt_cache_key,
        )  # fmt: skip


def build_chat_model(settings: ModelSettings) -> tuple[ChatOpenAI, httpx2.AsyncClient]:
    """ChatOpenAI on the Chat Completions API with SDK retries off (transforms.calls owns them).

    The run owns its HTTP client (close it when the run ends): langchain-openai's shared
    default client would stay bound to the event loop of the first run in this process.
    """
    s = settings
    client = httpx2.AsyncClient(
        timeout=httpx2.Timeout(s.timeout),
        limits=httpx2.Limits(max_connections=s.max_concurrency, max_keepalive_connections=s.max_concurrency),
    )
    # ChatOpenAI sends max_tokens as max_completion_tokens, which llama.cpp and older
    # OpenAI-compatible servers ignore; they get the classic field as well.
    extra_body: dict[str, object] = {"max_tokens": s.max_tokens} if s.base_url else {}
    if s.prompt_cache_key:
        # In the body, so it reaches the server whatever the installed SDK's create() accepts.
        extra_body["prompt_cache_key"] = s.prompt_cache_key
    model = ChatOpenAI(
        model=s.model,
        base_url=s.base_url,
        extra_body=extra_body or None,
        service_tier=s.service_tier,
        api_key=s.api_key or SecretStr(_PLACEHOLDER_KEY),
        temperature=s.temperature,
        max_tokens=s.max_tokens,
        timeout=s.timeout,
        max_retries=0,
        use_responses_api=False,
        http_async_client=client,
    )
    return model, client


def _secret_block_value(name: str) -> str:
    """The value of a Prefect Secret block, read at the edge like an environment variable."""
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(name).get())  # type: ignore[union-attr]  # sync call: a value, not a coroutine
    except Exception as exc:  # the seam: any failure to load is one configuration error
        raise ConfigError(
            f"the Prefect Secret block '{name}' (`api_key_secret`) could not be loaded "
            f"from the Prefect API at {_prefect_api()} ({type(exc).__name__}). Create it in the UI "
            "(Blocks -> Secret) or with `Secret(value=...).save(name)` on the server the run reports to (set "
            "PREFECT_API_URL; a run without it uses a temporary server that holds no blocks), or name the key's "
            "environment variable with `api_key_env` instead."
        ) from exc


def _prefect_api() -> str:
    """The Prefect API this process reports to, for a message."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return describe_url(url) if url else "(none set)"


def describe_endpoint(base_url: str | None, *, local: bool) -> str:
    """Where requests went, for the summary; the bundled model is only started when there is work."""
    if not local:
        return describe_url(base_url)
    return (
        f"{describe_url(base_url)} (bundled local model)"
        if base_url
        else "bundled local model (not started: nothing to ask)"
    )


def describe_url(url: str | None) -> str:
    """A URL fit for logs: scheme, host and path, without credentials or query."""
    return strip_credentials(url) if url else "the OpenAI API"


def redacting(classify: Callable[[BaseException], Failure], secret: str | None) -> Callable[[BaseException], Failure]:
    """A classifier whose messages never contain the API key, even when a server echoes it."""
    if not secret:
        return classify

    def classify_redacted(exc: BaseException) -> Failure:
        failure = classify(exc)
        return replace(failure, message=failure.message.replace(secret, "***"))

    return classify_redacted


def classify_openai_error(exc: BaseException) -> Failure:
    """Map an openai/httpx/langchain exception to retry, row failure or job failure."""
    if isinstance(exc, EmptyReply):
        return Failure("retry", "the model returned an empty reply")
    if isinstance(exc, UserError):  # e.g. a missing Prefect rate limit: every row would fail
        return Failure("fatal", exc.message)
    if isinstance(exc, AttemptDeadline):
        return Failure("retry", f"{exc} (raise `timeout` for slow models)", timed_out=True)
    if isinstance(exc, openai.APITimeoutError):
        return Failure("retry", "the request timed out (raise `timeout` for slow models)", timed_out=True)
    if isinstance(exc, openai.APIConnectionError):
        return Failure("retry", f"connection failed: {_short(exc.__cause__ or exc)}", unreachable=True)
    if isinstance(exc, openai.APIStatusError):
        retry_after = _retry_after(exc.response)
        return classify_status(exc.status_code, _server_message(exc), code=_error_code(exc), retry_after=retry_after)
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, TypeError)):
        return Failure("retry", f"malformed response body ({_short(exc)})")
    return Failure("retry", f"{type(exc).__name__}: {_short(exc)}")


def _error_code(exc: openai.APIStatusError) -> str | None:
    """The error's ``code`` (or ``type``) from the body: what a status alone cannot say."""
    body = exc.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(inner, dict):
        return getattr(exc, "code", None)
    for name in ("code", "type"):
        value = inner.get(name)
        if isinstance(value, str) and value in ("insufficient_quota", *CAPACITY_CODES):
            return value
    return inner.get("code") if isinstance(inner.get("code"), str) else None


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return _short(inner["message"])
    return _short(exc.message)


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$")


def _retry_after(response: httpx2.Response | None) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, retry-after, x-ratelimit-reset-*."""
    if response is None:
        return None
    headers = response.headers
    waits: list[float] = []
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            waits.append(float(ms) / 1000)
        except ValueError:
            pass
    if (secs := headers.get("retry-after")) is not None:
        try:
            waits.append(float(secs))
        except ValueError:
            pass
    if waits or response.status_code != 429:
        # The reset headers (on every response) say when the whole budget is back, up to a minute
        # on a 60 s window, not when one request fits: they are the wait only for a 429 that gives
        # no retry time, never for a 500.
        return max(waits) if waits else None
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        if (value := headers.get(name)) and (parsed := _parse_duration(value)) is not None:
            waits.append(parsed)
    # A server asking for more than MAX_SERVER_WAIT is not waited for in full (as the OpenAI SDK does):
    # the wait is capped, and the retry budget decides when the row gives up.
    return min(max(waits), MAX_SERVER_WAIT) if waits else None


def _parse_duration(text: str) -> float | None:
    """OpenAI's reset headers look like '1s', '6m0s', '120ms' or '0.5s'."""
    match = _DURATION.match(text.strip())
    if not match or not any(match.groups()):
        return None
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def _short(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
