"""Reading OpenAI chat and completion bodies for the in-process text generators
(`llama-cpp`, `vllm`), and writing their answers back as OpenAI bodies.

`parse` turns a body into a `Generation` or an error reply (400), so a bad line is an
error line, never a crashed chunk. The sampling defaults are OpenAI's (temperature 1,
top_p 1), not the engines' own.
"""

from __future__ import annotations

import importlib.util
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchery.backend import Reply, error_reply

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = frozenset({CHAT, COMPLETIONS})

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: Chat templates of open models rarely know `developer`; it means what `system` means.
_ROLE_ALIASES = {"developer": "system"}
_MAX_STOPS = 4
#: Options that change the answer in ways these engines cannot honour: refuse, don't ignore.
_UNSUPPORTED = ("tools", "functions", "logprobs", "stream")
#: A deployment option naming a file inside an installed package, resolved on each host.
PACKAGE_SCHEME = "pkg://"


@dataclass(frozen=True, kw_only=True, slots=True)
class Generation:
    """What to generate: chat `messages`, or one completion per prompt."""

    messages: list[dict[str, str]] | None = None
    prompts: list[str] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: None (free text), or the JSON schema the answer must follow ({} for any object).
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Choice:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def resolve_path(value: str) -> str:
    """`pkg://package/rel/path` -> that file of the installed package; anything else as is.

    Found with `find_spec`, which does not import the package (some run plugin code).
    """
    if not value.startswith(PACKAGE_SCHEME):
        return value
    package, _, rest = value.removeprefix(PACKAGE_SCHEME).partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{value}: the package '{package}' is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)


def parse(endpoint: str, body: dict[str, Any]) -> Generation | Reply:
    """Read a chat or completion body; a Reply is the 400 to answer instead."""
    problem = _check_common(body)
    if problem is not None:
        return problem
    if endpoint == CHAT:
        messages = _messages(body.get("messages"))
        if isinstance(messages, Reply):
            return messages
        return _sampling(body, messages=messages)
    prompts = _prompts(body.get("prompt"))
    if isinstance(prompts, Reply):
        return prompts
    return _sampling(body, prompts=prompts)


def _check_common(body: dict[str, Any]) -> Reply | None:
    for name in _UNSUPPORTED:
        if body.get(name):
            return error_reply(400, f"'{name}' is not supported by this model.", param=name,
                               code="unsupported_parameter")
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            return error_reply(400, f"'{name}' must be 1: this model returns one choice "
                                    f"per request.", param=name, code="unsupported_value")
    return None


def _messages(raw: Any) -> list[dict[str, str]] | Reply:
    if not isinstance(raw, list) or not raw:
        return error_reply(400, "'messages' must be a non-empty array.", param="messages",
                           code="invalid_value" if isinstance(raw, list) else None)
    messages: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return error_reply(400, f"'{where}' must be an object.", param=where,
                               code="invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            return error_reply(400, f"Invalid value for '{where}.role': expected one of "
                                    f"{', '.join(sorted(_ROLES))}.", param=f"{where}.role",
                               code="invalid_value")
        content = _text(message.get("content"))
        if "content" not in message and role != "assistant":
            content = None
        if content is None:
            return error_reply(400, f"'{where}.content' must be a string or an array of "
                                    f"text parts.", param=f"{where}.content",
                               code="invalid_type")
        messages.append({"role": _ROLE_ALIASES.get(role, str(role)), "content": content})
    return messages


def _text(content: Any) -> str | None:
    """A message's content as one string; None when it is not text."""
    if content is None:
        return ""  # an assistant turn that only called tools
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            return None
        parts.append(part["text"])
    return "".join(parts)


def _prompts(raw: Any) -> list[str] | Reply:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        return list(raw)
    return error_reply(400, "'prompt' must be a string or a non-empty array of strings.",
                       param="prompt", code="invalid_type" if raw is not None
                       else "missing_required_parameter")


def _sampling(body: dict[str, Any], *, messages: list[dict[str, str]] | None = None,
              prompts: list[str] | None = None) -> Generation | Reply:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    checks = {
        "max_tokens": max_tokens is None or (_is_int(max_tokens) and max_tokens >= 1),
        "temperature": _in_range(body.get("temperature"), 0, 2),
        "top_p": _in_range(body.get("top_p"), 0, 1),
        "presence_penalty": _in_range(body.get("presence_penalty"), -2, 2),
        "frequency_penalty": _in_range(body.get("frequency_penalty"), -2, 2),
        "seed": body.get("seed") is None or _is_int(body.get("seed")),
    }
    for name, ok in checks.items():
        if not ok:
            return error_reply(400, f"Invalid value for '{name}'.", param=name,
                               code="invalid_value")
    stop = _stop(body.get("stop"))
    schema = _json_schema(body.get("response_format"))
    if isinstance(stop, Reply):
        return stop
    if isinstance(schema, Reply):
        return schema
    return Generation(
        messages=messages, prompts=prompts or [], max_tokens=max_tokens,
        temperature=_float(body.get("temperature"), 1.0), top_p=_float(body.get("top_p"), 1.0),
        stop=stop, seed=body.get("seed"), json_schema=schema,
        presence_penalty=_float(body.get("presence_penalty"), 0.0),
        frequency_penalty=_float(body.get("frequency_penalty"), 0.0))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(value: Any, low: float, high: float) -> bool:
    if value is None:
        return True
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


def _float(value: Any, default: float) -> float:
    return default if value is None else float(value)


def _stop(raw: Any) -> list[str] | Reply:
    if raw is None:
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if (not isinstance(stops, list) or len(stops) > _MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        return error_reply(400, f"'stop' must be a string or an array of at most "
                                f"{_MAX_STOPS} non-empty strings.", param="stop",
                           code="invalid_value")
    return list(stops)


def _json_schema(raw: Any) -> dict[str, Any] | Reply | None:
    if raw is None or (isinstance(raw, dict) and raw.get("type") == "text"):
        return None
    if isinstance(raw, dict) and raw.get("type") == "json_object":
        return {}
    if isinstance(raw, dict) and raw.get("type") == "json_schema":
        schema = (raw.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            return schema
    return error_reply(400, "'response_format' must be {'type': 'text'}, {'type': "
                            "'json_object'} or {'type': 'json_schema', 'json_schema': "
                            "{'schema': {...}}}.", param="response_format",
                       code="invalid_value")


def refusal(exc: Exception) -> Reply | None:
    """The 400 for an engine's exception that blames the request, not the model: a
    ValueError (such as a prompt longer than the context), or a chat template refusing the
    messages (Jinja's `raise_exception`, as in templates that want roles to alternate).
    None for anything else."""
    if type(exc).__module__.startswith("jinja2"):
        return error_reply(400, f"The model's chat template refused these messages: {exc}",
                           param="messages", code="invalid_value")
    if isinstance(exc, ValueError):
        text = str(exc).lower()
        code = ("context_length_exceeded" if "context" in text or "model length" in text
                else None)
        return error_reply(400, str(exc), code=code)
    return None


# -- answers ---------------------------------------------------------------------------


def chat_body(model: Any, choice: Choice) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": choice.text,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": choice.finish_reason}],
        "usage": usage([choice]),
    }


def completion_body(model: Any, choices: list[Choice]) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": c.text, "logprobs": None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
        "usage": usage(choices),
    }


def usage(choices: list[Choice]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
