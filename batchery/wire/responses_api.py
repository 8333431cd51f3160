"""The Responses API on top of chat backends: translate a `/v1/responses` request into a
chat completion request, and a chat completion back into a `Response` object.

Any deployment that answers `/v1/chat/completions` can so serve `/v1/responses` lines. The
translation covers what a chat model can do: text and image input, `instructions`,
`max_output_tokens`, sampling, `text.format` (JSON modes), function tools and their calls.
What needs state kept between requests (`previous_response_id`, `conversation`, stored
`prompt`s) or the hosted tools (web search, file search, ...) is refused with a 400.

Shapes follow the `openai` SDK's types (`openai.types.responses`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from batchery.ports.backend import Reply, error_reply

#: Parameters that need state Batchery does not keep between requests.
_STATEFUL = ("previous_response_id", "conversation", "prompt")
#: Input roles and the chat role each becomes: chat templates of open models rarely know
#: `developer`; it means what `system` means.
_ROLES = {"user": "user", "assistant": "assistant", "system": "system",
          "developer": "system"}
#: Chat finish reasons that leave a response incomplete, and the reason it gives.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
#: Request fields a Response object repeats, with the value it shows when they are absent.
_ECHOED: dict[str, Any] = {
    "instructions": None, "max_output_tokens": None, "max_tool_calls": None,
    "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0, "tool_choice": "auto",
    "tools": [], "truncation": "disabled", "user": None, "safety_identifier": None,
    "prompt_cache_key": None, "service_tier": "default", "top_logprobs": 0,
    "background": False}


class ParamsError(ValueError):
    """The Responses request cannot be expressed as a chat request."""

    def __init__(self, message: str, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def reply(self) -> Reply:
        return error_reply(400, str(self), param=self.param, code=self.code)


# -- request: Responses -> chat ----------------------------------------------------------


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A `/v1/responses` body -> a `/v1/chat/completions` body. Raises ParamsError naming
    the field it cannot translate."""
    for name in _STATEFUL:
        if body.get(name) is not None:
            raise ParamsError(f"'{name}' is not supported in a batch: Batchery keeps no "
                              f"earlier responses or conversations to continue from; send "
                              f"the whole conversation in 'input'.", name,
                              "unsupported_parameter")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if body.get(name) is not None:
            chat[name] = body[name]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    if body.get("tools"):
        chat["tools"] = [_tool(tool, i) for i, tool in enumerate(_list(body["tools"], "tools"))]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    effort = _effort(body)
    if effort is not None:
        chat["reasoning_effort"] = effort
    return chat


def _effort(body: dict[str, Any]) -> Any:
    reasoning = body.get("reasoning")
    return reasoning.get("effort") if isinstance(reasoning, dict) else None


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ParamsError(f"Invalid type for '{where}': expected an array.", where,
                          "invalid_type")
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    elif instructions is not None and not isinstance(instructions, str):
        raise ParamsError("Invalid type for 'instructions': expected a string.",
                          "instructions", "invalid_type")
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list):
        messages.extend(_items(raw))
    else:
        raise ParamsError("Invalid type for 'input': expected a string or an array of input "
                          "items.", "input", "invalid_type" if raw is not None
                          else "missing_required_parameter")
    if not any(m["role"] != "system" for m in messages):
        raise ParamsError("'input' must hold at least one message besides instructions.",
                          "input")
    return messages


