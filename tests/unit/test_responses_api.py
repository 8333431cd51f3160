"""`/v1/responses` on chat backends (the translation both ways), `/v1/moderations` on echo,
and which endpoints each deployment serves."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from openai.types import ModerationCreateResponse
from openai.types.responses import Response

from batchery import backends
from batchery.backends import echo
from batchery.backends.echo import EchoBackend
from batchery.backends.openai_http import OpenAIBackend
from batchery.batchapi import execution
from batchery.model.deployments import Deployment
from batchery.model.exceptions import ConfigError
from batchery.model.retry import RetryPolicy
from batchery.ports.backend import ModelBackend, Reply, Request
from batchery.wire import responses_api
from batchery.wire.responses_api import ParamsError

CHAT, RESPONSES, MODERATIONS = "/v1/chat/completions", "/v1/responses", "/v1/moderations"


def test_text_input_with_instructions_and_options_becomes_a_chat_body() -> None:
    chat = responses_api.to_chat({
        "model": "m", "input": "Name a color.", "instructions": "Answer in one word.",
        "max_output_tokens": 16, "temperature": 0, "top_p": 0.5, "store": False,
        "metadata": {"k": "v"},
        "text": {"format": {"type": "json_schema", "name": "color", "strict": True,
                            "schema": {"type": "object"}}}})
    assert chat == {
        "model": "m",
        "messages": [{"role": "system", "content": "Answer in one word."},
                     {"role": "user", "content": "Name a color."}],
        "max_tokens": 16, "temperature": 0, "top_p": 0.5,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "color", "schema": {"type": "object"}, "strict": True}}}


def test_input_items_become_chat_messages() -> None:
    chat = responses_api.to_chat({"model": "m", "input": [
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "what is "}, {"type": "input_text", "text": "this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "A dot.", "annotations": []}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"a\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "2"}]},
        {"role": "user", "content": "and now?"}],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"},
                   "strict": True}],
        "tool_choice": {"type": "function", "name": "f"}, "json": None})
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is "}, {"type": "text", "text": "this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA",
                                                "detail": "low"}}]},
        {"role": "assistant", "content": "A dot."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g",
                                                          "arguments": "{\"a\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {"role": "user", "content": "and now?"}]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}, "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id",
     "unsupported_parameter"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_value"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type",
     "unsupported_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input[0].content[0].image_url", "unsupported_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type", "unsupported_value"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role", "invalid_value"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format", "invalid_value"),
    ({"input": "hi", "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
    ({"input": [], "instructions": "alone"}, "input", "invalid_value"),
    ({}, "input", "missing_required_parameter"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id", "missing_required_parameter"),
])
def test_what_a_chat_model_cannot_do_is_a_400_naming_the_field(
        body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(ParamsError) as info:
        responses_api.to_chat({"model": "m", **body})
    reply = info.value.reply()
    assert reply.status_code == 400 and not reply.retriable
    assert reply.body["error"]["param"] == param and reply.body["error"]["code"] == code
    assert reply.body["error"]["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in reply.body["error"]["message"]


def _chat(content: str | None = "Blue.", finish: str = "stop", **message: Any
          ) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
            "model": "m-served",
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, **message}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13,
                      "prompt_tokens_details": {"cached_tokens": 4}}}


def test_a_chat_answer_becomes_a_response_object_the_sdk_reads() -> None:
    request = {"model": "m", "input": "Name a color.", "instructions": "One word.",
               "max_output_tokens": 16, "temperature": 0, "metadata": {"k": "v"}}
    body = responses_api.from_chat(request, _chat())
    response = Response.model_validate(body)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output_text == "Blue."
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert [c.type for c in message.content] == ["output_text"]
    assert response.usage is not None and response.usage.input_tokens == 11
    assert response.usage.output_tokens == 2 and response.usage.total_tokens == 13
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert (response.model, response.created_at) == ("m-served", 1700000000)
    assert (response.instructions, response.max_output_tokens, response.temperature) == (
        "One word.", 16, 0)
    assert response.metadata == {"k": "v"} and response.text is not None
    assert response.text.format is not None and response.text.format.type == "text"


def test_a_cut_answer_is_incomplete_and_tool_calls_are_function_call_items() -> None:
    cut = Response.model_validate(responses_api.from_chat({"input": "x"},
                                                          _chat("Bl", finish="length")))
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete" and cut.output_text == "Bl"

    calls = Response.model_validate(responses_api.from_chat({"input": "x"}, _chat(
        None, finish="tool_calls", tool_calls=[
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": "{\"a\": 1}"}}])))
    (call,) = calls.output
    assert call.type == "function_call" and call.status == "completed"
    assert (call.call_id, call.name, call.arguments) == ("call_1", "f", "{\"a\": 1}")

    refused = Response.model_validate(responses_api.from_chat({"input": "x"}, _chat(
        None, refusal="I cannot help with that.")))
    assert [c.type for c in refused.output[0].content] == ["refusal"]


def test_an_error_reply_stays_as_it_came() -> None:
    error = Reply(status_code=429, body={"error": {"message": "slow down"}}, retriable=True)
    assert responses_api.reply_from_chat({"input": "x"}, error) is error


def _run(backend: ModelBackend, endpoint: str, bodies: dict[str, dict[str, Any]]
         ) -> execution.ChunkOutput:
    async def lookup(model: str) -> ModelBackend | None:
        return backend if model == "echo" else None

    lines = [orjson.dumps({"custom_id": cid, "body": {"model": "echo", **body}})
             for cid, body in bodies.items()]
    return asyncio.run(execution.run_chunk(lines, endpoint, lookup,
                                           RetryPolicy(max_attempts=1)))


def _by_id(data: bytearray) -> dict[str, dict[str, Any]]:
    return {x["custom_id"]: x for x in map(orjson.loads, bytes(data).splitlines())}


def test_a_chunk_of_responses_runs_on_a_chat_backend() -> None:
    output = _run(EchoBackend(), RESPONSES, {
        "a": {"input": "one two three", "instructions": "repeat"},
        "b": {"input": [{"role": "user", "content": [{"type": "input_text", "text": "four"}]}],
              "max_output_tokens": 16},
        "stateful": {"input": "hi", "previous_response_id": "resp_1"}})
    out, err = _by_id(output.out), _by_id(output.err)
    assert sorted(out) == ["a", "b"] and sorted(err) == ["stateful"]
    a = Response.model_validate(out["a"]["response"]["body"])
    assert a.output_text == "one two three" and out["a"]["response"]["status_code"] == 200
    assert err["stateful"]["response"]["status_code"] == 400
    assert err["stateful"]["response"]["body"]["error"]["param"] == "previous_response_id"
    # Batch usage counts Responses tokens: echo counts words (4 + 1 in, 3 + 1 out).
    assert (output.input_tokens, output.output_tokens) == (5, 4)


def test_echo_moderates_by_category_name() -> None:
    output = _run(EchoBackend(), MODERATIONS, {
        "one": {"input": "a calm sentence"},
        "two": {"input": ["pure violence", "violence/graphic and hate"]},
        "parts": {"input": [{"type": "text", "text": "self-harm"},
                            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        "bad": {"input": 3}})
    out, err = _by_id(output.out), _by_id(output.err)
    assert sorted(err) == ["bad"] and err["bad"]["response"]["status_code"] == 400
    one = ModerationCreateResponse.model_validate(out["one"]["response"]["body"])
    assert one.id.startswith("modr-") and one.model == "echo"
    assert [r.flagged for r in one.results] == [False]
    two = ModerationCreateResponse.model_validate(out["two"]["response"]["body"])
    assert [r.flagged for r in two.results] == [True, True]
    assert two.results[0].categories.violence and not two.results[0].categories.hate
    assert two.results[1].categories.violence_graphic and two.results[1].categories.hate
    assert two.results[0].category_scores.violence > 0.9
    parts = ModerationCreateResponse.model_validate(out["parts"]["response"]["body"])
    assert len(parts.results) == 1 and parts.results[0].categories.self_harm


def test_echo_answers_moderations_only_where_it_declares_them() -> None:
    assert MODERATIONS in EchoBackend.endpoints
    assert echo.answer(MODERATIONS, {"model": "e", "input": "hate"}).body["results"][0][
        "flagged"] is True


def test_each_deployment_serves_its_backends_endpoints_and_responses_on_chat() -> None:
    def served(backend: str, **options: Any) -> set[str]:
        return set(backends.endpoints_of(Deployment(name="d", backend=backend,
                                                    options=options)))

    assert served("echo") == {CHAT, "/v1/completions", "/v1/embeddings", MODERATIONS,
                              RESPONSES, "/v1/messages"}
    assert served("llama-cpp", model_path="x.gguf") == {CHAT, "/v1/completions", RESPONSES,
                                                         "/v1/messages"}
    assert served("sentence-transformers", model="m") == {"/v1/embeddings"}
    assert served("openai", base_url="http://u/v1") == {
        CHAT, "/v1/completions", "/v1/embeddings", RESPONSES, "/v1/messages"}
    assert served("openai", base_url="http://u/v1", endpoints=[MODERATIONS]) == {MODERATIONS}
    assert served("anthropic_batch") == {"/v1/messages"}
    assert RESPONSES in served("openai_batch") and MODERATIONS in served("openai_batch")
    assert served("no-such-backend") == set()


def test_the_openai_connector_checks_its_endpoint_options() -> None:
    with pytest.raises(ConfigError, match="endpoints"):
        OpenAIBackend(base_url="http://u/v1", endpoints=["/v1/images/generations"])
    with pytest.raises(ConfigError, match="endpoints"):
        OpenAIBackend(base_url="http://u/v1", endpoints=[])
    with pytest.raises(ConfigError, match="responses: expected one of auto, native, chat"):
        OpenAIBackend(base_url="http://u/v1", responses="sometimes")
    backend = OpenAIBackend(base_url="http://u/v1", endpoints=[CHAT, MODERATIONS])
    assert backend.endpoints == {CHAT, MODERATIONS}
    replies = asyncio.run(backend.infer("/v1/embeddings", [Request(custom_id="x", body={})]))
    assert replies[0].status_code == 404
