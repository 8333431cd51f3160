"""The rules of remote batches (`openai_batch`, `anthropic_batch`) when things go wrong, as
docs/connectors.md states them: a connector that cannot be built fails the batch at once;
transient provider errors are retried with a doubling wait, up to
`remote.MAX_CONSECUTIVE_FAILURES` failures of a step in a row; a permanent 4xx fails at once;
a batch failed on our side cancels the provider's job; every request gets a line.

A real worker, store and file store run in this process against a fake OpenAI-compatible
Batch API on a real HTTP port, which fails each step as a test's plan says.
"""

from __future__ import annotations

import email.parser
import io
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchery.batchapi import remote
from batchery.batchapi.message_batches import MessageBatchService
from batchery.batchapi.service import BatchService
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.model.batches import Batch, BatchStatus
from batchery.model.deployments import Deployment
from batchery.queue.worker import Worker, WorkerConfig
from batchery.stores.sql.store import SqlStore
from batchery.workers import worker as worker_for
from tests.helpers import chat_file
from tests.integration.threaded_server import ThreadedServer

N = remote.MAX_CONSECUTIVE_FAILURES
KEY_ENV = "FAKE_PROVIDER_KEY"
#: The retry wait's first step in these tests (1 s in production): the doubling is the same.
FIRST_RETRY_S = 0.05
#: The `timeout_s` of the connector: the provider's `slow` answer comes later.
TIMEOUT_S = 0.5


# -- a fake OpenAI Batch API -----------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    step: str  #: upload, create, poll, cancel or download
    action: str
    at: float


@dataclass
class _State:
    #: Per step, the actions of its calls in turn; the last one repeats. Default: ok.
    plans: dict[str, list[str]]
    #: custom_ids the provider leaves out of its output file.
    drop: set[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    calls: list[Call] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    files: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_in_flight: int = 0
    errors: list[BaseException] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._route(b"")

    def do_POST(self) -> None:
        self._route(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _route(self, raw: bytes) -> None:
        parts = self.path.strip("/").split("/")  # v1, files|batches, [id], [content|cancel]
        step, handle = {
            ("POST", 2, "files"): ("upload", self.upload),
            ("POST", 2, "batches"): ("create", self.create),
            ("GET", 3, "batches"): ("poll", self.poll),
            ("POST", 4, "batches"): ("cancel", self.cancel),
            ("GET", 4, "files"): ("download", self.download),
        }[(self.command, len(parts), parts[1])]
        state = self.server.state
        with state.lock:
            plan = state.plans.get(step, ["ok"])
            action = plan[min(state.counts[step], len(plan) - 1)]
            state.counts[step] += 1
            state.calls.append(Call(step=step, action=action, at=time.monotonic()))
        if action == "ok":
            handle(raw, parts)
        else:
            _FAULTS[action](self)

    def send_json(self, status: int, obj: Any) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")

    def send_bytes(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def upload(self, raw: bytes, _parts: list[str]) -> None:
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser().parsebytes(head + raw)
        content = next(p.get_payload(decode=True) for p in message.get_payload()
                       if p.get_filename())
        with self.server.state.lock:
            file_id = f"file-{len(self.server.state.files)}"
            self.server.state.files[file_id] = content
        self.send_json(200, {"id": file_id, "object": "file", "purpose": "batch"})

    def create(self, raw: bytes, _parts: list[str]) -> None:
        body = json.loads(raw)
        with self.server.state.lock:
            job_id = f"batch_fake{len(self.server.state.jobs)}"
            job = {"id": job_id, "object": "batch", "status": "in_progress",
                   "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                   "output_file_id": None, "error_file_id": None,
                   "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            self.server.state.jobs[job_id] = job
        self.send_json(200, job)

    def poll(self, _raw: bytes, parts: list[str]) -> None:
        """The job completes at its first successful poll."""
        with self.server.state.lock:
            job = self.server.state.jobs[parts[2]]
            if job["status"] == "in_progress":
                answered = self._answered(job["input_file_id"])
                self.server.state.files[f"out-{job['id']}"] = b"".join(answered)
                job.update(status="completed", output_file_id=f"out-{job['id']}",
                           request_counts={"total": len(answered),
                                           "completed": len(answered), "failed": 0})
        self.send_json(200, job)

    def _answered(self, input_file_id: str) -> list[bytes]:
        lines = []
        for raw in self.server.state.files[input_file_id].splitlines():
            line = json.loads(raw)
            if line["custom_id"] in self.server.state.drop:
                continue
            lines.append(orjson.dumps({
                "id": f"resp-{line['custom_id']}", "custom_id": line["custom_id"],
                "response": {"status_code": 200, "request_id": "r", "body": {
                    "object": "chat.completion", "model": line["body"]["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": "hi"}}]}},
                "error": None}) + b"\n")
        return lines

    def cancel(self, _raw: bytes, parts: list[str]) -> None:
        with self.server.state.lock:
            job = self.server.state.jobs[parts[2]]
            if job["status"] == "completed":
                self.send_json(409, {"error": {"message": "The batch has ended."}})
                return
            job["status"] = "cancelled"
        self.send_json(200, job)

    def download(self, _raw: bytes, parts: list[str]) -> None:
        self.send_bytes(200, self.server.state.files[parts[2]], "application/octet-stream")


def _slow(handler: _Handler) -> None:
    handler.server.state.stopping.wait(TIMEOUT_S * 3)
    handler.close_connection = True
    handler.send_json(500, {"error": {"message": "too late"}})


_FAULTS: dict[str, Callable[[_Handler], None]] = {
    "500": lambda h: h.send_json(500, {"error": {"message": "The server had an error."}}),
    "502": lambda h: h.send_bytes(502, b"<html>502 Bad Gateway</html>", "text/html"),
    "429": lambda h: h.send_json(429, {"error": {"message": "Rate limit reached."}}),
    "400": lambda h: h.send_json(400, {"error": {"message": "Invalid 'endpoint'."}}),
    # Reads the request, then closes the socket without a word: a connection error.
    "drop": lambda h: setattr(h, "close_connection", True),
    # Answers after the connector's timeout: a timeout.
    "slow": _slow,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, state: _State) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, (ConnectionError, TimeoutError)):
            self.state.errors.append(exc)


class FakeBatchProvider(ThreadedServer):
    label = "fake batch provider"

    def __init__(self, plans: dict[str, list[str]] | None = None,
                 drop: set[str] | None = None) -> None:
        self.state = _State(plans=plans or {}, drop=drop or set())
        super().__init__(_Server(self.state), self.state, "fake-batch-provider")

    def steps(self) -> list[str]:
        return [c.step for c in self.calls]

    def times(self, step: str) -> list[float]:
        return [c.at for c in self.calls if c.step == step]


# -- our side ----------------------------------------------------------------------------

@dataclass
class Ours:
    store: SqlStore
    files: FsspecFileStore
    batches: BatchService
    messages: MessageBatchService
    worker: Worker


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "RETRY_FIRST_S", FIRST_RETRY_S)
    monkeypatch.setattr(remote, "FIRST_POLL_S", FIRST_RETRY_S)


