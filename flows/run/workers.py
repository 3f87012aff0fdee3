"""Partition runtimes on Dask workers: rebuilt once per worker process from the job, not shipped."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from llm_enrich.flows.cache.files import default_cache_dir, open_cache
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm.endpoint import Endpoint, resolve_endpoint
from llm_enrich.flows.plan.lanes import build_context, resolve_price, share_limits
from llm_enrich.flows.plan.specs import build_spec
from llm_enrich.flows.run.runtime import EventLoopThread, Lane, Runtime, build_lane, lookup_runtime
from llm_enrich.flows.tables.schema_choice import resolve_schema
from llm_enrich.transforms.outcome import StatsCounts
from llm_enrich.transforms.prompts import parse_template

__all__ = ["counts_of", "runtime_for"]

_BUILT: OrderedDict[str, Runtime] = OrderedDict()
_LOCK = threading.Lock()
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
            while len(_BUILT) > _KEEP:
                _BUILT.popitem(last=False)[1].loop.close()
        return _BUILT[key], True


def counts_of(runtime: Runtime) -> list[StatsCounts]:
    """Each lane's counters, to be added up by the flow."""
    return [lane.ctx.stats.snapshot() for lane in runtime.lanes]


def _worker_share(job: EnrichJob, workers: int) -> EnrichJob:
    """Each of N workers holds 1/N of the run's --rpm/--tpm, so together they stay under it."""
    if workers <= 1:
        return job
    share = {name: max(1, value // workers) for name in ("rpm", "tpm") if (value := getattr(job, name))}
    return job.model_copy(update=share)


def _build(job: EnrichJob, *, local: bool, served_url: str | None, columns: Sequence[str], workers: int = 1) -> Runtime:
    # The key is read from this worker's environment; the identity (answer keys) must match the flow's.
    found = resolve_endpoint(job)
    endpoint = Endpoint(base_url=found.base_url, api_key=found.api_key, local=local)
    secret = endpoint.secret
    cache = open_cache(job.cache_dir or default_cache_dir(job.destination), job.storage()) if job.cache else None
    loop = EventLoopThread()
    lanes: list[Lane] = []
    for single in job.output_jobs():
        spec = build_spec(single, endpoint)
        price = resolve_price(single, spec.identity.model, local=local)
        # The server's rate-limit headers describe the whole budget: each worker takes its share.
        ctx = build_context(single, price, max_concurrency=spec.max_concurrency, secret=secret, shared_by=workers)
        if lanes:
            share_limits(ctx, lanes[0].ctx)
        lane, _ = build_lane(single, spec, ctx, endpoint, base_url=served_url or endpoint.base_url, cache=cache)
        lanes.append(lane)
    # The input's columns come from the flow, so 'auto' chooses as the flow did without reading the input here.
    schema = resolve_schema(job.input_schema, parse_template(job.prompt), columns)
    return Runtime(lanes=lanes, loop=loop, secret=secret, cache=cache, schema=schema)
