"""Idempotent creates, usage and cost, spend ceilings and cost estimates (issue #11, items 4
and 6), end to end: a real server on SQLite and on PostgreSQL, the official `openai` and
`anthropic` SDKs (through `extra_headers` and `extra_body`), and raw HTTP for jobs."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from openai import OpenAI

import batchery
import batchery.client
from tests.acceptance.engine_support import (
    Database,
    file_lines,
    python,
    serve,
    until,
    wait_batch,
    write_config,
)
from tests.conftest import Server
from tests.helpers import chat_line, jsonl

pytestmark = pytest.mark.slow

#: US dollars per million tokens of the priced deployments.
ECHO_PRICES = {"input": 1.5, "output": 3.0}
SLOW_PRICES = {"input": 2.0, "output": 4.0}
DEPLOYMENTS = [
    {"name": "echo", "backend": "echo", "prices": ECHO_PRICES},
    # 50 ms a request, one at a time: a batch of 200 takes 10 s, long enough to stop it.
    {"name": "echo-slow", "backend": "echo", "options": {"latency_ms": 50},
     "prices": SLOW_PRICES},
    {"name": "free", "backend": "echo"},
]
ENDPOINTS = [{"name": "ep", "deployments": [
    {**python("v1"), "workers": {"min": 0, "max": 1, "idle_seconds": 3}}]}]
KEY = "Idempotency-Key"



@pytest.fixture
def server(db: Database, tmp_path: Path, server_factory: Any) -> Server:
    config = write_config(tmp_path / "config.yaml", DEPLOYMENTS, ENDPOINTS)
    return serve(server_factory, db, config, "--workers", "1", "--chunk-size", "20")


@pytest.fixture
def client(server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.v1, api_key="k", max_retries=0) as made:
        yield made


@pytest.fixture
def claude(server: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0) as made:
        yield made


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as made:
        yield made


def upload(client: OpenAI, data: bytes, purpose: str = "batch") -> str:
    return client.files.create(file=("in.jsonl", data), purpose=purpose).id  # type: ignore[arg-type]


def chat_lines(n: int, model: str, prefix: str = "r") -> bytes:
    return jsonl(chat_line(f"{prefix}-{i}", f"hello number {i}", model=model) for i in range(n))


def message_request(custom_id: str, text: str, model: str = "echo") -> dict[str, Any]:
    return {"custom_id": custom_id, "params": {
        "model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}}


def all_at_once(n: int, call: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """`n` calls made together (threads), as clients retrying at the same moment would."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: call(), range(n)))


def extension(obj: Any, name: str) -> Any:
    """An extension field of an SDK object (the SDKs keep unknown fields)."""
    return obj.to_dict()[name]


def wait_message_batch(claude: anthropic.Anthropic, batch_id: str, timeout: float = 60) -> Any:
    return until(lambda: (b := claude.messages.batches.retrieve(batch_id)).processing_status
                 == "ended" and b, timeout, f"message batch {batch_id} to end", every=0.2)


# -- idempotent creates ----------------------------------------------------------------------