def start_ours(tmp_path: Path, provider: FakeBatchProvider) -> Ours:
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'ours.db'}")
    options = {"api_key_env": KEY_ENV, "model": "gpt-x", "timeout_s": TIMEOUT_S}
    store.set_deployments([
        Deployment(name="remote-gpt", backend="openai_batch",
                   options={"base_url": f"{provider.base_url}/v1", **options}),
        Deployment(name="remote-claude", backend="anthropic_batch",
                   options={"base_url": provider.base_url, **options}),
    ])
    files = FsspecFileStore(str(tmp_path / "files"))
    worker = worker_for(store, files, WorkerConfig(jobs=False, poll_s=0.01))
    return Ours(store=store, files=files, batches=BatchService(store, files),
                messages=MessageBatchService(store, files), worker=worker)


def with_provider(**kwargs: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("provider", [kwargs], indirect=True, ids=["planned"])


@pytest.fixture
def provider(request: pytest.FixtureRequest) -> Iterator[FakeBatchProvider]:
    """The fake provider; a test gives its plans with `@with_provider(...)`."""
    with FakeBatchProvider(**getattr(request, "param", {})) as fake:
        yield fake


@pytest.fixture
def ours(tmp_path: Path, provider: FakeBatchProvider, monkeypatch: pytest.MonkeyPatch,
         fast_retries: None) -> Iterator[Ours]:
    monkeypatch.setenv(KEY_ENV, "sk-fake")
    ours = start_ours(tmp_path, provider)
    yield ours
    ours.worker.stop()
    ours.worker.run()
    ours.store.close()


def submit(ours: Ours, n: int = 6) -> Batch:
    record = ours.batches.upload("p", io.BytesIO(chat_file(n, model="remote-gpt")),
                                 filename="in.jsonl", purpose="batch")
    return ours.batches.create_batch("p", input_file_id=record.id,
                                     endpoint="/v1/chat/completions")


def run_until_ended(ours: Ours, batch_id: str, timeout: float = 30) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = ours.store.get_batch("p", batch_id)
        assert batch is not None
        if batch.status.is_terminal:
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


def only_error(batch: Batch) -> tuple[str, str]:
    assert batch.status is BatchStatus.FAILED and batch.errors is not None
    (error,) = batch.errors
    return error.code, error.message


# -- the rules -----------------------------------------------------------------------------

def test_the_retry_schedule() -> None:
    assert remote.MAX_CONSECUTIVE_FAILURES == 5
    assert [remote.retry_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize("deployment", ["remote-gpt", "remote-claude"])
def test_a_connector_that_cannot_be_built_fails_the_batch_at_once(
        ours: Ours, provider: FakeBatchProvider, monkeypatch: pytest.MonkeyPatch,
        deployment: str) -> None:
    monkeypatch.delenv(KEY_ENV)
    if deployment == "remote-gpt":
        batch = submit(ours)
    else:
        batch = ours.messages.create("p", [
            {"custom_id": f"m{i}", "params": {"model": deployment, "max_tokens": 5,
                                              "messages": [{"role": "user", "content": "x"}]}}
            for i in range(3)])
    assert ours.worker.run_once()  # validation hands the batch to the provider
    assert ours.worker.run_once()  # the first remote step: the connector is built
    failed = ours.store.get_batch("p", batch.id)
    assert failed is not None
    code, message = only_error(failed)
    assert code == "remote_error"
    assert f"deployment '{deployment}'" in message
    assert KEY_ENV in message and "api_key_env" in message
    assert provider.calls == []


@pytest.mark.parametrize("step", ["create", "poll", "download"])
def test_transient_errors_short_of_the_limit_are_retried_with_a_doubling_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_retries: None,
        step: str) -> None:
    # 5xx, 429, a dropped connection and a timeout: N - 1 failures, then an answer.
    faults = ["500", "429", "drop", "slow", "502"][:N - 1]
    monkeypatch.setenv(KEY_ENV, "sk-fake")
    with FakeBatchProvider(plans={step: [*faults, "ok"]}) as provider:
        ours = start_ours(tmp_path, provider)
        try:
            batch = run_until_ended(ours, submit(ours).id)
            out = content(ours, batch.output_file_id)
        finally:
            ours.worker.stop()
            ours.worker.run()
            ours.store.close()
        times = provider.times(step)
    assert batch.status is BatchStatus.COMPLETED, batch.errors
    assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(6)]
    assert len(times) == N
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for failures, gap in enumerate(gaps, start=1):
        assert gap >= 0.9 * FIRST_RETRY_S * 2 ** (failures - 1), gaps
    assert "cancel" not in provider.steps()


