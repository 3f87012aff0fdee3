"""Tables on disk or in a bucket: paths, reading, validation, staging, writing, the destination.

Owns: where files are (``paths``), reading the input (``reading``, ``parse_errors``), which schema
checks it (``schema_choice``, ``validation``), the run's staging area, atomic writes (``writing``),
the destination's checks, provenance footer and the one-run-per-output lock or lease.
May import: ``schemas``, ``transforms``, ``flows.job``. Nothing else in ``flows``.
"""
