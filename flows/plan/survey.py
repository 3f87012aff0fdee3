"""The first pass over the input, one slice at a time: validate, plan, and stage each slice.

Nothing here holds the whole table: a slice is read, checked against the schema, keyed and
matched against the answers already known, written to the staging area, and dropped. What
is kept grows with the number of distinct prompts (keys), never with the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandera.polars as pa
import polars as pl

from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.plan.known_answers import ROW_INDEX, plan_slice
from llm_enrich.flows.plan.lanes import OutputRun
from llm_enrich.flows.plan.specs import planned_columns
from llm_enrich.flows.plan.trial import TrialPick
from llm_enrich.flows.tables.provenance import check_column_clashes, read_provenance
from llm_enrich.flows.tables.reading import detect_format, format_of, iter_partitions, read_error, scan_table
from llm_enrich.flows.tables.schema_choice import AUTO, SchemaChoice, choose_schema
from llm_enrich.flows.tables.staging import Staging
from llm_enrich.flows.tables.validation import check_rows, failure_report, refusal, unique_columns
from llm_enrich.schemas.errors import ConfigError, ValidationFailed
from llm_enrich.transforms.prompts import PromptTemplate

__all__ = ["Slice", "Survey", "choose_input_schema", "read_columns", "survey_input"]

_REPORT_CASES = 20
_ROWS_PER_PASS = 2_000_000


@dataclass(frozen=True)
class Slice:
    """A partition task's whole input: where its staged rows are, and how many."""

    number: int
    path: str
    rows: int
    to_ask: int
    owned: int = 0
    label: str = "no rows"  # "rows 1-500" of the input file: the partition task's run name in the UI


@dataclass
class Survey:
    """What the first pass found: counts, the staged slices, rejected parts and the report."""

    input_columns: list[str]
    rows_in: int = 0
    rows_valid: int = 0
    rows_rejected: int = 0
    rows_to_ask: int = 0
    slices: list[Slice] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    report: str = ""


def survey_input(
    job: EnrichJob,
    schema: pa.DataFrameSchema,
    template: PromptTemplate,
    runs: list[OutputRun],
    staging: Staging | None,
    pick: TrialPick | None = None,
) -> Survey:
    """Validate and plan every slice; stage them unless ``staging`` is None (an estimate).

    With a ``pick`` that is ready, only the trial's rows are planned and staged (and counted);
    one that is not ready yet (a sample's first pass) only learns from the valid rows it sees.
    """
    trial = pick if pick is not None and pick.ready else None
    source = job.input_path
    if job.in_place and detect_format(source, job.input_format) != "parquet":
        raise ConfigError(
            f"`in_place` = true rewrites the input, which must then be Parquet; '{source}' is not. "
            "Pass `output_path` = PATH.parquet instead."
        )
    scan, columns = _scan_input(job)
    fmt = format_of(source, job.input_format)
    template.check_columns(columns, source=f"'{source}'")
    duplicates = _duplicates(scan, schema, columns, source, fmt)
    survey = Survey(input_columns=columns)
    quarantine = job.on_invalid == "quarantine"
    shown: list[pl.DataFrame] = []
    shown_rows = 0
    empty: pl.DataFrame | None = None
    valid_seen = 0
    for number, frame in enumerate(iter_partitions(scan, job.partition_rows, source=source, fmt=fmt)):
        for run in runs[:1]:
            run.ctx.stop.check()  # a signal during a long survey stops it between slices
        if trial is not None and trial.done(valid_seen):
            break  # a limit has its rows: the trial reads no further
        offset = survey.rows_in
        survey.rows_in += frame.height
        checked = check_rows(frame, schema, source=source, offset=offset, duplicates=duplicates)
        valid = checked.valid
        if pick is not None:
            if trial is None:
                pick.observe(valid_seen, valid.height)
            else:
                valid = valid.filter(trial.keep(valid_seen, valid.height))
            valid_seen += checked.valid.height
        if checked.failing and trial is not None:
            pass  # a trial leaves invalid rows to the full run (its first pass refused or counted them)
        elif checked.failing:
            survey.rows_rejected += checked.failing
            if shown_rows < _REPORT_CASES:
                shown.append(checked.cases.sort("index").head(_REPORT_CASES - shown_rows))
                shown_rows += shown[-1].height
            if not quarantine:
                continue  # the run is refused: keep counting, stop staging
            if staging is not None:
                path = staging.path("rejected", number)
                staging.write(checked.rejected, path)
                survey.rejected.append(path)
        if survey.rows_rejected and not quarantine:
            continue
        planned = valid.with_row_index(ROW_INDEX, offset=offset)
        for run in runs:
            planned = plan_slice(planned, run.spec, run.known, run.tally, run.lane)
        to_ask = int(planned.select(pl.any_horizontal(run.lane.ask for run in runs).sum()).item())
        owned = int(planned.select(pl.any_horizontal(run.lane.owner for run in runs).sum()).item())
        survey.rows_valid += planned.height
        survey.rows_to_ask += to_ask
        if not planned.height:
            empty = planned
            continue
        if staging is not None:
            path = staging.path("in", number)
            staging.write(planned, path)
            label = f"rows {offset + 1:,}-{offset + frame.height:,}"
            survey.slices.append(Slice(number, path, planned.height, to_ask, owned, label=label))
    if pick is not None and trial is None:
        pick.settle()
    if trial is not None:
        survey.rows_in = survey.rows_valid  # a trial's table is its picked rows
    if survey.rows_rejected:
        cases = pl.concat(shown)
        survey.report = failure_report(cases, survey.rows_in, survey.rows_rejected, source, schema.name)
        if not quarantine:
            raise ValidationFailed(refusal(survey.report), failing_rows=survey.rows_rejected)
    if staging is not None and not survey.slices and empty is not None:
        # Every row was set aside: one empty slice still gives the output its columns.
        path = staging.path("in", 0)
        staging.write(empty, path)
        survey.slices.append(Slice(0, path, 0, 0))
    return survey


