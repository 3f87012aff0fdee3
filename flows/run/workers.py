"""Partition runtimes on Dask workers: rebuilt once per worker process from the job, not shipped."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from llm_enrich.flows.cache.files import default_cache_dir, open_cache
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm.endpoint import Endpoint, resolve_endpoint
from llm_enrich.flows.plan.lanes import plan_calls
from llm_enrich.flows.run.runtime import EventLoopThread, Runtime, build_lane, lookup_runtime
from llm_enrich.flows.tables.schema_choice import resolve_schema
from llm_enrich.transforms.outcome import StatsCounts
from llm_enrich.transforms.prompts import parse_template

__all__ = ["counts_of", "hold_runtime", "runtime_for"]

_BUILT: OrderedDict[str, Runtime] = OrderedDict()
_LOCK = threading.Lock()
_HELD: Counter[str] = Counter()  # tasks using each runtime now
_KEEP = 4  # runtimes of recent runs a long-lived worker keeps


def runtime_for(
    key: str, job: EnrichJob, *, local: bool, served_url: str | None, workers: int = 1, columns: Sequence[str] = ()
) -> tuple[Runtime, bool]:
    """The run's runtime in this process; (runtime, built_here). Built from the job on a worker."""
    try:
        return lookup_runtime(key), False
    except KeyError:
        pass
    with _LOCK:
        if key not in _BUILT:
            _BUILT[key] = _build(
                _worker_share(job, workers), local=local, served_url=served_url, columns=columns, workers=workers
            )
        _BUILT.move_to_end(key)
        # Least recently used first, and never a runtime a task holds: closing its loop would cancel its requests.
        for old in [k for k in _BUILT if k != key and not _HELD[k]][: max(0, len(_BUILT) - _KEEP)]:
            _BUILT.pop(old).loop.close()
        return _BUILT[key], True


@contextmanager
def hold_runtime(
    key: str, job: EnrichJob, *, local: bool, served_url: str | None, workers: int = 1, columns: Sequence[str] = ()
) -> Iterator[tuple[Runtime, bool]]:
    """``runtime_for`` for the length of a task: a runtime held by a task is never closed to make room."""
    with _LOCK:
        _HELD[key] += 1
    try:
        yield runtime_for(key, job, local=local, served_url=served_url, workers=workers, columns=columns)
    finally:
        with _LOCK:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]


def counts_of(runtime: Runtime) -> list[StatsCounts]:
    """Each lane's counters, to be added up by the flow."""
    return [lane.ctx.stats.snapshot() for lane in runtime.lanes]


def _worker_share(job: EnrichJob, workers: int) -> EnrichJob:
    """Each of N workers holds 1/N of the run's `rpm`, `tpm` and `max_cost`, so together they stay under them."""
    if workers <= 1:
        return job
    share: dict[str, float] = {
        name: max(1, value // workers) for name in ("rpm", "tpm") if (value := getattr(job, name))
    }
    if job.max_cost is not None:
        share["max_cost"] = job.max_cost / workers
    return job.model_copy(update=share)


def _build(job: EnrichJob, *, local: bool, served_url: str | None, columns: Sequence[str], workers: int = 1) -> Runtime:
    # The key is read from this worker's environment; the identity (answer keys) must match the flow's.
    found = resolve_endpoint(job)
    endpoint = Endpoint(base_url=found.base_url, api_key=found.api_key, local=local)
    cache = open_cache(job.cache_dir or default_cache_dir(job.destination), job.storage()) if job.cache else None
    loop = EventLoopThread()
    # The server's rate-limit headers describe the whole budget: each worker takes its share.
    lanes = [
        build_lane(call.job, call.spec, call.ctx, endpoint, base_url=served_url or endpoint.base_url, cache=cache)[0]
        for call in plan_calls(job, endpoint, shared_by=workers)
    ]
    # The input's columns come from the flow, so 'auto' chooses as the flow did without reading the input here.
    schema = resolve_schema(job.input_schema, parse_template(job.prompt), columns)
    return Runtime(lanes=lanes, loop=loop, secret=endpoint.secret, cache=cache, schema=schema)
