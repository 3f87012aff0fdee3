"""The plan stage before any request: specs and column names, prices, call contexts, known answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pydantic import SecretStr

from llm_enrich.flows.cache.files import ResponseCache
from llm_enrich.flows.job import EnrichJob, make_job
from llm_enrich.flows.llm.endpoint import Endpoint
from llm_enrich.flows.llm.local_model import LOCAL_MODEL_NAME
from llm_enrich.flows.plan.known_answers import LaneColumns, Tally, build_known, load_previous, plan_slice
from llm_enrich.flows.plan.lanes import CallSettings, build_context, plan_outputs, resolve_price
from llm_enrich.flows.plan.specs import build_spec, output_columns, planned_columns
from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TRUNCATED_COLUMN,
    bookkeeping_names,
)
from llm_enrich.schemas.errors import ConfigError
from llm_enrich.transforms.costs import DEFAULT_PRICES, Budget, Price
from llm_enrich.transforms.keys import answer_key
from llm_enrich.transforms.outcome import Outcome

REMOTE = Endpoint(base_url="http://127.0.0.1:9/v1", api_key=None, local=False)
OPENAI = Endpoint(base_url=None, api_key=SecretStr("sk-test-not-a-key"), local=False)
BUNDLED = Endpoint(base_url=None, api_key=None, local=True)
COLUMNS = ["id", "topic"]


def job_in(tmp_path: Path, **overrides: Any) -> EnrichJob:
    """A job over tmp_path/in.parquet writing tmp_path/out.parquet, its cache in tmp_path/cache."""
    values: dict[str, Any] = {
        "input_path": str(tmp_path / "in.parquet"),
        "output_path": str(tmp_path / "out.parquet"),
        "prompt": "Explain {topic}",
        "cache_dir": str(tmp_path / "cache"),
        "model": "gpt-4o-mini",
    }
    return make_job({**values, **overrides})


def key_of(job: EnrichJob, prompt: str, endpoint: Endpoint = REMOTE) -> str:
    """The answer key a run of ``job`` gives ``prompt`` (as the real spec computes it)."""
    spec = build_spec(job, endpoint)
    key: str = answer_key(spec.identity, spec.system, prompt)
    return key


def write_output(path: Path, rows: list[tuple[str | None, str | None, str | None]], **columns: str) -> None:
    """An older run's output (no truncation flag, no cached tokens): (key, answer, error) per row, 10 / 20 tokens."""
    names = {c: columns.get(c, c) for c in (KEY_COLUMN, ERROR_COLUMN, INPUT_TOKENS_COLUMN, OUTPUT_TOKENS_COLUMN)}
    answer = columns.get("answer", "explanation")
    frame = pl.DataFrame(
        {
            "id": list(range(len(rows))),
            answer: [text for _, text, _ in rows],
            names[ERROR_COLUMN]: [error for *_, error in rows],
            names[INPUT_TOKENS_COLUMN]: [10] * len(rows),
            names[OUTPUT_TOKENS_COLUMN]: [20] * len(rows),
            names[KEY_COLUMN]: [key for key, *_ in rows],
        },
        schema_overrides={answer: pl.String, names[ERROR_COLUMN]: pl.String, names[KEY_COLUMN]: pl.String},
    )
    frame.write_parquet(path)


# -- outputs: one lane each, sharing the limits ------------------------------------------------------------------


