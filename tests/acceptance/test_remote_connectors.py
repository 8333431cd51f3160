"""Remote batch connectors, against a second Batchery acting as the provider (it speaks
both the OpenAI and the Anthropic batch APIs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from openai import OpenAI

from tests.conftest import Server, start_provider_pair, start_server
from tests.helpers import Recorder, chat_file

PROVIDER_CONFIG = """
deployments:
  - name: echo
    backend: echo
    options: {latency_ms: 30}
  - name: echo-slow
    backend: echo
    options: {latency_ms: 200}
"""
SECRET = "correct-horse-battery-staple"


def ours_config(provider: Server, *, literal_key: str | None = None) -> str:
    credential = (f"api_key: {literal_key}" if literal_key else "api_key_env: PROVIDER_KEY")
    return f"""
deployments:
  - name: remote-gpt
    backend: openai_batch
    options: {{base_url: "{provider.v1}", {credential}, model: echo}}
  - name: remote-claude
    backend: anthropic_batch
    options: {{base_url: "{provider.base_url}", {credential}, model: echo}}
  - name: remote-claude-slow
    backend: anthropic_batch
    options: {{base_url: "{provider.base_url}", {credential}, model: echo-slow}}
  - name: echo
    backend: echo
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, str]]:
    tmp = tmp_path_factory.mktemp("remote")
    ours, provider, key = start_provider_pair(tmp, PROVIDER_CONFIG, ours_config)
    yield ours, provider, key
    ours.stop()
    provider.stop()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def openai_client(server: Server, recorder: Recorder) -> OpenAI:
    http = httpx.Client(event_hooks={"response": [recorder.hook]})
    return OpenAI(base_url=server.v1, api_key="k", http_client=http, max_retries=0)


def wait_openai(client: OpenAI, batch_id: str, timeout: float = 60) -> Any:
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


