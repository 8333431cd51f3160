"""The `gemini_batch` connector's translation: chat requests to GenerateContent, and
GenerateContent responses back to chat completions."""

from __future__ import annotations

from typing import Any

import pytest

from batchery.backends.remote_gemini import (
    Unsupported,
    chat_completion,
    error_status,
    generate_content_request,
)


def chat(*messages: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"model": "gem", "messages": list(messages), **params}


def test_roles_and_content_parts() -> None:
    request = generate_content_request(chat(
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use English."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg", "format": "wav"}}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"}))
    assert request == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use English."}]},
        "contents": [
            {"role": "user", "parts": [
                {"text": "What is this?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}},
                {"fileData": {"fileUri": "https://example.com/cat.jpg"}},
                {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg"}}]},
            {"role": "model", "parts": [{"text": "A cat."}]},
            {"role": "user", "parts": [{"text": "Sure?"}]}]}


def test_generation_parameters() -> None:
    request = generate_content_request(chat(
        {"role": "user", "content": "hi"}, temperature=0.2, top_p=0.9, n=2, seed=7,
        max_completion_tokens=50, max_tokens=99, stop="END", presence_penalty=0.1,
        frequency_penalty=0.3, reasoning_effort="low", user="u1", store=False,
        response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}))
    assert request["generationConfig"] == {
        "temperature": 0.2, "topP": 0.9, "candidateCount": 2, "seed": 7,
        "presencePenalty": 0.1, "frequencyPenalty": 0.3,
        "maxOutputTokens": 50,  # max_completion_tokens wins over the older max_tokens
        "stopSequences": ["END"], "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object", "properties": {"a": {"type": "string"}}},
        "thinkingConfig": {"thinkingLevel": "LOW"}}
    plain = generate_content_request(chat({"role": "user", "content": "hi"},
                                          response_format={"type": "json_object"},
                                          reasoning_effort="none"))
    assert plain["generationConfig"] == {"responseMimeType": "application/json",
                                         "thinkingConfig": {"thinkingBudget": 0}}


def test_function_tools_calls_and_results() -> None:
    request = generate_content_request(chat(
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
        tools=[{"type": "function", "function": {
            "name": "weather", "description": "Current weather.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        tool_choice={"type": "function", "function": {"name": "weather"}}))
    assert request["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "weather",
                                                      "args": {"city": "Oslo"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather",
                                                         "response": {"temp": -3}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather",
                                                         "response": {"content": "cold"}}}]}]
    assert request["tools"] == [{"functionDeclarations": [{
        "name": "weather", "description": "Current weather.",
        "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}}}}]}]
    assert request["toolConfig"] == {"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["weather"]}}
    auto = generate_content_request(chat({"role": "user", "content": "x"}, tool_choice="none"))
    assert auto["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


@pytest.mark.parametrize(("body", "param", "code", "message"), [
    (chat({"role": "user", "content": "x"}, logit_bias={"1": 2}), "logit_bias",
     "unsupported_parameter",
     "Unsupported parameter: 'logit_bias' cannot be sent to a Gemini batch API."),
    (chat({"role": "user", "content": "x"}, logprobs=True), "logprobs", "unsupported_value",
     "Unsupported value: 'logprobs' asks for log probabilities, which cannot be sent to a "
     "Gemini batch API."),
    (chat({"role": "function", "content": "x"}), "messages[0].role", "unsupported_value",
     "Unsupported value: 'messages[0].role' is \"function\", which cannot be sent to a "
     "Gemini batch API."),
    (chat({"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}),
     "messages[0].content[0]", "unsupported_value",
     "Unsupported value: 'messages[0].content[0]' is a 'file' part given by file_id, which "
     "cannot be sent to a Gemini batch API."),
    (chat({"role": "tool", "tool_call_id": "nope", "content": "x"}),
     "messages[0].tool_call_id", "invalid_value",
     "Invalid value for 'messages[0].tool_call_id': no earlier assistant message made the "
     "call \"nope\"."),
    (chat({"role": "user", "content": "x"}, response_format={"type": "xml"}),
     "response_format.type", "unsupported_value",
     "Unsupported value: 'response_format.type' is \"xml\", which cannot be sent to a "
     "Gemini batch API."),
    (chat({"role": "user", "content": "x"}, tools=[{"type": "web_search"}]), "tools[0]",
     "unsupported_value",
     "Unsupported value: 'tools[0]' is a tool of type \"web_search\", which cannot be sent "
     "to a Gemini batch API."),
])
def test_what_gemini_cannot_express_is_refused_naming_the_field(
        body: dict[str, Any], param: str, code: str, message: str) -> None:
    with pytest.raises(Unsupported) as info:
        generate_content_request(body)
    reply = info.value.reply()
    assert reply.status_code == 400
    assert reply.body == {"error": {"message": message, "type": "invalid_request_error",
                                    "param": param, "code": code}}


def test_a_response_with_candidates_becomes_a_chat_completion() -> None:
    body = chat_completion({
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "Hel"}, {"text": "lo"}]},
             "finishReason": "MAX_TOKENS"},
            {"content": {"role": "model", "parts": [{"text": "Hi"}]}, "finishReason": "SAFETY",
             "index": 1}],
        "usageMetadata": {"promptTokenCount": "4", "candidatesTokenCount": "5"},
        "responseId": "abc"}, "models/gemini-x")
    assert body["id"] == "chatcmpl-abc" and body["model"] == "gemini-x"
    assert [(c["index"], c["message"]["content"], c["finish_reason"])
            for c in body["choices"]] == [(0, "Hello", "length"), (1, "Hi", "content_filter")]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9,
                             "completion_tokens_details": {"reasoning_tokens": 0}}


@pytest.mark.parametrize(("error", "status"), [
    ({"code": 3, "message": "bad"}, 400),
    ({"code": 8}, 429),
    ({"code": 14}, 503),
    ({"code": 404, "status": "NOT_FOUND"}, 404),
    ({"status": "PERMISSION_DENIED"}, 403),
    ({"code": 99}, 500),
])
def test_per_request_errors_get_an_http_status(error: dict[str, Any], status: int) -> None:
    assert error_status(error) == status
