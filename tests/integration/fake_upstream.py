"""A fake OpenAI-compatible upstream: a real HTTP/1.1 server on 127.0.0.1 that injects faults.

Each request picks its own fate from the last message's content: `"<anything> do:<plan>"`,
where the plan is a comma-separated list of actions, one per attempt; the last action repeats
for every later attempt. Attempts are counted per content string, so give every request a
distinct content (its custom_id, say). `"req-1 do:500,ok"` fails once, then succeeds;
`"req-2 do:500"` fails every time. Content without a plan is answered `ok`.

Actions:
    ok        200 chat completion echoing the content (and the body's model)
    hold      like ok, after a short pause (for counting requests in flight)
    429       429 with `Retry-After: 1`
    429ms     429 with `retry-after-ms: 300` and `Retry-After: 20` (the ms header should win)
    429date   429 with `Retry-After` as an HTTP date 2 s ahead
    429junk   429 with an unparseable `Retry-After`
    500       500 with an OpenAI server_error body
    400       400 with an OpenAI invalid_request_error body
    slow      sleeps `slow_s` before answering (longer than the client's timeout)
    drop      reads the request, then closes the socket without answering
    html502   502 with an HTML body, as a proxy in front of the model would send
    text200   200 with a body that is not JSON

The server is a `ThreadingHTTPServer`, one thread per connection, with keep-alive.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.integration.threaded_server import ThreadedServer

PLAN_MARK = " do:"

#: The body of the 500 answer, byte for byte (tests check it is kept).
SERVER_ERROR = {"error": {"message": "The server had an error while processing your request.",
                          "type": "server_error", "param": None, "code": None}}
BAD_REQUEST = {"error": {"message": "Invalid value for 'temperature': must be at most 2.",
                         "type": "invalid_request_error", "param": "temperature",
                         "code": "invalid_value"}}
RATE_LIMITED = {"error": {"message": "Rate limit reached for requests.",
                          "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
HTML_502 = "<html><body><h1>502 Bad Gateway</h1>nginx/1.25</body></html>"
TEXT_200 = "upstream says: all good (but not in JSON)"


def content_of(body: dict[str, Any]) -> str:
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content", "")
    return content if isinstance(content, str) else json.dumps(content)


def plan_of(content: str) -> list[str]:
    _, mark, plan = content.rpartition(PLAN_MARK)
    return plan.split(",") if mark else ["ok"]


@dataclass(frozen=True)
class Call:
    """One request the upstream received."""

    key: str
    attempt: int
    action: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


@dataclass
class _State:
    slow_s: float
    hold_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    calls: list[Call] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    errors: list[BaseException] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: Idle keep-alive connections are dropped after this many seconds.
    timeout = 10
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        state = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.loads(raw)
        key = content_of(body)
        with state.lock:
            attempt = state.attempts[key]
            state.attempts[key] += 1
            plan = plan_of(key)
            action = plan[min(attempt, len(plan) - 1)]
            state.calls.append(Call(key=key, attempt=attempt, action=action, path=self.path,
                                    headers={k.lower(): v for k, v in self.headers.items()},
                                    body=body, at=time.monotonic()))
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            _ACTIONS[action](self, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timed out) first
        finally:
            with state.lock:
                state.in_flight -= 1

    def send(self, status: int, payload: bytes, *, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(obj).encode(), headers=headers)

    # -- actions -----------------------------------------------------------------------

    def ok(self, body: dict[str, Any]) -> None:
        content = content_of(body)
        self.send_json(200, {
            "id": f"chatcmpl-fake-{len(self.server.state.calls)}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"echo: {content}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})

    def hold(self, body: dict[str, Any]) -> None:
        self.server.state.stopping.wait(self.server.state.hold_s)
        self.ok(body)

    def slow(self, body: dict[str, Any]) -> None:
        self.server.state.stopping.wait(self.server.state.slow_s)
        self.close_connection = True
        self.ok(body)

    def drop(self, body: dict[str, Any]) -> None:
        self.close_connection = True  # returning without a word closes the socket

    def rate_limited(self, headers: dict[str, str]) -> None:
        self.send_json(429, RATE_LIMITED, headers)


_ACTIONS: dict[str, Callable[[_Handler, dict[str, Any]], None]] = {
    "ok": _Handler.ok,
    "hold": _Handler.hold,
    "slow": _Handler.slow,
    "drop": _Handler.drop,
    "429": lambda h, _: h.rate_limited({"Retry-After": "1"}),
    "429ms": lambda h, _: h.rate_limited({"retry-after-ms": "300", "Retry-After": "20"}),
    "429date": lambda h, _: h.rate_limited(
        {"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)}),
    "429junk": lambda h, _: h.rate_limited({"Retry-After": "soon, maybe"}),
    "500": lambda h, _: h.send_json(500, SERVER_ERROR),
    "400": lambda h, _: h.send_json(400, BAD_REQUEST),
    "html502": lambda h, _: h.send(502, HTML_502.encode(), content_type="text/html"),
    "text200": lambda h, _: h.send(200, TEXT_200.encode(), content_type="text/plain"),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the connection threads
    block_on_close = True
    request_queue_size = 128

    def __init__(self, state: _State) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, (ConnectionError, TimeoutError)):
            self.state.errors.append(exc)


class FakeUpstream(ThreadedServer):
    """The server, started in a thread; use as a context manager."""

    label = "fake upstream"

    def __init__(self, *, slow_s: float = 2.0, hold_s: float = 0.05) -> None:
        self.state = _State(slow_s=slow_s, hold_s=hold_s)
        super().__init__(_Server(self.state), self.state, "fake-upstream")
