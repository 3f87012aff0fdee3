"""Answer keys: a hash of everything that shapes an answer, stable across runs and machines."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["KEY_VERSION", "AnswerIdentity", "answer_key", "endpoint_family"]

KEY_VERSION = 1
"""Bumped when the key's recipe changes, which invalidates every cached answer at once."""


@dataclass(frozen=True)
class AnswerIdentity:
    """The request settings that, with the messages, decide the answer."""

    model: str
    endpoint: str
    temperature: float | None = None
    max_tokens: int | None = None
    output_schema: str | None = None


def endpoint_family(base_url: str | None, *, bundled: bool = False) -> str:
    """Which provider answers: 'openai', 'bundled', or the server's normalised URL."""
    if bundled:
        return "bundled"
    if not base_url or not base_url.strip():
        return "openai"
    parts = urlsplit(base_url.strip())
    host = (parts.hostname or "").lower()
    if host == "api.openai.com":
        return "openai"
    if not parts.scheme or not host:
        return base_url.strip().rstrip("/").lower()
    default_port = {"http": 80, "https": 443}.get(parts.scheme.lower())
    port = f":{parts.port}" if parts.port and parts.port != default_port else ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"


def answer_key(identity: AnswerIdentity, system: str | None, prompt: str) -> str:
    """sha256 over the identity, the system message and the rendered prompt."""
    material = [
        KEY_VERSION,
        identity.model,
        identity.endpoint,
        identity.temperature,
        identity.max_tokens,
        identity.output_schema,
        system,
        prompt,
    ]
    canonical = json.dumps(material, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
