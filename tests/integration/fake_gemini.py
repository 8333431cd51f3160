"""A fake Gemini Batch Mode API (the Developer API's REST shapes): a real HTTP/1.1 server on
127.0.0.1 for the `gemini_batch` connector's tests.

Routes, under `/v1beta` (uploads under `/upload/v1beta`):

    POST models/{model}:batchGenerateContent   create; inline requests or an uploaded file
    GET  batches/{id}                          the batch as a long-running operation
    POST batches/{id}:cancel                   cancel ({} back)
    POST /upload/v1beta/files                  resumable upload: start, then chunks
                                               (`upload`, the last `upload, finalize`)
    GET  files/{id}:download?alt=media         a results file

A batch is PENDING when created and ends at its `polls_to_end`-th poll: SUCCEEDED with
every request answered, unless cancelled first. Each request is answered from its last
content's text: `fail` gives an INVALID_ARGUMENT error, `block` a prompt blocked by safety,
`call` a function call, anything else the text echoed. Keys in `drop` get no result,
keys in `twice` two. `end_state` `FAILED` fails every batch at its end; `EXPIRED` ends it
expired, every other request with a DEADLINE_EXCEEDED error.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.integration.threaded_server import ThreadedServer

KEY = "gm-test-key"
#: The host the fake names in its upload URLs: not its own (the connector must keep the key
#: on the configured host, as the google-genai SDK does).
FOREIGN_UPLOAD_HOST = "upload.elsewhere.invalid:9"


@dataclass(frozen=True)
class Call:
    key: str  #: the route: create, poll, cancel, upload-start, upload, download
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class _State:
    polls_to_end: int
    end_state: str
    drop: set[str]
    twice: set[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    calls: list[Call] = field(default_factory=list)
    uploads: dict[str, int] = field(default_factory=dict)  #: upload id -> announced size
    received: dict[str, bytearray] = field(default_factory=dict)  #: upload id -> bytes
    files: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per job: its requests as (key, request) and the number of polls so far
    requests: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)
    max_in_flight: int = 0
    errors: list[BaseException] = field(default_factory=list)


def answer(request: dict[str, Any], model: str) -> dict[str, Any]:
    """A result for one request: `{"response": …}` or `{"error": …}`."""
    text = request["contents"][-1]["parts"][-1].get("text", "")
    if text == "fail":
        return {"error": {"code": 3, "message": "Invalid value at 'contents'."}}
    if text == "block":
        return {"response": {"promptFeedback": {"blockReason": "SAFETY"},
                             "usageMetadata": {"promptTokenCount": 1, "totalTokenCount": 1}}}
    if text == "call":
        parts: list[dict[str, Any]] = [{"functionCall": {"name": "lookup",
                                                         "args": {"q": "x"}}}]
    else:
        parts = [{"text": "thinking...", "thought": True}, {"text": f"echo: {text}"}]
    return {"response": {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP",
                        "index": 0}],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": "2",
                          "thoughtsTokenCount": 1, "totalTokenCount": 6},
        "modelVersion": model.removeprefix("models/"), "responseId": "resp-1"}}


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
        url = urlsplit(self.path)
        key, handle = self._handler(url.path)
        with self.state.lock:
            self.state.calls.append(Call(key=key, path=self.path,
                                         headers={k.lower(): v for k, v in self.headers.items()},
                                         body=raw))
        if self.headers.get("x-goog-api-key") != KEY:
            self.send_json(401, {"error": {"code": 401, "message": "API key not valid.",
                                           "status": "UNAUTHENTICATED"}})
            return
        handle(raw, url.path.rsplit("/", 1)[-1], parse_qs(url.query))

    def _handler(self, path: str) -> tuple[str, Callable[[bytes, str, Any], None]]:
        if self.command == "POST" and path.endswith(":batchGenerateContent"):
            return "create", self.create
        if self.command == "POST" and path.endswith(":cancel"):
            return "cancel", self.cancel
        if self.command == "GET" and path.startswith("/v1beta/batches/"):
            return "poll", self.poll
        if self.command == "POST" and path == "/upload/v1beta/files":
            if self.headers.get("X-Goog-Upload-Command") == "start":
                return "upload-start", self.upload_start
            return "upload", self.upload
        if self.command == "GET" and path.endswith(":download"):
            return "download", self.download
        return "unknown", lambda *_: self.send_json(404, {"error": {"code": 404}})

    @property
    def state(self) -> _State:
        return self.server.state

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def send_bytes(self, status: int, payload: bytes, content_type: str,
                   headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    # -- files --

    def upload_start(self, _raw: bytes, _last: str, _query: Any) -> None:
        with self.state.lock:
            upload_id = str(len(self.state.uploads))
            self.state.uploads[upload_id] = int(
                self.headers["X-Goog-Upload-Header-Content-Length"])
        url = f"http://{FOREIGN_UPLOAD_HOST}/upload/v1beta/files?upload_id={upload_id}"
        self.send_bytes(200, b"", "text/plain", {"X-Goog-Upload-URL": url,
                                                 "X-Goog-Upload-Status": "active"})

    def upload(self, raw: bytes, _last: str, query: Any) -> None:
        upload_id = query["upload_id"][0]
        command = self.headers["X-Goog-Upload-Command"]
        with self.state.lock:
            received = self.state.received.setdefault(upload_id, bytearray())
            assert int(self.headers["X-Goog-Upload-Offset"]) == len(received)
            received += raw
        if command == "upload":
            self.send_json(200, {}, {"X-Goog-Upload-Status": "active"})
            return
        assert command == "upload, finalize"
        assert len(received) == self.state.uploads[upload_id]
        name = f"files/in{upload_id}"
        with self.state.lock:
            self.state.files[name] = bytes(received)
        self.send_json(200, {"file": {"name": name, "sizeBytes": str(len(received)),
                                      "mimeType": "application/jsonl", "state": "ACTIVE"}},
                       {"X-Goog-Upload-Status": "final"})

    def download(self, _raw: bytes, last: str, query: Any) -> None:
        assert query == {"alt": ["media"]}
        name = "files/" + last.removesuffix(":download")
        self.send_bytes(200, self.state.files[name], "application/octet-stream")

    # -- batches --

    def create(self, raw: bytes, last: str, _query: Any) -> None:
        model = "models/" + last.removesuffix(":batchGenerateContent")
        config = json.loads(raw)["batch"]["inputConfig"]
        with self.state.lock:
            job_id = f"batches/fake{len(self.state.jobs)}"
            self.state.requests[job_id] = self._requests(config)
            self.state.polls[job_id] = 0
            job = {"name": job_id, "metadata": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta."
                         "GenerateContentBatch",
                "name": job_id, "model": model,
                "displayName": json.loads(raw)["batch"].get("displayName"),
                "state": "BATCH_STATE_PENDING", "createTime": "2025-01-01T00:00:00Z",
                "batchStats": {"requestCount": str(len(self.state.requests[job_id])),
                               "pendingRequestCount": str(len(self.state.requests[job_id]))}}}
            self.state.jobs[job_id] = job
        self.send_json(200, job)

    def _requests(self, config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if "fileName" in config:
            lines = [json.loads(x) for x in self.state.files[config["fileName"]].splitlines()]
            return [(x["key"], x["request"]) for x in lines]
        return [(x["metadata"]["key"], x["request"]) for x in config["requests"]["requests"]]

    def poll(self, _raw: bytes, last: str, _query: Any) -> None:
        job_id = f"batches/{last}"
        with self.state.lock:
            job = self.state.jobs[job_id]
            self.state.polls[job_id] += 1
            if job["metadata"]["state"] == "BATCH_STATE_PENDING" \
                    and self.state.polls[job_id] >= self.state.polls_to_end:
                self._end(job_id, job)
        self.send_json(200, job)

    def _end(self, job_id: str, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        if self.state.end_state == "FAILED":
            meta["state"] = "BATCH_STATE_FAILED"
            job.update(done=True, error={"code": 13, "message": "The batch could not run."})
            return
        results = []
        for i, (key, request) in enumerate(self.state.requests[job_id]):
            if key in self.state.drop:
                continue
            result = answer(request, meta["model"])
            if self.state.end_state == "EXPIRED" and i % 2:
                result = {"error": {"code": 4, "message": "The batch expired."}}
            results += [(key, result)] * (2 if key in self.state.twice else 1)
        ok = sum("response" in r for _, r in results)
        meta.update(state=f"BATCH_STATE_{self.state.end_state}", endTime="2025-01-01T00:01:00Z",
                    batchStats={"requestCount": str(len(self.state.requests[job_id])),
                                "successfulRequestCount": str(ok),
                                "failedRequestCount": str(len(results) - ok)})
        if self._was_file(job_id):
            name = f"files/out-{job_id.rsplit('/', 1)[-1]}"
            self.state.files[name] = b"".join(
                json.dumps({"key": k, **r}).encode() + b"\n" for k, r in results)
            output: dict[str, Any] = {"responsesFile": name}
        else:
            output = {"inlinedResponses": {"inlinedResponses": [
                {**r, "metadata": {"key": k}} for k, r in results]}}
        meta["output"] = output
        job.update(done=True, response={"@type": "GenerateContentBatchOutput", **output})

    def _was_file(self, job_id: str) -> bool:
        creates = [c for c in self.state.calls if c.key == "create"]
        index = int(job_id.removeprefix("batches/fake"))
        return b'"fileName"' in creates[index].body

    def cancel(self, _raw: bytes, last: str, _query: Any) -> None:
        job_id = "batches/" + last.removesuffix(":cancel")
        with self.state.lock:
            job = self.state.jobs[job_id]
            if job["metadata"]["state"] != "BATCH_STATE_PENDING":
                self.send_json(400, {"error": {"code": 400, "message": "The batch has ended.",
                                               "status": "FAILED_PRECONDITION"}})
                return
            job["metadata"]["state"] = "BATCH_STATE_CANCELLED"
            job["done"] = True
        self.send_json(200, {})


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


class FakeGemini(ThreadedServer):
    label = "fake Gemini batch API"

    def __init__(self, *, polls_to_end: int = 1, end_state: str = "SUCCEEDED",
                 drop: set[str] | None = None, twice: set[str] | None = None) -> None:
        self.state = _State(polls_to_end=polls_to_end, end_state=end_state,
                            drop=drop or set(), twice=twice or set())
        super().__init__(_Server(self.state), self.state, "fake-gemini")

    def routes(self) -> list[str]:
        return [c.key for c in self.calls]
