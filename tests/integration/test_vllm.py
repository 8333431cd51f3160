"""The `vllm` backend. Without a GPU its logic runs against a stand-in engine that records
what it is handed; the real engine runs only where vLLM and CUDA are (never in CI here).
The sampling parameters the engine is handed are always built by the backend's own builder:
with vLLM's `SamplingParams` where vLLM is installed, else with a stand-in `vllm` module
that takes exactly the field names vLLM's classes take (and refuses any other, as vLLM's
structs do), so a misspelt or vanished field fails here too.

The real test reads the model to serve from BATCHERY_TEST_VLLM_MODEL (a local directory,
since GPU machines may have no network), at import, before the environment is cleaned.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest

from batchery.backends.vllm import ParamsFactory, VllmBackend, _sampling_params
from batchery.ports.backend import Reply, Request

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
VLLM_MODEL = os.environ.get("BATCHERY_TEST_VLLM_MODEL")


#: The keyword arguments `vllm.SamplingParams` takes (vLLM 0.10; `guided_decoding` before
#: it, `structured_outputs` since).
SAMPLING_PARAMS_FIELDS = frozenset({
    "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
    "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "detokenize",
    "skip_special_tokens", "spaces_between_special_tokens", "logits_processors",
    "include_stop_str_in_output", "truncate_prompt_tokens", "output_kind", "logit_bias",
    "allowed_token_ids", "extra_args", "bad_words"})
#: The constraints of `StructuredOutputsParams` (and of the older `GuidedDecodingParams`):
#: exactly one of them is given.
CONSTRAINTS = frozenset({"json", "regex", "choice", "grammar", "json_object",
                         "structural_tag"})
HAS_VLLM = importlib.util.find_spec("vllm") is not None


class _Struct:
    """Keyword arguments only, and only the names vLLM's class has."""

    FIELDS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - self.FIELDS
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected keyword argument(s) "
                            f"{sorted(unknown)}")
        self.__dict__.update(kwargs)


class _Constraint(_Struct):
    FIELDS = CONSTRAINTS | {"disable_fallback", "disable_any_whitespace",
                            "disable_additional_properties", "whitespace_pattern"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        given = [k for k in CONSTRAINTS if kwargs.get(k) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one constraint must be given, not {given}")


def stand_in_vllm(*, structured_outputs: bool) -> dict[str, ModuleType]:
    """`vllm` and `vllm.sampling_params` as the builder imports them: with
    `StructuredOutputsParams` (vLLM 0.10 on), or with `GuidedDecodingParams` only."""
    option = "structured_outputs" if structured_outputs else "guided_decoding"
    sampling_params_cls = type("SamplingParams", (_Struct,), {
        "FIELDS": SAMPLING_PARAMS_FIELDS | {option}})
    constraint_cls = type("StructuredOutputsParams" if structured_outputs
                          else "GuidedDecodingParams", (_Constraint,), {})
    vllm, sampling_params = ModuleType("vllm"), ModuleType("vllm.sampling_params")
    vllm.SamplingParams = sampling_params.SamplingParams = sampling_params_cls  # type: ignore[attr-defined]
    setattr(sampling_params, constraint_cls.__name__, constraint_cls)
    vllm.sampling_params = sampling_params  # type: ignore[attr-defined]
    return {"vllm": vllm, "vllm.sampling_params": sampling_params}


@pytest.fixture(autouse=True)
def vllm_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own classes where it is installed, else the stand-in (of vLLM 0.10 on)."""
    if not HAS_VLLM:
        for name, module in stand_in_vllm(structured_outputs=True).items():
            monkeypatch.setitem(sys.modules, name, module)


def option(params: Any, name: str) -> Any:
    return getattr(params, name, None)


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
        self.params: list[Any] = []

    async def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    async def generate(self, prompt: Any, params: Any, request_id: str
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
    """The backend on the stand-in engine; its sampling parameters come from the backend's
    own builder, as the real engine's do."""

    def _open(self) -> tuple[Any, ParamsFactory]:
        self.fake = FakeEngine()
        return self.fake, _sampling_params


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
    assert type(first).__name__ == "SamplingParams"
    assert {name: option(first, name) for name in (
        "n", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
        "frequency_penalty")} == {
        "n": 1, "max_tokens": 9, "temperature": 0.0, "top_p": 0.5, "stop": ["END"],
        "seed": 3, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    # `json_object` as vLLM's structured-output option, the one constraint given.
    assert option(option(first, "structured_outputs"), "json_object") is True
    assert option(second, "max_tokens") == 50 and option(second, "temperature") == 1.0
    assert option(second, "structured_outputs") is None and option(second, "seed") is None


def test_a_json_schema_is_the_structured_output_constraint() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    backend = FakeVllm(model="any")
    infer(backend, ask("a", response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": schema}}))
    (params,) = backend.fake.params
    constraint = option(params, "structured_outputs")
    assert option(constraint, "json") == schema and option(constraint, "json_object") is None


@pytest.mark.skipif(HAS_VLLM, reason="the installed vLLM has one of the two spellings")
def test_before_vllm_0_10_the_constraint_is_guided_decoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, module in stand_in_vllm(structured_outputs=False).items():
        monkeypatch.setitem(sys.modules, name, module)
    params = _sampling_params({"n": 1, "max_tokens": 4, "json_schema": {}})
    assert option(option(params, "guided_decoding"), "json_object") is True
    assert option(params, "structured_outputs") is None
    plain = _sampling_params({"n": 1, "max_tokens": 4, "json_schema": None})
    assert option(plain, "guided_decoding") is None


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
