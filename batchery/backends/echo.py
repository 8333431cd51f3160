"""`echo`: a deterministic stand-in model for tests, demos and pipelines without a GPU.

It answers every endpoint with a well-formed OpenAI body, validates request bodies the way
a real server would (a bad body gets a 400 reply, not an exception), and can simulate time
per request (`latency_ms`) and a seeded share of server errors (`failure_rate`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from batchery.backend import ModelBackend, Reply, Request, error_reply
from batchery.exceptions import ConfigError

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_DEFAULT_DIM = 16


class EchoBackend(ModelBackend):
    endpoints = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

    def __init__(self, *, latency_ms: float = 0.0, failure_rate: float = 0.0, seed: int = 0,
                 concurrency: int = 1, dimensions: int = _DEFAULT_DIM) -> None:
        if not _number(latency_ms) or latency_ms < 0:
            raise ConfigError(f"latency_ms: expected a number of milliseconds >= 0, "
                              f"not {latency_ms!r}")
        if not _number(failure_rate) or not 0.0 <= failure_rate <= 1.0:
            raise ConfigError(f"failure_rate: expected a number between 0 and 1, "
                              f"not {failure_rate!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed: expected a whole number, not {seed!r}")
        for name, value in (("concurrency", concurrency), ("dimensions", dimensions)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: expected a whole number >= 1, not {value!r}")
        self.latency_s = latency_ms / 1000.0
        self.failure_rate = failure_rate
        self.seed = seed
        self.concurrency = concurrency
        self.dimensions = dimensions

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        if self.latency_s:
            # One sleep for the whole call: the same simulated time as one request after
            # another, without a timer per request.
            await asyncio.sleep(self.latency_s * len(requests) / self.concurrency)
        handler = _HANDLERS.get(endpoint)
        if handler is None:
            return [error_reply(404, f"Invalid URL (POST {endpoint})") for _ in requests]
        dim = self.dimensions
        if not self.failure_rate:
            return [handler(r.body, dim) for r in requests]
        return [self._simulated_failure(r) or handler(r.body, dim) for r in requests]

    def _simulated_failure(self, request: Request) -> Reply | None:
        if not self.failure_rate:
            return None
        digest = hashlib.blake2b(f"{self.seed}:{request.custom_id}".encode(),
                                 digest_size=8).digest()
        if int.from_bytes(digest, "big") / 2**64 >= self.failure_rate:
            return None
        return error_reply(500, "The echo model failed this request on purpose "
                                "(failure_rate).", type_="server_error")


def _number(value: Any) -> bool:
    """A real number: not a bool, not NaN or infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return None


def _check_messages(messages: Any) -> Reply | None:
    if not isinstance(messages, list) or not messages:
        return error_reply(400, "'messages' must be a non-empty array.", param="messages",
                           code="invalid_value" if isinstance(messages, list) else None)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return error_reply(400, f"'messages[{i}]' must be an object.",
                               param=f"messages[{i}]", code="invalid_type")
        if message.get("role") not in _ROLES:
            return error_reply(400, f"Invalid value for 'messages[{i}].role': expected one of "
                                    f"{', '.join(sorted(_ROLES))}.",
                               param=f"messages[{i}].role", code="invalid_value")
        if "content" not in message and message["role"] != "assistant":
            return error_reply(400, f"Missing required parameter: 'messages[{i}].content'.",
                               param=f"messages[{i}].content",
                               code="missing_required_parameter")
    return None


def chat(body: dict[str, Any], _dim: int = _DEFAULT_DIM) -> Reply:
    problem = _check_messages(body.get("messages"))
    if problem is not None:
        return problem
    messages = body["messages"]
    answer = next((_text_of(m.get("content")) for m in reversed(messages)
                   if m.get("role") == "user"), None) or ""
    prompt_tokens = sum(_words(_text_of(m.get("content")) or "") for m in messages)
    completion_tokens = _words(answer)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    finish = "stop"
    if isinstance(max_tokens, int) and completion_tokens > max_tokens:
        answer = " ".join(answer.split()[:max_tokens])
        completion_tokens, finish = max_tokens, "length"
    return Reply(status_code=200, body={
        "id": "chatcmpl-" + _digest(answer, body.get("model")),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": finish}],
        "usage": _usage(prompt_tokens, completion_tokens),
        "system_fingerprint": "fp_echo",
    })


def completion(body: dict[str, Any], _dim: int = _DEFAULT_DIM) -> Reply:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, str):
        prompts = [prompt]
    else:
        return error_reply(400, "'prompt' must be a string or an array of strings.",
                           param="prompt", code="invalid_type" if prompt is not None
                           else "missing_required_parameter")
    tokens = sum(_words(p) for p in prompts)
    return Reply(status_code=200, body={
        "id": "cmpl-" + _digest("".join(prompts), body.get("model")),
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": i, "text": p, "logprobs": None, "finish_reason": "stop"}
                    for i, p in enumerate(prompts)],
        "usage": _usage(tokens, tokens),
        "system_fingerprint": "fp_echo",
    })


def embedding(body: dict[str, Any], dim: int = _DEFAULT_DIM) -> Reply:
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return error_reply(400, "'input' must be a string or a non-empty array of strings.",
                           param="input", code="invalid_type")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        return error_reply(400, "'encoding_format' must be 'float' or 'base64'.",
                           param="encoding_format", code="invalid_value")
    size = body.get("dimensions") or dim
    if not isinstance(size, int) or size < 1 or size > 4096:
        return error_reply(400, "'dimensions' must be an integer from 1 to 4096.",
                           param="dimensions", code="invalid_value")
    data = [{"object": "embedding", "index": i, "embedding": _encode(_vector(t, size), fmt)}
            for i, t in enumerate(texts)]
    tokens = sum(_words(t) for t in texts)
    return Reply(status_code=200, body={
        "object": "list", "data": data, "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


def _vector(text: str, size: int) -> list[float]:
    stream = b""
    counter = 0
    while len(stream) < size * 4:
        stream += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    raw = [v / 2**31 - 1.0 for v in struct.unpack(f"<{size}I", stream[: size * 4])]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _digest(text: str, model: Any) -> str:
    return hashlib.blake2b(f"{model}:{text}".encode(), digest_size=12).hexdigest()


_HANDLERS: dict[str, Callable[[dict[str, Any], int], Reply]] = {
    "/v1/chat/completions": chat,
    "/v1/completions": completion,
    "/v1/embeddings": embedding,
}


def answer(endpoint: str, body: dict[str, Any]) -> Reply:
    """Answer one request body the way the backend does: shared with the benchmark baseline."""
    return _HANDLERS[endpoint](body, _DEFAULT_DIM)
