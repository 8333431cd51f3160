"""Anthropic Messages on top of chat backends: translate a Messages request into a chat
completion request, and a chat completion back into a Messages `Message`.

Any deployment that answers `/v1/chat/completions` can so serve Anthropic Message Batches.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

# The message batches' line endpoint is a domain value; offered here too, beside the rest
# of the Messages wire format.
from batchery.model.batches import MESSAGES_ENDPOINT as MESSAGES_ENDPOINT
from batchery.ports.backend import Reply

CHAT_ENDPOINT = "/v1/chat/completions"
#: Anthropic's custom_id rule. `\Z`, not `$`: `$` also matches before a trailing newline.
CUSTOM_ID = re.compile(r"\A[a-zA-Z0-9_-]{1,64}\Z")

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "billing_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
                529: "overloaded_error"}


class ParamsError(ValueError):
    """The Messages params cannot be expressed as a chat request."""


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ParamsError(f"{where}: expected a string or a list of content blocks")
    parts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" \
                or not isinstance(block.get("text"), str):
            raise ParamsError(f"{where}.{i}: only text content blocks are supported")
        parts.append(block["text"])
    return "".join(parts)


def to_chat(params: dict[str, Any]) -> dict[str, Any]:
    """Messages params -> chat completion body. Raises ParamsError naming the field."""
    if not isinstance(params.get("max_tokens"), int) or params["max_tokens"] < 1:
        raise ParamsError("max_tokens: Field required (a positive integer)")
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParamsError("messages: Field required (a non-empty list)")
    chat: list[dict[str, str]] = []
    if params.get("system") is not None:
        chat.append({"role": "system", "content": _text(params["system"], "system")})
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise ParamsError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        chat.append({"role": message["role"],
                     "content": _text(message.get("content"), f"messages.{i}.content")})
    body: dict[str, Any] = {"model": params.get("model"), "messages": chat,
                            "max_tokens": params["max_tokens"]}
    if params.get("stop_sequences"):
        body["stop"] = params["stop_sequences"]
    for key in ("temperature", "top_p", "top_k"):
        if params.get(key) is not None:
            body[key] = params[key]
    return body


def message_from_chat(body: dict[str, Any], model: Any) -> dict[str, Any]:
    """A chat completion -> an Anthropic `Message`."""
    choice = (body.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    usage = body.get("usage") or {}
    digest = hashlib.blake2b(orjson.dumps(body.get("id")), digest_size=12).hexdigest()
    return {"id": f"msg_{digest}", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": _STOP_REASONS.get(choice.get("finish_reason"), "end_turn"),
            "stop_sequence": None,
            "usage": {"input_tokens": int(usage.get("prompt_tokens") or 0),
                      "output_tokens": int(usage.get("completion_tokens") or 0)}}


def error_response(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def result_line(custom_id: str, reply: Reply, model: Any) -> bytes:
    """One line of a Message Batch's results for an answered request."""
    if reply.ok:
        result: dict[str, Any] = {"type": "succeeded",
                                  "message": message_from_chat(reply.body, model)}
    else:
        error = reply.body.get("error") if isinstance(reply.body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        result = {"type": "errored",
                  "error": error_response(reply.status_code, str(message or reply.body))}
    return orjson.dumps({"custom_id": custom_id, "result": result}) + b"\n"


def unrun_line(custom_id: str, kind: str, message: str | None = None) -> bytes:
    """A line for a request that never ran: `canceled`, `expired`, or `errored` (api_error)."""
    result: dict[str, Any] = {"type": kind}
    if kind == "errored":
        result["error"] = error_response(500, message or "The request could not be run.")
    return orjson.dumps({"custom_id": custom_id, "result": result}) + b"\n"
