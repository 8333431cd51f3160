"""The `gemini_batch` connector against a fake Gemini Batch Mode API on a real HTTP port: the
requests it sends (inline and as an uploaded file), the results it brings back, cancel,
a provider-failed batch, and a request Gemini cannot express. A real worker, store and file
store run in this process.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchery.backends import remote_gemini
from batchery.batchapi import remote
from batchery.batchapi.message_batches import MessageBatchService
from batchery.batchapi.service import BatchService
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.model.batches import Batch, BatchStatus
from batchery.model.deployments import Deployment
from batchery.queue.worker import Worker, WorkerConfig
from batchery.stores.sql.store import SqlStore
from batchery.workers import worker as worker_for
from tests.helpers import chat_file, chat_line, jsonl
from tests.integration.fake_gemini import FOREIGN_UPLOAD_HOST, KEY, FakeGemini

KEY_ENV = "FAKE_GEMINI_KEY"


@dataclass
class Ours:
    store: SqlStore
    files: FsspecFileStore
    batches: BatchService
    messages: MessageBatchService
    worker: Worker


@pytest.fixture
def ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A factory: `ours(fake, **options)` starts our side against `fake`."""
    monkeypatch.setattr(remote, "FIRST_POLL_S", 0.02)
    monkeypatch.setattr(remote, "RETRY_FIRST_S", 0.02)
    monkeypatch.setenv(KEY_ENV, KEY)
    started: list[Ours] = []

    def start(fake: FakeGemini, **options: Any) -> Ours:
        store = SqlStore.from_url(f"sqlite:///{tmp_path / 'ours.db'}")
        store.set_deployments([Deployment(name="gem", backend="gemini_batch", options={
            "base_url": fake.base_url, "api_key_env": KEY_ENV, "model": "gemini-test",
            **options})])
        files = FsspecFileStore(str(tmp_path / "files"))
        worker = worker_for(store, files, WorkerConfig(jobs=False, poll_s=0.01))
        started.append(Ours(store=store, files=files, batches=BatchService(store, files),
                            messages=MessageBatchService(store, files), worker=worker))
        return started[-1]

    yield start
    for one in started:
        one.worker.stop()
        one.worker.run()
        one.store.close()


def submit(ours: Ours, data: bytes) -> Batch:
    record = ours.batches.upload("p", io.BytesIO(data), filename="in.jsonl", purpose="batch")
    return ours.batches.create_batch("p", input_file_id=record.id,
                                     endpoint="/v1/chat/completions")


def run_until(ours: Ours, batch_id: str, done: Any = lambda b: b.status.is_terminal,
              timeout: float = 30) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = ours.store.get_batch("p", batch_id)
        assert batch is not None
        if done(batch):
            return batch
        assert time.monotonic() < deadline, batch
        if not ours.worker.run_once():
            time.sleep(0.01)


