"""The orchestration layer (installed as ``llm_enrich.flows``): Prefect flow and tasks, files, CLI.

It wires loading, validation, the transforms and writing: ``pipeline`` holds the ``@flow``;
``destination`` / ``lock`` / ``lease`` guard the output; ``survey`` plans slices before any
request; ``partitions`` are the tasks; ``runtime`` builds the event loop, model and scheduler;
``cache`` and ``object_cache`` keep answers; ``writing`` publishes; ``cli`` is a thin layer over
the flow. It may import ``llm_enrich.transforms`` and ``llm_enrich.schemas``, never the reverse.
"""
