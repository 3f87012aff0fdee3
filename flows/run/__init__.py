"""Running the plan: partition tasks, their per-run machinery, Dask workers, stopping on request.

``runtime`` holds one run's event loop, model, scheduler and memo; ``partitions`` are the Prefect
tasks that ask the model for a slice and write its part file; ``assembly`` writes each row's
answer into its slice; ``workers`` rebuilds the runtime on a Dask worker; ``scaling`` chooses the
task runner; ``stopping`` turns signals into a clean stop.
May import: every part of ``flows`` except ``cli`` and ``pipeline``.
"""