def content(ours: Ours, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    _, stream = ours.batches.open_content("p", file_id)
    with stream:
        return [orjson.loads(x) for x in stream.read().splitlines()]


def sent(fake: FakeGemini, key: str) -> list[dict[str, Any]]:
    return [orjson.loads(c.body) for c in fake.calls if c.key == key]


def test_an_inline_batch_is_translated_both_ways(ours: Any) -> None:
    with FakeGemini() as fake:
        side = ours(fake)
        data = jsonl([chat_line(f"r{i}", f"hi {i}", model="gem", max_tokens=7,
                                temperature=0.5) for i in range(5)])
        batch = run_until(side, submit(side, data).id)
        out = content(side, batch.output_file_id)
    assert batch.status is BatchStatus.COMPLETED, batch.errors
    assert (batch.completed, batch.failed) == (5, 0)
    # What went out: one inline GenerateContentRequest per line, keyed by custom_id.
    assert fake.routes() == ["create", "poll", "poll"]  # the last poll fetches inline results
    assert all(c.headers["x-goog-api-key"] == KEY for c in fake.calls)
    assert fake.calls[0].path == "/v1beta/models/gemini-test:batchGenerateContent"
    (create,) = sent(fake, "create")
    assert create["batch"]["displayName"] == f"batchery {batch.id}"
    items = create["batch"]["inputConfig"]["requests"]["requests"]
    assert [x["metadata"]["key"] for x in items] == [f"r{i}" for i in range(5)]
    assert items[0]["request"] == {
        "contents": [{"role": "user", "parts": [{"text": "hi 0"}]}],
        "generationConfig": {"temperature": 0.5, "maxOutputTokens": 7}}
    # What came back: chat completions; thoughts left out of the text, counted as tokens.
    by_id = {x["custom_id"]: x["response"] for x in out}
    assert sorted(by_id) == [f"r{i}" for i in range(5)]
    body = by_id["r3"]["body"]
    assert by_id["r3"]["status_code"] == 200
    assert body["object"] == "chat.completion" and body["model"] == "gemini-test"
    assert body["choices"] == [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                "message": {"role": "assistant", "content": "echo: hi 3",
                                            "refusal": None}}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "completion_tokens_details": {"reasoning_tokens": 1}}
    # The provider's job is `remote_job`, without the (possibly large) inline responses.
    job = batch.remote["job"] if batch.remote else None
    assert job is not None and job["name"] == "batches/fake0"
    assert job["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    assert "inlinedResponses" not in job["metadata"]["output"]
    assert "inlinedResponses" not in job["response"]


def test_a_large_batch_goes_as_an_uploaded_file(ours: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_gemini, "UPLOAD_CHUNK_BYTES", 1024)
    with FakeGemini() as fake:
        side = ours(fake, inline_max_bytes=1000)
        batch = run_until(side, submit(side, chat_file(40, model="gem")).id)
        out = content(side, batch.output_file_id)
    assert batch.status is BatchStatus.COMPLETED, batch.errors
    routes = fake.routes()
    chunks = [c for c in fake.calls if c.key == "upload"]
    assert len(chunks) > 2
    assert routes == ["upload-start"] + ["upload"] * len(chunks) + ["create", "poll", "download"]
    start, uploaded = fake.calls[0], b"".join(c.body for c in chunks)
    assert start.headers["x-goog-upload-protocol"] == "resumable"
    assert start.headers["x-goog-upload-header-content-type"] == "application/jsonl"
    assert int(start.headers["x-goog-upload-header-content-length"]) == len(uploaded)
    assert [c.headers["x-goog-upload-command"] for c in chunks] == \
        ["upload"] * (len(chunks) - 1) + ["upload, finalize"]
    assert [int(c.headers["x-goog-upload-offset"]) for c in chunks] == \
        [1024 * i for i in range(len(chunks))]
    # The fake named another host for the upload: the key went to the configured one only.
    for chunk in chunks:
        assert chunk.path.startswith("/upload/v1beta/files?upload_id=")
        assert FOREIGN_UPLOAD_HOST not in chunk.headers.get("host", "")
    lines = [orjson.loads(x) for x in uploaded.splitlines()]
    assert lines[0] == {"key": "req-0", "request": {
        "contents": [{"role": "user", "parts": [{"text": "hello number 0"}]}]}}
    (create,) = sent(fake, "create")
    assert create["batch"]["inputConfig"] == {"fileName": "files/in0"}
    assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(40))
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"].startswith("echo: ")


