"""Prefect-native operation against a real `prefect server`: end-of-run events, Secret blocks, the run's records."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from llm_enrich.flows.report.events import public_uri
from tests.conftest import DATA, REPO
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer, expected_answer
from tests.prefect_server import trigger, wait_for


def read_events(prefect_server: str, output: Path | str) -> list[dict[str, Any]]:
    """The llm-enrich events about one output, as the server stored them (at most 50: the server's page)."""
    body = {
        "filter": {
            "event": {"prefix": ["llm-enrich.run."]},
            "resource": {"id": [f"llm-enrich.output.{public_uri(str(output))}"]},
        },
        "limit": 50,
    }
    reply = httpx.post(f"{prefect_server}/events/filter", json=body, timeout=30)
    reply.raise_for_status()
    return list(reply.json()["events"])


def wait_for_event(prefect_server: str, output: Path | str) -> dict[str, Any]:
    """The one event about this output; the server files events in the background."""
    events = wait_for(lambda: read_events(prefect_server, output), timeout=60, what="the run's event")
    assert len(events) == 1, events
    return events[0]


def cli(prefect_server: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command in its own process, reporting to the session's Prefect server."""
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))},
        "PREFECT_API_URL": prefect_server,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **(env or {}),
    }
    command = [sys.executable, "-m", "llm_enrich.flows.cli", *args]
    return subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


def test_a_cli_run_emits_one_event_that_an_automation_can_match(
    prefect_server: str, fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    topics = ["tea", "FAULT:invalid_prompt", "coffee"]
    pl.DataFrame({"id": [1, 2, 3], "topic": topics}).write_csv(source)
    done = cli(prefect_server, "run", str(source), "-o", str(out), "--base-url", fake_llm.base_url, "--model", "m-1")
    assert done.returncode == 0, done.stdout + done.stderr

    event = wait_for_event(prefect_server, out)
    assert event["event"] == "llm-enrich.run.completed"
    # What an automation's trigger can match on is in the labels.
    assert event["resource"]["llm-enrich.outcome"] == "with-failures"
    assert event["resource"]["llm-enrich.model"] == "m-1"
    payload = event["payload"]
    assert (payload["rows_in"], payload["rows_ok"], payload["rows_failed"]) == (3, 2, 1)
    assert payload["requests"] == fake_llm.stats.requests
    assert payload["output"] == f"file://{out}"
    assert "invalid" in payload["most_common_error"].lower()
    # Prefect attaches the run that emitted it.
    assert {"flow-run", "flow"} <= {related["prefect.resource.role"] for related in event["related"]}
    # The run's failures table leads with the reason, where a wide row cannot push it off-screen.
    [flow_run] = [r["prefect.resource.id"] for r in event["related"] if r["prefect.resource.role"] == "flow-run"]
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run.removeprefix("prefect.flow-run.")]}}}
    artifacts = httpx.post(f"{prefect_server}/artifacts/filter", json=body, timeout=30).json()
    [failures] = [a for a in artifacts if a["key"] == "enrich-failures"]
    rows = json.loads(failures["data"])
    assert list(rows[0])[:2] == ["why", "stage"] and rows[0]["topic"] == "FAULT:invalid_prompt"


