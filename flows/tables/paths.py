"""Local paths and object-store URIs (s3://, gs://, az://) behind one set of helpers."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["REMOTE_SCHEMES", "is_remote", "literal_path", "open_store", "sibling", "strip_credentials", "suffix_of"]

REMOTE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "abfss://")
# polars-style storage options that obstore takes as HTTP client settings rather than store config.
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "timeout", "connect_timeout", "proxy_url"}


def strip_credentials(url: str) -> str:
    """scheme://host[:port]/path: no user, password, query or fragment (a SAS token lives in the query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def literal_path(path: str) -> str:
    """A local path as a polars scan matches it: its glob characters ('[', '*', '?') match only themselves."""
    if is_remote(path):
        return path
    return "".join(f"[{c}]" if c in "[*?" else c for c in path)


def is_remote(location: str) -> bool:
    """True for an object-store URI; credentials come from the usual environment variables."""
    return location.lower().startswith(REMOTE_SCHEMES)


def suffix_of(location: str) -> str:
    """The extension of a path or URI ('.csv')."""
    return posixpath.splitext(location)[1].lower() if is_remote(location) else Path(location).suffix.lower()


def sibling(location: str, name: str) -> str:
    """A file beside a path or object (same directory or prefix)."""
    if is_remote(location):
        scheme, _, rest = location.partition("://")
        return f"{scheme}://{posixpath.join(posixpath.dirname(rest), name)}"
    return str(Path(location).with_name(name))


def open_store(url: str, storage: dict[str, str] | None) -> Any:
    """An obstore store rooted at ``url``, from polars-style storage options (or the environment).

    Every request on it is bounded by obstore's client timeout (30 s unless ``timeout`` is given).
    """
    from obstore.store import from_url

    options = storage or {}
    client = {k.split("_", 1)[1]: v for k, v in options.items() if k.split("_", 1)[-1] in _CLIENT_KEYS}
    config = {k: v for k, v in options.items() if k.split("_", 1)[-1] not in _CLIENT_KEYS}
    return from_url(url, config=config or None, client_options=client or None)  # type: ignore[arg-type]
