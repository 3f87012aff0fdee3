"""``python -m llm_enrich.flows.cli``: the same as the `enrich` command."""

from llm_enrich.flows.cli.app import app

app()
