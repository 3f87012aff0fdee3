"""The installable package: one top-level name, the public API, and the documented exports."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import polars as pl
import pytest

import llm_enrich
from tests.conftest import REPO
from tests.fakes.openai_server import FakeOpenAIServer, expected_answer


def test_the_exported_names_are_exactly_the_documented_ones() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
    assert documented == set(llm_enrich.__all__)
    assert all(getattr(llm_enrich, name) is not None for name in llm_enrich.__all__)


@pytest.mark.usefixtures("prefect_backend")
def test_enrich_frame_takes_a_frame_and_returns_it_enriched_and_pays_once(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    frame = pl.DataFrame({"order_id": [7, 8, 9], "description": ["red shoes", "blue hat", "red shoes"]})
    job = {"prompt": "Summarize {description}", "output_column": "summary", "base_url": fake_llm.base_url}
    out = llm_enrich.enrich_frame(frame, cache_dir=str(tmp_path / "cache"), **job)
    assert out.select("order_id", "description").equals(frame)
    assert out["summary"].to_list() == [expected_answer(f"Summarize {d}") for d in frame["description"]]
    assert fake_llm.stats.requests == 2  # the repeated description is asked once
    again = llm_enrich.enrich_frame(frame, llm_enrich.EnrichJob(**job, cache_dir=str(tmp_path / "cache")))
    assert again["summary"].to_list() == out["summary"].to_list() and fake_llm.stats.requests == 2


@pytest.mark.usefixtures("prefect_backend")
def test_enrich_task_runs_inside_a_users_own_flow(fake_llm: FakeOpenAIServer, tmp_path: Path) -> None:
    from prefect import flow

    source = tmp_path / "orders.csv"
    pl.DataFrame({"order_id": [1, 2], "description": ["a lamp", "a desk"]}).write_csv(source)

    @flow
    def nightly() -> int:
        job = llm_enrich.EnrichJob(
            input_path=str(source), output_path=str(tmp_path / "out.parquet"), prompt="Summarize {description}",
            base_url=fake_llm.base_url,
        )  # fmt: skip
        return llm_enrich.enrich_task(job).rows_ok

    assert nightly() == 2
    assert pl.read_parquet(tmp_path / "out.parquet")["explanation"].null_count() == 0


def test_the_wheel_installs_one_package_that_imports_next_to_a_users_flows_and_schemas(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("llm_enrich-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"llm_enrich"}
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "__init__.py").write_text("MINE = 'the user flows package'\n")
    (project / "schemas.py").write_text("MINE = 'the user schemas module'\n")
    probe = (
        "import flows, schemas, llm_enrich, llm_enrich.flows.tables.paths, llm_enrich.schemas.errors, "
        "llm_enrich.transforms.keys\n"
        "assert flows.MINE and schemas.MINE\n"
        f"assert llm_enrich.__file__.startswith({str(target)!r}), llm_enrich.__file__\n"
        "assert llm_enrich.flows.tables.paths.is_remote('s3://bucket/x')\n"
        "print('ok')\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe], cwd=project, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr[-2000:]
