"""The orchestration layer (installed as ``llm_enrich.flows``): Prefect flow and tasks, files, CLI.

One subpackage per stage, each saying in its own docstring what it owns and may import::

    job.py        EnrichJob, the flow's one parameter      children.py  child processes we start
    tables/       paths, reading, validation, staging, writing, the destination and its lock
    cache/        answers already paid for: files, objects, and ``reading`` (the one reader)
    llm/          the endpoint, ChatOpenAI, the one openai error seam, the bundled model
    report/       summary, artifacts, progress, the Prefect API a run reports to
    plan/         everything settled before the first request (specs, lanes, known answers, survey)
    run/          partition tasks, the per-run runtime, where a row's answer is written, Dask, stopping
    pipeline.py   the ``@flow``: only wires the stages
    frames.py     enrich_frame / enrich_task for code that is not the CLI
    deployment.py scheduled deployments       cli/  the `enrich` command over the flow

Layers import downwards only: ``tables``, ``cache``, ``llm``, ``report`` <- ``plan`` <- ``run`` <-
``pipeline`` <- ``cli``; all of them may import ``llm_enrich.transforms`` and ``llm_enrich.schemas``,
never the reverse (``tests/test_layout.py`` checks it).
"""
