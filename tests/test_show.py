"""`enrich show`: provenance, rows fitted to the terminal, failed rows by error kind, NDJSON, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import obstore
import polars as pl
import pytest
from obstore.store import from_url

from llm_enrich.flows.cli.show import error_kind
from llm_enrich.flows.tables.writing import write_parquet_dataset_atomic
from tests.conftest import REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer
from tests.test_object_store import s3_endpoint  # noqa: F401  (the moto_server fixture)

LONG = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts " * 2
TOPICS = ["Black holes", "FAULT:400 first", LONG.strip(), "FAULT:400 second", "FAULT:500", "FAULT:empty", "인공지능"]
SYSTEM = "Be brief."


def enrich(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the real `enrich` command at a fixed terminal width (rich reads COLUMNS; not a terminal, no colour)."""
    return subprocess.run(
        [sys.executable, "-m", "llm_enrich.flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def env(prefect_backend: str) -> dict[str, str]:
    """A scrubbed environment: the session's Prefect server, a 100-column terminal, no forced colour."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_", "FORCE_COLOR", "TTY_"))}
    return {**kept, "PREFECT_API_URL": prefect_backend, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "100"}


@pytest.fixture(scope="module")
def output(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real enriched output with an extra output, answered rows and failed rows (400, 500, empty reply)."""
    work = tmp_path_factory.mktemp("show")
    source, out = work / "in.csv", work / "out.parquet"
    pl.DataFrame({"id": range(1, len(TOPICS) + 1), "topic": TOPICS}).write_csv(source)
    with FakeOpenAIServer() as server:
        config = work / "job.toml"
        config.write_text(
            f'input_path = "{source}"\noutput_path = "{out}"\nbase_url = "{server.base_url}"\n'
            f'prompt = "Explain {{topic}}"\nsystem = "{SYSTEM}"\nmax_retries = 1\nretry_base_delay = 0.01\n'
            'cache = false\n\n[[extra_outputs]]\nprompt = "Label {topic}"\noutput_column = "label"\n'
        )
        result = enrich("run", "--config", str(config), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    yield out


def show(*args: str, env: dict[str, str]) -> tuple[int, str]:
    result = enrich("show", *args, env=env)
    return result.returncode, result.stdout + result.stderr


# The rows at COLUMNS=100: deterministic, since the answers derive from the prompts.
GOLDEN = """\
7 rows; showing the first 3.
┏━━━━┳━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━┓
┃    ┃                  ┃                  ┃                  ┃                 ┃ enrich_error_lab ┃
┃ id ┃ topic            ┃ explanation      ┃ enrich_error     ┃ label           ┃ el               ┃
┡━━━━╇━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━┩
│ 1  │ Black holes      │ answer-bf4b09679 │ null             │ answer-87221aa6 │ null             │
│    │                  │ 4614c14          │                  │ 8a1b693a        │                  │
├────┼──────────────────┼──────────────────┼──────────────────┼─────────────────┼──────────────────┤
│ 2  │ FAULT:400 first  │ null             │ HTTP 400:        │ null            │ HTTP 400:        │
│    │                  │                  │ injected 400     │                 │ injected 400     │
│    │                  │                  │ (after 1         │                 │ (after 1         │
│    │                  │                  │ attempt)         │                 │ attempt)         │
├────┼──────────────────┼──────────────────┼──────────────────┼─────────────────┼──────────────────┤
│ 3  │ Photosynthesis   │ answer-8734385b8 │ null             │ answer-3d2dc6e2 │ null             │
│    │ turns light,     │ 979b659          │                  │ 17c95688        │                  │
│    │ water and carbon │                  │                  │                 │                  │
│    │ dioxide into     │                  │                  │                 │                  │
│    │ sugar and oxygen │                  │                  │                 │                  │
│    │ inside the       │                  │                  │                 │                  │
│    │ chloroplasts     │                  │                  │                 │                  │
│    │ Photosynthesis   │                  │                  │                 │                  │
│    │ turns light,     │                  │                  │                 │                  │
│    │ water and carbon │                  │                  │                 │                  │
│    │ dioxide into     │                  │                  │                 │                  │
│    │ sugar and oxygen │                  │                  │                 │                  │
│    │ inside the       │                  │                  │                 │                  │
│    │ chloroplasts     │                  │                  │                 │                  │
└────┴──────────────────┴──────────────────┴──────────────────┴─────────────────┴──────────────────┘
"""


def test_the_first_rows_fit_the_terminal_with_the_provenance(output: Path, env: dict[str, str]) -> None:
    code, text = show(str(output), "--rows", "3", env=env)
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0] == str(output)
    assert lines[1].startswith("model gpt-4o-mini at http://127.0.0.1:") and ", written 20" in lines[1]
    assert lines[3:5] == ["prompt: Explain {topic}", f"system: {SYSTEM}"]
    assert all(len(line) <= 100 for line in lines), "wider than the terminal"
    assert "\x1b[" not in text  # not a terminal: no colour codes
    # A long answer folds over lines inside its cell; every character is kept.
    column = "".join(line.split("│")[3].strip() for line in lines if line.count("│") > 3)
    assert expected_answer("Explain Black holes", SYSTEM) in column
    assert "enrich_key" not in text.split("Not shown:")[0]
    # The long topic is wrapped over lines inside its cell, every word kept.
    cells = " ".join(line.split("│")[2].strip() for line in lines if line.count("│") > 3)
    assert LONG.strip() in " ".join(cells.split())
    assert GOLDEN in text
    hidden = " ".join(text.split("Not shown:")[1].split())
    assert "enrich_input_tokens, enrich_output_tokens, enrich_cached_tokens, enrich_key," in hidden
    assert "with --columns" in hidden


def test_failed_rows_with_a_count_per_error_kind(output: Path, env: dict[str, str]) -> None:
    code, text = show(str(output), "--failed", env=env)
    assert code == 0, text
    assert "4 of 7 rows failed; showing 4." in text
    assert "Black holes" not in text and "인공지능" not in text
    kinds = [" ".join(line.strip("│ ").split()) for line in text.split("Errors by kind")[1].splitlines()]
    # Two outputs, so each kind names its output; "(after N attempts)" and numbers are folded away.
    assert "2 │ explanation: HTTP 400: injected N" in kinds
    assert "2 │ label: HTTP 400: injected N" in kinds
    assert "1 │ explanation: HTTP 500: injected N" in kinds
    assert "1 │ label: the model returned an empty reply" in kinds


def test_json_prints_one_object_per_row_and_nothing_else(output: Path, env: dict[str, str]) -> None:
    code, text = show(str(output), "--json", "--rows", "0", env=env)
    assert code == 0, text
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in rows] == list(range(1, 8))
    assert rows[0]["explanation"] == expected_answer("Explain Black holes", SYSTEM)
    assert rows[1]["enrich_error"] == "HTTP 400: injected 400 (after 1 attempt)"
    assert "enrich_key" not in rows[0]
    code, text = show(str(output), "--json", "--failed", "--columns", "id", env=env)
    failed = [json.loads(line) for line in text.splitlines()]
    assert [set(r) for r in failed] == [{"id", "enrich_error", "enrich_error_label"}] * 4
    assert [r["id"] for r in failed] == [2, 4, 5, 6]


def test_columns_picks_and_orders_the_columns(output: Path, env: dict[str, str]) -> None:
    code, text = show(str(output), "--columns", "enrich_key,id", "--rows", "2", env=env)
    assert code == 0, text
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert header.split("┃")[1:3] == [" enrich_key ", " id "] or header.split()[1:4:2] == ["enrich_key", "id"]
    assert "topic" not in text.split("showing")[1] and "Not shown" not in text
    code, text = show(str(output), "--columns", "id,nope", env=env)
    assert code == 2 and "column 'nope' is not in" in text and "it has: id, topic" in text


def test_a_hive_partitioned_output_directory(output: Path, env: dict[str, str], tmp_path: Path) -> None:
    frame = pl.read_parquet(output).with_columns(part=pl.col("id") % 2)
    footer = {"llm_enrich": pl.read_parquet_metadata(output)["llm_enrich"]}
    write_parquet_dataset_atomic(frame, str(tmp_path / "dataset"), "part", footer)
    code, text = show(str(tmp_path / "dataset"), "--json", "--rows", "0", env=env)
    assert code == 0, text
    assert sorted(json.loads(line)["id"] for line in text.splitlines()) == list(range(1, 8))
    code, text = show(str(tmp_path / "dataset"), "--failed", env=env)
    assert code == 0 and "prompt: Explain {topic}" in text and "4 of 7 rows failed" in text


def test_an_output_in_a_bucket_with_storage_options(output: Path, env: dict[str, str], s3_endpoint: str) -> None:  # noqa: F811
    options = {
        "aws_endpoint_url": s3_endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "s3-secret-77",
        "aws_region": "us-east-1", "aws_allow_http": "true",
    }  # fmt: skip
    # Uploaded as bytes, so the footer is the run's own (obstore takes allow_http as a client option).
    store = from_url("s3://data/show", config={k: v for k, v in options.items() if k != "aws_allow_http"},
                     client_options={"allow_http": True})  # fmt: skip
    obstore.put(store, "out.parquet", output.read_bytes())
    flags = [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]
    code, text = show("s3://data/show/out.parquet", "--failed", *flags, env=env)
    assert code == 0, text
    assert "prompt: Explain {topic}" in text and "4 of 7 rows failed" in text and "s3-secret-77" not in text
    code, text = show("s3://data/show/nope.parquet", *flags, env=env)
    assert code == 2 and "could not read 's3://data/show/nope.parquet'" in text and "s3-secret-77" not in text
    assert text.strip().count("\n") == 0


def test_json_into_a_closed_pipe_ends_quietly(output: Path, env: dict[str, str]) -> None:
    command = f"{sys.executable} -m flows.cli show {output} --json --rows 0 | head -n 1"
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert json.loads(result.stdout)["id"] == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_a_missing_path_exits_2_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    code, text = show(str(tmp_path / "missing.parquet"), env=env)
    assert code == 2
    assert text.strip().count("\n") == 0 and "missing.parquet' does not exist" in text and "Traceback" not in text


def test_a_parquet_file_that_is_not_enriched_exits_2_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    plain = tmp_path / "plain.parquet"
    pl.DataFrame({"id": [1], "topic": ["x"]}).write_parquet(plain)
    code, text = show(str(plain), env=env)
    assert code == 2
    assert text.strip().count("\n") == 0 and "is not an output of llm-enrich" in text and "Traceback" not in text
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    code, text = show(str(broken), env=env)
    assert code == 2 and "could not read" in text and "Traceback" not in text


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("HTTP 400: injected 400 (after 1 attempt)", "HTTP 400: injected N"),
        ("HTTP 400: context too long: 9120 tokens (after 1 attempt)", "HTTP 400: context too long: N tokens"),
        ("HTTP 429: try again in 20ms (after 7 attempts)", "HTTP 429: try again in Nms"),
        ("the model returned an empty reply (after 7 attempts)", "the model returned an empty reply"),
        ("no complete reply within `timeout` 2.5 s (after 3 attempts)", "no complete reply within `timeout` N s"),
    ],
)
def test_error_kinds_fold_attempts_and_numbers_but_keep_the_status(message: str, kind: str) -> None:
    assert error_kind(message) == kind
