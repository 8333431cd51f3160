"""Gemini requests and answers translated to and from chat, the engine's answers put back
in request order, and Google's error envelope."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from batchery.batchapi import gemini
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.model.batches import Batch, BatchStatus
from batchery.model.exceptions import InvalidRequest


def part(text: str) -> dict[str, Any]:
    return {"text": text}


def test_a_request_becomes_a_chat_request() -> None:
    body = gemini.to_chat({
        "model": "models/m",
        "systemInstruction": {"parts": [part("be "), part("brief")]},
        "contents": [{"role": "user", "parts": [part("hi")]},
                     {"role": "model", "parts": [part("hello")]},
                     {"parts": [part("again")]}],
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "topK": 5,
                             "maxOutputTokens": 7, "stopSequences": ["x"],
                             "candidateCount": 2, "seed": 1, "thinkingConfig": {}},
    }, "m", "req")
    assert body == {"model": "m", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}],
        "temperature": 0.2, "top_p": 0.9, "top_k": 5, "max_tokens": 7, "stop": ["x"],
        "n": 2, "seed": 1}


def test_proto_field_names_and_json_output() -> None:
    body = gemini.to_chat({"contents": [{"parts": [part("x")]}],
                           "system_instruction": {"parts": [part("s")]},
                           "generation_config": {"max_output_tokens": 3,
                                                 "response_mime_type": "application/json"}},
                          "m", "r")
    assert body["messages"][0] == {"role": "system", "content": "s"}
    assert body["max_tokens"] == 3 and body["response_format"] == {"type": "json_object"}
    schema = gemini.to_chat({"contents": [{"parts": [part("x")]}], "generationConfig": {
        "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}}}},
        "m", "r")["response_format"]
    assert schema == {"type": "json_schema", "json_schema": {"name": "response", "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}


@pytest.mark.parametrize(("request_", "param"), [
    ({"contents": []}, "r.contents"),
    ({"contents": [{"parts": [{"inlineData": {"data": "AA=="}}]}]}, "r.contents[0].parts[0]"),
    ({"contents": [{"role": "function", "parts": [part("x")]}]}, "r.contents[0].role"),
    ({"contents": [{"parts": []}]}, "r.contents[0].parts"),
    ({"contents": [{"parts": [part("x")]}], "tools": [{}]}, "r.tools"),
    ({"contents": [{"parts": [part("x")]}], "model": "models/other"}, "r.model"),
    ({"contents": [{"parts": [part("x")]}], "generationConfig": 3}, "r.generationConfig"),
    ("text", "r"),
])
def test_what_chat_cannot_say_is_refused_naming_the_field(request_: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        gemini.to_chat(request_, "m", "r")
    assert refused.value.param == param
    assert param in refused.value.message


def test_a_chat_completion_becomes_a_generate_content_response() -> None:
    answer = gemini.generate_content_response({
        "id": "c1", "model": "m", "usage": {"prompt_tokens": 4, "completion_tokens": 2},
        "choices": [{"index": 0, "message": {"content": "hey"}, "finish_reason": "length"},
                    {"index": 1, "message": {"content": None}, "finish_reason": "stop"}]},
        "fallback")
    assert answer == {"candidates": [
        {"content": {"role": "model", "parts": [{"text": "hey"}]},
         "finishReason": "MAX_TOKENS", "index": 0},
        {"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP",
         "index": 1}],
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2,
                          "totalTokenCount": 6},
        "modelVersion": "m", "responseId": "c1"}


def test_an_embedding_request_and_its_answer() -> None:
    assert gemini.to_embedding({"content": {"parts": [part("a"), part("b")]},
                                "taskType": "RETRIEVAL_QUERY", "output_dimensionality": 4},
                               "e", "r") == {"model": "e", "input": "ab", "dimensions": 4}
    with pytest.raises(InvalidRequest) as refused:
        gemini.to_embedding({"contents": []}, "e", "r")
    assert refused.value.param == "r.content"
    line = {"response": {"status_code": 200, "body": {
        "data": [{"embedding": [0.5, 1.0]}], "usage": {"prompt_tokens": 3}}}}
    assert gemini.result_of(line, "e", gemini.EMBEDDINGS_ENDPOINT) == {
        "response": {"embedding": {"values": [0.5, 1.0]}, "tokenCount": 3}}


@pytest.mark.parametrize(("line", "code"), [
    ({"response": {"status_code": 400, "body": {"error": {"message": "bad"}}}}, 3),
    ({"response": {"status_code": 404, "body": {"error": {"message": "gone"}}}}, 5),
    ({"response": {"status_code": 503, "body": {"error": {"message": "busy"}}}}, 14),
    ({"response": None, "error": {"code": "batch_cancelled", "message": "c"}}, 1),
    ({"response": None, "error": {"code": "batch_expired", "message": "e"}}, 4),
    ({"response": None, "error": {"code": "server_error", "message": "s"}}, 13),
])
def test_errors_become_rpc_statuses(line: dict[str, Any], code: int) -> None:
    assert gemini.result_of(line, "m")["error"]["code"] == code


def test_custom_ids_keep_the_index_and_any_key() -> None:
    for index, key in ((0, None), (7, ""), (12, "a:b:c")):
        assert gemini.parse_custom_id(gemini.custom_id(index, key)) == (index, key)


def write(store: FsspecFileStore, key: str, indexes: list[int]) -> None:
    with store.open_write(key) as out:
        for i in indexes:
            out.write(orjson.dumps({"custom_id": gemini.custom_id(i, f"k{i}")}) + b"\n")


@pytest.mark.parametrize("runs", [1, 3, 40])
def test_answers_come_back_in_request_order(tmp_path: Path, runs: int) -> None:
    """Output and error files hold ascending runs (the engine writes chunks in order; a
    provider's results may come in any order): merged, or past the run limit, sorted."""
    store = FsspecFileStore(str(tmp_path))
    out = [i for i in range(0, 200) if i % 3]
    errors = [i for i in range(0, 200) if not i % 3]
    pieces = [errors[k::runs] for k in range(runs)]
    write(store, "out", out)
    write(store, "err", [i for piece in pieces for i in piece])
    got = [index for index, _ in gemini.ordered_answers(store, ["out", "err"])]
    assert got == list(range(200))


def test_gaps_are_filled_and_repeats_dropped() -> None:
    results = iter([(1, "b"), (1, "again"), (3, "d")])
    filled = gemini._filled(results, 5, lambda: "-")  # type: ignore[arg-type]
    assert list(filled) == [(0, "-"), (1, "b"), (2, "-"), (3, "d"), (4, "-")]


def batch(status: BatchStatus, completed: int = 0, failed: int = 0) -> Batch:
    return Batch(id="gbatch-1", project="p", endpoint="/v1/chat/completions",
                 input_file_id="f", completion_window="24h", status=status, created_at=0,
                 expires_at=10, completed=completed, failed=failed)


def test_batch_stats_leave_zeros_out_and_count_every_request_once_ended() -> None:
    assert gemini.batch_stats(batch(BatchStatus.VALIDATING), 4) == {
        "requestCount": "4", "pendingRequestCount": "4"}
    assert gemini.batch_stats(batch(BatchStatus.IN_PROGRESS, 1, 1), 4) == {
        "requestCount": "4", "successfulRequestCount": "1", "failedRequestCount": "1",
        "pendingRequestCount": "2"}
    # Cancelled before it started: the engine counted nothing, yet no request is pending.
    assert gemini.batch_stats(batch(BatchStatus.CANCELLED), 4) == {
        "requestCount": "4", "failedRequestCount": "4"}
    assert gemini.batch_stats(batch(BatchStatus.FAILED), 2) == {
        "requestCount": "2", "failedRequestCount": "2"}


def test_googles_error_envelope() -> None:
    assert gemini.error_body(404, "gone") == {
        "error": {"code": 404, "message": "gone", "status": "NOT_FOUND"}}
    precondition = gemini.error_body(400, "ended", param="name", code="FAILED_PRECONDITION")
    assert precondition["error"]["status"] == "FAILED_PRECONDITION"
    assert precondition["error"]["details"][0]["fieldViolations"] == [
        {"field": "name", "description": "ended"}]
    # An OpenAI-style code is no status name: the HTTP status picks it.
    assert gemini.error_body(400, "x", code="invalid_value")["error"]["status"] == \
        "INVALID_ARGUMENT"


def test_which_paths_are_geminis() -> None:
    assert gemini.is_gemini_path("/gemini/v1/batches")
    assert gemini.is_gemini_path("/v1beta/models/m:batchGenerateContent")
    assert gemini.is_gemini_path("/upload/v1beta/files")
    assert not gemini.is_gemini_path("/v1/batches")
    assert not gemini.is_gemini_path("/v1betax/files")