def test_two_outputs_share_one_scheduler_and_budget_but_keep_their_own_counters(tmp_path: Path) -> None:
    job = job_in(
        tmp_path,
        max_cost=2.5,
        extra_outputs=[{"prompt": "Summarise {topic}", "output_column": "summary", "model": "gpt-4o"}],
    )
    runs, cache = plan_outputs(job, COLUMNS, REMOTE)
    primary, extra = runs
    assert cache is not None
    assert extra.ctx.scheduler is primary.ctx.scheduler and primary.ctx.scheduler is not None
    assert extra.ctx.budget is primary.ctx.budget and isinstance(primary.ctx.budget, Budget)
    assert primary.ctx.budget.limit_usd == 2.5
    assert extra.ctx.stop is primary.ctx.stop and extra.ctx.errors is primary.ctx.errors
    assert extra.ctx.reachability is primary.ctx.reachability
    # Counters, prices and tallies are each output's own.
    assert extra.ctx.stats is not primary.ctx.stats and extra.tally is not primary.tally
    primary.ctx.stats.add(requests=1, tokens=(100, 50))
    assert (extra.ctx.stats.requests, extra.ctx.stats.input_tokens) == (0, 0)
    assert primary.price == DEFAULT_PRICES["gpt-4o-mini"] and extra.price == DEFAULT_PRICES["gpt-4o"]
    assert extra.spec.identity.model == "gpt-4o" and extra.spec.template.fields == ("topic",)
    # The primary output keeps the plain bookkeeping names; the extra one's carry its column name.
    assert primary.names[ERROR_COLUMN] == "enrich_error" and extra.names[ERROR_COLUMN] == "enrich_error_summary"
    assert primary.lane == LaneColumns.of(0) and extra.lane == LaneColumns.of(1)
    assert not set(primary.lane.staged) & set(extra.lane.staged)


def test_a_column_collision_is_refused_naming_the_column(tmp_path: Path) -> None:
    extra = {"prompt": "Summarise {topic}", "output_column": "topic"}
    with pytest.raises(ConfigError, match="output 'topic' would overwrite another column"):
        plan_outputs(job_in(tmp_path, extra_outputs=[extra]), COLUMNS, REMOTE)
    with pytest.raises(ConfigError, match=r"`output_schema` field 'topic'.*output_prefix"):
        plan_outputs(job_in(tmp_path, output_schema="topic:str"), COLUMNS, REMOTE)
    # An extra output named like one of the primary's typed fields.
    typed = job_in(
        tmp_path,
        output_schema="summary:str, level:int[1..5]",
        extra_outputs=[{"prompt": "Summarise {topic}", "output_column": "summary"}],
    )
    with pytest.raises(ConfigError, match="output 'summary' would overwrite another column"):
        plan_outputs(typed, COLUMNS, REMOTE)
    # The same fields under a prefix clash with nothing.
    runs, _ = plan_outputs(typed.model_copy(update={"output_prefix": "ai_"}), COLUMNS, REMOTE)
    assert [run.job.output_column for run in runs] == ["explanation", "summary"]
    assert runs[0].spec.structured is not None and runs[0].spec.structured.prefix == "ai_"


# -- prices -----------------------------------------------------------------------------------------------------


def price_of(tmp_path: Path, endpoint: Endpoint = REMOTE, **overrides: Any) -> Price | None:
    """The price plan_outputs settles on for the job's primary output."""
    runs, _ = plan_outputs(job_in(tmp_path, cache=False, **overrides), COLUMNS, endpoint)
    return runs[0].price


def test_batch_mode_and_flex_halve_the_shipped_price(tmp_path: Path) -> None:
    listed = DEFAULT_PRICES["gpt-4o-mini"]
    half = Price(listed.input_per_million / 2, listed.output_per_million / 2, 0.0375)
    assert price_of(tmp_path) == price_of(tmp_path, service_tier="default") == listed
    assert price_of(tmp_path, mode="batch") == price_of(tmp_path, service_tier="flex") == half
    # A dated snapshot is priced as its family.
    assert price_of(tmp_path, mode="batch", model="gpt-4o-mini-2024-07-18") == half
    assert resolve_price(job_in(tmp_path), "gpt-4o-mini", local=False, discounted=True) == half


def test_a_price_given_in_the_job_is_never_discounted(tmp_path: Path) -> None:
    both = price_of(tmp_path, mode="batch", input_price=1.0, output_price=2.0)
    assert both == Price(1.0, 2.0)
    # Given a price, cached input is charged at it in full (an upper bound, as the README says).
    assert both is not None and both.cost(1_000_000, 0, cached_input_tokens=1_000_000) == pytest.approx(1.0)
    # Only the input price given: the output price is still the (halved) table's.
    assert price_of(tmp_path, service_tier="flex", input_price=1.0) == Price(1.0, 0.30)
    priced = job_in(tmp_path, input_price=1.0, output_price=2.0)
    assert resolve_price(priced, "gpt-4o", local=False, discounted=True) == Price(1.0, 2.0)


