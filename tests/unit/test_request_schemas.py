"""The per-endpoint body checks every line passes before any backend sees it: what the
official SDK sends passes, and each wrong shape gets the hosted API's 400, word for word."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from batchery.wire import request_schemas
from batchery.wire.request_schemas import CHAT, COMPLETIONS, EMBEDDINGS, MODERATIONS, RESPONSES

USER = [{"role": "user", "content": "hi"}]

VALID = [
    pytest.param(CHAT, {
        "model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": [{"type": "text", "text": "really"}], "name": "s"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-1"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            {"role": "function", "name": "f", "content": None},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
        "temperature": 0, "top_p": 1, "n": 1, "max_tokens": 5, "max_completion_tokens": 9,
        "presence_penalty": -2, "frequency_penalty": 2.0, "stop": ["a", "b", "c", "d"],
        "seed": -7, "logprobs": False, "top_logprobs": 20, "logit_bias": {"50256": -100},
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "person", "schema": {"type": "object"}, "strict": True}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": True, "user": "u", "store": False, "metadata": {"k": "v"},
        "stream": False, "reasoning_effort": "low", "vendor_extra": {"top_k": 3}},
        id="chat-everything"),
    pytest.param(CHAT, {"model": "m", "messages": USER, "temperature": None, "stop": None,
                        "response_format": None, "tools": None, "n": None},
                 id="chat-nulls-are-unset"),
    pytest.param(CHAT, {"model": "m", "messages": USER, "stop": "END",
                        "response_format": {"type": "json_object"}, "tool_choice": "auto"},
                 id="chat-string-forms"),
    pytest.param(COMPLETIONS, {"model": "m", "prompt": "once", "max_tokens": 0,
                               "echo": True, "logprobs": 5, "best_of": 1, "suffix": "."},
                 id="completions-text"),
    pytest.param(COMPLETIONS, {"model": "m", "prompt": ["a", "b"]}, id="completions-texts"),
    pytest.param(COMPLETIONS, {"model": "m", "prompt": [1, 2, 3]}, id="completions-ids"),
    pytest.param(COMPLETIONS, {"model": "m", "prompt": [[1, 2], [3]]},
                 id="completions-id-lists"),
    pytest.param(EMBEDDINGS, {"model": "m", "input": ["a", "b"], "encoding_format": "base64",
                              "dimensions": 8, "user": "u"}, id="embeddings"),
    pytest.param(EMBEDDINGS, {"model": "m", "input": "a"}, id="embeddings-text"),
    pytest.param(RESPONSES, {"model": "m", "input": "hi", "instructions": "be brief",
                             "max_output_tokens": 16, "temperature": 2, "top_p": 0,
                             "text": {"format": {"type": "json_schema", "name": "x",
                                                 "schema": {"type": "object"}}},
                             "truncation": "auto", "store": False}, id="responses-text"),
    pytest.param(RESPONSES, {"model": "m", "input": [
        {"role": "user", "content": "plain"},
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "x"}, {"type": "input_image", "detail": "auto",
                                                  "image_url": "https://x/y.png"},
            {"type": "input_file", "file_id": "file-1"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "sure", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"type": "item_reference", "id": "msg_1"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"}],
        "tools": [{"type": "function", "name": "f", "parameters": None, "strict": None},
                  {"type": "web_search"}, {"type": "some_future_tool"}],
        "tool_choice": "required", "text": {"format": {"type": "text"}}}, id="responses-items"),
    pytest.param(MODERATIONS, {"model": "m", "input": "text"}, id="moderations-text"),
    pytest.param(MODERATIONS, {"model": "m", "input": ["a", "b"]}, id="moderations-texts"),
    pytest.param(MODERATIONS, {"model": "m", "input": [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        id="moderations-parts"),
    pytest.param("/v1/messages", {"anything": "goes"}, id="no-schema-here"),
]


@pytest.mark.parametrize(("endpoint", "body"), VALID)
def test_what_the_sdks_send_passes(endpoint: str, body: dict[str, Any]) -> None:
    assert request_schemas.check(endpoint, body) is None


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER, **fields}


ROLES = "'system', 'assistant', 'user', 'function', 'tool', and 'developer'"

BAD = [
    # The line: neither `role` nor `content`.
    (CHAT, chat(messages=[{"rolez": "user", "contentz": "hi"}]), "messages[0].role",
     "missing_required_parameter", "Missing required parameter: 'messages[0].role'."),
    (CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role",
     "invalid_value", f"Invalid value: 'wizard'. Supported values are: {ROLES}."),
    (CHAT, chat(messages=[{"role": 3, "content": "hi"}]), "messages[0].role", "invalid_type",
     "Invalid type for 'messages[0].role': expected a string, but got an integer instead."),
    (CHAT, chat(messages=[*USER, {"role": "user"}]), "messages[1].content",
     "missing_required_parameter", "Missing required parameter: 'messages[1].content'."),
    (CHAT, chat(messages=[{"role": "user", "content": None}]), "messages[0].content",
     "invalid_type", "Invalid type for 'messages[0].content': expected one of a string or "
                     "array of objects, but got null instead."),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), "messages[0].content",
     "invalid_type", "Invalid type for 'messages[0].content': expected one of a string or "
                     "array of objects, but got an integer instead."),
    (CHAT, chat(messages=[{"role": "user", "content": []}]), "messages[0].content",
     "empty_array", "Invalid 'messages[0].content': empty array. Expected an array with "
                    "minimum length 1, but got an empty array instead."),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "txt", "text": "a"}]}]),
     "messages[0].content[0].type", "invalid_value",
     "Invalid value: 'txt'. Supported values are: 'text', 'image_url', 'input_audio', and "
     "'file'."),
    (CHAT, chat(messages=[{"role": "user", "content": [{"text": "a"}]}]),
     "messages[0].content[0].type", "missing_required_parameter",
     "Missing required parameter: 'messages[0].content[0].type'."),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "messages[0].content[0].image_url", "missing_required_parameter",
     "Missing required parameter: 'messages[0].content[0].image_url'."),
    (CHAT, chat(messages=[{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type", "invalid_value",
     "Invalid value: 'image_url'. Supported values are: 'text'."),
    (CHAT, chat(messages=[{"role": "tool", "content": "42"}]), "messages[0].tool_call_id",
     "missing_required_parameter", "Missing required parameter: 'messages[0].tool_call_id'."),
    (CHAT, chat(messages=["hi"]), "messages[0]", "invalid_type",
     "Invalid type for 'messages[0]': expected an object, but got a string instead."),
    (CHAT, chat(messages="hi"), "messages", "invalid_type",
     "Invalid type for 'messages': expected an array of objects, but got a string instead."),
    (CHAT, chat(messages=[]), "messages", "empty_array",
     "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
     "empty array instead."),
    (CHAT, chat(temperature=3), "temperature", "decimal_above_max_value",
     "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 "
     "instead."),
    (CHAT, chat(temperature=-0.5), "temperature", "decimal_below_min_value",
     "Invalid 'temperature': decimal below minimum value. Expected a value >= 0, but got "
     "-0.5 instead."),
    (CHAT, chat(temperature="hot"), "temperature", "invalid_type",
     "Invalid type for 'temperature': expected a decimal, but got a string instead."),
    (CHAT, chat(top_p=True), "top_p", "invalid_type",
     "Invalid type for 'top_p': expected a decimal, but got a boolean instead."),
    (CHAT, chat(n=0), "n", "integer_below_min_value",
     "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
    (CHAT, chat(n=129), "n", "integer_above_max_value",
     "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 "
     "instead."),
    (CHAT, chat(n=1.5), "n", "invalid_type",
     "Invalid type for 'n': expected an integer, but got a decimal instead."),
    (CHAT, chat(max_tokens=0), "max_tokens", "integer_below_min_value",
     "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 "
     "instead."),
    (CHAT, chat(seed="1"), "seed", "invalid_type",
     "Invalid type for 'seed': expected an integer, but got a string instead."),
    (CHAT, chat(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length",
     "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an "
     "array with length 5 instead."),
    (CHAT, chat(stop=5), "stop", "invalid_type",
     "Invalid type for 'stop': expected one of a string or array of strings, but got an "
     "integer instead."),
    (CHAT, chat(logprobs="yes"), "logprobs", "invalid_type",
     "Invalid type for 'logprobs': expected a boolean, but got a string instead."),
    (CHAT, chat(logit_bias={"1": 101}), "logit_bias.1", "integer_above_max_value",
     "Invalid 'logit_bias.1': integer above maximum value. Expected a value <= 100, but got "
     "101 instead."),
    (CHAT, chat(response_format={"type": "xml"}), "response_format.type", "invalid_value",
     "Invalid value: 'xml'. Supported values are: 'text', 'json_object', and 'json_schema'."),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
     "response_format.json_schema.name", "missing_required_parameter",
     "Missing required parameter: 'response_format.json_schema.name'."),
    (CHAT, chat(tools=[{"type": "function"}]), "tools[0].function",
     "missing_required_parameter", "Missing required parameter: 'tools[0].function'."),
    (CHAT, chat(tool_choice="sometimes"), "tool_choice", "invalid_value",
     "Invalid value: 'sometimes'. Supported values are: 'none', 'auto', and 'required'."),
    (CHAT, chat(metadata={"k": 1}), "metadata.k", "invalid_type",
     "Invalid type for 'metadata.k': expected a string, but got an integer instead."),
    (CHAT, chat(stream="yes"), "stream", "invalid_type",
     "Invalid type for 'stream': expected a boolean, but got a string instead."),
    (CHAT, chat(model=5), "model", "invalid_type",
     "Invalid type for 'model': expected a string, but got an integer instead."),
    (COMPLETIONS, {"model": "m"}, "prompt", "missing_required_parameter",
     "Missing required parameter: 'prompt'."),
    (COMPLETIONS, {"model": "m", "prompt": []}, "prompt", "empty_array",
     "Invalid 'prompt': empty array. Expected an array with minimum length 1, but got an "
     "empty array instead."),
    (COMPLETIONS, {"model": "m", "prompt": ["a", 1]}, "prompt[1]", "invalid_type",
     "Invalid type for 'prompt[1]': expected a string, but got an integer instead."),
    (COMPLETIONS, {"model": "m", "prompt": 5}, "prompt", "invalid_type",
     "Invalid type for 'prompt': expected one of a string, array of strings, array of "
     "integers, or array of arrays of integers, but got an integer instead."),
    (COMPLETIONS, {"model": "m", "prompt": "a", "best_of": 21}, "best_of",
     "integer_above_max_value", "Invalid 'best_of': integer above maximum value. Expected a "
                                "value <= 20, but got 21 instead."),
    (EMBEDDINGS, {"model": "m", "input": "a", "encoding_format": "int8"}, "encoding_format",
     "invalid_value", "Invalid value: 'int8'. Supported values are: 'float' and 'base64'."),
    (EMBEDDINGS, {"model": "m", "input": "a", "dimensions": 0}, "dimensions",
     "integer_below_min_value", "Invalid 'dimensions': integer below minimum value. Expected "
                                "a value >= 1, but got 0 instead."),
    (EMBEDDINGS, {"model": "m", "input": ["x"] * 2049}, "input", "array_above_max_length",
     "Invalid 'input': array too long. Expected an array with maximum length 2048, but got "
     "an array with length 2049 instead."),
    (EMBEDDINGS, {"model": "m", "input": [[1], []]}, "input[1]", "empty_array",
     "Invalid 'input[1]': empty array. Expected an array with minimum length 1, but got an "
     "empty array instead."),
    (RESPONSES, {"model": "m", "input": 5}, "input", "invalid_type",
     "Invalid type for 'input': expected one of a string or array of objects, but got an "
     "integer instead."),
    (RESPONSES, {"model": "m", "input": [{"content": "hi"}]}, "input[0].role",
     "missing_required_parameter", "Missing required parameter: 'input[0].role'."),
    (RESPONSES, {"model": "m", "input": [{"role": "tool", "content": "hi"}]},
     "input[0].role", "invalid_value",
     "Invalid value: 'tool'. Supported values are: 'user', 'assistant', 'system', and "
     "'developer'."),
    (RESPONSES, {"model": "m", "input": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]}, "input[0].content[0].type", "invalid_value",
     "Invalid value: 'text'. Supported values are: 'input_text', 'input_image', and "
     "'input_file'."),
    (RESPONSES, {"model": "m", "input": [{"type": "function_call", "name": "f",
                                          "arguments": "{}"}]}, "input[0].call_id",
     "missing_required_parameter", "Missing required parameter: 'input[0].call_id'."),
    (RESPONSES, {"model": "m", "input": "hi", "max_output_tokens": 5}, "max_output_tokens",
     "integer_below_min_value", "Invalid 'max_output_tokens': integer below minimum value. "
                                "Expected a value >= 16, but got 5 instead."),
    (RESPONSES, {"model": "m", "input": "hi", "instructions": ["be", "brief"]},
     "instructions", "invalid_type",
     "Invalid type for 'instructions': expected a string, but got an array instead."),
    (RESPONSES, {"model": "m", "input": "hi", "text": {"format": {
        "type": "json_schema", "name": "x"}}}, "text.format.schema",
     "missing_required_parameter", "Missing required parameter: 'text.format.schema'."),
    (RESPONSES, {"model": "m", "input": "hi", "tools": [{"type": "function"}]},
     "tools[0].name", "missing_required_parameter",
     "Missing required parameter: 'tools[0].name'."),
    (RESPONSES, {"model": "m", "input": "hi", "truncation": "sometimes"}, "truncation",
     "invalid_value", "Invalid value: 'sometimes'. Supported values are: 'auto' and "
                      "'disabled'."),
    (MODERATIONS, {"model": "m", "input": [{"type": "text"}]}, "input[0].text",
     "missing_required_parameter", "Missing required parameter: 'input[0].text'."),
    (MODERATIONS, {"model": "m", "input": ["a", {"type": "text", "text": "b"}]}, "input[1]",
     "invalid_type", "Invalid type for 'input[1]': expected a string, but got an object "
                     "instead."),
    (MODERATIONS, {"model": "m", "input": [{"type": "video", "url": "x"}]}, "input[0].type",
     "invalid_value", "Invalid value: 'video'. Supported values are: 'text' and 'image_url'."),
]


@pytest.mark.parametrize(("endpoint", "body", "param", "code", "message"), BAD,
                         ids=[f"{b[0]}:{b[2]}:{b[3]}" for b in BAD])
def test_each_wrong_shape_is_the_hosted_400(endpoint: str, body: dict[str, Any], param: str,
                                            code: str, message: str) -> None:
    problem = request_schemas.check(endpoint, body)
    assert problem is not None
    assert (problem.param, problem.code, problem.message) == (param, code, message)
    reply = problem.reply()
    assert reply.status_code == 400 and not reply.retriable
    assert reply.body == {"error": {"message": message, "type": "invalid_request_error",
                                    "param": param, "code": code}}


def test_missing_fields_come_first_then_the_bodys_own_order() -> None:
    first = request_schemas.check(CHAT, chat(
        messages=[{"role": "user", "content": "a"}, {"role": "wizard"}], temperature=9))
    assert first is not None and first.param == "messages[1].role"
    later = request_schemas.check(CHAT, {"temperature": 9, "model": "m", "messages": []})
    assert later is not None and later.param == "temperature"
    missing = request_schemas.check(CHAT, {"temperature": 9, "model": "m"})
    assert missing is not None and missing.param == "messages"


def test_required_fields_by_endpoint() -> None:
    assert request_schemas.required(CHAT) == ("model", "messages")
    assert request_schemas.required(COMPLETIONS) == ("model", "prompt")
    for endpoint in (EMBEDDINGS, RESPONSES, MODERATIONS):
        assert request_schemas.required(endpoint) == ("model", "input")
    # Any other endpoint (Anthropic's lines) still needs the model that routes it.
    assert request_schemas.required("/v1/messages") == ("model",)
    assert request_schemas.missing(CHAT, {"model": None}) == ["model", "messages"]
    assert request_schemas.missing(COMPLETIONS, {"model": "m", "prompt": ""}) == []


def test_azure_spelling_has_the_same_schema() -> None:
    assert request_schemas.required("/chat/completions") == ("model", "messages")
    problem = request_schemas.check("/embeddings", {"model": "m", "input": 1})
    assert problem is not None and problem.param == "input"


# -- the schemas follow the installed SDK's types -----------------------------------------


def _literals(typed_dict: Any, key: str) -> list[str]:
    """The `Literal` values a TypedDict of the SDK allows for `key`."""
    found: list[str] = []

    def walk(hint: Any) -> None:
        if typing.get_origin(hint) is typing.Literal:
            found.extend(typing.get_args(hint))
        for arg in typing.get_args(hint):
            walk(arg)

    walk(typing.get_type_hints(typed_dict, include_extras=True).get(key))
    return found


def _tags(union: Any, key: str) -> set[str]:
    return {value for member in typing.get_args(union) for value in _literals(member, key)}


def _variants(node: Any) -> set[str]:
    return set(node.variants)


def test_roles_and_part_types_are_the_sdks() -> None:
    from openai.types.chat import chat_completion_content_part_param as parts
    from openai.types.chat import chat_completion_message_param as messages

    message = typing.cast(Any, request_schemas.SCHEMAS[CHAT].fields["messages"]).item
    assert _variants(message) == _tags(messages.ChatCompletionMessageParam, "role")
    user_parts = message.variants["user"].fields["content"].branches[1].item
    assert _variants(user_parts) == _tags(parts.ChatCompletionContentPartParam, "type")


def test_responses_item_and_content_types_are_the_sdks() -> None:
    from openai.types.responses import response_input_content_param as content
    from openai.types.responses import response_input_item_param as items

    field = typing.cast(Any, request_schemas.SCHEMAS[RESPONSES].fields["input"])
    item = field.branches[1].item
    assert _variants(item) == _tags(items.ResponseInputItemParam, "type")
    user = item.variants["message"].variants["user"].fields["content"].branches[1].item
    assert _variants(user) == _tags(content.ResponseInputContentParam, "type")
    assert _variants(item.variants["message"]) == set(
        _literals(items.EasyInputMessageParam, "role"))


def test_moderation_parts_are_the_sdks() -> None:
    from openai.types import moderation_multi_modal_input_param as parts

    field = typing.cast(Any, request_schemas.SCHEMAS[MODERATIONS].fields["input"])
    assert _variants(field.items[1]) == _tags(parts.ModerationMultiModalInputParam, "type")


@pytest.mark.parametrize(("endpoint", "body"),
                         [*(p for p in VALID if p.values[0] in request_schemas.SCHEMAS),
                          *(pytest.param(b[0], b[1], id=f"{b[0]}:{b[2]}:{b[3]}")
                            for b in BAD)])
def test_the_fast_answer_agrees_with_the_full_check(endpoint: str, body: Any) -> None:
    """`valid` is what runs on every line; `check` only where `valid` says no. They must
    never disagree: a wrong body passed as valid would reach a backend unchecked."""
    schema = request_schemas.SCHEMAS[endpoint]
    assert schema.valid(body) is (schema.check(body, "") is None)
