"""The `vllm` backend. Without a GPU its logic runs against a stand-in engine that records
what it is handed; the real engine runs only where vLLM and CUDA are (never in CI here).

The real test reads the model to serve from BATCHERY_TEST_VLLM_MODEL (a local directory,
since GPU machines may have no network), at import, before the environment is cleaned.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from batchery.backends.vllm import ParamsFactory, VllmBackend
from batchery.ports.backend import Reply, Request

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
VLLM_MODEL = os.environ.get("BATCHERY_TEST_VLLM_MODEL")


class FakeTokenizer:
    def apply_chat_template(self, messages: list[dict[str, str]], *, tokenize: bool,
                            add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        return "<s>" + "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "bot:"

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        assert not add_special_tokens
        return list(range(len(text.split())))


class FakeEngine:
    """Answers each prompt with its own words reversed, after a few yields, and counts the
    requests it holds at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.params: list[dict[str, Any]] = []

    async def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    async def generate(self, prompt: Any, params: dict[str, Any], request_id: str
                       ) -> AsyncIterator[Any]:
        self.params.append(params)
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt.split()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            for step in range(3):
                await asyncio.sleep(0.01)
                done = step == 2
                yield SimpleNamespace(prompt_token_ids=ids, outputs=[SimpleNamespace(
                    text=f"answer {len(ids)}" if done else "ans", token_ids=[1] * (step + 1),
                    finish_reason="length" if done else None)])
        finally:
            self.in_flight -= 1


class FakeVllm(VllmBackend):
    def _open(self) -> tuple[Any, ParamsFactory]:
        self.fake = FakeEngine()
        return self.fake, dict


def infer(backend: VllmBackend, *bodies: dict[str, Any], endpoint: str = CHAT
          ) -> list[Reply]:
    requests = [Request(custom_id=f"r{i}", body={"model": "big", **b})
                for i, b in enumerate(bodies)]
    return asyncio.run(backend.infer(endpoint, requests))


def ask(text: str, **body: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **body}


def test_every_line_of_a_call_is_in_flight_at_once() -> None:
    backend = FakeVllm(model="any")
    replies = infer(backend, *(ask(f"question {i}", max_tokens=3) for i in range(20)))
    assert backend.fake.peak == 20
    assert [r.status_code for r in replies] == [200] * 20
    body = replies[0].body
    assert body["object"] == "chat.completion" and body["model"] == "big"
    # "<s>user: question 0\nbot:" is four words: four prompt tokens.
    assert body["choices"][0]["message"]["content"] == "answer 4"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_sampling_options_reach_the_engine() -> None:
    backend = FakeVllm(model="any", default_max_tokens=50)
    infer(backend, ask("a", temperature=0, seed=3, top_p=0.5, stop="END", max_tokens=9,
                       response_format={"type": "json_object"}), ask("b"))
    first, second = backend.fake.params
    assert first == {"n": 1, "max_tokens": 9, "temperature": 0.0, "top_p": 0.5,
                     "stop": ["END"], "seed": 3, "presence_penalty": 0.0,
                     "frequency_penalty": 0.0, "json_schema": {}}
    assert second["max_tokens"] == 50 and second["temperature"] == 1.0
    assert second["json_schema"] is None and second["seed"] is None


def test_completions_and_bad_bodies() -> None:
    backend = FakeVllm(model="any")
    both, bad_n, token_ids = infer(
        backend, {"prompt": ["one two", "three"]}, {"prompt": "x", "n": 3},
        {"prompt": [5, 6]}, endpoint=COMPLETIONS)
    assert [c["text"] for c in both.body["choices"]] == ["answer 2", "answer 1"]
    assert both.body["usage"]["prompt_tokens"] == 3
    assert bad_n.status_code == 400 and bad_n.body["error"]["param"] == "n"
    assert token_ids.status_code == 400 and token_ids.body["error"]["param"] == "prompt"
    (image,) = infer(backend, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert image.status_code == 400
    assert len(backend.fake.params) == 2, "bad bodies never reach the engine"


class TemplateError(Exception):
    """Stands for jinja2's: what a chat template's `raise_exception` raises."""


TemplateError.__module__ = "jinja2.exceptions"


class Refusing(FakeVllm):
    def __init__(self, error: Exception, **options: Any) -> None:
        super().__init__(model="any", **options)
        self.error = error

    async def _run(self, gen: Any, model: Any) -> Reply:
        raise self.error


@pytest.mark.parametrize(("error", "code"), [
    (TemplateError("Conversation roles must alternate"), "invalid_value"),
    (ValueError("The decoder prompt (length 9000) is longer than the maximum model length "
                "of 4096."), "context_length_exceeded"),
])
def test_errors_that_blame_the_request_are_400(error: Exception, code: str) -> None:
    (reply,) = infer(Refusing(error), ask("hi"))
    assert reply.status_code == 400 and reply.body["error"]["code"] == code


def test_other_engine_errors_fail_the_call() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        infer(Refusing(RuntimeError("CUDA error: an illegal memory access")), ask("hi"))


def _gpu_ready() -> bool:
    if importlib.util.find_spec("vllm") is None or VLLM_MODEL is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs vLLM, CUDA and BATCHERY_TEST_VLLM_MODEL")
def test_a_real_engine_answers_reproducibly() -> None:  # pragma: no cover - GPU only
    assert VLLM_MODEL is not None
    backend = VllmBackend(model=VLLM_MODEL, gpu_memory_utilization=0.5, max_model_len=2048)

    async def twice() -> tuple[list[Reply], list[Reply]]:
        requests = [Request(custom_id=f"r{i}", body={"model": "m", **ask(
            f"Count to {i + 3}.", temperature=0, seed=1, max_tokens=24)}) for i in range(16)]
        try:
            return (await backend.infer(CHAT, requests), await backend.infer(CHAT, requests))
        finally:
            await backend.aclose()

    first, second = asyncio.run(twice())
    assert all(r.status_code == 200 for r in first)
    assert [r.body["choices"] for r in first] == [r.body["choices"] for r in second]