def test_the_bundled_local_model_is_free(tmp_path: Path) -> None:
    priced = job_in(tmp_path, input_price=5.0, output_price=5.0)
    assert resolve_price(priced, "gpt-4o", local=True, discounted=False) == Price(0.0, 0.0)
    runs, _ = plan_outputs(job_in(tmp_path, model=None, input_price=5.0), COLUMNS, BUNDLED)
    assert runs[0].price == Price(0.0, 0.0) and runs[0].spec.identity.model == LOCAL_MODEL_NAME


def test_an_unknown_model_has_no_price_or_cost_unless_the_job_gives_a_price(tmp_path: Path) -> None:
    assert price_of(tmp_path, model="my-own-model", output_price=3.0) == Price(0.0, 3.0)
    runs, _ = plan_outputs(job_in(tmp_path, model="my-own-model"), COLUMNS, REMOTE)
    run = runs[0]
    run.ctx.stats.add(requests=1, tokens=(10, 10))
    assert run.price is None and run.cost_usd is None
    run.reprice(Price(1.0, 1.0))  # what was spent before is unknown, so the total stays unknown
    assert run.cost_usd is None


# -- call context and cost --------------------------------------------------------------------------------------


def test_the_call_context_takes_retries_timeout_limits_and_budget_from_the_job(tmp_path: Path) -> None:
    job = job_in(
        tmp_path, max_retries=2, retry_base_delay=0.5, timeout=12.0, max_cost=3.0, max_error_rate=0.2,
        max_tokens=99, rpm=60, on_truncated="error", max_concurrency=7,
    )  # fmt: skip
    price = Price(1.0, 2.0)
    ctx = build_context(CallSettings.of(job), price, max_concurrency=5, shared_by=3)
    assert (ctx.policy.max_retries, ctx.policy.base_delay, ctx.policy.attempt_timeout) == (2, 0.5, 12.0)
    assert ctx.scheduler is not None
    assert (ctx.scheduler.max_concurrency, ctx.scheduler.shared_by, ctx.scheduler.max_tokens) == (5, 3, 99)
    assert ctx.budget is not None and ctx.budget.limit_usd == 3.0
    assert ctx.errors.limit == 0.2 and ctx.on_truncated == "error"
    assert ctx.price is price and ctx.max_tokens == 99
    # The flow's own contexts are built the same way, at the spec's concurrency.
    planned = plan_outputs(job, COLUMNS, REMOTE)[0][0].ctx
    assert (planned.policy.max_retries, planned.policy.attempt_timeout, planned.errors.limit) == (2, 12.0, 0.2)
    assert planned.scheduler is not None and planned.scheduler.max_concurrency == 7
    assert plan_outputs(job_in(tmp_path), COLUMNS, REMOTE)[0][0].ctx.budget is None
    # Flex replies get 15 minutes unless the job sets its own timeout.
    assert plan_outputs(job_in(tmp_path, service_tier="flex"), COLUMNS, REMOTE)[0][0].ctx.policy.attempt_timeout == 900
    flex_own = job_in(tmp_path, service_tier="flex", timeout=30.0)
    assert plan_outputs(flex_own, COLUMNS, REMOTE)[0][0].ctx.policy.attempt_timeout == 30.0


def test_the_call_context_redacts_the_api_key_from_failure_messages(tmp_path: Path) -> None:
    secret = "sk-very-secret-123"
    settings = CallSettings.of(job_in(tmp_path))
    ctx = build_context(settings, None, max_concurrency=1, secret=secret)
    failure = ctx.policy.classify(RuntimeError(f"server echoed Authorization: Bearer {secret}"))
    assert secret not in failure.message and "***" in failure.message
    plain = build_context(settings, None, max_concurrency=1)
    assert secret in plain.policy.classify(RuntimeError(f"echo {secret}")).message
    # plan_outputs hands the endpoint's key to every output's context.
    keyed = Endpoint(base_url="http://127.0.0.1:9/v1", api_key=SecretStr(secret), local=False)
    runs, _ = plan_outputs(job_in(tmp_path), COLUMNS, keyed)
    assert secret not in runs[0].ctx.policy.classify(RuntimeError(f"echo {secret}")).message


