"""What a run tells people: its summary, Prefect artifacts, live progress, the Prefect API.

``summary`` is the typed result a run returns, ``artifacts`` the tables and markdown shown in the
UI, ``progress`` the sink the CLI's bar listens to, ``orchestration`` the Prefect API a run
reports to (its own temporary server, bounded clients, best-effort records).
May import: ``schemas``, ``transforms``, ``flows.tables``, ``flows.children``.
"""
