"""Local paths and object-store URIs (s3://, gs://, az://) behind one set of helpers."""

from __future__ import annotations

import posixpath
from pathlib import Path

__all__ = ["REMOTE_SCHEMES", "is_remote", "sibling", "suffix_of"]

REMOTE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "abfss://")


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
