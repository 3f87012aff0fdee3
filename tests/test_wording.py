"""Messages name job fields (the Prefect form has no flags); the CLI prints them with its flags instead."""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from llm_enrich.flows.cli.messages import print_summary
from llm_enrich.flows.cli.options import _FIELD_OF
from llm_enrich.flows.cli.wording import as_flags, flag_of
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.pipeline import INVALID_STATE, enrich_table
from llm_enrich.flows.report.summary import RunSummary
from tests.conftest import DATA, REPO
from tests.fakes.openai_server import FakeOpenAIServer

# A backticked name in a message, with the value a boolean is set to: "`max_cost`", "`cache` = false".
_NAMED = re.compile(r"(?<!`)`(?P<name>[a-z_][a-z0-9_]*)`(?P<value> = (?:true|false)\b)?(?!`)")
# Backticked words in messages that are commands, not job fields.
_COMMANDS = {"enrich"}


def _message_sources() -> list[Path]:
    """The files whose messages must name job fields: transforms/ and flows/ but the CLI, batch and the job."""
    files = [*(REPO / "transforms").glob("*.py"), *(REPO / "flows").rglob("*.py")]
    skipped = ("flows/cli/", "flows/batch/", "flows/job/")
    return [f for f in files if not str(f.relative_to(REPO)).startswith(skipped)]


def _named_in_messages() -> dict[str, set[str]]:
    """Each backticked name (with its boolean value, if set) in a string literal, and where it is."""
    found: dict[str, set[str]] = {}
    for path in _message_sources():
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for match in _NAMED.finditer(node.value):
                    where = f"{path.relative_to(REPO)}:{node.lineno}"
                    found.setdefault(match.group(0), set()).add(where)
    return found


@pytest.fixture(scope="module")
def run_flags() -> set[str]:
    """Every flag (and the argument) `enrich run --help` shows, on a terminal wide enough for all of them."""
    result = subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", "run", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"--[a-z][a-z-]*", result.stdout)) | set(re.findall(r"\bINPUT_PATH\b", result.stdout))


def test_every_field_a_message_names_is_a_job_field_with_a_flag(run_flags: set[str]) -> None:
    named = _named_in_messages()
    assert "`max_cost`" in named and "`cache` = false" in named, "the scan found none of the known messages"
    wrong = []
    for form, where in sorted(named.items()):
        name = form.split("`")[1]
        if name in _COMMANDS:
            continue
        flag = as_flags(form).split()[0]
        if name not in EnrichJob.model_fields or flag not in run_flags:
            wrong.append(f"{form} -> {flag} ({', '.join(sorted(where))})")
    assert wrong == [], "a message names no job field, or a field `enrich run` has no flag for"


def test_every_option_maps_back_to_its_flag(run_flags: set[str]) -> None:
    for field in set(_FIELD_OF.values()) | {"storage_options"}:
        assert flag_of(field) in run_flags, field
    for field, info in EnrichJob.model_fields.items():
        if info.annotation is bool and flag_of(field, False) is not None:
            assert flag_of(field, False) in run_flags, field


@pytest.mark.parametrize(
    ("message", "printed"),
    [
        ("rerun with a higher `max_cost` to continue", "rerun with a higher --max-cost to continue"),
        ("Give another `output_path`.", "Give another --output."),
        ("`output_path` = 'a.csv' is the input", "--output 'a.csv' is the input"),
        (
            "pass `cache_dir` somewhere writable, or `cache` = false.",
            "pass --cache-dir somewhere writable, or --no-cache.",
        ),
        ("Rerun with `wait` = true, or use `in_place` = true", "Rerun with --wait, or use --in-place"),
        ("+ `max_tokens` = 256 tokens", "+ --max-tokens 256 tokens"),
        ("Pass `input_format` = csv|parquet|ndjson.", "Pass --format csv|parquet|ndjson."),
        ("the `input_schema` = 'template' check", "the --schema 'template' check"),
        ("(environment or `storage_options`)", "(environment or --storage-option)"),
        ("the block (`api_key_secret`)", "the block (--api-key-block)"),
        # No flag for these: the text stays as it is.
        ("`batch_submit` = false, `in_place` = false", "`batch_submit` = false, `in_place` = false"),
        (
            "the `enrich` command; `enrich cache verify --repair`",
            "the `enrich` command; `enrich cache verify --repair`",
        ),
        ("`nonsense` and ``max_cost``", "`nonsense` and ``max_cost``"),
    ],
)
def test_as_flags_names_the_flags(message: str, printed: str) -> None:
    assert as_flags(message) == printed


def test_the_summary_notes_name_flags() -> None:
    summary = RunSummary(
        rows_in=1, rows_valid=1, rows_rejected=0, rows_ok=1, rows_failed=0, rows_cached=0, rows_deduplicated=0,
        unique_prompts_sent=1, requests=1, retries=0, rate_limited=0, input_tokens=10, output_tokens=9,
        cost_usd=None, wall_seconds=1.0, output="o.parquet", model="m", endpoint="e",
        notes=["`tpm` bound this run: `max_tokens` = 32 would let more through"],
    )  # fmt: skip
    out = io.StringIO()
    print_summary(Console(file=out, width=200), summary.model_dump())
    assert "Note: --tpm bound this run: --max-tokens 32 would let more through" in out.getvalue()


def _cli(fake_llm: FakeOpenAIServer, prefect_backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `enrich run`, reporting to the session's Prefect server."""
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_backend,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "250",
    }
    return subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", "run", *args, "--base-url", fake_llm.base_url],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip


def test_the_output_over_the_input_names_the_flag_on_the_cli_and_the_field_in_the_flow(
    fake_llm: FakeOpenAIServer, prefect_backend: str, tmp_path: Path
) -> None:
    source = tmp_path / "table.csv"
    source.write_bytes((DATA / "topics.csv").read_bytes())
    result = _cli(fake_llm, prefect_backend, str(source), "--output", str(source))
    printed = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--output '{source}' is the input" in printed and "Give another --output," in printed
    assert "`" not in printed and "output_path" not in printed

    state = enrich_table(
        EnrichJob(input_path=str(source), output_path=str(source), base_url=fake_llm.base_url), return_state=True
    )
    assert state.name == INVALID_STATE
    assert f"`output_path` = '{source}' is the input" in state.message and "--output" not in state.message
    assert fake_llm.stats.requests == 0


def test_a_message_from_the_flow_run_names_the_flag_on_the_cli(
    fake_llm: FakeOpenAIServer, prefect_backend: str, tmp_path: Path
) -> None:
    """The flow's final state message (not a check the CLI makes first) is printed with flags too."""
    out = tmp_path / "out.parquet"
    result = _cli(fake_llm, prefect_backend, str(DATA / "topics.csv"), "-o", str(out), "--output-schema", "topic:str")
    assert result.returncode == 2, result.stdout + result.stderr
    # Prefect's log lines above it quote the flow's message as it is; the error paragraph names flags.
    printed = " ".join(result.stderr.rsplit("error: ", 1)[1].split())
    assert "--output-prefix ai_" in printed and "`" not in printed

    state = enrich_table(
        EnrichJob(
            input_path=str(DATA / "topics.csv"),
            output_path=str(out),
            output_schema="topic:str",
            base_url=fake_llm.base_url,
        ),
        return_state=True,
    )
    assert state.name == INVALID_STATE and "`output_prefix` = ai_" in state.message
    assert not out.exists() and fake_llm.stats.requests == 0
