"""Everything settled before the first request: specs, known answers, the survey, the estimate.

``specs`` turns a job into output specs and column names, ``lanes`` plans one lane per output
(its call context, price, cache), ``known_answers`` finds what the cache or a previous output
already answers, ``survey`` validates, plans and stages the input one slice at a time, and
``estimate`` prices a run without calling the model.
May import: ``schemas``, ``transforms``, ``flows.job``, ``flows.tables``, ``flows.cache``, ``flows.llm``.
"""
