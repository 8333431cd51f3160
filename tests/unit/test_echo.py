from __future__ import annotations

import asyncio
import base64
import struct

from batchery.backends import echo
from batchery.backends.echo import EchoBackend
from batchery.ports.backend import Request


def test_chat_echoes_the_last_user_message() -> None:
    reply = echo.chat({"model": "echo", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "x"}, {"role": "user", "content": [
            {"type": "text", "text": "three four five"}]}]})
    assert reply.ok
    assert reply.body["choices"][0]["message"]["content"] == "three four five"
    assert reply.body["usage"] == {"prompt_tokens": 8, "completion_tokens": 3,
                                   "total_tokens": 11}


def test_chat_max_tokens_truncates() -> None:
    reply = echo.chat({"model": "e", "max_tokens": 2,
                       "messages": [{"role": "user", "content": "a b c d"}]})
    assert reply.body["choices"][0]["message"]["content"] == "a b"
    assert reply.body["choices"][0]["finish_reason"] == "length"


def test_only_what_echo_cannot_do_is_refused() -> None:
    """Shapes are checked before a backend (`request_schemas`); echo refuses what a model
    without a tokenizer cannot take, and more dimensions than it offers."""
    cases = [
        (echo.completion({"model": "e", "prompt": [1, 2]}), "prompt"),
        (echo.embedding({"model": "e", "input": [[1, 2]]}), "input"),
        (echo.embedding({"model": "e", "input": "a", "dimensions": 4097}), "dimensions"),
    ]
    for reply, param in cases:
        assert reply.status_code == 400 and not reply.retriable
        assert reply.body["error"]["param"] == param


def test_embeddings_are_deterministic_unit_vectors() -> None:
    first = echo.embedding({"model": "e", "input": ["a", "b"], "dimensions": 8})
    again = echo.embedding({"model": "e", "input": "a", "dimensions": 8})
    vector = first.body["data"][0]["embedding"]
    assert vector == again.body["data"][0]["embedding"] and len(vector) == 8
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-9
    packed = echo.embedding({"model": "e", "input": "a", "dimensions": 8,
                             "encoding_format": "base64"}).body["data"][0]["embedding"]
    decoded = struct.unpack("<8f", base64.b64decode(packed))
    assert all(abs(x - y) < 1e-6 for x, y in zip(decoded, vector, strict=True))


def test_completions() -> None:
    reply = echo.completion({"model": "e", "prompt": ["x y", "z"]})
    assert [c["text"] for c in reply.body["choices"]] == ["x y", "z"]


def test_failure_rate_is_seeded_and_proportional() -> None:
    backend = EchoBackend(failure_rate=0.3, seed=1)
    requests = [Request(custom_id=f"r{i}", body={"model": "e", "prompt": "p"})
                for i in range(1000)]
    first = asyncio.run(backend.infer("/v1/completions", requests))
    again = asyncio.run(backend.infer("/v1/completions", requests))
    failed = [r.status_code == 500 for r in first]
    assert failed == [r.status_code == 500 for r in again]
    assert 230 < sum(failed) < 370


def test_latency_is_simulated() -> None:
    backend = EchoBackend(latency_ms=20)
    requests = [Request(custom_id=str(i), body={"model": "e", "prompt": "p"})
                for i in range(5)]
    loop = asyncio.new_event_loop()
    try:
        started = loop.time()
        loop.run_until_complete(backend.infer("/v1/completions", requests))
        assert loop.time() - started >= 0.09
    finally:
        loop.close()