def read_columns(job: EnrichJob) -> list[str]:
    """The input's columns (without answer columns of an earlier run), from its schema alone."""
    return _scan_input(job)[1]


def choose_input_schema(job: EnrichJob, template: PromptTemplate) -> SchemaChoice:
    """The job's input schema; only 'auto' reads the input, and only its column names."""
    return choose_schema(job.input_schema, template, read_columns(job) if job.input_schema == AUTO else None)


def _scan_input(job: EnrichJob) -> tuple[pl.LazyFrame, list[str]]:
    scan = scan_table(job.input_path, job.input_format, job.storage())
    try:
        columns = scan.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError, ValueError, RuntimeError) as exc:
        raise read_error(job.input_path, format_of(job.input_path, job.input_format), exc) from exc
    # A rerun over our own enriched file replaces the old answer columns rather than nesting
    # them; any other clash with an input column is refused.
    planned = planned_columns(job)
    provenance = None
    if any(c in planned for c in columns) and format_of(job.input_path, job.input_format) in ("parquet", "dataset"):
        provenance = read_provenance(job.input_path, job.storage())
    stale = check_column_clashes(job, columns, planned, provenance)
    if stale:
        scan, columns = scan.drop(stale), [c for c in columns if c not in stale]
    return scan, columns


def _duplicates(
    scan: pl.LazyFrame, schema: pa.DataFrameSchema, columns: list[str], source: str, fmt: str
) -> dict[str, pl.Series]:
    """Per unique column, the values that occur more than once anywhere in the table (streamed).

    A big table is checked in several passes, each over one hash bucket of the values, so the
    memory of a pass stays near that of _ROWS_PER_PASS distinct values whatever the table size.
    """
    names = [name for name in unique_columns(schema) if name in columns]
    if not names:
        return {}
    found = {}
    try:
        rows = scan.select(pl.len()).collect().item()
        passes = max(1, -(-rows // _ROWS_PER_PASS))
        for name in names:
            buckets = []
            for bucket in range(passes):
                values = scan.select(name)
                if passes > 1:
                    values = values.filter(pl.col(name).hash(seed=7) % passes == bucket)
                buckets.append(values.group_by(name).len().filter(pl.col("len") > 1).select(name).collect())
            repeated = pl.concat(buckets).get_column(name)
            if repeated.len():
                found[name] = repeated
    except (pl.exceptions.PolarsError, OSError, ValueError, RuntimeError) as exc:
        raise read_error(source, fmt, exc) from exc
    return found