def _items(items: list[Any]) -> Iterator[dict[str, Any]]:
    """Chat messages of the input items; consecutive function calls become one assistant
    turn, as a chat model makes parallel calls."""
    calls: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ParamsError(f"Invalid type for '{where}': expected an object.", where,
                              "invalid_type")
        kind = item.get("type", "message")
        if kind == "function_call":
            calls.append(_call(item, where))
            continue
        if calls:
            yield {"role": "assistant", "content": None, "tool_calls": calls}
            calls = []
        if kind == "message":
            yield _message(item, where)
        elif kind == "function_call_output":
            yield _call_output(item, where)
        elif kind != "reasoning":  # a model's own reasoning: chat has no place for it
            raise ParamsError(f"Invalid value for '{where}.type': '{kind}' items cannot run "
                              f"on this deployment; it takes messages, function calls and "
                              f"their outputs.", f"{where}.type", "unsupported_value")
    if calls:
        yield {"role": "assistant", "content": None, "tool_calls": calls}


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise ParamsError(f"Invalid value for '{where}.role': expected one of "
                          f"{', '.join(sorted(_ROLES))}.", f"{where}.role")
    return {"role": _ROLES[role], "content": _content(item.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """Chat content: one string when every part is text (what every chat server takes),
    else a list of chat content parts."""
    if isinstance(content, str):
        return content
    parts = [_part(part, f"{where}[{i}]") for i, part in enumerate(_list(content, where))]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": "text", "text": part["refusal"]}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        image: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_image":
        raise ParamsError(f"'{where}': images must be given as 'image_url' (a URL or a data "
                          f"URL); uploaded files ('file_id') are not supported.",
                          f"{where}.image_url", "unsupported_value")
    raise ParamsError(f"Invalid value for '{where}.type': expected 'input_text', "
                      f"'output_text', 'refusal' or 'input_image'.", f"{where}.type",
                      "unsupported_value" if isinstance(kind, str) else "invalid_value")


def _call(item: dict[str, Any], where: str) -> dict[str, Any]:
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str):
            raise ParamsError(f"Missing required parameter: '{where}.{name}'.",
                              f"{where}.{name}", "missing_required_parameter")
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def _call_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(item.get("call_id"), str):
        raise ParamsError(f"Missing required parameter: '{where}.call_id'.",
                          f"{where}.call_id", "missing_required_parameter")
    output = item.get("output")
    text = output if isinstance(output, str) else _content(output, f"{where}.output")
    if not isinstance(text, str):
        raise ParamsError(f"'{where}.output' must be text: a string or text parts.",
                          f"{where}.output", "unsupported_value")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": text}


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {key: fmt[key] for key in ("name", "description", "schema", "strict")
                  if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise ParamsError("Invalid value for 'text.format': expected {'type': 'text'}, "
                      "{'type': 'json_object'} or {'type': 'json_schema', 'name': ..., "
                      "'schema': {...}}.", "text.format")


def _tool(tool: Any, i: int) -> dict[str, Any]:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function" or not isinstance(tool.get("name"), str):
        raise ParamsError(f"Invalid value for 'tools[{i}].type': only function tools can run "
                          f"on this deployment, not {kind!r}.", f"tools[{i}].type",
                          "unsupported_value")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ParamsError("Invalid value for 'tool_choice': expected 'none', 'auto', "
                      "'required' or {'type': 'function', 'name': ...}.", "tool_choice")


# -- answer: chat -> Response ------------------------------------------------------------


def from_chat(request: dict[str, Any], chat: dict[str, Any]) -> dict[str, Any]:
    """A chat completion answering `to_chat(request)` -> the `Response` object."""
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") or {}
    reason = _INCOMPLETE.get(choice.get("finish_reason") or "stop")
    status = "incomplete" if reason else "completed"
    created = chat.get("created")
    response = {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response",
        "created_at": created if isinstance(created, int) else int(time.time()),
        "status": status, "completed_at": int(time.time()) if not reason else None,
        "error": None, "incomplete_details": {"reason": reason} if reason else None,
        "model": chat.get("model") or request.get("model"),
        "output": _output(message, status),
        "usage": usage(chat.get("usage")),
        "reasoning": {"effort": _effort(request), "summary": None},
        "text": {"format": _format_of(request), "verbosity": "medium"},
        "metadata": request.get("metadata") or {},
        "previous_response_id": None,
    }
    for name, default in _ECHOED.items():
        value = request.get(name)
        response[name] = default if value is None else value
    return response


def _format_of(request: dict[str, Any]) -> Any:
    text = request.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    return fmt if isinstance(fmt, dict) else {"type": "text"}


def _output(message: dict[str, Any], status: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str):
        content.append({"type": "output_text", "text": message["content"], "annotations": [],
                        "logprobs": []})
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        content.append({"type": "refusal", "refusal": message["refusal"]})
    calls = [_function_call(c) for c in message.get("tool_calls") or []
             if isinstance(c, dict)]
    output = []
    if content or not calls:
        output.append({"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": status,
                       "role": "assistant", "content": content})
    return output + calls


def _function_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    return {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "completed",
            "call_id": call.get("id"), "name": function.get("name"),
            "arguments": function.get("arguments")}


def usage(chat_usage: Any) -> dict[str, Any]:
    """Chat usage -> Responses usage (tokens in and out, and their details)."""
    chat_usage = chat_usage if isinstance(chat_usage, dict) else {}
    prompt, completion = _int(chat_usage.get("prompt_tokens")), _int(
        chat_usage.get("completion_tokens"))
    cached = _int((chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
    reasoning = _int((chat_usage.get("completion_tokens_details") or {}).get(
        "reasoning_tokens"))
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def reply_from_chat(request: dict[str, Any], reply: Reply) -> Reply:
    """The reply to a Responses request that ran as chat: a Response object when the chat
    answer succeeded; an error as it came (both APIs share the error envelope)."""
    if not reply.ok:
        return reply
    return Reply(status_code=reply.status_code, body=from_chat(request, reply.body))
