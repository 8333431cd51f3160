"""The official `openai` SDK, unchanged but for `base_url`, against a real `batchery serve`.

This module also runs under openai 1.x (see test_openai_sdk_1x.py), so it uses only API
that both majors share.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import OpenAI

from tests.conftest import Server, start_server
from tests.helpers import (
    SDK_DEPLOYMENTS,
    by_label,
    chat_file,
    chat_line,
    eventually,
    jsonl,
    metric_samples,
)

TERMINAL = {"completed", "failed", "expired", "cancelled"}




@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("sdk")
    config = tmp / "deployments.yaml"
    config.write_text(SDK_DEPLOYMENTS)
    server = start_server(tmp, "--config", str(config), "--workers", "2", "--chunk-size", "10",
                          "--max-tasks", "1000", "--lease-seconds", "6")
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.v1, api_key="sk-anything", max_retries=0) as c:
        yield c


def wait(client: OpenAI, batch_id: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in client.files.content(file_id).content.splitlines()]


def submit(client: OpenAI, data: bytes, **kwargs: Any) -> Any:
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=kwargs.pop(
        "endpoint", "/v1/chat/completions"), completion_window=kwargs.pop(
        "completion_window", "24h"), **kwargs)


def test_sdk_major_is_the_one_expected() -> None:
    expected = os.environ.get("TEST_EXPECT_OPENAI_MAJOR")
    major = int(openai.__version__.split(".")[0])
    assert major == int(expected) if expected else major >= 2


def test_whole_flow(client: OpenAI) -> None:
    bad = chat_line("bad-role")
    bad["body"]["messages"] = [{"role": "wizard", "content": "hi"}]
    data = chat_file(35) + jsonl([bad])
    f = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and f.bytes == len(data)
    assert f.filename == "requests.jsonl" and f.status == "processed"
    assert client.files.retrieve(f.id).id == f.id

    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"team": "nlp"})
    assert batch.id.startswith("batch_") and batch.status == "validating"
    assert batch.metadata == {"team": "nlp"}
    done = wait(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == 36
    assert done.request_counts.completed == 35 and done.request_counts.failed == 1
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.model == "echo"

    out = lines_of(client, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(35))
    first = next(x for x in out if x["custom_id"] == "req-3")
    assert first["response"]["status_code"] == 200 and first["error"] is None
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "hello number 3"
    assert first["id"].startswith("batch_req_")

    errors = lines_of(client, done.error_file_id)
    assert [x["custom_id"] for x in errors] == ["bad-role"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "messages[0].role"

    output_file = client.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output"
    assert output_file.filename == f"batch_{batch.id}_output.jsonl"
    # The batch's usage is the sum of its lines' (the failed line used nothing).
    usage = client.batches.retrieve(batch.id).to_dict()["usage"]  # openai 1.x: no Batch.usage
    lines_usage = [x["response"]["body"]["usage"] for x in out]
    assert usage["input_tokens"] == sum(u["prompt_tokens"] for u in lines_usage) > 0
    assert usage["output_tokens"] == sum(u["completion_tokens"] for u in lines_usage) > 0
    assert usage["total_tokens"] == sum(u["total_tokens"] for u in lines_usage)


def test_raw_bytes_upload_and_expires_after(client: OpenAI) -> None:
    f = client.files.create(file=chat_file(1), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.filename == "upload"
    assert f.expires_at == f.created_at + 3600


def test_file_pagination_and_delete(client: OpenAI) -> None:
    ids = [client.files.create(file=(f"p{i}.jsonl", chat_file(1)), purpose="batch").id
           for i in range(5)]
    page = client.files.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    seen = [f.id for f in client.files.list(limit=2)]  # auto-pagination follows `after`
    assert seen[:5] == list(reversed(ids))
    assert len(seen) == len(set(seen))
    asc = [f.id for f in client.files.list(limit=3, order="asc")]
    assert asc == list(reversed(seen))

    deleted = client.files.delete(ids[0])
    assert deleted.deleted is True and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError) as info:
        client.files.retrieve(ids[0])
    assert "No such File object" in str(info.value)


def test_batch_pagination(client: OpenAI) -> None:
    made = [submit(client, chat_file(1, prefix=f"pg{i}")).id for i in range(4)]
    page = client.batches.list(limit=3)
    assert len(page.data) == 3 and page.has_more
    ids = [b.id for b in client.batches.list(limit=3)]
    assert ids[:4] == list(reversed(made))
    assert len(ids) == len(set(ids))


def test_models_lists_deployments(client: OpenAI) -> None:
    names = {m.id for m in client.models.list()}
    assert names == {"echo", "echo-slow"}


def _error_codes(batch: Any) -> list[tuple[int | None, str | None, str | None]]:
    return [(e.line, e.code, e.param) for e in batch.errors.data]


def test_every_validation_error_is_reported_with_its_line(client: OpenAI) -> None:
    def line(**changes: Any) -> dict[str, Any]:
        base = chat_line("x")
        base.update(changes)
        return base

    no_model = chat_line("no-model")
    del no_model["body"]["model"]
    data = jsonl([
        chat_line("ok-1"),
        "this is not json",
        {k: v for k, v in chat_line("a").items() if k != "custom_id"},
        {k: v for k, v in chat_line("b").items() if k != "method"},
        {k: v for k, v in chat_line("c").items() if k != "url"},
        {k: v for k, v in chat_line("d").items() if k != "body"},
        no_model,
        line(custom_id="wrong-url", url="/v1/embeddings"),
        chat_line("ok-1"),
        chat_line("streamer", stream=True),
        chat_line("ghost", model="no-such-model"),
    ])
    failed = wait(client, submit(client, data).id)
    assert failed.status == "failed" and failed.failed_at
    assert _error_codes(failed) == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "missing_required_parameter", "method"),
        (5, "missing_required_parameter", "url"),
        (6, "missing_required_parameter", "body"),
        (7, "invalid_request", "body.model"),
        (8, "invalid_url", "url"),
        (9, "duplicate_custom_id", "custom_id"),
        (10, "streaming_unsupported", "body.stream"),
        (11, "model_not_found", "body.model"),
    ]
    assert failed.output_file_id is None and failed.error_file_id is None


def test_empty_file_and_too_many_tasks(client: OpenAI) -> None:
    empty = wait(client, submit(client, b"\n").id)
    assert empty.status == "failed" and _error_codes(empty) == [(None, "empty_file", None)]
    huge = wait(client, submit(client, chat_file(1001)).id)
    assert huge.status == "failed"
    assert [e.code for e in huge.errors.data] == ["too_many_tasks"]
    assert "1000" in huge.errors.data[0].message


def test_missing_input_file_fails_the_batch(client: OpenAI) -> None:
    batch = client.batches.create(input_file_id="file-doesnotexist",
                                  endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait(client, batch.id)
    assert failed.status == "failed"
    error = failed.errors.data[0]
    assert error.code == "invalid_request" and error.param == "file_id"
    assert error.message.startswith("Cannot find file file-doesnotexist")


def test_create_time_errors(client: OpenAI) -> None:
    f = client.files.create(file=chat_file(1), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations",  # type: ignore[arg-type]
                              completion_window="24h")
    assert info.value.code == "invalid_value" and info.value.param == "endpoint"
    assert ("Supported values are: '/v1/chat/completions', '/v1/completions', '/v1/embeddings', "
            "'/v1/moderations', and '/v1/responses'.") in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="forever")  # type: ignore[arg-type]
    assert info.value.param == "completion_window"
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"tags": ["a"]})  # type: ignore[dict-item]
    assert info.value.code == "invalid_type" and info.value.param == "metadata.tags"
    notes = client.files.create(file=chat_file(1), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=notes.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert info.value.param == "input_file_id"
    assert "purpose 'user_data'" in str(info.value) and "purpose 'batch'" in str(info.value)


def test_cancel_keeps_partial_results(client: OpenAI) -> None:
    data = chat_file(300, prefix="slow", model="echo-slow")  # 40 ms a line, 10 lines a chunk
    batch = submit(client, data)
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed < 20:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait(client, batch.id, timeout=60)
    assert done.status == "cancelled" and done.cancelled_at
    out = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    ids = [x["custom_id"] for x in out + errors]
    assert sorted(ids) == sorted(f"slow-{i}" for i in range(300))  # each exactly once
    assert len(out) >= 20 and errors
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    assert done.request_counts.completed == len(out)
    assert done.request_counts.failed == len(errors)
    assert client.batches.cancel(batch.id).status == "cancelled"  # idempotent


def test_expiry_keeps_partial_results(client: OpenAI) -> None:
    # 800 lines at 40 ms on 2 workers take 16 s: far more than the 8 s window.
    batch = submit(client, chat_file(800, prefix="exp", model="echo-slow"),
                   completion_window="8s")  # type: ignore[arg-type]
    done = wait(client, batch.id, timeout=30)
    assert done.status == "expired" and done.expired_at
    out = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert sorted(x["custom_id"] for x in out + errors) == sorted(f"exp-{i}" for i in range(800))
    expired = [x for x in errors if x["error"]]
    assert expired and {x["error"]["code"] for x in expired} == {"batch_expired"}
    assert all(x["response"] is None for x in expired)
    # What ran inside the window is kept: answered lines in the output file, counted.
    assert out, "no request completed inside the 8 s window"
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in out)
    assert done.request_counts is not None
    assert done.request_counts.completed == len(out)
    assert done.request_counts.failed == len(errors)


def test_conflict_is_not_retried(server: Server) -> None:
    sent: list[str] = []

    def count(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    with httpx.Client(event_hooks={"request": [count]}) as http, \
            OpenAI(base_url=server.v1, api_key="k", max_retries=2, http_client=http) as c:
        batch = wait(c, submit(c, chat_file(2)).id)
        sent.clear()
        with pytest.raises(openai.ConflictError) as info:
            c.batches.cancel(batch.id)
    assert "Cannot cancel a batch with status 'completed'" in str(info.value)
    # Sent once: the SDK's backoff-and-retry did not happen.
    assert sent == [f"POST /v1/batches/{batch.id}/cancel"]
    response = httpx.post(f"{server.v1}/batches/{batch.id}/cancel",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 409 and response.headers["x-should-retry"] == "false"


def test_not_found(client: OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_missing")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-missing")
    with pytest.raises(openai.NotFoundError):
        client.files.delete("file-missing")
    response = httpx.get(f"{server.v1}/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"


def test_wire_shapes(server: Server) -> None:
    """Every field present, nulls included; raw multipart with bracket fields."""
    files = {"file": ("upload", chat_file(2), "application/octet-stream")}
    form = {"purpose": "batch", "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "7200"}
    uploaded = httpx.post(f"{server.v1}/files", data=form, files=files)
    assert uploaded.status_code == 200 and "x-request-id" in uploaded.headers
    body = uploaded.json()
    assert set(body) == {"id", "object", "bytes", "created_at", "expires_at", "filename",
                         "purpose", "status", "status_details"}
    assert body["expires_at"] == body["created_at"] + 7200 and body["status_details"] is None
    created = httpx.post(f"{server.v1}/batches", json={
        "input_file_id": body["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json()
    assert set(created) >= {
        "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
        "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
        "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
        "cancelled_at", "request_counts", "metadata"}
    assert created["object"] == "batch" and created["errors"] is None
    assert created["expires_at"] == created["created_at"] + 86400
    assert created["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    listing = httpx.get(f"{server.v1}/batches", params={"limit": 1}).json()
    assert set(listing) == {"object", "data", "first_id", "last_id", "has_more"}
    empty_cancel = httpx.post(f"{server.v1}/batches/{created['id']}/cancel",
                              headers={"Content-Type": "application/json",
                                       "Content-Length": "0"})
    assert empty_cancel.status_code in (200, 409)
    bad_json = httpx.post(f"{server.v1}/batches", content=b"{nope",
                          headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == \
        "invalid_request_error"


def test_auth_and_project_isolation(tmp_path: Path) -> None:
    from batchery.security.auth import add_key

    keys = tmp_path / "keys.yaml"
    key_a, key_b = add_key(keys, "team-a")[1], add_key(keys, "team-b")[1]
    assert key_a not in keys.read_text()  # stored hashed
    server = start_server(tmp_path, "--keys-file", str(keys), "--workers", "1")
    try:
        with OpenAI(base_url=server.v1, api_key="sk-wrong", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError) as info:
                stranger.files.list()
            assert info.value.code == "invalid_api_key"
        with OpenAI(base_url=server.v1, api_key=key_a, max_retries=0) as a, \
                OpenAI(base_url=server.v1, api_key=key_b, max_retries=0) as b:
            done = wait(a, submit(a, chat_file(3)).id)
            assert done.status == "completed"
            assert [f.id for f in b.files.list()] == []
            assert [x.id for x in b.batches.list()] == []
            with pytest.raises(openai.NotFoundError):
                b.batches.retrieve(done.id)
            with pytest.raises(openai.NotFoundError):
                b.files.content(done.output_file_id)
            with pytest.raises(openai.NotFoundError):
                b.batches.cancel(done.id)
            # B cannot run a batch over A's file either.
            stolen = b.batches.create(input_file_id=done.input_file_id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
            assert wait(b, stolen.id).errors.data[0].code == "invalid_request"
            assert len(lines_of(a, done.output_file_id)) == 3
    finally:
        server.stop()


def test_metrics(client: OpenAI, server: Server) -> None:
    """The gauges hold the counts the API shows, and the request counter counts requests (the
    collector prints every label, even at 0: the values are what is checked)."""
    def all_ended() -> list[Any] | None:
        batches = list(client.batches.list(limit=100))
        return batches if all(b.status in TERMINAL for b in batches) else None

    eventually(all_ended, "every earlier batch to end", timeout=60)
    before = metric_samples(server.base_url)
    done = wait(client, submit(client, chat_file(3)).id)
    assert done.status == "completed"
    batches = all_ended()
    assert batches is not None
    after = metric_samples(server.base_url)

    created = ("batchery_http_requests_total",
               (("method", "POST"), ("route", "/v1/batches"), ("status", "200")))
    assert after[created] - before.get(created, 0.0) == 1
    by_status = by_label(after, "batchery_batches", "status")
    assert by_status == {status: float(sum(b.status == status for b in batches))
                         for status in by_status}
    assert sum(by_status.values()) == len(batches)
    assert by_status["completed"] == by_label(before, "batchery_batches", "status")[
        "completed"] + 1
    # Every batch has ended: no chunk is left in any state.
    chunks = by_label(after, "batchery_chunks", "state")
    assert chunks and set(chunks.values()) == {0.0}, chunks
    # The server runs 2 batch workers (`--workers 2`), each reporting one state.
    assert sum(by_label(after, "batchery_workers", "state").values()) == 2
