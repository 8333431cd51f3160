"""The official `anthropic` SDK, unchanged but for `base_url`, against a real server.

This module also runs under anthropic 0.x (see test_anthropic_sdk_0x.py), which sends
`X-Api-Key` where 2.x sends `Authorization: Bearer`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import Server, start_server
from tests.helpers import SDK_DEPLOYMENTS, eventually


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("anthropic")
    config = tmp / "deployments.yaml"
    config.write_text(SDK_DEPLOYMENTS)
    server = start_server(tmp, "--config", str(config), "--workers", "2",
                          "--chunk-size", "10", "--lease-seconds", "6")
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-any",
                             max_retries=0) as c:
        yield c


def request(custom_id: str, text: str = "hi", model: str = "echo",
            **params: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": {
        "model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}],
        **params}}


def wait(client: anthropic.Anthropic, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, batch.request_counts
        time.sleep(0.2)
    return batch


def results(client: anthropic.Anthropic, batch_id: str) -> dict[str, Any]:
    return {r.custom_id: r.result for r in client.messages.batches.results(batch_id)}


def test_sdk_major_is_the_one_expected() -> None:
    expected = os.environ.get("TEST_EXPECT_ANTHROPIC_MAJOR")
    major = int(anthropic.__version__.split(".")[0])
    assert major == int(expected) if expected else major >= 2


def test_whole_flow(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[
        request("plain", "hello there"),
        request("with-system", "what now", system="be brief", stop_sequences=["\n"],
                temperature=0.0),
        request("blocks", "", messages=[{"role": "user", "content": [
            {"type": "text", "text": "from "}, {"type": "text", "text": "blocks"}]}]),
        request("no-such-model", model="ghost"),
        {"custom_id": "no-max-tokens", "params": {
            "model": "echo", "messages": [{"role": "user", "content": "x"}]}},
        request("bad-role", messages=[{"role": "system", "content": "x"}]),
    ])
    assert batch.id.startswith("msgbatch_") and batch.type == "message_batch"
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 6
    assert batch.expires_at.timestamp() - batch.created_at.timestamp() == 86400

    done = wait(client, batch.id)
    assert done.ended_at is not None and done.results_url
    assert done.request_counts.succeeded == 3 and done.request_counts.errored == 3
    assert done.request_counts.processing == 0

    by_id = results(client, batch.id)
    assert set(by_id) == {"plain", "with-system", "blocks", "no-such-model",
                          "no-max-tokens", "bad-role"}
    message = by_id["plain"].message
    assert message.content[0].text == "hello there" and message.role == "assistant"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 2
    assert by_id["blocks"].message.content[0].text == "from blocks"
    assert by_id["no-such-model"].type == "errored"
    assert by_id["no-such-model"].error.error.type == "not_found_error"
    assert by_id["no-max-tokens"].error.error.type == "invalid_request_error"
    assert "max_tokens" in by_id["no-max-tokens"].error.error.message
    assert by_id["bad-role"].type == "errored"


def test_results_are_lf_only_compact_jsonl(client: anthropic.Anthropic,
                                           server: Server) -> None:
    done = wait(client, client.messages.batches.create(requests=[
        request(f"r{i}") for i in range(3)]).id)
    raw = httpx.get(done.results_url, headers={"x-api-key": "k"}).content
    assert b"\r" not in raw and raw.endswith(b"\n") and b"\n\n" not in raw
    assert len(raw.splitlines()) == 3


def test_list_pages_both_ways(client: anthropic.Anthropic) -> None:
    made = [client.messages.batches.create(requests=[request(f"p{i}")]).id
            for i in range(5)]
    newest_first = list(reversed(made))
    page = client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2] and page.has_more
    assert page.first_id == newest_first[0] and page.last_id == newest_first[1]
    walked = [b.id for b in client.messages.batches.list(limit=2)]  # follows after_id
    assert walked[:5] == newest_first and len(walked) == len(set(walked))
    older = client.messages.batches.list(limit=2, after_id=newest_first[1])
    assert [b.id for b in older.data] == newest_first[2:4]
    newer = client.messages.batches.list(limit=2, before_id=newest_first[4])
    assert [b.id for b in newer.data] == newest_first[2:4]
    assert newer.has_more


def test_cancel_keeps_partial_results(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[
        request(f"c{i}", model="echo-slow") for i in range(300)])

    def tokens_in() -> int:
        # Its counts stay `processing` until the end; its usage (an extension) grows as
        # lines are committed.
        extra = client.messages.batches.retrieve(batch.id).model_extra or {}
        return int((extra.get("usage") or {}).get("input_tokens", 0))

    eventually(lambda: tokens_in() > 0, "some lines to be done")
    cancelling = client.messages.batches.cancel(batch.id)
    assert cancelling.processing_status in ("canceling", "ended")
    assert cancelling.cancel_initiated_at is not None
    done = wait(client, batch.id, timeout=60)
    counts = done.request_counts
    assert counts.canceled > 0 and counts.succeeded > 0
    assert counts.succeeded + counts.canceled + counts.errored == 300
    by_id = results(client, batch.id)
    assert len(by_id) == 300
    assert sum(r.type == "canceled" for r in by_id.values()) == counts.canceled
    assert sum(r.type == "succeeded" for r in by_id.values()) == counts.succeeded


def test_expiry(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--config", _config(tmp_path), "--workers", "1",
                          "--chunk-size", "10", "--message-batch-window", "8")
    try:
        with anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0) as c:
            batch = c.messages.batches.create(requests=[
                request(f"e{i}", model="echo-slow") for i in range(400)])
            done = wait(c, batch.id, timeout=30)
            counts = done.request_counts
            assert counts.expired > 0 and counts.expired + counts.succeeded == 400
            kinds = [r.type for r in results(c, batch.id).values()]
            assert len(kinds) == 400 and set(kinds) <= {"succeeded", "expired"}
            assert kinds.count("expired") == counts.expired
    finally:
        server.stop()


def _config(tmp_path: Path) -> str:
    path = tmp_path / "deployments.yaml"
    path.write_text(SDK_DEPLOYMENTS)
    return str(path)


def test_delete_and_conflicts(client: anthropic.Anthropic) -> None:
    running = client.messages.batches.create(requests=[
        request(f"d{i}", model="echo-slow") for i in range(100)])
    with pytest.raises(anthropic.ConflictError):
        client.messages.batches.delete(running.id)
    client.messages.batches.cancel(running.id)
    wait(client, running.id)
    with pytest.raises(anthropic.ConflictError) as info:
        client.messages.batches.cancel(running.id)
    assert info.value.body["error"]["type"] == "conflict_error"  # type: ignore[index]
    deleted = client.messages.batches.delete(running.id)
    assert deleted.id == running.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.batches.retrieve(running.id)
    body = missing.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert body["request_id"].startswith("req_")  # type: ignore[index]


def test_bad_requests_are_refused_at_create(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.create(requests=[request("same"), request("same")])
    assert "custom_id" in str(info.value)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.create(requests=[request("x" * 65)])
    for bad in ("ends-in-newline\n", "has space", "dot.ted", "ünï"):
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.batches.create(requests=[request(bad)])
        assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert "requests.0.custom_id" in str(refused.value)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.create(requests=[])


def test_both_auth_styles_and_isolation(tmp_path: Path) -> None:
    from batchery.security.auth import add_key

    keys = tmp_path / "keys.yaml"
    key_a, key_b = add_key(keys, "a")[1], add_key(keys, "b")[1]
    server = start_server(tmp_path, "--keys-file", str(keys), "--workers", "1")
    try:
        url = f"{server.base_url}/v1/messages/batches"
        body = {"requests": [request("one")]}
        by_header = httpx.post(url, json=body, headers={"x-api-key": key_a})
        by_bearer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key_a}"})
        assert by_header.status_code == by_bearer.status_code == 200
        assert by_header.headers["request-id"].startswith("req_")
        refused = httpx.post(url, json=body, headers={"x-api-key": "nope",
                                                      "anthropic-version": "2023-06-01"})
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        with anthropic.Anthropic(base_url=server.base_url, auth_token=key_b,
                                 max_retries=0) as b:
            assert [x.id for x in b.messages.batches.list()] == []
            with pytest.raises(anthropic.NotFoundError):
                b.messages.batches.retrieve(by_header.json()["id"])
    finally:
        server.stop()
