"""The templated `http` backend against a real REST model on 127.0.0.1 that speaks its own
shapes (see `rest_model.py`) and injects faults on demand."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from batchery import backends
from batchery.api.app import create_app
from batchery.backends.http_template import HttpBackend
from batchery.batchapi import execution
from batchery.batchapi.service import BatchService
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.model.deployments import Deployment
from batchery.model.exceptions import ConfigError
from batchery.model.retry import RetryPolicy
from batchery.ports.backend import ModelBackend, Request
from batchery.queue.worker import Worker, WorkerConfig
from batchery.runtime import open_runtime
from batchery.settings import Settings
from batchery.stores.sql.store import SqlStore
from batchery.workers import worker as worker_for
from tests.helpers import jsonl
from tests.integration.rest_model import (
    INVALID,
    LOADING,
    NO_FIELD,
    RATE_LIMITED,
    TEXT_500,
    TOKEN,
    UNAUTHORIZED,
    RestModel,
    generate_to_chat,
    generated,
    vector,
)

EMBEDDINGS, CHAT, COMPLETIONS = "/v1/embeddings", "/v1/chat/completions", "/v1/completions"
POLICY = RetryPolicy(max_attempts=3, base_delay_s=0.05)
Line = dict[str, Any]


@pytest.fixture
def model() -> Iterator[RestModel]:
    # A short Retry-After keeps the tests that exhaust the retry budget quick.
    with RestModel(retry_after="0.1") as server:
        yield server


# -- deployments and requests ------------------------------------------------------------


def embed_options(model: RestModel) -> dict[str, Any]:
    return {"url": model.base_url + "/models/${model}/embed",
            "headers": {"Authorization": "Bearer ${credential.token}"},
            "body": {"inputs": "${body.input}", "truncate": True},
            "response": {"jsonpath": "$.embeddings"},
            "credential": {"token": TOKEN}}


def generate_options(model: RestModel) -> dict[str, Any]:
    return {"url": model.base_url + "/generate",
            "headers": {"Authorization": "Bearer ${credential.token}"},
            "body": {"prompt": "${body.messages[-1].content}",
                     "max_new_tokens": "${body.max_tokens}"},
            "response": {"jsonpath": "$.generated_text"},
            "credential": {"token": TOKEN}}


def embed_backend(model: RestModel, **options: Any) -> HttpBackend:
    return HttpBackend(**{**embed_options(model), **options})


def generate_backend(model: RestModel, **options: Any) -> HttpBackend:
    return HttpBackend(**{**generate_options(model), **options})


def embed(custom_id: str, text: str | list[str] | None = None, model: str = "emb") -> Request:
    return Request(custom_id=custom_id, body={"model": model, "input": text or custom_id})


def chat(custom_id: str, text: str | None = None, max_tokens: int | None = 16) -> Request:
    body: dict[str, Any] = {"model": "gen", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": text or custom_id}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return Request(custom_id=custom_id, body=body)


# -- running a chunk ---------------------------------------------------------------------


async def _run(backend: ModelBackend, endpoint: str, requests: Sequence[Request],
               policy: RetryPolicy) -> execution.ChunkOutput:
    await backend.start()
    try:
        async def lookup(_model: str) -> ModelBackend | None:
            return backend

        lines = [orjson.dumps({"custom_id": r.custom_id, "body": r.body}) for r in requests]
        return await execution.run_chunk(lines, endpoint, lookup, policy)
    finally:
        await backend.aclose()


def run(backend: ModelBackend, endpoint: str, requests: Sequence[Request],
        policy: RetryPolicy = POLICY) -> tuple[dict[str, Line], dict[str, Line], float]:
    """Run the requests as one chunk: the output and error lines by custom_id, and the
    seconds it took."""
    started = time.monotonic()
    output = asyncio.run(_run(backend, endpoint, requests, policy))
    elapsed = time.monotonic() - started
    out, err = parse_lines(bytes(output.out)), parse_lines(bytes(output.err))
    assert sorted([*out, *err]) == sorted(r.custom_id for r in requests), "a line got lost"
    return out, err, elapsed


def parse_lines(data: bytes) -> dict[str, Line]:
    lines: dict[str, Line] = {}
    for raw in data.splitlines():
        line = orjson.loads(raw)
        assert line["custom_id"] not in lines, f"{line['custom_id']} written twice"
        lines[line["custom_id"]] = line
    return lines


def body_of(line: Line) -> Any:
    return line["response"]["body"]


def error_of(line: Line) -> dict[str, Any]:
    error: dict[str, Any] = body_of(line)["error"]
    return error


# -- mapping answers -----------------------------------------------------------------------


def test_embeddings_through_jsonpath(model: RestModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REST_MODEL_TOKEN", TOKEN)
    backend = embed_backend(model, credential={"token_env": "REST_MODEL_TOKEN"},
                            upstream_model="bge-small",
                            headers={"Authorization": "Bearer ${credential.token}",
                                     "X-Req": "${custom_id}"})
    out, err, _ = run(backend, EMBEDDINGS, [embed("one", "hello"), embed("two", ["a", "bb"])])

    assert not err
    assert body_of(out["one"]) == {
        "object": "list", "model": "bge-small",
        "data": [{"object": "embedding", "index": 0, "embedding": vector("hello")}],
        "usage": {"prompt_tokens": 0, "total_tokens": 0}}
    assert [d["embedding"] for d in body_of(out["two"])["data"]] == [vector("a"), vector("bb")]
    assert [d["index"] for d in body_of(out["two"])["data"]] == [0, 1]
    two = next(c for c in model.calls if c.key == "a|bb")
    assert (two.method, two.path) == ("POST", "/models/bge-small/embed")
    assert two.body == {"inputs": ["a", "bb"], "truncate": True}, "a whole list stays a list"
    assert two.headers["authorization"] == f"Bearer {TOKEN}"
    assert two.headers["x-req"] == "two"
    assert two.headers["content-type"] == "application/json"


def test_chat_through_jsonpath(model: RestModel) -> None:
    out, err, _ = run(generate_backend(model), CHAT, [chat("c1", "Tell me a joke")])

    assert not err
    body = body_of(out["c1"])
    assert body["object"] == "chat.completion" and body["model"] == "gen"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": generated("Tell me a joke"),
                                 "refusal": None}
    assert choice["finish_reason"] == "stop"
    (call,) = model.calls
    assert call.path == "/generate"
    # The last message's text, and max_tokens kept a number.
    assert call.body == {"prompt": "Tell me a joke", "max_new_tokens": 16}


def test_completions_through_jsonpath(model: RestModel) -> None:
    backend = generate_backend(model, body={"prompt": "Q: ${body.prompt}\nA:",
                                            "max_new_tokens": 8})
    request = Request(custom_id="p1", body={"model": "gen", "prompt": "2+2?"})
    out, err, _ = run(backend, COMPLETIONS, [request])

    assert not err
    body = body_of(out["p1"])
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": generated("Q: 2+2?\nA:"),
                                "logprobs": None, "finish_reason": "stop"}]
    assert model.calls[0].body == {"prompt": "Q: 2+2?\nA:", "max_new_tokens": 8}


def test_post_process_returns_the_whole_body(model: RestModel) -> None:
    backend = generate_backend(model, response={
        "post_process": "tests.integration.rest_model:generate_to_chat"})
    out, err, _ = run(backend, CHAT, [chat("c1", "hi there", max_tokens=5)])

    assert not err
    expected = generate_to_chat(CHAT, chat("c1", "hi there", max_tokens=5).body,
                                {"generated_text": generated("hi there"),
                                 "details": {"generated_tokens": 5}})
    assert body_of(out["c1"]) == expected
    assert body_of(out["c1"])["endpoint_seen"] == CHAT


def test_post_process_that_raises_is_a_502_error_line(model: RestModel) -> None:
    backend = generate_backend(model, response={
        "post_process": "tests.integration.rest_model:broken_post_process"})
    out, err, _ = run(backend, CHAT, [chat("c1")])

    assert not out
    assert err["c1"]["response"]["status_code"] == 502
    assert error_of(err["c1"])["code"] == "post_process_failed"
    assert "broken_post_process" in error_of(err["c1"])["message"]
    assert "KeyError" in error_of(err["c1"])["message"]
    assert len(model.calls) == 1, "the upstream would answer the same again"


# -- templating ----------------------------------------------------------------------------


def test_url_placeholders_are_percent_encoded_and_model_defaults_to_the_line(
        model: RestModel) -> None:
    backend = embed_backend(
        model, url=model.base_url + "/models/${model}/embed?id=${custom_id}",
        headers={"Authorization": "Bearer ${credential.token}",
                 "X-Literal": "$${custom_id} is ${custom_id}"})
    out, err, _ = run(backend, EMBEDDINGS, [embed("a b&c=d", "x", model="bge small/v1.5")])

    assert not err
    (call,) = model.calls
    assert call.path == "/models/bge%20small%2Fv1.5/embed?id=a%20b%26c%3Dd"
    assert call.headers["x-literal"] == "${custom_id} is a b&c=d"
    assert body_of(out["a b&c=d"])["model"] == "bge small/v1.5"


def test_a_value_the_line_lacks_is_a_400_error_line_naming_it(model: RestModel) -> None:
    out, err, _ = run(generate_backend(model), CHAT, [chat("c1", max_tokens=None),
                                                      chat("c2")])

    assert list(out) == ["c2"]
    line = err["c1"]
    assert line["response"]["status_code"] == 400
    assert error_of(line)["code"] == "missing_required_parameter"
    assert error_of(line)["param"] == "max_tokens"
    assert "body.max_tokens" in error_of(line)["message"]
    assert [c.key for c in model.calls] == ["c2"], "nothing was sent for c1"


def test_header_values_from_the_request(model: RestModel) -> None:
    backend = embed_backend(model, headers={"Authorization": "Bearer ${credential.token}",
                                            "X-Req": "${custom_id}"})
    out, err, _ = run(backend, EMBEDDINGS, [embed("a\r\nX-Evil: 1", "x"),
                                            embed("café", "y")])

    # A line break would smuggle a header in: that line is refused, and never sent.
    assert err["a\r\nX-Evil: 1"]["response"]["status_code"] == 400
    assert list(out) == ["café"]
    (call,) = model.calls
    # Sent as UTF-8; the server's parser reads header bytes as latin-1.
    assert call.headers["x-req"].encode("latin-1").decode() == "café"


def test_without_body_or_response_options_the_line_and_answer_pass_through(
        model: RestModel) -> None:
    backend = HttpBackend(url=model.base_url + "/generate",
                          headers={"Authorization": f"Bearer {TOKEN}"})
    body = {"model": "gen", "prompt": "hi", "max_new_tokens": 3}
    out, err, _ = run(backend, COMPLETIONS, [Request(custom_id="p1", body=body)])

    assert not err
    assert model.calls[0].body == body
    assert body_of(out["p1"]) == {"generated_text": generated("hi"),
                                  "details": {"generated_tokens": 3}}


@pytest.mark.parametrize(("options", "says"), [
    ({"url": "http://127.0.0.1:9/${nope}"}, "unknown placeholder '${nope}'"),
    ({"url": "http://127.0.0.1:9/${model.name}"}, "without fields"),
    ({"url": "ftp://127.0.0.1/x"}, "http://"),
    ({"url": "http://127.0.0.1:99999/${model}"}, "port"),
    ({"url": "http://127.0.0.1:${body.port}/"}, "not a valid URL"),
    ({"body": {"inputs": "${body.input"}}, "unclosed"),
    ({"body": {"inputs": "${}"}}, "is not a path"),
    ({"headers": {"Authorization": "Bearer ${credential.key}"}}, "no such field"),
    ({"headers": {"X-Count": 5}}, "headers.X-Count"),
    ({"headers": {"X Count": "5"}}, "not a valid header name"),
    ({"credential": {"token_env": "REST_MODEL_UNSET"}}, "REST_MODEL_UNSET"),
    ({"credential": {"token": "t", "token_env": "HOME"}}, "not both"),
    ({"method": "FETCH"}, "method"),
    ({"response": {"jsonpath": "$.[["}}, "cannot parse"),
    ({"response": {"jsonpath": "$.a", "post_process": "m:f"}}, "not both"),
    ({"response": {"jq": ".a"}}, "unknown key"),
    ({"response": "$.embeddings"}, "expected a mapping"),
    ({"response": {"post_process": "tests.integration.rest_model:nope"}}, "cannot import"),
    ({"response": {"post_process": "batchery_no_such_module:f"}}, "cannot import"),
    ({"response": {"post_process": "tests.integration.rest_model"}}, "module.path:function"),
    ({"response": {"post_process": "tests.integration.rest_model:TOKEN"}}, "not a function"),
])
def test_bad_options_are_config_errors(model: RestModel, options: dict[str, Any],
                                       says: str) -> None:
    deployment = Deployment(name="emb", backend="http",
                            options={**embed_options(model), **options})
    with pytest.raises(ConfigError) as info:
        backends.create(deployment)
    assert says in str(info.value)


# -- upstream failures ---------------------------------------------------------------------


def test_without_the_token_the_upstream_401_is_kept(model: RestModel) -> None:
    backend = embed_backend(model, headers={}, credential=None)
    out, err, _ = run(backend, EMBEDDINGS, [embed("e1")])

    assert not out
    assert err["e1"]["response"]["status_code"] == 401
    assert body_of(err["e1"]) == UNAUTHORIZED
    assert [c.action for c in model.calls] == ["401"], "a 401 is not retried"
    assert "authorization" not in model.calls[0].headers


@pytest.mark.parametrize(("plan", "status", "attempts"), [
    ("422", 422, 1),
    ("503", 503, POLICY.max_attempts),
    ("429", 429, POLICY.max_attempts),
    ("text500", 500, POLICY.max_attempts),
])
def test_error_statuses_end_in_an_error_line_keeping_the_upstream_body(
        model: RestModel, plan: str, status: int, attempts: int) -> None:
    text = f"e1 do:{plan}"
    out, err, _ = run(embed_backend(model), EMBEDDINGS, [embed("e1", text), embed("fine")])

    assert list(out) == ["fine"]
    line = err["e1"]
    assert line["error"] is None
    assert line["response"]["status_code"] == status
    expected = {"422": INVALID, "503": LOADING, "429": RATE_LIMITED}.get(plan)
    if expected is not None:
        assert body_of(line) == expected
    else:  # not JSON: wrapped in an error object that quotes it
        assert error_of(line)["code"] == "invalid_upstream_body"
        assert repr(TEXT_500) in error_of(line)["message"]
    assert len(model.calls_for(text)) == attempts
    assert len(model.calls_for("fine")) == 1, "only the failure was asked again"


def test_retriable_failures_are_retried_then_succeed(model: RestModel) -> None:
    plans = ["503,ok", "429,ok", "drop,ok", "text500,ok", "503,503,ok"]
    requests = [embed(f"r{i}", f"r{i} do:{plan}") for i, plan in enumerate(plans)]
    out, err, _ = run(embed_backend(model), EMBEDDINGS, requests)

    assert not err
    for request in requests:
        text = request.body["input"]
        assert body_of(out[request.custom_id])["data"][0]["embedding"] == vector(text)
        assert model.calls_for(text)[-1].action == "ok"
    assert len(model.calls_for("r4 do:503,503,ok")) == 3


def test_429_waits_for_the_retry_after_it_names() -> None:
    with RestModel(retry_after="1") as model:
        out, err, _ = run(embed_backend(model), EMBEDDINGS, [embed("r1", "r1 do:429,ok")])
        first, second = model.calls_for("r1 do:429,ok")

    assert not err and out["r1"]["response"]["status_code"] == 200
    # Retry-After: 1, not the policy's 0.05 s backoff nor its 30 s ceiling (a wait that long
    # means the wrong delay was chosen, far from the right one whatever the machine's load).
    assert 0.95 <= second.at - first.at < 15


def test_timeouts_are_retried_then_an_error_line_504() -> None:
    requests = [embed("stuck", "stuck do:slow"), embed("once", "once do:slow,ok")]
    with RestModel(slow_s=60) as model:
        out, err, elapsed = run(embed_backend(model, timeout_s=0.3), EMBEDDINGS, requests)

    assert out["once"]["response"]["status_code"] == 200
    line = err["stuck"]
    assert line["response"]["status_code"] == 504
    assert error_of(line)["code"] == "upstream_timeout"
    assert "0.3s" in error_of(line)["message"]
    assert len(model.calls_for("stuck do:slow")) == POLICY.max_attempts
    # Three attempts of 0.3 s each, cut short: the model would have slept 60 s.
    assert 0.9 <= elapsed < 15


def test_an_answer_without_the_mapped_field_is_a_502_naming_the_jsonpath(
        model: RestModel) -> None:
    out, err, _ = run(embed_backend(model), EMBEDDINGS, [embed("e1", "e1 do:nofield")])

    assert not out
    line = err["e1"]
    assert line["response"]["status_code"] == 502
    assert error_of(line)["code"] == "unmapped_upstream_body"
    assert "$.embeddings" in error_of(line)["message"]
    assert NO_FIELD["result"] in error_of(line)["message"], "the answer is quoted"
    assert len(model.calls_for("e1 do:nofield")) == 1, "the same answer would come again"


def test_a_mapped_value_of_the_wrong_shape_is_a_502(model: RestModel) -> None:
    backend = embed_backend(model, response={"jsonpath": "$.embeddings[0][0]"})
    out, err, _ = run(backend, EMBEDDINGS, [embed("e1", "hello")])

    assert not out
    assert err["e1"]["response"]["status_code"] == 502
    assert "not a vector" in error_of(err["e1"])["message"]


def test_a_jsonpath_deployment_refuses_an_endpoint_it_cannot_wrap(model: RestModel) -> None:
    replies = asyncio.run(embed_backend(model).infer("/v1/responses", [embed("e1")]))

    assert [r.status_code for r in replies] == [404]
    assert not model.calls


def test_max_concurrency_caps_requests_in_flight(model: RestModel) -> None:
    requests = [embed(f"r{i}", f"r{i} do:hold") for i in range(20)]
    out, err, _ = run(embed_backend(model, max_concurrency=4), EMBEDDINGS, requests)

    assert len(out) == 20 and not err
    assert len(model.calls) == 20
    assert model.max_in_flight == 4


# -- through the engine --------------------------------------------------------------------

#: plan -> (status code of the line, in the output file?, attempts)
E2E_PLANS: dict[str, tuple[int, bool, int]] = {
    "ok": (200, True, 1),
    "503,ok": (200, True, 2),
    "429,ok": (200, True, 2),
    "drop,ok": (200, True, 2),
    "slow,ok": (200, True, 2),
    "422": (422, False, 1),
    "503": (503, False, 3),
    "nofield": (502, False, 1),
    "text500": (500, False, 3),
    "slow": (504, False, 3),
}


def drive(worker: Worker, service: BatchService, batch_id: str) -> Any:
    """Run the worker until the batch is done, then close it the way `run()` does."""
    deadline = time.monotonic() + 20
    try:
        while not (batch := service.get_batch("proj", batch_id)).status.is_terminal:
            assert time.monotonic() < deadline, f"stuck in {batch.status}"
            if not worker.run_once():
                time.sleep(0.05)
    finally:
        # With the stop already asked for, run() only closes the backends and the loop.
        worker.stop()
        worker.run()
    return batch


def file_lines(service: BatchService, file_id: str | None) -> dict[str, Line]:
    if file_id is None:
        return {}
    _, stream = service.open_content("proj", file_id)
    with stream:
        return parse_lines(stream.read())


def test_end_to_end_through_the_worker(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REST_MODEL_TOKEN", TOKEN)
    plans = list(E2E_PLANS)
    lines: list[Line] = [{"custom_id": f"req-{i}", "method": "POST", "url": EMBEDDINGS,
                          "body": {"model": "emb",
                                   "input": f"req-{i} do:{plans[i % len(plans)]}"}}
                         for i in range(20)]
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'batchery.db'}")
    files = FsspecFileStore(str(tmp_path / "files"))
    with RestModel(retry_after="0.1", slow_s=1.0) as model:
        try:
            store.set_deployments([Deployment(name="emb", backend="http", options={
                **embed_options(model), "credential": {"token_env": "REST_MODEL_TOKEN"},
                "timeout_s": 0.3, "max_concurrency": 8})])
            service = BatchService(store, files, chunk_size=5)
            record = service.upload("proj", io.BytesIO(jsonl(lines)), filename="in.jsonl",
                                    purpose="batch")
            batch = service.create_batch("proj", input_file_id=record.id, endpoint=EMBEDDINGS)
            worker = worker_for(store, files, WorkerConfig(retry=POLICY, poll_s=0.05))
            batch = drive(worker, service, batch.id)

            assert batch.status == "completed", batch.errors
            out = file_lines(service, batch.output_file_id)
            err = file_lines(service, batch.error_file_id)
        finally:
            store.close()
        calls = model.calls

    assert not set(out) & set(err), "a line is in both files"
    assert sorted([*out, *err]) == sorted(line["custom_id"] for line in lines)
    for line in lines:
        text = line["body"]["input"]
        status, ok, attempts = E2E_PLANS[text.rpartition(" do:")[2]]
        got = (out if ok else err)[line["custom_id"]]
        assert got["response"]["status_code"] == status, (text, got)
        assert len([c for c in calls if c.key == text]) == attempts, text
        if ok:
            assert body_of(got)["data"][0]["embedding"] == vector(text)
    assert body_of(err["req-5"]) == INVALID, "the upstream's own error body is kept"


# -- credentials at rest -------------------------------------------------------------------

SECRET_TOKEN = "sk-rest-literal-0123456789abcdef"


def test_a_literal_token_is_sealed_and_never_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHERY_SECRET_KEY", "a passphrase for the tests")
    with RestModel(token=SECRET_TOKEN) as model:
        config = tmp_path / "deployments.yaml"
        config.write_text(orjson.dumps({"deployments": [{
            "name": "tei-embed", "backend": "http",
            "options": {**embed_options(model), "credential": {"token": SECRET_TOKEN}},
        }]}).decode())  # JSON is YAML
        runtime = open_runtime(Settings(data_dir=tmp_path / "data", config=config),
                               publish_deployments=True)
        try:
            (stored,) = runtime.store.list_deployments()
            assert SECRET_TOKEN not in orjson.dumps(stored.options).decode()
            assert set(stored.options["credential"]["token"]) == {"$sealed"}
            with TestClient(create_app(runtime)) as client:
                listing = client.get("/v1/models")
                one = client.get("/v1/models/tei-embed")
            assert listing.status_code == 200 and one.status_code == 200
            assert [m["id"] for m in listing.json()["data"]] == ["tei-embed"]
            assert SECRET_TOKEN not in listing.text and SECRET_TOKEN not in one.text
            # A worker opens the seal: the upstream accepts the token.
            out, err, _ = run(backends.create(stored), EMBEDDINGS, [embed("e1", "hi")])
        finally:
            runtime.close()

    assert not err and body_of(out["e1"])["data"][0]["embedding"] == vector("hi")
    assert model.calls[0].headers["authorization"] == f"Bearer {SECRET_TOKEN}"
