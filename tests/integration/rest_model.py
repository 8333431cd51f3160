"""A REST model with its own request and response shapes (not OpenAI's), on 127.0.0.1.

    POST /models/{name}/embed   {"inputs": str | [str]}                 -> {"embeddings": [[...]]}
    POST /generate              {"prompt": str, "max_new_tokens": int}  -> {"generated_text": ...}

Every request needs `Authorization: Bearer <token>`; without it the answer is 401 with the
server's own error JSON. The text of a request (its prompt, or its inputs joined by `|`)
chooses its fate with a `" do:<plan>"` suffix: comma-separated actions, one per attempt,
the last repeating. Attempts are counted per text, so give each request its own text.

Actions:
    ok        the answer
    hold      the answer after a short pause (for counting requests in flight)
    429       429 with `Retry-After` (1 s unless the server is told otherwise)
    503       503, the model is loading
    422       422 with this server's own validation error JSON
    text500   500 with a plain-text body
    slow      the answer after `slow_s`, longer than the client's timeout
    drop      reads the request, then closes the socket without a word
    nofield   200 with JSON that lacks the field the deployment maps

Also the `post_process` functions that tests name as `tests.integration.rest_model:...`.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.integration.threaded_server import ThreadedServer

PLAN_MARK = " do:"
TOKEN = "rest-model-token"
UNAUTHORIZED = {"message": "missing or wrong bearer token", "code": 40100}
LOADING = {"error": "Model is loading", "error_type": "overloaded", "estimated_time": 2.5}
RATE_LIMITED = {"error": "Model is overloaded", "error_type": "overloaded"}
INVALID = {"error": "Input validation error: inputs must have less than 512 tokens",
           "error_type": "Validation"}
TEXT_500 = "worker crashed: CUDA error: an illegal memory access was encountered"
NO_FIELD = {"result": "nothing you asked for", "took_ms": 3}
_EMBED = re.compile(r"^/models/([^/?]+)/embed(?:\?.*)?$")


def vector(text: str) -> list[float]:
    """The deterministic embedding of a text."""
    return [float(len(text)), float(sum(map(ord, text)) % 101), 1.0]


def generated(prompt: str) -> str:
    return f"generated: {prompt}"


def plan_of(text: str) -> list[str]:
    _, mark, plan = text.rpartition(PLAN_MARK)
    return plan.split(",") if mark else ["ok"]


@dataclass(frozen=True)
class Call:
    """One request the model received."""

    key: str
    action: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class _State:
    token: str
    slow_s: float
    hold_s: float
    retry_after: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    calls: list[Call] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    errors: list[BaseException] = field(default_factory=list)


def _key(path: str, body: Any) -> str:
    """The text that carries the plan: the prompt, or the inputs joined."""
    if not isinstance(body, dict):
        return ""
    if path.startswith("/generate"):
        return str(body.get("prompt", ""))
    inputs = body.get("inputs", "")
    return "|".join(map(str, inputs)) if isinstance(inputs, list) else str(inputs)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.loads(raw) if raw else None
        action = self._record(body)
        try:
            self._act(action, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timed out) first
        finally:
            with self.server.state.lock:
                self.server.state.in_flight -= 1

    def _record(self, body: Any) -> str:
        state = self.server.state
        key = _key(self.path, body)
        authorized = self.headers.get("Authorization") == f"Bearer {state.token}"
        with state.lock:
            plan = plan_of(key)
            action = plan[min(state.attempts[key], len(plan) - 1)] if authorized else "401"
            state.attempts[key] += 1
            state.calls.append(Call(key=key, action=action, method=self.command,
                                    path=self.path, body=body, at=time.monotonic(),
                                    headers={k.lower(): v for k, v in self.headers.items()}))
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        return action

    def _act(self, action: str, body: Any) -> None:
        state = self.server.state
        if action in ("hold", "slow"):
            state.stopping.wait(state.hold_s if action == "hold" else state.slow_s)
            self.close_connection = action == "slow"
        if action in ("ok", "hold", "slow"):
            self._answer(body)
        elif action == "drop":
            self.close_connection = True  # returning without a word closes the socket
        elif action == "text500":
            self.send(500, TEXT_500.encode(), content_type="text/plain")
        else:
            status, payload, headers = _CANNED[action](state)
            self.send_json(status, payload, headers)

    def _answer(self, body: Any) -> None:
        if self.path.startswith("/generate"):
            if not isinstance(body.get("max_new_tokens"), int):
                self.send_json(422, {"error": "max_new_tokens must be an integer",
                                     "error_type": "Validation"})
                return
            self.send_json(200, {"generated_text": generated(body["prompt"]),
                                 "details": {"generated_tokens": body["max_new_tokens"]}})
        elif _EMBED.match(self.path):
            inputs = body["inputs"]
            texts = inputs if isinstance(inputs, list) else [inputs]
            self.send_json(200, {"embeddings": [vector(t) for t in texts]})
        else:
            self.send_json(404, {"message": f"no route {self.path}"})

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


_Canned = tuple[int, Any, dict[str, str] | None]
_CANNED: dict[str, Callable[[_State], _Canned]] = {
    "401": lambda s: (401, UNAUTHORIZED, None),
    "429": lambda s: (429, RATE_LIMITED, {"Retry-After": s.retry_after}),
    "503": lambda s: (503, LOADING, None),
    "422": lambda s: (422, INVALID, None),
    "nofield": lambda s: (200, NO_FIELD, None),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the connection threads
    block_on_close = True
    request_queue_size = 128

    def __init__(self, state: _State) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, (ConnectionError, TimeoutError)):
            self.state.errors.append(exc)


class RestModel(ThreadedServer):
    """The server, started in a thread; use as a context manager."""

    label = "REST model"

    def __init__(self, *, token: str = TOKEN, slow_s: float = 2.0, hold_s: float = 0.05,
                 retry_after: str = "1") -> None:
        self.state = _State(token=token, slow_s=slow_s, hold_s=hold_s, retry_after=retry_after)
        super().__init__(_Server(self.state), self.state, "rest-model")


# -- post_process functions ------------------------------------------------------------


def generate_to_chat(endpoint: str, request_body: dict[str, Any],
                     response_json: Any) -> dict[str, Any]:
    """The /generate answer as a chat completion, with the token count it reports."""
    tokens = response_json["details"]["generated_tokens"]
    return {"id": "chatcmpl-rest", "object": "chat.completion", "created": 0,
            "model": request_body["model"], "endpoint_seen": endpoint,
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant",
                                     "content": response_json["generated_text"]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                      "total_tokens": 1 + tokens}}


def broken_post_process(endpoint: str, request_body: dict[str, Any],
                        response_json: Any) -> dict[str, Any]:
    """Fails the way a post-processor with a wrong idea of the answer does."""
    value: dict[str, Any] = response_json["choices"]
    return value
