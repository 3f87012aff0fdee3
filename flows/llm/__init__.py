"""The LLM endpoint: credentials read once, the chat model built, openai errors translated.

``endpoint`` resolves where requests go and builds ``ChatOpenAI`` from what it uses (model,
base URL, key, timeout), and holds the one seam where openai/httpx errors become ours.
``local_model`` serves the bundled model on loopback when no key is configured.
May import: ``schemas``, ``transforms``, ``flows.job``, ``flows.children``.
"""