def test_a_run_that_fails_emits_a_failed_event(prefect_server: str, tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    pl.DataFrame({"id": list(range(40)), "topic": [f"subject {i}" for i in range(40)]}).write_csv(source)
    with FakeOpenAIServer(Behaviour(quota_after=5)) as server:
        done = cli(prefect_server, "run", str(source), "-o", str(out), "--base-url", server.base_url)
    assert done.returncode == 2, done.stdout + done.stderr
    event = wait_for_event(prefect_server, out)
    assert event["event"] == "llm-enrich.run.failed"
    assert event["resource"]["llm-enrich.outcome"] == "failed"
    assert "quota" in event["payload"]["error"]
    assert not out.exists()


def test_a_deployment_run_emits_its_event_and_ends_with_a_one_line_message(
    prefect_server: str, served: Path, served_llm: FakeOpenAIServer
) -> None:
    out = served / "evented.parquet"
    run = trigger(prefect_server, {"input_path": str(DATA / "topics.csv"), "output_path": str(out)})
    assert run.state.is_completed(), run.state.message
    assert run.state.message.startswith(f"wrote {out}: 30 rows ok")
    event = wait_for_event(prefect_server, out)
    assert event["event"] == "llm-enrich.run.completed"
    assert event["resource"]["llm-enrich.outcome"] == "ok"
    related = {(r["prefect.resource.role"], r["prefect.resource.id"]) for r in event["related"]}
    assert ("flow-run", f"prefect.flow-run.{run.id}") in related
    assert any(role == "deployment" for role, _ in related)
    assert pl.read_parquet(out)["explanation"][0] == expected_answer("Explain this topic in two sentences: 인공지능")


def test_the_api_key_comes_from_a_secret_block_and_goes_nowhere_else(prefect_server: str, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    key = "sk-from-the-block-0123456789"
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        Secret(value=key).save("llm-enrich-test-key", overwrite=True)
    source, out, summary = tmp_path / "in.csv", tmp_path / "out.parquet", tmp_path / "summary.json"
    pl.DataFrame({"id": [1, 2], "topic": ["tea", "coffee"]}).write_csv(source)
    with FakeOpenAIServer(Behaviour(require_key=key)) as server:
        args = ["run", str(source), "-o", str(out), "--base-url", server.base_url, "--summary-json", str(summary)]
        # An environment key that would be refused proves the block's key is the one sent.
        done = cli(prefect_server, *args, "--api-key-block", "llm-enrich-test-key", env={"OPENAI_API_KEY": "sk-wrong"})
        assert done.returncode == 0, done.stdout + done.stderr
        assert server.stats.auth_headers == {f"Bearer {key}"}
        assert pl.read_parquet(out)["explanation"].to_list() == [
            expected_answer(f"Explain this topic in two sentences: {t}") for t in ("tea", "coffee")
        ]

        missing = cli(prefect_server, *args[:3], str(tmp_path / "never.parquet"), "--base-url", server.base_url,
                      "--api-key-block", "no-such-block")  # fmt: skip
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "'no-such-block'" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "never.parquet").exists()
    footer = str(pl.read_parquet_metadata(out))
    for text in (done.stdout, done.stderr, summary.read_text(), footer):
        assert key not in text


def test_two_runs_of_the_deployment_triggered_together_take_turns(
    prefect_server: str, served: Path, served_llm: FakeOpenAIServer
) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tests.prefect_server import DEPLOYMENT, api

    outs = [served / "turn-a.parquet", served / "turn-b.parquet"]
    with api(prefect_server) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        ids = [
            client.create_flow_run_from_deployment(
                deployment.id, parameters={"job": {"input_path": str(DATA / "topics.csv"), "output_path": str(out)}}
            ).id
            for out in outs
        ]

        def finished() -> list[Any] | None:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            return runs if len(runs) == 2 and all(r.state.is_final() for r in runs) else None

        runs = wait_for(finished, timeout=240, interval=1, what="both runs")
        assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
        first, second = sorted(runs, key=lambda r: r.start_time)
        # The deployment's limit of 1 made the later one wait until the first had ended.
        assert second.start_time >= first.end_time
        waited = [s.name for s in client.read_flow_run_states(second.id)]
        assert "AwaitingConcurrencySlot" in waited, waited
    assert all(pl.read_parquet(out).height == 30 for out in outs)


def test_the_readme_automation_is_accepted_by_the_server(prefect_server: str) -> None:
    import textwrap
    import uuid

    import yaml
    from prefect.events.schemas.automations import AutomationCore

    from tests.prefect_server import api

    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n( *name: llm-enrich failures\n.*?) *```", readme, re.DOTALL)
    assert block is not None
    text = textwrap.dedent(block.group(1)).replace("<id of the ops-email block>", str(uuid.uuid4()))
    data = yaml.safe_load(text)
    automation = AutomationCore.model_validate(data)
    assert automation.trigger.match.model_dump()["llm-enrich.outcome"] == ["with-failures", "failed"]
    with api(prefect_server) as client:
        created = client.create_automation(automation)
        assert client.read_automation(created).name == "llm-enrich failures"


_NOISE = ("telemetry", "anonymous", "temporary server", "dedicated Prefect server", "prefect.io/docs")


def on_a_terminal(command: list[str], env: dict[str, str], typed: bytes = b"") -> tuple[int, str]:
    """Run a command on a pseudo-terminal (with `typed` as the keys pressed); its exit code and what it showed."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    if typed:
        os.write(leader, typed)
    shown = bytearray()
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the last holder of the terminal closed it
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    # Colours and cursor moves out, so a test reads the words.
    return process.wait(timeout=60), re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))


def test_a_default_cli_run_prints_no_prefect_noise_on_a_terminal_or_off_one(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    # No PREFECT_API_URL: the CLI starts (and stops) its own temporary server, which must stay silent.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_", "DO_NOT_TRACK"))},
        "PREFECT_HOME": str(tmp_path / "home"),
        "COLUMNS": "200",
    }
    base = [
        sys.executable,
        "-m",
        "llm_enrich.flows.cli",
        "run",
        str(DATA / "topics.csv"),
        "--base-url",
        fake_llm.base_url,
    ]
    code, shown = on_a_terminal([*base, "-o", str(tmp_path / "tty.parquet")], env)
    assert code == 0, shown
    assert "Enriched 30 of 30 rows" in shown
    assert not [word for word in (*_NOISE, "INFO") if word in shown], shown
    piped = subprocess.run(
        [*base, "-o", str(tmp_path / "piped.parquet")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert piped.returncode == 0, piped.stderr
    combined = piped.stdout + piped.stderr
    assert not [word for word in _NOISE if word in combined], combined
    # Off a terminal the run's own log lines stay, for cron mail and log files.
    assert "loaded 30 rows from" in combined and "Enriched 30 of 30 rows" in piped.stdout
    code, verbose = on_a_terminal([*base, "-o", str(tmp_path / "verbose.parquet"), "--verbose"], env)
    assert code == 0 and "loaded 30 rows from" in verbose


def test_an_expensive_cli_run_asks_first_and_sends_nothing_unless_approved(
    fake_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))},
        "PREFECT_HOME": str(tmp_path / "home"),
        "COLUMNS": "200",
    }
    out = tmp_path / "out.parquet"
    command = [
        sys.executable, "-m", "llm_enrich.flows.cli", "run", str(DATA / "topics.csv"), "-o", str(out),
        "--base-url", fake_llm.base_url, "--approve-above", "0",
    ]  # fmt: skip
    # Off a terminal nobody can answer: exit 2 with the figures, nothing sent.
    piped = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 2, piped.stderr
    assert "needs approval" in piped.stderr and "30 distinct prompts" in piped.stderr and "--yes" in piped.stderr
    assert fake_llm.stats.requests == 0 and not out.exists()
    # On a terminal, "n" sends nothing; "y" runs.
    code, shown = on_a_terminal(command, env, typed=b"n\n")
    assert code == 1 and "not approved" in shown, shown
    assert fake_llm.stats.requests == 0 and not out.exists()
    code, shown = on_a_terminal(command, env, typed=b"y\n")
    assert code == 0 and "Enriched 30 of 30 rows" in shown, shown
    assert fake_llm.stats.requests == 30
    # --yes approves in advance; a threshold above the ceiling asks nobody.
    for extra in (["--yes"], ["--approve-above", "1000"]):
        again = subprocess.run(
            [*command, *extra, "--refresh-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0, again.stderr


def _paused_run(prefect_server: str, job: dict[str, Any]) -> Any:
    """Start a deployment run that needs approval; the run once it is paused for it."""
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.input import keyset_from_paused_state

    from tests.prefect_server import DEPLOYMENT, api

    with api(prefect_server) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"job": job})

        def paused() -> Any:
            found = client.read_flow_run(run.id)
            assert not found.state.is_final(), found.state
            if not found.state.is_paused():
                return None
            # Prefect sets Paused first and saves the form's schema after it; a resume in between is refused.
            try:
                client.read_flow_run_input(run.id, key=keyset_from_paused_state(found.state)["schema"])
            except (ObjectNotFound, PrefectHTTPStatusError):  # 404 until it is saved
                return None
            return found

        return wait_for(paused, timeout=120, interval=0.5, what="the run to pause for approval")


def _final(prefect_server: str, run_id: Any) -> Any:
    from tests.prefect_server import api

    with api(prefect_server) as client:
        return wait_for(
            lambda: (r := client.read_flow_run(run_id)).state.is_final() and r,
            timeout=120,
            interval=0.5,
            what="the end",
        )


def test_a_deployment_run_above_the_threshold_pauses_until_a_person_approves(
    prefect_server: str, served: Path, served_llm: FakeOpenAIServer
) -> None:
    from tests.prefect_server import api

    served_llm.reset()
    rejected_out, approved_out = served / "rejected.parquet", served / "approved.parquet"
    base = {"input_path": str(DATA / "topics.csv"), "approve_above_usd": 0.0, "cache": False}
    run = _paused_run(prefect_server, {**base, "output_path": str(rejected_out)})
    with api(prefect_server) as client:
        resumed = client.resume_flow_run(run.id, run_input={"approve": False, "reason": "too dear for a test"})
        assert resumed.status.value == "ACCEPT", resumed
    ended = _final(prefect_server, run.id)
    assert ended.state.is_cancelled(), ended.state
    assert "too dear for a test" in ended.state.message and "nothing was sent" in ended.state.message
    assert served_llm.stats.requests == 0 and not rejected_out.exists()
    assert wait_for_event(prefect_server, rejected_out)["resource"]["llm-enrich.outcome"] == "cancelled"

    run = _paused_run(prefect_server, {**base, "output_path": str(approved_out)})
    assert served_llm.stats.requests == 0
    with api(prefect_server) as client:
        resumed = client.resume_flow_run(run.id, run_input={"approve": True, "reason": ""})
        assert resumed.status.value == "ACCEPT", resumed
    ended = _final(prefect_server, run.id)
    assert ended.state.is_completed(), ended.state
    assert served_llm.stats.requests == 30 and pl.read_parquet(approved_out).height == 30


def test_a_cancel_from_the_ui_stops_a_run_waiting_for_approval_at_once(
    prefect_server: str, served: Path, served_llm: FakeOpenAIServer
) -> None:
    from prefect.states import Cancelling

    from tests.prefect_server import api

    served_llm.reset()
    out = served / "cancelled-while-paused.parquet"
    job = {"input_path": str(DATA / "topics.csv"), "output_path": str(out), "approve_above_usd": 0.0, "cache": False}
    run = _paused_run(prefect_server, job)
    with api(prefect_server) as client:
        client.set_flow_run_state(run.id, Cancelling(), force=True)
    ended = _final(prefect_server, run.id)
    assert ended.state.is_cancelled(), ended.state
    # The run's own handler ended the wait (the runner's SIGKILL would come 30 s later and say nothing).
    with api(prefect_server) as client:
        messages = [s.message or "" for s in client.read_flow_run_states(run.id)]
    assert any("interrupted by SIGTERM" in m for m in messages), messages
    assert served_llm.stats.requests == 0 and not out.exists()


def test_cancel_new_drops_a_run_that_overlaps_the_one_running(
    prefect_server: str, served_llm: FakeOpenAIServer, tmp_path: Path
) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from llm_enrich.flows.children import stop_process_group
    from tests.prefect_server import api

    config = tmp_path / "job.toml"
    config.write_text(f'input_path = "{DATA / "topics.csv"}"\noutput_path = "{tmp_path / "default.parquet"}"\n')
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))},
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OPENAI_BASE_URL": served_llm.base_url,
    }
    command = [
        sys.executable, "-m", "llm_enrich.flows.cli", "serve", "--config", str(config), "--cron", "",
        "--name", "overlap", "--on-overlap", "cancel-new",
    ]  # fmt: skip
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            with api(prefect_server) as client:
                deployment = wait_for(
                    lambda: _deployment_or_none(client, "enrich-table/overlap"), timeout=120, what="the deployment"
                )
                # The first run's replies take 30 s (it holds the deployment's one slot); the second overlaps it.
                pl.DataFrame({"id": [1, 2], "topic": ["tea", "coffee"]}).write_csv(tmp_path / "two.csv")
                slow = {"input_path": str(tmp_path / "two.csv"), "output_path": str(tmp_path / "first.parquet"),
                        "prompt": "FAULT:slow {topic}", "cache": False}  # fmt: skip
                first = client.create_flow_run_from_deployment(deployment.id, parameters={"job": slow})
                wait_for(lambda: client.read_flow_run(first.id).state.is_running(), timeout=120, what="the first run")
                second_job = {"input_path": str(DATA / "topics.csv"), "output_path": str(tmp_path / "second.parquet")}
                second = client.create_flow_run_from_deployment(deployment.id, parameters={"job": second_job})

                def ended() -> Any:
                    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[second.id])))
                    return runs[0] if runs and runs[0].state.is_final() else None

                dropped = wait_for(ended, timeout=120, interval=1, what="the overlapping run to end")
                assert dropped.state.is_cancelled(), dropped.state
                assert not (tmp_path / "second.parquet").exists()
                done = wait_for(
                    lambda: (r := client.read_flow_run(first.id)).state.is_final() and r, timeout=120, what="the first"
                )
                assert done.state.is_completed(), done.state
        finally:
            stop_process_group(server)


def _deployment_or_none(client: Any, name: str) -> Any:
    try:
        return client.read_deployment_by_name(name)
    except Exception:  # noqa: BLE001 - not registered yet
        return None
