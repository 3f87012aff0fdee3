"""The data work does not depend on the Prefect API staying up: a real server, stopped mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psutil

from tests.conftest import REPO
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer
from tests.prefect_server import running_prefect_server, wait_for

ROWS = 200


def _kill_server(api_url: str) -> None:
    """SIGKILL the process group of the server listening on the API's port, and nothing else."""
    port = int(api_url.rsplit(":", 1)[1].split("/")[0])
    owners = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"}
    assert owners, f"nothing listens on {port}"
    for pid in owners:
        assert os.getpgid(pid) != os.getpgid(0), "the server must run in its own process group"
        os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_a_prefect_server_that_dies_mid_run_costs_at_most_a_minute_and_no_answer(tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out" / "enriched.parquet"
    pl.DataFrame({"id": list(range(ROWS)), "topic": [f"outage {i}" for i in range(ROWS)]}).write_csv(source)
    with FakeOpenAIServer(Behaviour(latency=0.2)) as llm, running_prefect_server(_home(tmp_path)) as api_url:
        env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        command = [
            sys.executable, "-m", "llm_enrich.flows.cli", "run", str(source), "-o", str(out),
            "--base-url", llm.base_url,
            "--max-concurrency", "4", "--partition-rows", "40",
        ]  # fmt: skip
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: llm.stats.completions >= 30, timeout=120, what="the run to get going")
        _kill_server(api_url)
        killed = time.monotonic()
        output = process.communicate(timeout=300)[0].decode()
        outlived = time.monotonic() - killed
        folded = " ".join(output.split())
        if process.returncode == 0:
            # Finished the data work and wrote the output, saying the records are incomplete.
            assert out.exists() and pl.read_parquet(out).height == ROWS
            assert "records there (state, artifacts, logs) are incomplete" in folded
        else:
            assert process.returncode == 1, folded
            assert "stopped answering" in folded and "kept in the cache" in folded
        answered = llm.stats.completions
    # The run outlives its work by well under two minutes (measured: about 30 s), never forever.
    assert outlived < 120, f"the run outlived the server by {outlived:.0f} s"
    assert answered <= ROWS + 8  # nothing was paid twice beyond the few in flight


def _home(folder: Path) -> Path:
    home = folder / "prefect-home"
    home.mkdir()
    return home
