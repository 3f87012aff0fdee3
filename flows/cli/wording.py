"""Messages for a terminal: the job fields they name, rewritten as the `enrich run` flags that set them.

The flow and the transforms name job fields in backticks ("raise `max_cost`", "`cache` = false"),
since a run started from the Prefect UI form has no flags. The CLI prints those messages through
``as_flags``, which names the flags instead ("raise --max-cost", "--no-cache"). The map is
``options._FIELD_OF`` inverted, so a new one-to-one option needs nothing here.
"""

from __future__ import annotations

import re
from functools import cache

from llm_enrich.flows.job import EnrichJob

__all__ = ["as_flags", "flag_of"]

# Where the option's parameter name is not its flag's spelling, or the field has no one-to-one option.
_SPELLED = {"input_path": "INPUT_PATH", "input_format": "--format"}
_UNMAPPED = {"storage_options": "--storage-option"}  # repeatable KEY=VALUE pairs, merged by parse_pairs
_BOOLEAN = frozenset(name for name, info in EnrichJob.model_fields.items() if info.annotation is bool)
# The flag that sets a boolean field to false, where the CLI has one ("`cache` = false" -> --no-cache).
_OFF = {
    "cache": "--no-cache",
    "wait": "--no-wait",
    "batch_wait": "--batch-no-wait",
    "retry_failed": "--no-retry-failed",
}
# A backticked field, optionally with its value: "`max_cost`", "`cache` = false", "`max_tokens` = 64"
# (a ``double-backticked`` name is code, left alone).
_NAMED = re.compile(r"(?<!`)`(?P<field>[a-z_][a-z0-9_]*)`(?!`)(?P<set> = (?P<value>true|false)\b| = )?")


@cache
def _flags() -> dict[str, str]:
    """Job field -> the flag that sets it (true for a boolean field)."""
    # Imported here: options imports running, which imports this module.
    from llm_enrich.flows.cli.options import _FIELD_OF

    flags: dict[str, str] = dict(_UNMAPPED)
    for option, field in _FIELD_OF.items():
        # Several options for one field: the one named like the field wins, else the first.
        if field not in flags or option == field:
            flags[field] = _SPELLED.get(option, "--" + option.replace("_", "-"))
    return flags


def flag_of(field: str, value: bool | None = None) -> str | None:
    """The flag that sets a job field (to ``value``, for a boolean one), or None when the CLI has none."""
    if value is False and field in _BOOLEAN:
        return _OFF.get(field)
    return _flags().get(field)


def as_flags(text: str) -> str:
    """The message with each backticked job field (and "`field` = value") named as its CLI flag."""
    return _NAMED.sub(_as_flag, text)


def _as_flag(match: re.Match[str]) -> str:
    field, assigned, value = match.group("field", "set", "value")
    if field in _BOOLEAN and assigned:
        # A boolean's flag carries its value: "`cache` = false" is --no-cache, nothing after it.
        flag = flag_of(field, value == "true") if value else None
        return flag or match.group(0)
    flag = flag_of(field)
    if flag is None:
        return match.group(0)
    if not assigned:
        return flag
    return f"{flag} {value}" if value else f"{flag} "
