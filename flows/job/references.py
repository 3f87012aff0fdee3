"""The one rule for a job field naming Python code as 'module:Name': import it, or say what to fix."""

from __future__ import annotations

import importlib

from llm_enrich.schemas.errors import ConfigError

__all__ = ["import_reference"]


def import_reference(ref: str, field: str, example: str) -> object:
    """The object ``ref`` ('package.module:Name') names; a ConfigError naming ``field`` when it cannot be had."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"`{field}` = {ref!r} is not a 'module:Name' reference (for example {example!r}).")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"`{field}` = {ref!r} could not be loaded ({exc}); make sure the module is importable (installed, "
            "or on PYTHONPATH) and defines that name."
        ) from exc
