"""The response cache: answers already paid for, on local disk or in a bucket.

``files`` appends to local segment files, ``objects`` writes immutable Parquet segments to object
storage, and ``reading`` is the one place a segment is read back, record by record, so damage
costs only what is damaged; ``verification`` checks and repairs a whole cache (``enrich cache
verify``). Imports go ``reading`` <- ``files``, ``objects`` <- ``verification``, with no cycle.
May import: ``schemas``, ``transforms``, ``flows.tables.paths``.
"""
