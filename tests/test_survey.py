"""The survey, the first pass over the input: read, validate, plan and stage one slice at a time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from llm_enrich.flows.job import EnrichJob, make_job
from llm_enrich.flows.llm.endpoint import Endpoint
from llm_enrich.flows.plan.known_answers import ROW_INDEX
from llm_enrich.flows.plan.lanes import OutputRun, plan_outputs
from llm_enrich.flows.plan.specs import build_spec
from llm_enrich.flows.plan.survey import Slice, Survey, choose_input_schema, read_columns, survey_input
from llm_enrich.flows.plan.trial import TrialPick
from llm_enrich.flows.tables.staging import Staging
from llm_enrich.flows.tables.validation import REJECT_REASON
from llm_enrich.schemas.enriched import (
    CACHED_TOKENS_COLUMN,
    ERROR_COLUMN,
    INPUT_TOKENS_COLUMN,
    KEY_COLUMN,
    OUTPUT_TOKENS_COLUMN,
    TRUNCATED_COLUMN,
)
from llm_enrich.schemas.errors import ConfigError, RunInterrupted, TemplateError, ValidationFailed
from llm_enrich.transforms.keys import answer_key
from llm_enrich.transforms.prompts import parse_template

ENDPOINT = Endpoint(base_url="http://127.0.0.1:9/v1", api_key=None, local=False)


def write_topics(path: Path, topics: Sequence[str | None], ids: list[int] | None = None) -> Path:
    """A topics table (ids 1..n unless given), as CSV or Parquet by the file's suffix."""
    frame = pl.DataFrame(
        {"id": ids or list(range(1, len(topics) + 1)), "topic": topics}, schema_overrides={"topic": pl.String}
    )
    if path.suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    return path


def job_for(source: Path, **overrides: Any) -> EnrichJob:
    values: dict[str, Any] = {
        "input_path": str(source),
        "output_path": str(source.parent / "out.parquet"),
        "prompt": "Explain {topic}",
        "model": "gpt-4o-mini",
        "cache": False,
    }
    return make_job({**values, **overrides})


def survey(job: EnrichJob, staging: Staging | None, pick: TrialPick | None = None) -> tuple[Survey, list[OutputRun]]:
    """Plan the job's outputs and survey its input, as a run does."""
    template = parse_template(job.prompt)
    schema = choose_input_schema(job, template).schema
    runs, _ = plan_outputs(job, read_columns(job), ENDPOINT)
    return survey_input(job, schema, template, runs, staging, pick), runs


def write_earlier_output(job: EnrichJob, answers: dict[str, str | None]) -> None:
    """The primary output of an earlier run at the job's destination: topic -> answer (None: it failed)."""
    spec = build_spec(job, ENDPOINT)
    topics = list(answers)
    pl.DataFrame(
        {
            "id": list(range(1, len(topics) + 1)),
            "topic": topics,
            "explanation": list(answers.values()),
            ERROR_COLUMN: [None if text is not None else "HTTP 500" for text in answers.values()],
            TRUNCATED_COLUMN: [False] * len(topics),
            INPUT_TOKENS_COLUMN: [5] * len(topics),
            OUTPUT_TOKENS_COLUMN: [7] * len(topics),
            CACHED_TOKENS_COLUMN: [0] * len(topics),
            KEY_COLUMN: [answer_key(spec.identity, spec.system, f"Explain {t}") for t in topics],
        },
        schema_overrides={"explanation": pl.String, ERROR_COLUMN: pl.String},
    ).write_parquet(job.destination)


def staged(found: Survey) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(s.path) for s in found.slices])