def test_cost_counts_cached_input_at_its_price_and_a_reprice_keeps_what_was_spent_before(tmp_path: Path) -> None:
    runs, _ = plan_outputs(job_in(tmp_path), COLUMNS, REMOTE)
    run = runs[0]
    assert run.cost_usd == 0.0
    # 1M input (400k of them from the prompt cache) and 1M output at 0.15 / 0.075 cached / 0.60.
    run.ctx.stats.add(requests=1, tokens=(1_000_000, 1_000_000))
    run.ctx.stats.bump(cached_input_tokens=400_000)
    assert run.cost_usd == pytest.approx(0.6 * 0.15 + 0.4 * 0.075 + 0.60)
    before = run.cost_usd
    cheaper = Price(0.0, 1.0)
    run.reprice(cheaper)
    assert run.ctx.price is cheaper and run.price is cheaper
    assert run.cost_usd == pytest.approx(before)
    run.ctx.stats.add(requests=1, tokens=(500_000, 2_000_000))
    assert run.cost_usd == pytest.approx(before + 2.0)


# -- known answers ----------------------------------------------------------------------------------------------


def test_load_previous_reads_one_row_per_answered_key_and_the_failed_keys(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    write_output(out, [("k1", "one", None), ("k1", "one", None), ("k2", None, "HTTP 500"), (None, None, "no key")])
    previous = load_previous(str(out), "explanation")
    assert previous is not None
    assert sorted(previous.get_column(KEY_COLUMN)) == ["k1", "k2"], "one row per key"
    rows = {row[KEY_COLUMN]: row for row in previous.iter_rows(named=True)}
    assert rows["k1"]["text"] == "one" and rows["k1"][ERROR_COLUMN] is None
    assert rows["k2"]["text"] is None and rows["k2"][ERROR_COLUMN] == "HTTP 500"
    # An output written before the truncation flag and cached-token column: whole answers, no cached tokens.
    assert rows["k1"][TRUNCATED_COLUMN] is False and rows["k1"][CACHED_TOKENS_COLUMN] == 0
    assert rows["k1"][INPUT_TOKENS_COLUMN] == 10 and rows["k1"][OUTPUT_TOKENS_COLUMN] == 20


def test_load_previous_finds_nothing_in_a_missing_foreign_or_unreadable_file(tmp_path: Path) -> None:
    assert load_previous(str(tmp_path / "absent.parquet"), "explanation") is None
    foreign = tmp_path / "foreign.parquet"
    pl.DataFrame({"id": [1], "explanation": ["theirs"]}).write_parquet(foreign)
    assert load_previous(str(foreign), "explanation") is None
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert load_previous(str(garbage), "explanation") is None


def test_load_previous_reads_an_extra_outputs_suffixed_columns_and_a_partitioned_dataset(tmp_path: Path) -> None:
    names = bookkeeping_names("summary", primary=False)
    dataset = tmp_path / "out"
    for part, key in (("a", "k1"), ("b", "k2")):
        (dataset / f"topic={part}").mkdir(parents=True)
        write_output(dataset / f"topic={part}" / "part-0.parquet", [(key, f"short {part}", None)], answer="summary",
                     **names)  # fmt: skip
    previous = load_previous(str(dataset), "summary", names)
    assert previous is not None
    assert sorted(previous.select(KEY_COLUMN, "text").iter_rows()) == [("k1", "short a"), ("k2", "short b")]
    # Under the primary's plain names the same files hold nothing of this output.
    assert load_previous(str(dataset), "summary") is None


def test_build_known_prefers_the_previous_output_and_keeps_failures_only_without_retry_failed() -> None:
    previous = pl.DataFrame(
        {
            KEY_COLUMN: ["same", "failed", "healed"],
            "text": ["from output", None, None],
            ERROR_COLUMN: [None, "HTTP 500", "HTTP 500"],
            INPUT_TOKENS_COLUMN: [1, 0, 0],
            OUTPUT_TOKENS_COLUMN: [2, 0, 0],
            TRUNCATED_COLUMN: [True, False, False],
            CACHED_TOKENS_COLUMN: [9, 0, 0],  # more than its input tokens: a damaged count
        }
    )
    cached = pl.DataFrame(
        {
            "key": ["same", "healed", "only cached"],
            "text": ["from cache", "answered later", "cached answer"],
            "input_tokens": [5, 6, 7],
            "output_tokens": [8, 9, 10],
        }
    )
    kept = {row["key"]: row for row in build_known(cached, previous, retry_failed=False).iter_rows(named=True)}
    assert set(kept) == {"same", "healed", "only cached", "failed"}
    assert kept["same"]["text"] == "from output" and kept["same"][TRUNCATED_COLUMN] is True
    assert kept["same"][CACHED_TOKENS_COLUMN] == 1, "cached tokens never exceed the input tokens"
    # A failure the cache has since answered is an answer, not a failure.
    assert kept["healed"]["text"] == "answered later" and kept["healed"][ERROR_COLUMN] is None
    assert kept["failed"]["text"] is None and kept["failed"][ERROR_COLUMN] == "HTTP 500"
    # Cache records written before cached_input_tokens existed read none.
    assert kept["only cached"][CACHED_TOKENS_COLUMN] == 0 and kept["only cached"][INPUT_TOKENS_COLUMN] == 7
    retried = build_known(cached, previous, retry_failed=True)
    assert "failed" not in retried.get_column("key").to_list() and retried.height == 3
    empty = build_known(None, None, retry_failed=False)
    assert empty.height == 0 and ERROR_COLUMN in empty.columns


def test_plan_uses_answers_from_the_previous_output_and_the_cache_and_retries_failures_on_request(
    tmp_path: Path,
) -> None:
    job = job_in(tmp_path, retry_failed=False)
    a, b, c = (key_of(job, f"Explain {t}") for t in "abc")
    write_output(tmp_path / "out.parquet", [(a, "A from output", None), (c, None, "HTTP 500")])
    cache = ResponseCache(str(tmp_path / "cache"))
    cache.append(b, Outcome(text="B from cache", input_tokens=3, output_tokens=4), model="gpt-4o-mini")
    cache.close()

    def known(**overrides: Any) -> dict[str, tuple[str | None, str | None]]:
        runs, _ = plan_outputs(job.model_copy(update=overrides), COLUMNS, REMOTE)
        return {k: (t, e) for k, t, e in runs[0].known.select("key", "text", ERROR_COLUMN).iter_rows()}

    assert known() == {a: ("A from output", None), b: ("B from cache", None), c: (None, "HTTP 500")}
    assert known(retry_failed=True) == {a: ("A from output", None), b: ("B from cache", None)}
    assert known(refresh_cache=True) == {}
    assert known(cache=False, retry_failed=True) == {a: ("A from output", None)}
    assert plan_outputs(job.model_copy(update={"cache": False}), COLUMNS, REMOTE)[1] is None


def test_plan_slice_asks_each_new_prompt_once_and_charges_tokens_on_a_keys_first_row_only() -> None:
    job = EnrichJob(prompt="Explain {topic}", output_path="unused.parquet", model="gpt-4o-mini")
    spec = build_spec(job, REMOTE)
    lane = LaneColumns.of(0)
    settled = answer_key(spec.identity, None, "Explain known")
    known = build_known(
        None,
        pl.DataFrame(
            {
                KEY_COLUMN: [settled], "text": ["answer"], ERROR_COLUMN: [None], INPUT_TOKENS_COLUMN: [1],
                OUTPUT_TOKENS_COLUMN: [1], TRUNCATED_COLUMN: [False], CACHED_TOKENS_COLUMN: [0],
            },
            schema_overrides={ERROR_COLUMN: pl.String},
        ),
        retry_failed=True,
    )  # fmt: skip
    tally = Tally()
    first = plan_slice(pl.DataFrame({"topic": ["x", "known", "x", "y"]}), spec, known, tally, lane)
    assert first.get_column(lane.ask).to_list() == [True, False, True, True]
    assert first.get_column(lane.owner).to_list() == [True, False, False, True]
    assert first.get_column(lane.charge).to_list() == [True, True, False, True]
    assert first.get_column(lane.text).to_list() == [None, "answer", None, None]
    assert first.get_column(lane.key)[1] == settled and lane.prompt not in first.columns
    # The next slice repeats "x" and "known": neither is charged or owned again; "z" is new.
    second = plan_slice(pl.DataFrame({"topic": ["known", "x", "z"]}), spec, known, tally, lane)
    assert second.get_column(lane.charge).to_list() == [False, False, True]
    assert second.get_column(lane.owner).to_list() == [False, False, True]
    assert (tally.rows_cached, tally.rows_to_ask, tally.rows_kept_failed) == (2, 5, 0)
    assert tally.unique_todo == 3 and sorted(tally.todo.values()) == ["Explain x", "Explain y", "Explain z"]


# -- specs and column names -------------------------------------------------------------------------------------


def test_the_bundled_model_gets_its_own_identity_and_at_most_two_requests_in_flight(tmp_path: Path) -> None:
    job = job_in(tmp_path, model=None, max_concurrency=32, temperature=0.3, max_tokens=64)
    local = build_spec(job, BUNDLED)
    assert local.identity.model == LOCAL_MODEL_NAME and local.identity.endpoint == "bundled"
    assert local.max_concurrency == 2
    remote = build_spec(job, REMOTE)
    assert remote.identity.model == "gpt-4o-mini" and remote.identity.endpoint == "http://127.0.0.1:9/v1"
    assert remote.max_concurrency == 32
    assert (remote.identity.temperature, remote.identity.max_tokens) == (0.3, 64)
    assert key_of(job, "Explain a", BUNDLED) != key_of(job, "Explain a", REMOTE)


def test_a_structured_answer_asks_by_json_schema_on_openai_by_function_call_elsewhere_and_changes_the_key(
    tmp_path: Path,
) -> None:
    typed = job_in(tmp_path, output_schema="summary:str, level:int[1..5]")
    on_openai, elsewhere = build_spec(typed, OPENAI), build_spec(typed, REMOTE)
    assert on_openai.structured is not None and on_openai.structured.method == "json_schema"
    assert elsewhere.structured is not None and elsewhere.structured.method == "function_calling"
    assert list(elsewhere.structured.model.model_fields) == ["summary", "level"]
    assert elsewhere.identity.output_schema == elsewhere.structured.fingerprint
    assert key_of(typed, "Explain a") != key_of(job_in(tmp_path), "Explain a")
    forced = build_spec(job_in(tmp_path, output_schema="summary:str", structured_method="json_mode"), OPENAI)
    assert forced.structured is not None and forced.structured.method == "json_mode"


def test_an_output_schema_comes_from_a_json_schema_file_and_a_bad_reference_names_itself(tmp_path: Path) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]})
    )
    spec = build_spec(job_in(tmp_path, output_schema=str(schema)), REMOTE)
    assert spec.structured is not None and list(spec.structured.model.model_fields) == ["label"]
    with pytest.raises(ConfigError, match=r"missing\.json"):
        build_spec(job_in(tmp_path, output_schema=str(tmp_path / "missing.json")), REMOTE)
    with pytest.raises(ConfigError, match="no_such_module_here:Answer"):
        build_spec(job_in(tmp_path, output_schema="no_such_module_here:Answer"), REMOTE)


def test_planned_and_output_columns_name_every_column_a_job_writes(tmp_path: Path) -> None:
    job = job_in(
        tmp_path,
        output_schema="label:str",
        output_prefix="ai_",
        extra_outputs=[{"prompt": "Summarise {topic}", "output_column": "summary"}],
    )
    planned = planned_columns(job)
    assert planned["explanation"] == "`output_column`"
    assert planned["summary"] == "the extra output's output_column"
    assert planned["ai_label"] == "`output_schema` field"
    assert planned["enrich_key"] == planned["enrich_key_summary"] == "the bookkeeping column"
    columns = output_columns(job)
    assert columns[:2] == ["explanation", "enrich_error"] and "summary" in columns
    assert "enrich_error_summary" in columns and "enrich_key_summary" in columns
    # Typed fields are not among the columns a rerun drops from its input.
    assert "ai_label" not in columns and set(columns) == set(planned) - {"ai_label"}