def test_openai_batch_replays_return_the_batch_and_conflicts_are_409(
        client: OpenAI, http: httpx.Client) -> None:
    file_id = upload(client, chat_lines(3, "echo"))
    params: dict[str, Any] = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                              "completion_window": "24h"}
    first = client.batches.create(**params, extra_headers={KEY: "k-1"})
    again = client.batches.create(**params, extra_headers={KEY: "k-1"})
    by_body = client.batches.create(**params, extra_body={"idempotency_key": "k-1"})
    assert again.id == by_body.id == first.id
    # The same key with other parameters: a 409 that says so, header and body alike.
    with pytest.raises(openai.ConflictError) as header_form:
        client.batches.create(**{**params, "completion_window": "1h"},
                              extra_headers={KEY: "k-1"})
    with pytest.raises(openai.ConflictError) as body_form:
        client.batches.create(**params, metadata={"run": "2"},
                              extra_body={"idempotency_key": "k-1"})
    for refused in (header_form.value, body_form.value):
        assert refused.code == "conflict"
        assert first.id in refused.message and "different parameters" in refused.message
    # The header wins over the body field; a key with control characters is refused.
    both = http.post("/v1/batches", json={**params, "idempotency_key": "k-2"},
                     headers={KEY: "k-1"})
    assert both.status_code == 200 and both.json()["id"] == first.id
    bad = http.post("/v1/batches", json={**params, "idempotency_key": "a\nb"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "idempotency_key"
    # Without a key every create makes a batch, as on the hosted API.
    assert client.batches.create(**params).id != client.batches.create(**params).id
    # Clients racing with one key make one batch.
    raced = all_at_once(8, lambda: http.post("/v1/batches", json=params,
                                             headers={KEY: "k-race"}))
    assert [r.status_code for r in raced] == [200] * 8, [r.text for r in raced]
    assert len({r.json()["id"] for r in raced}) == 1
    listed = [b.id for b in client.batches.list(limit=100)]
    assert len(listed) == len(set(listed)) == 4  # k-1, two without a key, k-race
    assert raced[0].json()["id"] in listed and first.id in listed


def test_message_batch_replays_return_the_batch_and_conflicts_are_409(
        claude: anthropic.Anthropic, http: httpx.Client) -> None:
    requests = [message_request("a", "one"), message_request("b", "two")]
    first = claude.messages.batches.create(requests=requests,  # type: ignore[arg-type]
                                           extra_headers={KEY: "m-1"})
    again = claude.messages.batches.create(requests=requests,  # type: ignore[arg-type]
                                           extra_body={"idempotency_key": "m-1"})
    assert again.id == first.id
    with pytest.raises(anthropic.ConflictError) as refused:
        claude.messages.batches.create(requests=requests[:1],  # type: ignore[arg-type]
                                       extra_headers={KEY: "m-1"})
    assert first.id in refused.value.message
    raced = all_at_once(6, lambda: http.post("/v1/messages/batches",
                                             json={"requests": requests},
                                             headers={KEY: "m-race"}))
    assert [r.status_code for r in raced] == [200] * 6, [r.text for r in raced]
    assert len({r.json()["id"] for r in raced}) == 1
    listed = [b.id for b in claude.messages.batches.list(limit=100)]
    assert sorted(listed) == sorted({first.id, raced[0].json()["id"]})


def test_job_replays_return_the_job_and_conflicts_are_409(http: httpx.Client) -> None:
    body = {"item_list": {"items": [1, 2, 3], "batch_size": 2}}
    first = http.post("/api/v1/endpoints/ep/jobs", json=body, headers={KEY: "j-1"})
    again = http.post("/api/v1/endpoints/ep/jobs", json={**body, "idempotency_key": "j-1"})
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json()["id"] == first.json()["id"]
    other = http.post("/api/v1/endpoints/ep/jobs",
                      json={"item_list": {"items": [9], "batch_size": 1}},
                      headers={KEY: "j-1"})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "conflict"
    assert first.json()["id"] in other.json()["error"]["message"]
    raced = all_at_once(6, lambda: http.post("/api/v1/endpoints/ep/jobs", json=body,
                                             headers={KEY: "j-race"}))
    assert [r.status_code for r in raced] == [200] * 6, [r.text for r in raced]
    assert len({r.json()["id"] for r in raced}) == 1
    listed = [j["id"] for j in http.get("/api/v1/jobs", params={"limit": 100}).json()["data"]]
    assert sorted(listed) == sorted({first.json()["id"], raced[0].json()["id"]})


# -- usage, cost and estimates ---------------------------------------------------------------

def _priced(prices: dict[str, float], tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * prices["input"] + tokens_out * prices["output"]) / 1_000_000


def test_usage_sums_the_lines_and_cost_is_at_the_deployments_prices(
        client: OpenAI, claude: anthropic.Anthropic) -> None:
    # Two models with different prices in one batch: each line at its own.
    data = jsonl([*(chat_line(f"e-{i}", f"say {'word ' * i}now") for i in range(12)),
                  *(chat_line(f"s-{i}", f"slow {i}", model="echo-slow") for i in range(4)),
                  chat_line("f-0", "free of charge", model="free")])
    batch = client.batches.create(input_file_id=upload(client, data),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_batch(client, batch.id, 60)
    assert done.status == "completed"
    lines = file_lines(client, done.output_file_id)
    assert len(lines) == 17
    usages = [(line["custom_id"], line["response"]["body"]["usage"]) for line in lines]
    tokens_in = sum(u["prompt_tokens"] for _, u in usages)
    tokens_out = sum(u["completion_tokens"] for _, u in usages)
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (tokens_in, tokens_out)
    assert done.usage.total_tokens == tokens_in + tokens_out
    assert done.usage.input_tokens_details.cached_tokens == 0
    assert done.usage.output_tokens_details.reasoning_tokens == 0
    expected = sum(_priced(ECHO_PRICES if cid.startswith("e-") else SLOW_PRICES,
                           u["prompt_tokens"], u["completion_tokens"])
                   for cid, u in usages if not cid.startswith("f-"))
    assert extension(done, "cost") == pytest.approx(expected, rel=1e-9)
    assert expected > 0
    # Message batches carry their usage and cost as extensions too.
    message_batch = claude.messages.batches.create(requests=[  # type: ignore[list-item]
        message_request("a", "one two three"), message_request("b", "four five")])
    ended = wait_message_batch(claude, message_batch.id)
    usage = extension(ended, "usage")
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert extension(ended, "cost") == pytest.approx(
        _priced(ECHO_PRICES, usage["input_tokens"], usage["output_tokens"]), rel=1e-9)


def test_cost_estimate_counts_bytes_over_four_at_the_models_prices(
        client: OpenAI, http: httpx.Client) -> None:
    texts = [f"estimate me {'x' * i}" for i in range(10)]
    data = jsonl([*(chat_line(f"c-{i}", t) for i, t in enumerate(texts)), "not json"])
    file_id = upload(client, data)
    tokens = sum(math.ceil(len(t.encode()) / 4) for t in texts)
    by_model = http.get(f"/v1/files/{file_id}/cost_estimate", params={"model": "echo-slow"})
    assert by_model.status_code == 200, by_model.text
    found = by_model.json()
    assert (found["requests"], found["invalid_lines"], found["input_tokens"]) == (10, 1, tokens)
    assert found["cost"] == pytest.approx(tokens * SLOW_PRICES["input"] / 1_000_000)
    assert "bytes/4" in found["method"]
    own = http.get(f"/v1/files/{file_id}/cost_estimate").json()  # each line's own model
    assert own["models"][0]["model"] == "echo"
    assert own["cost"] == pytest.approx(tokens * ECHO_PRICES["input"] / 1_000_000)
    unpriced = http.get(f"/v1/files/{file_id}/cost_estimate", params={"model": "free"}).json()
    assert unpriced["cost"] is None and unpriced["input_tokens"] == tokens
    # Refusals are sentences that name the field.
    unknown_model = http.get(f"/v1/files/{file_id}/cost_estimate", params={"model": "nope"})
    assert unknown_model.status_code == 404
    assert unknown_model.json()["error"]["param"] == "model"
    assert http.get("/v1/files/file-missing/cost_estimate").status_code == 404
    blank = http.get(f"/v1/files/{file_id}/cost_estimate", params={"model": ""})
    assert blank.status_code == 400 and blank.json()["error"]["param"] == "model"


# -- spend ceilings --------------------------------------------------------------------------

def test_a_token_ceiling_stops_the_batch_with_partial_results(
        client: OpenAI, claude: anthropic.Anthropic) -> None:
    # 200 lines of 6 tokens each at 20 a second: the ceiling is met within the first second.
    batch = client.batches.create(input_file_id=upload(client, chat_lines(200, "echo-slow")),
                                  endpoint="/v1/chat/completions", completion_window="24h",
                                  extra_body={"max_total_tokens": 60})
    assert extension(batch, "max_total_tokens") == 60
    done = wait_batch(client, batch.id, 60)
    assert done.status == "cancelled"
    counts = done.request_counts
    assert counts is not None
    # Stopped like a cancel, promptly: what finished is kept, the rest never ran.
    assert 10 <= counts.completed <= 120, counts
    assert counts.completed + counts.failed == 200
    kept = file_lines(client, done.output_file_id)
    assert len(kept) == counts.completed
    # What ran is what was spent: the lines' usage, summed, past the budget it stopped at.
    assert done.usage is not None
    assert done.usage.total_tokens == sum(
        line["response"]["body"]["usage"]["total_tokens"] for line in kept) >= 60
    errors = file_lines(client, done.error_file_id)
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"budget_exceeded"}
    assert "max_total_tokens=60" in errors[0]["error"]["message"]
    # A message batch stops the same way; its unrun requests are `errored` results.
    requests = [message_request(f"m-{i}", f"hello number {i}", "echo-slow")
                for i in range(100)]
    created = claude.messages.batches.create(requests=requests,  # type: ignore[arg-type]
                                             extra_body={"max_total_tokens": 40})
    ended = wait_message_batch(claude, created.id)
    results = list(claude.messages.batches.results(created.id))
    stopped = [r for r in results if r.result.type == "errored"]
    succeeded = [r for r in results if r.result.type == "succeeded"]
    assert len(results) == 100 and stopped and succeeded
    assert all(r.result.error.error.message.startswith("budget_exceeded")  # type: ignore[union-attr]
               for r in stopped)
    assert (ended.request_counts.succeeded, ended.request_counts.errored) == \
        (len(succeeded), len(stopped))


def test_ceilings_are_checked_when_a_batch_is_created(client: OpenAI,
                                                      http: httpx.Client) -> None:
    file_id = upload(client, chat_lines(1, "echo"))
    params = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    for field, value in (("max_cost", 0), ("max_cost", "1"), ("max_total_tokens", 1.5),
                         ("max_total_tokens", 0)):
        refused = http.post("/v1/batches", json={**params, field: value})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == field
    made = http.post("/v1/batches", json={**params, "max_cost": 0.5})
    assert made.status_code == 200 and made.json()["max_cost"] == 0.5
    messages = http.post("/v1/messages/batches", json={
        "requests": [message_request("a", "hi")], "max_total_tokens": -1})
    assert messages.status_code == 400
    assert "max_total_tokens" in orjson.loads(messages.content)["error"]["message"]


# -- the command line and batchery.Client ------------------------------------------------------

def _cli(server: Server, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "batchery", *args, "--base-url", server.v1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def test_cli_and_client_expose_keys_ceilings_and_estimates(server: Server,
                                                           client: OpenAI) -> None:
    file_id = upload(client, chat_lines(4, "echo"))
    made = [_cli(server, "batches", "create", "-i", file_id, "--idempotency-key", "cli-1",
                 "--max-cost", "0.25", "--max-total-tokens", "1000") for _ in range(2)]
    assert made[0]["id"] == made[1]["id"]
    assert (made[0]["max_cost"], made[0]["max_total_tokens"]) == (0.25, 1000)
    estimate = _cli(server, "files", "cost-estimate", file_id, "--model", "echo")
    assert (estimate["requests"], estimate["model"]) == (4, "echo")
    with batchery.Client(server.base_url, api_key="k") as native:
        first = native.create_batch(file_id, idempotency_key="client-1", max_total_tokens=500)
        again = native.create_batch(file_id, idempotency_key="client-1", max_total_tokens=500)
        assert again["id"] == first["id"] != made[0]["id"]
        with pytest.raises(batchery.client.APIError) as refused:
            native.create_batch(file_id, idempotency_key="client-1", max_total_tokens=5)
        assert refused.value.status_code == 409
        assert native.cost_estimate(file_id)["input_tokens"] == estimate["input_tokens"]
        body = {"item_list": {"items": [1], "batch_size": 1}}
        job = native.submit("ep", body, idempotency_key="client-job")
        assert native.submit_job("ep", item_list=body["item_list"],
                                 idempotency_key="client-job")["id"] == job["id"]
