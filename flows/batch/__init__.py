"""Batch mode: the provider's Batch API instead of one online request per prompt.

Owns the batch manifest (what was uploaded and submitted, beside the output, so a rerun resumes
the same batches), the one seam to the ``openai`` Files and Batches API, and the orchestration:
split, submit, poll, collect, and put each answer into its lane's memo and the cache before the
normal partition pass runs (which then asks nothing online).

May import ``llm_enrich.flows`` job, ``tables``, ``cache``, ``llm``, ``report``, ``plan`` and
``run.runtime`` (the lanes), and ``transforms``/``schemas``; nothing imports it but ``pipeline.py``.
"""
