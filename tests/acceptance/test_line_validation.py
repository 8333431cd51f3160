"""Request-level validation through the official `openai` SDK against a real `batchery serve`.

A line missing a required body field fails the batch, every such line listed with its
`line` and `param`; a line whose body has the wrong shape runs as a 400 line of the error
file, in the hosted API's words, and never reaches the model. The model that proves it is a
`python` deployment answering each body it is handed with `{"seen": body}`: what reached it
is exactly what its output lines hold.

This module also runs under openai 1.x (tests/acceptance/test_older_sdks.py), so it uses
only API that both majors share.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml
from openai import OpenAI

from tests.conftest import Server, start_server
from tests.helpers import chat_line, jsonl

PREDICTORS = Path(__file__).resolve().parent.parent / "predictors"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
#: The model that records: a `python` endpoint whose predictor echoes what it was handed.
RECORDER = "recorder"
ROLES = "'system', 'assistant', 'user', 'function', 'tool', and 'developer'"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("lines")
    config = tmp / "deployments.yaml"
    config.write_text(yaml.safe_dump({
        "deployments": [{"name": "echo", "backend": "echo"}],
        "endpoints": [{"name": RECORDER, "deployments": [{
            "name": "v1", "backend": "python",
            "options": {"predictor": "job_predictors:Doubler",
                        "python_path": [str(PREDICTORS)]}}]}],
    }))
    server = start_server(tmp, "--config", str(config), "--workers", "2", "--chunk-size", "4",
                          "--max-tasks", "1000")
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.v1, api_key="sk-anything", max_retries=0) as c:
        yield c


def run(client: OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions",
        timeout: float = 90.0) -> Any:
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window="24h")
    deadline = time.monotonic() + timeout
    while batch.status not in TERMINAL:
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    return batch


def by_custom_id(client: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    lines = [orjson.loads(x) for x in client.files.content(file_id).content.splitlines()]
    return {line["custom_id"]: line for line in lines}


def line(custom_id: str, url: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_sdk_major_is_the_one_expected() -> None:
    expected = os.environ.get("TEST_EXPECT_OPENAI_MAJOR")
    major = int(openai.__version__.split(".")[0])
    assert major == int(expected) if expected else major >= 2


# -- missing fields fail the batch, every line reported --------------------------------------


def test_every_missing_field_of_every_line_fails_the_batch(client: OpenAI) -> None:
    no_model = chat_line("no-model")
    del no_model["body"]["model"]
    no_messages = chat_line("no-messages")
    del no_messages["body"]["messages"]
    batch = run(client, [
        chat_line("fine"),
        no_model,
        no_messages,
        line("neither", temperature=0),
        chat_line("null-messages", messages=None),
        chat_line("ghost", model="nonexistent-model-xyz"),
        chat_line("streamer", stream=True),
        {**chat_line("elsewhere"), "url": "/v1/embeddings"},
    ])
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    model = ("invalid_request", "body.model", "Model parameter is required.")
    messages = ("invalid_request", "body.messages", "Messages parameter is required.")
    assert [(e.line, e.code, e.param, e.message) for e in batch.errors.data] == [
        (2, *model),
        (3, *messages),
        (4, *model),
        (4, *messages),
        (5, *messages),
        (6, "model_not_found", "body.model",
         "The provided model 'nonexistent-model-xyz' is not supported by the Batch API."),
        (7, "streaming_unsupported", "body.stream",
         "Chat Completions: Streaming is not supported in the Batch API."),
        (8, "invalid_url", "url",
         "The URL provided for this request does not match the batch endpoint."),
    ]


@pytest.mark.parametrize(("endpoint", "field"), [
    ("/v1/completions", "prompt"),
    ("/v1/embeddings", "input"),
    ("/v1/responses", "input"),
    ("/v1/moderations", "input"),
])
def test_each_endpoint_requires_its_input(client: OpenAI, endpoint: str, field: str) -> None:
    batch = run(client, [line("fine", endpoint, model=RECORDER, **{field: "hi"}),
                         line("empty", endpoint, model=RECORDER),
                         line("null", endpoint, model=RECORDER, **{field: None})],
                endpoint=endpoint)
    assert batch.status == "failed"
    expected = ("invalid_request", f"body.{field}", f"{field.capitalize()} parameter is "
                                                    f"required.")
    assert [(e.line, e.code, e.param, e.message) for e in batch.errors.data] == [
        (2, *expected), (3, *expected)]


# -- wrong shapes are 400 lines, and the model never sees them --------------------------------


def hosted(param: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}


USER = [{"role": "user", "content": "hi"}]

#: custom_id -> (body, the error body of its 400 line).
CHAT_SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "rolez": ({"messages": [{"rolez": "user", "contentz": "hi"}]}, hosted(
        "messages[0].role", "missing_required_parameter",
        "Missing required parameter: 'messages[0].role'.")),
    "wizard": ({"messages": [{"role": "wizard", "content": "hi"}]}, hosted(
        "messages[0].role", "invalid_value",
        f"Invalid value: 'wizard'. Supported values are: {ROLES}.")),
    "no-content": ({"messages": [*USER, {"role": "user"}]}, hosted(
        "messages[1].content", "missing_required_parameter",
        "Missing required parameter: 'messages[1].content'.")),
    "content-number": ({"messages": [{"role": "user", "content": 7}]}, hosted(
        "messages[0].content", "invalid_type",
        "Invalid type for 'messages[0].content': expected one of a string or array of "
        "objects, but got an integer instead.")),
    "bad-part": ({"messages": [{"role": "user", "content": [{"type": "txt", "text": "a"}]}]},
                 hosted("messages[0].content[0].type", "invalid_value",
                        "Invalid value: 'txt'. Supported values are: 'text', 'image_url', "
                        "'input_audio', and 'file'.")),
    "empty-messages": ({"messages": []}, hosted(
        "messages", "empty_array", "Invalid 'messages': empty array. Expected an array with "
                                   "minimum length 1, but got an empty array instead.")),
    "hot": ({"messages": USER, "temperature": 3}, hosted(
        "temperature", "decimal_above_max_value",
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got "
        "3 instead.")),
    "n-zero": ({"messages": USER, "n": 0}, hosted(
        "n", "integer_below_min_value",
        "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 "
        "instead.")),
    "max-tokens-text": ({"messages": USER, "max_tokens": "10"}, hosted(
        "max_tokens", "invalid_type",
        "Invalid type for 'max_tokens': expected an integer, but got a string instead.")),
    "five-stops": ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, hosted(
        "stop", "array_above_max_length",
        "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an "
        "array with length 5 instead.")),
    "xml": ({"messages": USER, "response_format": {"type": "xml"}}, hosted(
        "response_format.type", "invalid_value",
        "Invalid value: 'xml'. Supported values are: 'text', 'json_object', and "
        "'json_schema'.")),
}


def test_wrong_shapes_are_400_lines_that_never_reach_the_model(client: OpenAI) -> None:
    good = {f"ok-{i}": {"model": RECORDER, "messages": [{"role": "user", "content": f"q{i}"}],
                        "temperature": 0.5} for i in range(3)}
    lines = [line(custom_id, **body) for custom_id, body in good.items()]
    lines[1:1] = [line(custom_id, model=RECORDER, **body)
                  for custom_id, (body, _) in CHAT_SHAPES.items()]
    batch = run(client, lines)

    assert batch.status == "completed", batch.errors
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(lines), 3, len(CHAT_SHAPES))
    out = by_custom_id(client, batch.output_file_id)
    # The recorder answers `{"seen": body}`: these bodies, and only these, reached it.
    assert {c: x["response"]["body"] for c, x in out.items()} == {
        c: {"seen": body} for c, body in good.items()}
    errors = by_custom_id(client, batch.error_file_id)
    assert sorted(errors) == sorted(CHAT_SHAPES)
    for custom_id, (_, expected) in CHAT_SHAPES.items():
        response = errors[custom_id]["response"]
        assert (response["status_code"], response["body"]) == (400, expected), custom_id
        assert errors[custom_id]["error"] is None


def test_the_issues_line_is_a_400_on_echo_too(client: OpenAI) -> None:
    batch = run(client, [chat_line("fine"),
                         chat_line("rolez", messages=[{"rolez": "user", "contentz": "hi"}])])
    assert batch.status == "completed"
    assert list(by_custom_id(client, batch.output_file_id)) == ["fine"]
    error = by_custom_id(client, batch.error_file_id)["rolez"]["response"]
    assert (error["status_code"], error["body"]) == (400, CHAT_SHAPES["rolez"][1])


OTHER_SHAPES = [
    pytest.param("/v1/completions", {"prompt": "once"}, {"prompt": 5}, hosted(
        "prompt", "invalid_type",
        "Invalid type for 'prompt': expected one of a string, array of strings, array of "
        "integers, or array of arrays of integers, but got an integer instead."),
        id="completions"),
    pytest.param("/v1/embeddings", {"input": ["a", "b"]},
                 {"input": "a", "encoding_format": "int8"}, hosted(
                     "encoding_format", "invalid_value",
                     "Invalid value: 'int8'. Supported values are: 'float' and 'base64'."),
                 id="embeddings"),
    pytest.param("/v1/responses", {"input": "hi", "instructions": "brief"},
                 {"input": "hi", "max_output_tokens": 5}, hosted(
                     "max_output_tokens", "integer_below_min_value",
                     "Invalid 'max_output_tokens': integer below minimum value. Expected a "
                     "value >= 16, but got 5 instead."), id="responses"),
    pytest.param("/v1/responses", {"input": [{"role": "user", "content": "hi"}]},
                 {"input": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
                 hosted("input[0].content[0].type", "invalid_value",
                        "Invalid value: 'text'. Supported values are: 'input_text', "
                        "'input_image', and 'input_file'."), id="responses-items"),
    pytest.param("/v1/moderations", {"input": ["a", "b"]}, {"input": [{"type": "text"}]},
                 hosted("input[0].text", "missing_required_parameter",
                        "Missing required parameter: 'input[0].text'."), id="moderations"),
]


@pytest.mark.parametrize(("endpoint", "good", "bad", "expected"), OTHER_SHAPES)
def test_every_endpoint_checks_its_shape(client: OpenAI, endpoint: str, good: dict[str, Any],
                                         bad: dict[str, Any], expected: dict[str, Any]) -> None:
    batch = run(client, [line("good", endpoint, model=RECORDER, **good),
                         line("bad", endpoint, model=RECORDER, **bad)], endpoint=endpoint)
    assert batch.status == "completed", batch.errors
    out = by_custom_id(client, batch.output_file_id)
    assert out["good"]["response"]["body"] == {"seen": {"model": RECORDER, **good}}
    assert list(out) == ["good"]
    response = by_custom_id(client, batch.error_file_id)["bad"]["response"]
    assert (response["status_code"], response["body"]) == (400, expected)
