"""The bundled SmolLM2 model, really served by llama-cpp-python, end to end on 3 rows."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm.local_model import LOCAL_MODEL_NAME, find_bundled_model, serve_local_model
from llm_enrich.flows.pipeline import enrich_table
from llm_enrich.schemas.enriched import ERROR_COLUMN, OUTPUT_TOKENS_COLUMN

pytestmark = [pytest.mark.local_model, pytest.mark.usefixtures("prefect_backend")]


def test_the_bundled_model_file_is_found() -> None:
    model = find_bundled_model()
    assert model.suffix == ".gguf" and model.stat().st_size > 50_000_000


def test_three_rows_are_enriched_by_the_local_model_and_the_server_is_stopped(tmp_path: Path) -> None:
    source = tmp_path / "three.csv"
    pl.DataFrame({"id": [1, 2, 3], "topic": ["인공지능", "Photosynthesis", "The Silk Road"]}).write_csv(source)
    out = tmp_path / "out.parquet"
    job = EnrichJob(input_path=str(source), output_path=str(out), max_tokens=48)
    summary = enrich_table(job)
    assert summary["model"] == LOCAL_MODEL_NAME
    assert summary["endpoint"].startswith("http://127.0.0.1:")
    frame = pl.read_parquet(out)
    assert frame[ERROR_COLUMN].null_count() == 3
    assert all(len(text.strip()) > 0 for text in frame["explanation"])
    assert all(0 < n <= 48 for n in frame[OUTPUT_TOKENS_COLUMN])  # max_tokens reached the server
    port = summary["endpoint"].split(":")[2].split("/")[0]
    with socket.socket() as sock:  # the server is gone once the run is over
        assert sock.connect_ex(("127.0.0.1", int(port))) != 0


def test_the_server_stops_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError), serve_local_model() as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        raise RuntimeError("boom")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base_url}/models", timeout=2)


def test_the_local_model_fills_a_two_field_schema(tmp_path: Path) -> None:
    source = tmp_path / "two.csv"
    pl.DataFrame({"id": [1, 2], "topic": ["Photosynthesis", "The Silk Road"]}).write_csv(source)
    out = tmp_path / "out.parquet"
    job = EnrichJob(
        input_path=str(source), output_path=str(out), max_tokens=96, output_schema="summary:str, difficulty:int[1..5]"
    )
    summary = enrich_table(job)
    frame = pl.read_parquet(out)
    assert frame.schema["summary"] == pl.String and frame.schema["difficulty"] == pl.Int64
    answered = frame.filter(pl.col(ERROR_COLUMN).is_null())
    # Grammar-constrained function calling: every answered row is well-typed and in range.
    assert answered.height >= 1, frame[ERROR_COLUMN].to_list()
    assert answered["difficulty"].is_between(1, 5).all()
    assert summary["input_tokens"] > 0