def test_openai_batch_is_run_by_the_provider(servers: tuple[Server, Server, str],
                                             recorder: Recorder) -> None:
    ours, provider, key = servers
    with openai_client(ours, recorder) as client:
        f = client.files.create(file=chat_file(30, model="remote-gpt"), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        seen_remote = None
        deadline = time.monotonic() + 60
        while (current := client.batches.retrieve(batch.id)).status != "completed":
            seen_remote = (current.model_extra or {}).get("remote_job") or seen_remote
            assert time.monotonic() < deadline and current.status != "failed", current
            time.sleep(0.2)
        remote_job = (current.model_extra or {})["remote_job"]
        assert remote_job["id"].startswith("batch_") and remote_job["status"] == "completed"
        assert seen_remote is not None
        out = lines(client, current.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(30))
        assert out[0]["response"]["body"]["model"] == "echo"  # the provider's model name
        assert current.request_counts.completed == 30
        client.models.list()
    with OpenAI(base_url=provider.v1, api_key=key) as at_provider:
        theirs = at_provider.batches.retrieve(remote_job["id"])
        assert theirs.metadata == {"batchery_batch_id": batch.id}
    recorder.assert_never_contains(key)


def test_openai_cancel_is_forwarded(servers: tuple[Server, Server, str],
                                    recorder: Recorder) -> None:
    ours, _provider, key = servers
    with openai_client(ours, recorder) as client:
        f = client.files.create(file=chat_file(400, model="remote-gpt"), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 30
        while not (client.batches.retrieve(batch.id).model_extra or {}).get("remote_job"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)
        client.batches.cancel(batch.id)
        done = wait_openai(client, batch.id)
        assert done.status == "cancelled"
        assert (done.model_extra or {})["remote_job"]["status"] == "cancelled"
        out, errors = lines(client, done.output_file_id), lines(client, done.error_file_id)
    ids = [x["custom_id"] for x in out + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(400))
    assert errors and {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    assert done.request_counts.completed == len(out)
    recorder.assert_never_contains(key)


def test_anthropic_batch_is_run_by_the_provider(servers: tuple[Server, Server, str],
                                                recorder: Recorder) -> None:
    """200 lines of 0.2 s on the provider's 2 workers (some 20 s there): the cancel, sent as
    soon as the provider has the batch, reaches the provider and cancels lines there."""
    ours, provider, key = servers
    # The SDK's own client class, whichever HTTP library it is built on (httpx2 for
    # anthropic 2.x, httpx before): importing one by name skipped this test when absent.
    http = anthropic.DefaultHttpxClient(event_hooks={"response": [recorder.hook]})
    with anthropic.Anthropic(base_url=ours.base_url, api_key="k", http_client=http,
                             max_retries=0) as client:
        batch = client.messages.batches.create(requests=[
            {"custom_id": f"m{i}", "params": {"model": "remote-claude-slow", "max_tokens": 8,
                                              "messages": [{"role": "user",
                                                            "content": f"hi {i}"}]}}
            for i in range(200)])
        deadline = time.monotonic() + 30
        while not (client.messages.batches.retrieve(batch.id).model_extra or {}).get(
                "remote_job"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        client.messages.batches.cancel(batch.id)
        deadline = time.monotonic() + 60
        while (done := client.messages.batches.retrieve(batch.id)).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        remote_job = (done.model_extra or {})["remote_job"]
        assert remote_job["id"].startswith("msgbatch_")
        assert remote_job["processing_status"] == "ended"
        results = {r.custom_id: r.result.type for r in client.messages.batches.results(batch.id)}
    assert set(results) == {f"m{i}" for i in range(200)}
    assert set(results.values()) <= {"succeeded", "canceled"}
    assert "canceled" in results.values(), "every line ran: the cancel never took effect"
    assert done.request_counts.succeeded == sum(t == "succeeded" for t in results.values())
    assert done.request_counts.canceled == sum(t == "canceled" for t in results.values())
    # The provider was told: its batch was cancelled, and cancelled lines there.
    with anthropic.Anthropic(base_url=provider.base_url, api_key=key,
                             max_retries=0) as at_provider:
        theirs = at_provider.messages.batches.retrieve(remote_job["id"])
    assert theirs.cancel_initiated_at is not None
    assert theirs.processing_status == "ended" and theirs.request_counts.canceled > 0
    recorder.assert_never_contains(key)


def test_a_literal_credential_is_stored_encrypted(tmp_path: Path,
                                                  servers: tuple[Server, Server, str],
                                                  recorder: Recorder) -> None:
    _ours, provider, key = servers
    config = tmp_path / "literal.yaml"
    config.write_text(ours_config(provider, literal_key=key))
    with pytest.raises(RuntimeError, match="BATCHERY_SECRET_KEY"):
        start_server(tmp_path, "--config", str(config), name="nokey")
    ours = start_server(tmp_path, "--config", str(config), "--workers", "1",
                        env={"BATCHERY_SECRET_KEY": SECRET}, name="sealed")
    try:
        with openai_client(ours, recorder) as client:
            f = client.files.create(file=chat_file(5, model="remote-gpt"), purpose="batch")
            batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            assert wait_openai(client, batch.id).status == "completed"
            client.models.list()
        database = (ours.data_dir / "batchery.db").read_bytes()
        assert key.encode() not in database
        for wal in ours.data_dir.glob("batchery.db-wal"):
            assert key.encode() not in wal.read_bytes()
    finally:
        ours.stop()
    recorder.assert_never_contains(key)


def test_provider_errors_fail_the_batch_with_the_cause(tmp_path: Path,
                                                       servers: tuple[Server, Server, str]
                                                       ) -> None:
    _ours, provider, _key = servers
    config = tmp_path / "wrong.yaml"
    config.write_text(ours_config(provider).replace("api_key_env: PROVIDER_KEY",
                                                    "api_key_env: WRONG_KEY"))
    ours = start_server(tmp_path, "--config", str(config), "--workers", "1",
                        env={"WRONG_KEY": "sk-not-a-key"}, name="wrong")
    try:
        with OpenAI(base_url=ours.v1, api_key="k") as client:
            f = client.files.create(file=chat_file(3, model="remote-gpt"), purpose="batch")
            batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            failed = wait_openai(client, batch.id, timeout=120)
        assert failed.status == "failed"
        assert failed.errors.data[0].code == "remote_error"
        assert "401" in failed.errors.data[0].message
    finally:
        ours.stop()
