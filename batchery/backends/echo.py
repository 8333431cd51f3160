"""`echo`: a deterministic stand-in model for tests, demos and pipelines without a GPU.

It answers every endpoint with a well-formed OpenAI body, and can simulate time per request
(`latency_ms`) and a seeded share of server errors (`failure_rate`). Bodies reach it checked
(`batchery.wire.request_schemas`); it refuses only what a text model of its size cannot do.
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

from batchery.model.exceptions import ConfigError
from batchery.ports.backend import ModelBackend, Reply, Request, error_reply

_DEFAULT_DIM = 16
_MAX_DIM = 4096


class EchoBackend(ModelBackend):
    endpoints = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                           "/v1/moderations"})

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
        self._busy = asyncio.Lock()

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        if self.latency_s:
            # One sleep for the whole call: the same simulated time as one request after
            # another, without a timer per request. Calls take turns, as on a real model of
            # this capacity: concurrent calls do not add capacity.
            async with self._busy:
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


def _texts(raw: str | list[Any]) -> list[str] | None:
    """A prompt or input as texts; None for token ids, which echo has no tokenizer for."""
    if isinstance(raw, str):
        return [raw]
    return list(raw) if all(isinstance(t, str) for t in raw) else None


def _no_token_ids(param: str) -> Reply:
    return error_reply(400, f"'{param}' holds token ids: this model takes text only.",
                       param=param, code="unsupported_value")


def chat(body: dict[str, Any], _dim: int = _DEFAULT_DIM) -> Reply:
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
    prompts = _texts(body["prompt"])
    if prompts is None:
        return _no_token_ids("prompt")
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
    texts = _texts(body["input"])
    if texts is None:
        return _no_token_ids("input")
    fmt = body.get("encoding_format") or "float"
    size = body.get("dimensions") or dim
    if size > _MAX_DIM:
        return error_reply(400, f"'dimensions' must be at most {_MAX_DIM} for this model.",
                           param="dimensions", code="invalid_value")
    data = [{"object": "embedding", "index": i, "embedding": _encode(_vector(t, size), fmt)}
            for i, t in enumerate(texts)]
    tokens = sum(_words(t) for t in texts)
    return Reply(status_code=200, body={
        "object": "list", "data": data, "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


#: The moderation categories of the hosted API.
_MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
    "sexual/minors", "violence", "violence/graphic")


def moderation(body: dict[str, Any], _dim: int = _DEFAULT_DIM) -> Reply:
    """One result per input text (a list of multimodal parts is one input). A category is
    flagged when its name appears in the text, so tests can choose what gets flagged:
    "violence" flags `violence`, "violence/graphic" flags `violence/graphic` too."""
    texts = _moderation_inputs(body.get("input"))
    if texts is None:
        return error_reply(400, "'input' must be a string, an array of strings, or an array "
                                "of multimodal input parts.", param="input",
                           code="invalid_type")
    return Reply(status_code=200, body={
        "id": "modr-" + _digest("\n".join(texts), body.get("model")),
        "model": body.get("model"),
        "results": [_moderate(text) for text in texts],
    })


def _moderation_inputs(raw: Any) -> list[str] | None:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        return list(raw)
    if isinstance(raw, list) and raw and all(isinstance(p, dict) for p in raw):
        return [" ".join(p["text"] for p in raw if isinstance(p.get("text"), str))]
    return None


def _moderate(text: str) -> dict[str, Any]:
    lowered = text.lower()
    flags = {name: name in lowered for name in _MODERATION_CATEGORIES}
    return {"flagged": any(flags.values()), "categories": flags,
            "category_scores": {name: 0.99 if hit else 0.0001 for name, hit in flags.items()},
            "category_applied_input_types": {name: ["text"] for name in _MODERATION_CATEGORIES}}


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
    "/v1/moderations": moderation,
}


def answer(endpoint: str, body: dict[str, Any]) -> Reply:
    """Answer one request body the way the backend does: shared with the benchmark baseline."""
    return _HANDLERS[endpoint](body, _DEFAULT_DIM)