def test_every_request_gets_exactly_one_line(ours: Any) -> None:
    with FakeGemini(drop={"gone"}, twice={"dup"}) as fake:
        side = ours(fake)
        data = jsonl([chat_line(k, t, model="gem") for k, t in [
            ("ok", "hello"), ("bad", "fail"), ("blocked", "block"), ("tool", "call"),
            ("gone", "hello"), ("dup", "hello")]])
        batch = run_until(side, submit(side, data).id)
        out = {x["custom_id"]: x for x in content(side, batch.output_file_id)}
        errors = {x["custom_id"]: x for x in content(side, batch.error_file_id)}
    assert batch.status is BatchStatus.COMPLETED
    assert sorted(out) == ["blocked", "dup", "ok", "tool"]
    assert sorted(errors) == ["bad", "gone"]
    assert (batch.completed, batch.failed) == (4, 2)
    bad = errors["bad"]["response"]
    assert bad["status_code"] == 400
    assert bad["body"]["error"]["message"] == "Invalid value at 'contents'."
    assert errors["gone"]["response"] is None
    assert errors["gone"]["error"]["code"] == "server_error"
    blocked = out["blocked"]["response"]["body"]["choices"][0]
    assert blocked["finish_reason"] == "content_filter"
    assert blocked["message"]["content"] is None and "SAFETY" in blocked["message"]["refusal"]
    tool = out["tool"]["response"]["body"]["choices"][0]
    assert tool["finish_reason"] == "tool_calls" and tool["message"]["content"] is None
    (call,) = tool["message"]["tool_calls"]
    assert call["function"] == {"name": "lookup", "arguments": '{"q":"x"}'}


def test_cancel_is_forwarded(ours: Any) -> None:
    with FakeGemini(polls_to_end=10_000) as fake:
        side = ours(fake)
        batch = submit(side, chat_file(8, model="gem"))
        run_until(side, batch.id, lambda b: b.remote and b.remote["job"] is not None)
        side.batches.cancel_batch("p", batch.id)
        done = run_until(side, batch.id)
        errors = content(side, done.error_file_id)
    assert done.status is BatchStatus.CANCELLED
    assert "cancel" in fake.routes()
    assert done.remote is not None
    assert done.remote["job"]["metadata"]["state"] == "BATCH_STATE_CANCELLED"
    assert sorted(x["custom_id"] for x in errors) == sorted(f"req-{i}" for i in range(8))
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    assert (done.completed, done.failed, done.unrun) == (0, 8, 8)


def test_a_batch_the_provider_fails_fails_here(ours: Any) -> None:
    with FakeGemini(end_state="FAILED") as fake:
        side = ours(fake)
        batch = run_until(side, submit(side, chat_file(3, model="gem")).id)
    assert batch.status is BatchStatus.FAILED
    assert batch.errors is not None
    assert [(e.code, e.message) for e in batch.errors] == [
        ("remote_failed", "The batch could not run.")]
    assert "cancel" not in fake.routes()


def test_requests_a_provider_expiry_left_unrun_are_reported_so(ours: Any) -> None:
    with FakeGemini(end_state="EXPIRED") as fake:
        side = ours(fake)
        batch = run_until(side, submit(side, chat_file(6, model="gem")).id)
        out = content(side, batch.output_file_id)
        errors = content(side, batch.error_file_id)
    assert batch.status is BatchStatus.COMPLETED
    assert sorted(x["custom_id"] for x in out) == ["req-0", "req-2", "req-4"]
    assert sorted(x["custom_id"] for x in errors) == ["req-1", "req-3", "req-5"]
    assert {(x["response"], x["error"]["code"]) for x in errors} == {(None, "batch_expired")}
    assert (batch.completed, batch.failed, batch.unrun) == (3, 3, 3)


