"""The `gemini_batch` connector against a second Batchery acting as the Gemini provider (its
Gemini Batch Mode API), driven through the `openai` and `anthropic` SDKs on our side and
checked with the `google-genai` SDK on the provider's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from openai import OpenAI

from tests.conftest import Server, start_provider_pair, start_server
from tests.helpers import Recorder, chat_file

genai = pytest.importorskip("google.genai")

PROVIDER_CONFIG = """
deployments:
  - name: echo
    backend: echo
    options: {latency_ms: 30}
"""
SECRET = "correct-horse-battery-staple"


def ours_config(provider: Server, credential: str = "api_key_env: PROVIDER_KEY") -> str:
    common = f'base_url: "{provider.base_url}", {credential}, model: echo'
    return f"""
deployments:
  - name: remote-gemini
    backend: gemini_batch
    options: {{{common}}}
  - name: remote-gemini-file
    backend: gemini_batch
    options: {{{common}, inline_max_bytes: 0}}
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, str]]:
    tmp = tmp_path_factory.mktemp("gemini")
    ours, provider, key = start_provider_pair(tmp, PROVIDER_CONFIG, ours_config)
    yield ours, provider, key
    ours.stop()
    provider.stop()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def openai_client(server: Server, recorder: Recorder) -> OpenAI:
    http = openai.DefaultHttpxClient(event_hooks={"response": [recorder.hook]})
    return OpenAI(base_url=server.v1, api_key="k", http_client=http, max_retries=0)


def provider_batch(provider: Server, key: str, name: str) -> Any:
    """The provider's own view of its batch, through its official SDK."""
    client = genai.Client(api_key=key, http_options={"base_url": provider.base_url + "/gemini"})
    try:
        return client.batches.get(name=name)
    finally:
        client.close()


def run(client: OpenAI, model: str, n: int) -> tuple[Any, str]:
    f = client.files.create(file=chat_file(n, model=model), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    return batch, f.id


def wait(client: OpenAI, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in (
            "completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.3)
    return batch


def lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    return [orjson.loads(x) for x in client.files.content(file_id).content.splitlines()]


def remote_job(batch: Any) -> dict[str, Any]:
    job: dict[str, Any] = (batch.model_extra or {})["remote_job"]
    return job


@pytest.mark.parametrize("model", ["remote-gemini", "remote-gemini-file"])
def test_a_chat_batch_is_run_by_the_gemini_provider(servers: tuple[Server, Server, str],
                                                    recorder: Recorder, model: str) -> None:
    ours, provider, key = servers
    with openai_client(ours, recorder) as client:
        batch, _ = run(client, model, 25)
        done = wait(client, batch.id)
        assert done.status == "completed", done.errors
        out, errors = lines(client, done.output_file_id), lines(client, done.error_file_id)
        client.batches.list()
    assert errors == []
    assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(25))
    by_id = {x["custom_id"]: x["response"] for x in out}
    assert by_id["req-7"]["status_code"] == 200
    body = by_id["req-7"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "hello number 7"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (25, 0)
    job = remote_job(done)
    assert job["name"].startswith("batches/")
    assert job["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    theirs = provider_batch(provider, key, job["name"])
    assert theirs.state.name == "JOB_STATE_SUCCEEDED"
    assert theirs.display_name == f"batchery {batch.id}"
    assert (theirs.dest.file_name is not None) == (model == "remote-gemini-file")
    recorder.assert_never_contains(key)


def test_cancel_is_forwarded_to_the_gemini_provider(servers: tuple[Server, Server, str],
                                                    recorder: Recorder) -> None:
    ours, provider, key = servers
    with openai_client(ours, recorder) as client:
        batch, _ = run(client, "remote-gemini", 400)
        deadline = time.monotonic() + 30
        while not (client.batches.retrieve(batch.id).model_extra or {}).get("remote_job"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(0.5)
        client.batches.cancel(batch.id)
        done = wait(client, batch.id)
        out, errors = lines(client, done.output_file_id), lines(client, done.error_file_id)
    assert done.status == "cancelled"
    job = remote_job(done)
    assert job["metadata"]["state"] == "BATCH_STATE_CANCELLED"
    ids = [x["custom_id"] for x in out + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(400))
    assert errors and {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    assert done.request_counts is not None and done.request_counts.completed == len(out)
    theirs = provider_batch(provider, key, job["name"])
    assert theirs.state.name == "JOB_STATE_CANCELLED"
    recorder.assert_never_contains(key)


def test_a_message_batch_is_run_by_the_gemini_provider(servers: tuple[Server, Server, str],
                                                       recorder: Recorder) -> None:
    ours, _provider, key = servers
    http = anthropic.DefaultHttpxClient(event_hooks={"response": [recorder.hook]})
    with anthropic.Anthropic(base_url=ours.base_url, api_key="k", http_client=http,
                             max_retries=0) as client:
        batch = client.messages.batches.create(requests=[
            {"custom_id": f"m{i}", "params": {"model": "remote-gemini", "max_tokens": 16,
                                              "system": "Be brief.",
                                              "messages": [{"role": "user",
                                                            "content": f"hi {i}"}]}}
            for i in range(12)])
        deadline = time.monotonic() + 60
        while (done := client.messages.batches.retrieve(batch.id)).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert set(results) == {f"m{i}" for i in range(12)}
    assert all(r.type == "succeeded" for r in results.values())
    first = results["m3"]
    assert first.type == "succeeded"
    assert [getattr(b, "text", None) for b in first.message.content] == ["hi 3"]
    assert done.request_counts.succeeded == 12
    assert remote_job(done)["name"].startswith("batches/")
    recorder.assert_never_contains(key)


def test_a_literal_key_is_sealed(tmp_path: Path, servers: tuple[Server, Server, str],
                                 recorder: Recorder) -> None:
    _ours, provider, key = servers
    config = tmp_path / "literal.yaml"
    config.write_text(ours_config(provider, credential=f"api_key: {key}"))
    with pytest.raises(RuntimeError, match="BATCHERY_SECRET_KEY"):
        start_server(tmp_path, "--config", str(config), name="nokey")
    ours = start_server(tmp_path, "--config", str(config), "--workers", "1",
                        env={"BATCHERY_SECRET_KEY": SECRET}, name="sealed")
    try:
        with openai_client(ours, recorder) as client:
            batch, _ = run(client, "remote-gemini", 3)
            assert wait(client, batch.id).status == "completed"
            client.models.list()
        for stored in ours.data_dir.glob("batchery.db*"):  # the database and its WAL
            assert key.encode() not in stored.read_bytes()
    finally:
        ours.stop()
    recorder.assert_never_contains(key)


def test_a_refused_key_fails_the_batch_with_the_cause(tmp_path: Path,
                                                      servers: tuple[Server, Server, str]
                                                      ) -> None:
    _ours, provider, _key = servers
    config = tmp_path / "wrong.yaml"
    config.write_text(ours_config(provider, credential="api_key_env: WRONG_KEY"))
    ours = start_server(tmp_path, "--config", str(config), "--workers", "1",
                        env={"WRONG_KEY": "not-a-key"}, name="wrong")
    try:
        with OpenAI(base_url=ours.v1, api_key="k") as client:
            batch, _ = run(client, "remote-gemini", 3)
            failed = wait(client, batch.id, timeout=120)
    finally:
        ours.stop()
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    (error,) = failed.errors.data
    assert error.code == "remote_error"
    assert error.message.startswith("Submitting the batch to the provider failed: ")
    assert "401" in error.message and "not-a-key" not in error.message
