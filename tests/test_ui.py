"""The Prefect UI as a person uses it: Deployments -> nightly -> Run -> Custom run -> change a field."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tests.fakes.openai_server import FakeOpenAIServer, expected_answer
from tests.prefect_server import wait_for

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.browser

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium (apt-get install chromium) for the browser test")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
            ],
        )  # fmt: skip
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        print(f"screenshot saved to {tmp_path / 'failure.png'}")
    page.close()


def test_a_custom_run_started_in_the_ui_writes_the_chosen_column(
    page: Page, prefect_server: str, served: Path, served_llm: FakeOpenAIServer
) -> None:
    out = Path(served) / "default.parquet"
    out.unlink(missing_ok=True)
    ui = prefect_server.removesuffix("/api")
    page.goto(f"{ui}/deployments")
    page.get_by_text("nightly", exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.click()

    label = page.locator(".schema-form-property__label", has_text=re.compile(r"^Essentials: Answer column"))
    field = page.locator(".schema-form-property", has=label).last.locator("textarea")
    field.wait_for()
    # Kept for a person to look at: the form as an operator sees it.
    page.screenshot(path=str(Path(served) / "run-form.png"), full_page=False)
    field.fill("explained_in_the_ui")
    page.get_by_role("button", name="Submit").click()

    # The served process picks the run up and writes the file; the deployment page lists the run.
    wait_for(out.exists, timeout=180, what="the output written by the run started in the UI")
    frame = pl.read_parquet(out)
    assert "explained_in_the_ui" in frame.columns and "explanation" not in frame.columns
    assert frame["explained_in_the_ui"][0] == expected_answer("Explain this topic in two sentences: 인공지능")
    page.get_by_text("Completed").first.wait_for(timeout=120_000)