def test_requests_that_cannot_be_sent_get_a_400_and_the_others_run(ours: Any) -> None:
    with FakeGemini() as fake:
        side = ours(fake)
        bad_shape = chat_line("shape", model="gem")
        bad_shape["body"]["messages"] = [{"rolez": "user", "contentz": "hi"}]
        data = jsonl([chat_line("a", model="gem"), chat_line("b", model="gem", logprobs=True),
                      bad_shape, chat_line("c", model="gem", logit_bias={"1": 2})])
        batch = run_until(side, submit(side, data).id)
        out = content(side, batch.output_file_id)
        errors = {x["custom_id"]: x["response"] for x in content(side, batch.error_file_id)}
    assert batch.status is BatchStatus.COMPLETED
    assert [x["custom_id"] for x in out] == ["a"]
    (create,) = sent(fake, "create")
    assert [x["metadata"]["key"] for x in
            create["batch"]["inputConfig"]["requests"]["requests"]] == ["a"]
    assert {k: (v["status_code"], v["body"]["error"]) for k, v in errors.items()} == {
        "b": (400, {"message": "Unsupported value: 'logprobs' asks for log probabilities, "
                               "which cannot be sent to a Gemini batch API.",
                    "type": "invalid_request_error", "param": "logprobs",
                    "code": "unsupported_value"}),
        "shape": (400, {"message": "Missing required parameter: 'messages[0].role'.",
                        "type": "invalid_request_error", "param": "messages[0].role",
                        "code": "missing_required_parameter"}),
        "c": (400, {"message": "Unsupported parameter: 'logit_bias' cannot be sent to a "
                               "Gemini batch API.",
                    "type": "invalid_request_error", "param": "logit_bias",
                    "code": "unsupported_parameter"})}
    assert (batch.completed, batch.failed, batch.unrun) == (1, 3, 0)


def test_a_batch_of_refused_requests_creates_no_provider_batch(ours: Any) -> None:
    with FakeGemini() as fake:
        side = ours(fake)
        data = jsonl([chat_line(f"r{i}", model="gem", logprobs=True) for i in range(3)])
        batch = run_until(side, submit(side, data).id)
        errors = content(side, batch.error_file_id)
    assert batch.status is BatchStatus.COMPLETED
    assert sorted(x["custom_id"] for x in errors) == ["r0", "r1", "r2"]
    assert {x["response"]["status_code"] for x in errors} == {400}
    assert (batch.completed, batch.failed) == (0, 3)
    assert fake.calls == []


def test_a_refused_key_fails_the_batch_at_once(ours: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeGemini() as fake:
        side = ours(fake)
        monkeypatch.setenv(KEY_ENV, "wrong")
        batch = run_until(side, submit(side, chat_file(2, model="gem")).id)
    assert batch.status is BatchStatus.FAILED and batch.errors is not None
    (error,) = batch.errors
    assert error.code == "remote_error" and "401" in error.message
    assert "API key not valid." in error.message and "wrong" not in error.message
    assert fake.routes() == ["create"]


def test_a_message_batch_runs_on_gemini(ours: Any) -> None:
    with FakeGemini() as fake:
        side = ours(fake)
        batch = side.messages.create("p", [
            {"custom_id": cid, "params": {"model": "gem", "max_tokens": 9, "system": "Be brief.",
                                          "messages": [{"role": "user", "content": text}]}}
            for cid, text in [("m1", "hello"), ("m2", "fail"),
                              ("m3", [{"type": "image", "source": {}}])]])
        done = run_until(side, batch.id)
        _, stream = side.messages.open_results("p", batch.id)
        assert stream is not None
        with stream:
            results = {x["custom_id"]: x["result"]
                       for x in map(orjson.loads, stream.read().splitlines())}
    assert done.status is BatchStatus.COMPLETED
    (create,) = sent(fake, "create")
    first = create["batch"]["inputConfig"]["requests"]["requests"][0]["request"]
    assert first["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert first["generationConfig"] == {"maxOutputTokens": 9}
    assert results["m1"]["type"] == "succeeded"
    message = results["m1"]["message"]
    assert message["content"] == [{"type": "text", "text": "echo: hello"}]
    assert message["model"] == "gemini-test" and message["stop_reason"] == "end_turn"
    assert results["m2"]["type"] == "errored"
    assert results["m2"]["error"]["error"] == {"type": "invalid_request_error",
                                               "message": "Invalid value at 'contents'."}
    # Not sent: the Messages request has no chat form.
    assert results["m3"] == {"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "messages.0.content.0: only text content blocks are supported"}}}
    assert len(create["batch"]["inputConfig"]["requests"]["requests"]) == 2
