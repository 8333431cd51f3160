"""Reading OpenAI chat and completion bodies for the in-process text generators
(`llama-cpp`, `vllm`), and writing their answers back as OpenAI bodies.

`parse` turns a body that `batchery.wire.request_schemas` has passed into a `Generation`, or
into an error reply (400) for what these engines cannot do (tools, several choices,
images), so such a line is an error line, never a crashed chunk. The sampling defaults
are OpenAI's (temperature 1, top_p 1), not the engines' own.
"""

from __future__ import annotations

import importlib.util
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchery.ports.backend import Reply, error_reply

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = frozenset({CHAT, COMPLETIONS})

#: Chat templates of open models rarely know `developer`; it means what `system` means.
_ROLE_ALIASES = {"developer": "system"}
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
    """Read a chat or completion body that `batchery.wire.request_schemas` has passed; a Reply is
    the 400 for what these engines cannot do."""
    problem = _check_common(body)
    if problem is not None:
        return problem
    if endpoint == CHAT:
        messages = _messages(body["messages"])
        if isinstance(messages, Reply):
            return messages
        return _sampling(body, messages=messages)
    prompts = _prompts(body["prompt"])
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


def _messages(raw: list[dict[str, Any]]) -> list[dict[str, str]] | Reply:
    messages: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        content = _text(message.get("content"))
        if content is None:
            return error_reply(400, f"'messages[{i}].content' holds a part that is not text: "
                                    f"this model reads text only.",
                               param=f"messages[{i}].content", code="unsupported_value")
        role = str(message["role"])
        messages.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
    return messages


def _text(content: Any) -> str | None:
    """A message's content as one string; None when it holds a part that is not text."""
    if content is None:
        return ""  # an assistant turn that only called tools
    if isinstance(content, str):
        return content
    if not all(part.get("type") == "text" for part in content):
        return None
    return "".join(part["text"] for part in content)


def _prompts(raw: str | list[Any]) -> list[str] | Reply:
    if isinstance(raw, str):
        return [raw]
    if all(isinstance(p, str) for p in raw):
        return list(raw)
    return error_reply(400, "'prompt' holds token ids: this model takes text prompts only.",
                       param="prompt", code="unsupported_value")


def _sampling(body: dict[str, Any], *, messages: list[dict[str, str]] | None = None,
              prompts: list[str] | None = None) -> Generation:
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    return Generation(
        messages=messages, prompts=prompts or [], max_tokens=max_tokens,
        temperature=_float(body.get("temperature"), 1.0), top_p=_float(body.get("top_p"), 1.0),
        stop=_stop(body.get("stop")), seed=body.get("seed"),
        json_schema=_json_schema(body.get("response_format")),
        presence_penalty=_float(body.get("presence_penalty"), 0.0),
        frequency_penalty=_float(body.get("frequency_penalty"), 0.0))


def _float(value: Any, default: float) -> float:
    return default if value is None else float(value)


def _stop(raw: str | list[str] | None) -> list[str]:
    stops = [] if raw is None else [raw] if isinstance(raw, str) else raw
    # An empty stop string would end every answer before its first token.
    return [s for s in stops if s]


def _json_schema(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """None (free text), or the schema the answer must follow ({} for any JSON object)."""
    if raw is None or raw["type"] == "text":
        return None
    if raw["type"] == "json_object":
        return {}
    schema: dict[str, Any] = raw["json_schema"].get("schema") or {}
    return schema


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