@with_provider(plans={"poll": ["500"]})
def test_the_limit_of_failed_polls_fails_the_batch_and_cancels_the_provider_job(
        ours: Ours, provider: FakeBatchProvider) -> None:
    batch = run_until_ended(ours, submit(ours).id)
    code, message = only_error(batch)
    assert code == "remote_error"
    assert message.startswith(f"Polling the provider's batch failed {N} times in a row")
    assert "500" in message
    assert provider.steps().count("poll") == N
    # Our batch failed while the provider's job ran: it is cancelled, once.
    assert provider.steps()[-1] == "cancel" and provider.steps().count("cancel") == 1
    assert provider.state.jobs["batch_fake0"]["status"] == "cancelled"


@with_provider(plans={"download": ["502"]})
def test_the_limit_of_failed_downloads_fails_the_batch(ours: Ours,
                                                      provider: FakeBatchProvider) -> None:
    batch = run_until_ended(ours, submit(ours).id)
    code, message = only_error(batch)
    assert code == "remote_error"
    assert message.startswith(f"Downloading the provider's results failed {N} times in a row")
    assert provider.steps().count("download") == N
    # The provider's job had ended: it is neither polled again between downloads nor
    # cancelled.
    assert provider.steps().count("poll") == 1
    assert "cancel" not in provider.steps()


@with_provider(plans={"create": ["400"]})
def test_a_4xx_on_create_fails_the_batch_at_once(ours: Ours,
                                                 provider: FakeBatchProvider) -> None:
    batch = run_until_ended(ours, submit(ours).id)
    code, message = only_error(batch)
    assert code == "remote_error"
    assert message.startswith("Submitting the batch to the provider failed: ")
    assert "400" in message and "Invalid 'endpoint'." in message
    assert provider.steps() == ["upload", "create"]


@with_provider(drop={"req-1", "req-4"})
def test_requests_the_provider_left_out_come_back_as_errors(ours: Ours) -> None:
    batch = run_until_ended(ours, submit(ours).id)
    assert batch.status is BatchStatus.COMPLETED
    out, errors = content(ours, batch.output_file_id), content(ours, batch.error_file_id)
    assert sorted(x["custom_id"] for x in out) == ["req-0", "req-2", "req-3", "req-5"]
    assert sorted(x["custom_id"] for x in errors) == ["req-1", "req-4"]
    assert {(x["response"], x["error"]["code"]) for x in errors} == {(None, "server_error")}
    assert (batch.completed, batch.failed) == (4, 2)
