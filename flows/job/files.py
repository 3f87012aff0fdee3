"""Jobs from outside: a TOML or YAML job file, and one readable error for a job pydantic refuses."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llm_enrich.flows.job.model import EnrichJob
from llm_enrich.schemas.errors import ConfigError

__all__ = ["load_job_file", "make_job"]


def make_job(values: dict[str, Any], *, source: str = "the options") -> EnrichJob:
    """Build a job, turning pydantic's errors into one readable ConfigError."""
    try:
        return EnrichJob(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid job in {source}: {problems}.") from exc


def load_job_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML job file into a dict of EnrichJob fields."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"job file '{path}' does not exist; pass a .toml or .yaml file to --config.")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".toml":
            data = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"job file '{path}' must end in .toml, .yaml or .yml.")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"job file '{path}' could not be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"job file '{path}' must hold a table of job fields at the top level.")
    return data.get("job", data) if isinstance(data.get("job"), dict) else data