def test_the_survey_counts_the_rows_and_stages_one_slice_per_partition_rows(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", [f"topic {i}" for i in range(10)])
    found, runs = survey(job_for(source, partition_rows=4), Staging(str(tmp_path / "staging")))
    assert (found.rows_in, found.rows_valid, found.rows_rejected, found.rows_to_ask) == (10, 10, 0, 10)
    assert found.input_columns == ["id", "topic"] and found.rejected == [] and found.report == ""
    assert [(s.number, s.rows, s.to_ask, s.owned) for s in found.slices] == [(0, 4, 4, 4), (1, 4, 4, 4), (2, 2, 2, 2)]
    assert [s.label for s in found.slices] == ["rows 1-4", "rows 5-8", "rows 9-10"]
    assert found.slices[2] == Slice(2, found.slices[2].path, rows=2, to_ask=2, owned=2, label="rows 9-10")
    assert all(Path(s.path).is_file() and s.path.startswith(str(tmp_path / "staging")) for s in found.slices)
    rows = staged(found)
    lane = runs[0].lane
    assert rows.get_column(ROW_INDEX).to_list() == list(range(10))
    assert rows.get_column("id").to_list() == list(range(1, 11))
    assert set(lane.staged) <= set(rows.columns) and lane.prompt not in rows.columns
    assert rows.get_column(lane.ask).all() and rows.get_column(lane.text).is_null().all()


def test_repeated_prompts_are_sent_once_owned_by_their_first_row_across_slices(tmp_path: Path) -> None:
    topics = ["a", "b", "a", "c", "b", "a", "d", "a"]
    source = write_topics(tmp_path / "in.parquet", topics)
    found, runs = survey(job_for(source, partition_rows=3), Staging(str(tmp_path / "staging")))
    tally = runs[0].tally
    assert found.rows_to_ask == tally.rows_to_ask == 8
    assert tally.unique_todo == 4 and sorted(tally.todo.values()) == [f"Explain {t}" for t in "abcd"]
    assert [s.owned for s in found.slices] == [2, 1, 1] and sum(s.to_ask for s in found.slices) == 8
    rows = staged(found)
    lane = runs[0].lane
    owners = rows.filter(pl.col(lane.owner)).get_column("topic").to_list()
    assert owners == ["a", "b", "c", "d"]
    assert rows.get_column(lane.charge).to_list() == rows.get_column(lane.owner).to_list()
    assert rows.get_column(lane.key).n_unique() == 4


def test_an_estimate_counts_the_same_and_stages_nothing(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", ["a", "b", "a"])
    found, runs = survey(job_for(source, partition_rows=2), None)
    assert (found.rows_in, found.rows_valid, found.rows_to_ask, found.slices) == (3, 3, 3, [])
    assert runs[0].tally.unique_todo == 2
    assert [p.name for p in tmp_path.iterdir()] == ["in.csv"]


def test_invalid_rows_refuse_the_run_with_a_report_naming_each_row(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", ["fine", "  ", "fine too", None, "ok"])
    with pytest.raises(ValidationFailed) as caught:
        survey(job_for(source, partition_rows=2), Staging(str(tmp_path / "staging")))
    assert caught.value.failing_rows == 2
    message = caught.value.message
    assert "2 of 5 rows fail the input schema 'TopicsInput'" in message
    assert "row 2: column 'topic' must not be blank" in message
    assert "row 4: column 'topic' must not be empty" in message
    assert "`on_invalid` = quarantine" in message


def test_quarantine_sets_invalid_rows_aside_with_their_reason_and_plans_the_rest(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", ["fine", "  ", "fine too", None, "ok"])
    job = job_for(source, partition_rows=2, on_invalid="quarantine")
    found, _ = survey(job, Staging(str(tmp_path / "staging")))
    assert (found.rows_in, found.rows_valid, found.rows_rejected, found.rows_to_ask) == (5, 3, 2, 3)
    assert "2 of 5 rows fail" in found.report and "row 2:" in found.report and "row 4:" in found.report
    assert staged(found).get_column("id").to_list() == [1, 3, 5]
    assert len(found.rejected) == 2  # one part per slice with rejected rows
    rejected = pl.concat([pl.read_parquet(path) for path in found.rejected])
    assert rejected.get_column("id").to_list() == [2, 4]
    reasons = rejected.get_column(REJECT_REASON).to_list()
    assert "not_blank" in reasons[0] and "not_nullable" in reasons[1]


def test_an_id_repeated_in_another_slice_rejects_both_rows(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", ["a", "b", "c", "d", "e"], ids=[1, 2, 3, 1, 5])
    found, _ = survey(job_for(source, partition_rows=2, on_invalid="quarantine"), Staging(str(tmp_path / "st")))
    assert (found.rows_valid, found.rows_rejected) == (3, 2)
    assert staged(found).get_column("topic").to_list() == ["b", "c", "e"]
    rejected = pl.concat([pl.read_parquet(path) for path in found.rejected])
    assert rejected.get_column("topic").to_list() == ["a", "d"]
    assert all("field_uniqueness" in reason for reason in rejected.get_column(REJECT_REASON))


def test_when_every_row_is_set_aside_one_empty_slice_still_carries_the_columns(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", [" ", None, "  "])
    found, runs = survey(job_for(source, partition_rows=2, on_invalid="quarantine"), Staging(str(tmp_path / "st")))
    assert (found.rows_valid, found.rows_rejected) == (0, 3)
    assert [(s.number, s.rows, s.to_ask) for s in found.slices] == [(0, 0, 0)]
    empty = pl.read_parquet(found.slices[0].path)
    assert empty.height == 0 and {"id", "topic", ROW_INDEX, *runs[0].lane.staged} <= set(empty.columns)


def test_rows_answered_by_an_earlier_output_are_not_asked_again(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", ["a", "b", "c", "d", "a"])
    job = job_for(source, partition_rows=2)
    write_earlier_output(job, {"a": "A", "b": "B", "c": None})
    found, runs = survey(job, Staging(str(tmp_path / "st")))
    tally = runs[0].tally
    assert (tally.rows_cached, tally.rows_to_ask, tally.rows_kept_failed) == (3, 2, 0)
    assert found.rows_to_ask == 2 and sorted(tally.todo.values()) == ["Explain c", "Explain d"]
    lane = runs[0].lane
    assert staged(found).get_column(lane.text).to_list() == ["A", "B", None, None, "A"]
    assert [s.to_ask for s in found.slices] == [0, 2, 0]
    # Without retry_failed the failed row is kept as it was.
    _, kept = survey(job.model_copy(update={"retry_failed": False}), None)
    assert (kept[0].tally.rows_kept_failed, kept[0].tally.rows_to_ask, kept[0].tally.unique_todo) == (1, 1, 1)


def test_each_output_plans_its_own_lane_and_a_row_is_to_ask_if_any_output_asks(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", ["a", "b", "a"])
    job = job_for(source, extra_outputs=[{"prompt": "Summarise {topic} in {id} words", "output_column": "summary"}])
    write_earlier_output(job, {"a": "A"})  # the primary output answered "a" before; the extra one is new
    found, (primary, extra) = survey(job, Staging(str(tmp_path / "st")))
    assert (primary.tally.rows_cached, primary.tally.rows_to_ask, primary.tally.unique_todo) == (2, 1, 1)
    assert (extra.tally.rows_cached, extra.tally.rows_to_ask, extra.tally.unique_todo) == (0, 3, 3)
    assert found.rows_to_ask == 3 and found.slices[0].to_ask == 3 and found.slices[0].owned == 3
    rows = staged(found)
    assert rows.get_column(primary.lane.ask).to_list() == [False, True, False]
    assert rows.get_column(primary.lane.text).to_list() == ["A", None, "A"]
    assert rows.get_column(extra.lane.owner).to_list() == [True, True, True]
    assert sorted(extra.tally.todo.values()) == [
        "Summarise a in 1 words",
        "Summarise a in 3 words",
        "Summarise b in 2 words",
    ]


def test_a_limit_trial_plans_only_the_first_valid_rows_and_leaves_invalid_ones_to_the_full_run(
    tmp_path: Path,
) -> None:
    source = write_topics(tmp_path / "in.csv", ["a", " ", "c", "d", "e", "f", "g", "h"])
    pick = TrialPick.of(job_for(source, limit=3))
    assert pick is not None and pick.ready
    found, runs = survey(job_for(source, limit=3, partition_rows=2), Staging(str(tmp_path / "st")), pick)
    assert (found.rows_in, found.rows_valid, found.rows_rejected) == (3, 3, 0)
    assert staged(found).get_column("id").to_list() == [1, 3, 4]
    assert runs[0].tally.unique_todo == 3 and found.report == ""


def test_a_sample_trial_learns_its_rows_in_a_first_pass_and_its_seed_repeats_them(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", [f"topic {i}" for i in range(40)])

    def sampled(seed: int, name: str) -> list[int]:
        job = job_for(source, sample=5, seed=seed, partition_rows=7)
        pick = TrialPick.of(job)
        assert pick is not None and not pick.ready
        first, _ = survey(job, None, pick)  # the full-table estimate: counts everything, picks the rows
        assert (first.rows_in, first.rows_valid) == (40, 40) and pick.ready
        trial, _ = survey(job, Staging(str(tmp_path / name)), pick)
        assert (trial.rows_in, trial.rows_valid, trial.rows_to_ask) == (5, 5, 5)
        return staged(trial).get_column("id").to_list()

    once, again, other = sampled(7, "one"), sampled(7, "two"), sampled(8, "three")
    assert once == again and once != other
    assert len(set(once)) == 5 and once != [1, 2, 3, 4, 5]


def test_an_in_place_run_needs_parquet_and_the_template_needs_its_columns(tmp_path: Path) -> None:
    csv = write_topics(tmp_path / "in.csv", ["a"])
    with pytest.raises(ConfigError, match="`in_place` = true rewrites the input"):
        survey(job_for(csv, in_place=True, output_path=None), None)
    missing = job_for(csv, prompt="Explain {subject}", input_schema="template")
    with pytest.raises(TemplateError, match="'subject'"):
        survey(missing, None)


def test_read_columns_drops_our_own_earlier_answer_columns_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    ours = tmp_path / "enriched.parquet"
    pl.DataFrame(
        {
            "id": [1], "topic": ["a"], "explanation": ["A"], ERROR_COLUMN: [None], TRUNCATED_COLUMN: [False],
            INPUT_TOKENS_COLUMN: [1], OUTPUT_TOKENS_COLUMN: [1], CACHED_TOKENS_COLUMN: [0], KEY_COLUMN: ["k"],
        },
        schema_overrides={ERROR_COLUMN: pl.String},
    ).write_parquet(ours)  # fmt: skip
    assert read_columns(job_for(ours)) == ["id", "topic"]
    found, _ = survey(job_for(ours), None)
    assert found.input_columns == ["id", "topic"] and found.rows_to_ask == 1
    foreign = tmp_path / "theirs.parquet"
    pl.DataFrame({"id": [1], "topic": ["a"], "explanation": ["their own notes"]}).write_parquet(foreign)
    with pytest.raises(ConfigError, match="`output_column` 'explanation' is already a column of the input"):
        read_columns(job_for(foreign))


def test_auto_schema_reads_only_column_names_and_an_explicit_one_reads_nothing(tmp_path: Path) -> None:
    template = parse_template("Explain {topic}")
    topics = write_topics(tmp_path / "in.csv", ["a"])
    assert choose_input_schema(job_for(topics), template).ref == "topics"
    notes = tmp_path / "notes.csv"
    pl.DataFrame({"topic": ["a"], "note": ["n"]}).write_csv(notes)
    choice = choose_input_schema(job_for(notes), template)
    assert choice.ref == "template" and list(choice.schema.columns) == ["topic"]
    absent = job_for(tmp_path / "not-written-yet.csv", input_schema="topics")
    assert choose_input_schema(absent, template).ref == "topics"


def test_a_stop_requested_before_the_survey_ends_it_before_anything_is_staged(tmp_path: Path) -> None:
    source = write_topics(tmp_path / "in.csv", ["a", "b"])
    job = job_for(source)
    template = parse_template(job.prompt)
    runs, _ = plan_outputs(job, read_columns(job), ENDPOINT)
    runs[0].ctx.stop.set("asked to stop")
    schema = choose_input_schema(job, template).schema
    with pytest.raises(RunInterrupted, match="asked to stop"):
        survey_input(job, schema, template, runs, Staging(str(tmp_path / "st")))
    assert not (tmp_path / "st").exists()
