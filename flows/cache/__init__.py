"""The response cache: answers already paid for, on local disk or in a bucket.

``files`` appends to local segment files, ``objects`` writes immutable Parquet segments to object
storage, and ``reading`` is the one place a segment is read back, record by record, so damage
costs only what is damaged (``enrich cache verify``). ``files`` and ``objects`` both import
``reading``; ``reading`` imports neither at module level.
May import: ``schemas``, ``transforms``, ``flows.tables.paths``.
"""
