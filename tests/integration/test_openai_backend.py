"""The `openai` backend against a real (fake) upstream on 127.0.0.1 that injects faults.

See `fake_upstream.py` for the `do:<plan>` markers that choose what each request meets.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchery.backends.openai_http import OpenAIBackend
from batchery.batchapi import execution
from batchery.batchapi.service import BatchService
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.model.deployments import Deployment
from batchery.model.exceptions import ConfigError
from batchery.model.retry import RetryPolicy
from batchery.ports.backend import ModelBackend, Reply, Request
from batchery.queue.worker import WorkerConfig
from batchery.stores.sql.store import SqlStore
from batchery.workers import worker as worker_for
from tests.helpers import chat_line, jsonl
from tests.integration.fake_upstream import (
    BAD_REQUEST,
    HTML_502,
    SERVER_ERROR,
    TEXT_200,
    FakeUpstream,
)

ENDPOINT = "/v1/chat/completions"
POLICY = RetryPolicy(max_attempts=3, base_delay_s=0.05)
#: A wait this long means the wrong delay was chosen (the policy's 30 s ceiling, a coarser
#: header, the upstream's whole 60 s sleep): far from every right one, so a loaded machine
#: cannot reach it.
WRONG_WAIT_S = 15.0
Line = dict[str, Any]


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def request(custom_id: str, plan: str, model: str = "up") -> Request:
    return Request(custom_id=custom_id,
                   body=chat_line(custom_id, f"{custom_id} do:{plan}", model=model)["body"])


def backend_for(upstream: FakeUpstream, **options: Any) -> OpenAIBackend:
    return OpenAIBackend(base_url=upstream.base_url + "/v1", **options)


async def _with_backend(backend: ModelBackend, requests: Sequence[Request],
                        policy: RetryPolicy) -> execution.ChunkOutput:
    await backend.start()
    try:
        async def lookup(model: str) -> ModelBackend | None:
            return backend if model == "up" else None

        lines = [orjson.dumps({"custom_id": r.custom_id, "body": r.body}) for r in requests]
        return await execution.run_chunk(lines, ENDPOINT, lookup, policy)
    finally:
        await backend.aclose()


def run_chunk(backend: ModelBackend, requests: Sequence[Request],
              policy: RetryPolicy = POLICY) -> tuple[dict[str, Line], dict[str, Line], float]:
    """Run the requests as one chunk; returns the output lines and the error lines by
    custom_id, and the seconds it took."""
    started = time.monotonic()
    output = asyncio.run(_with_backend(backend, requests, policy))
    elapsed = time.monotonic() - started
    out, err = parse_lines(bytes(output.out)), parse_lines(bytes(output.err))
    assert output.n_ok == len(out) and output.n_err == len(err)
    assert sorted([*out, *err]) == sorted(r.custom_id for r in requests), "a line got lost"
    return out, err, elapsed


def parse_lines(data: bytes) -> dict[str, Line]:
    lines: dict[str, Line] = {}
    for raw in data.splitlines():
        line = orjson.loads(raw)
        assert line["custom_id"] not in lines, f"{line['custom_id']} written twice"
        lines[line["custom_id"]] = line
    return lines


def error_message(line: Line) -> str:
    message: str = line["response"]["body"]["error"]["message"]
    return message


# -- retriable answers -----------------------------------------------------------------


def test_429_waits_for_retry_after_then_succeeds(upstream: FakeUpstream) -> None:
    out, err, elapsed = run_chunk(backend_for(upstream), [request("r1", "429,ok")])

    assert not err
    assert out["r1"]["response"]["status_code"] == 200
    assert out["r1"]["response"]["body"]["choices"][0]["message"]["content"] == \
        "echo: r1 do:429,ok"
    first, second = upstream.calls_for("r1 do:429,ok")
    # Retry-After: 1, not the policy's 0.05 s backoff (nor its 30 s ceiling).
    assert 0.95 <= second.at - first.at < WRONG_WAIT_S
    assert elapsed >= 0.95


def test_429_retry_after_ms_wins_over_retry_after(upstream: FakeUpstream) -> None:
    out, err, _ = run_chunk(backend_for(upstream), [request("r1", "429ms,ok")])

    assert not err and out["r1"]["response"]["status_code"] == 200
    first, second = upstream.calls_for("r1 do:429ms,ok")
    # retry-after-ms: 300 is honoured; the coarser Retry-After: 20 is not used.
    assert 0.28 <= second.at - first.at < WRONG_WAIT_S


def test_429_retry_after_as_an_http_date(upstream: FakeUpstream) -> None:
    out, err, _ = run_chunk(backend_for(upstream), [request("r1", "429date,ok")])

    assert not err and out["r1"]["response"]["status_code"] == 200
    first, second = upstream.calls_for("r1 do:429date,ok")
    # Two seconds ahead, at the header's one-second resolution: neither the policy's 0.05 s
    # backoff nor its 30 s ceiling.
    assert 0.9 <= second.at - first.at < WRONG_WAIT_S


def test_429_with_unparseable_retry_after_falls_back_to_backoff(
        upstream: FakeUpstream) -> None:
    out, err, _ = run_chunk(backend_for(upstream), [request("r1", "429junk,ok")])

    assert not err and out["r1"]["response"]["status_code"] == 200
    first, second = upstream.calls_for("r1 do:429junk,ok")
    # The policy's 0.05 s backoff, not its 30 s ceiling.
    assert second.at - first.at < WRONG_WAIT_S


def test_429_after_the_budget_is_an_error_line_with_the_upstream_body(
        upstream: FakeUpstream) -> None:
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.05)
    out, err, _ = run_chunk(backend_for(upstream), [request("r1", "429ms")], policy)

    assert not out
    assert err["r1"]["response"]["status_code"] == 429
    assert err["r1"]["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
    assert len(upstream.calls_for("r1 do:429ms")) == 2


def test_500_then_success(upstream: FakeUpstream) -> None:
    out, err, _ = run_chunk(backend_for(upstream), [request("r1", "500,ok")])

    assert not err and out["r1"]["response"]["status_code"] == 200
    assert [c.action for c in upstream.calls_for("r1 do:500,ok")] == ["500", "ok"]


def test_permanent_500_is_an_error_line_keeping_the_upstream_body(
        upstream: FakeUpstream) -> None:
    requests = [request("bad", "500"), request("good", "ok")]
    out, err, _ = run_chunk(backend_for(upstream), requests)

    assert list(out) == ["good"]
    line = err["bad"]
    assert line["error"] is None
    assert line["response"]["status_code"] == 500
    assert line["response"]["body"] == SERVER_ERROR
    assert len(upstream.calls_for("bad do:500")) == POLICY.max_attempts
    # The good line was answered once; only the failure was asked again.
    assert len(upstream.calls_for("good do:ok")) == 1


def test_400_is_an_error_line_at_once_without_retry(upstream: FakeUpstream) -> None:
    out, err, _ = run_chunk(backend_for(upstream), [request("r1", "400")])

    assert not out
    assert err["r1"]["response"]["status_code"] == 400
    assert err["r1"]["response"]["body"] == BAD_REQUEST
    assert len(upstream.calls_for("r1 do:400")) == 1


# -- no answer at all ------------------------------------------------------------------


def test_timeouts_are_retried_then_an_error_line_504() -> None:
    requests = [request("stuck", "slow"), request("once", "slow,ok")]
    with FakeUpstream(slow_s=60) as upstream:
        out, err, elapsed = run_chunk(backend_for(upstream, timeout_s=0.3), requests)

    assert out["once"]["response"]["status_code"] == 200
    line = err["stuck"]
    assert line["response"]["status_code"] == 504
    assert line["response"]["body"]["error"]["code"] == "upstream_timeout"
    assert "0.3s" in error_message(line)
    assert len(upstream.calls_for("stuck do:slow")) == POLICY.max_attempts
    assert len(upstream.calls_for("once do:slow,ok")) == 2
    # Three attempts of 0.3 s each, cut short: the upstream would have slept 60 s.
    assert 0.9 <= elapsed < WRONG_WAIT_S


def test_dropped_connections_are_retried_then_an_error_line_502(
        upstream: FakeUpstream) -> None:
    requests = [request("gone", "drop"), request("back", "drop,ok")]
    out, err, _ = run_chunk(backend_for(upstream), requests)

    assert out["back"]["response"]["status_code"] == 200
    line = err["gone"]
    assert line["response"]["status_code"] == 502
    assert line["response"]["body"]["error"]["code"] == "upstream_unreachable"
    assert "RemoteProtocolError" in error_message(line)
    assert "disconnected" in error_message(line)
    assert len(upstream.calls_for("gone do:drop")) == POLICY.max_attempts
    assert len(upstream.calls_for("back do:drop,ok")) == 2


def test_unreachable_upstream_is_an_error_line_502() -> None:
    with FakeUpstream() as gone:
        base_url = gone.base_url
    backend = OpenAIBackend(base_url=base_url, timeout_s=1)
    out, err, _ = run_chunk(backend, [request("r1", "ok")])

    assert not out
    assert err["r1"]["response"]["status_code"] == 502
    assert "ConnectError" in error_message(err["r1"])


# -- bodies that are not JSON ----------------------------------------------------------


def test_non_json_error_body_is_quoted_in_the_error_line(upstream: FakeUpstream) -> None:
    out, err, _ = run_chunk(backend_for(upstream), [request("r1", "html502")])

    assert not out
    line = err["r1"]
    assert line["response"]["status_code"] == 502
    assert line["response"]["body"]["error"]["code"] == "invalid_upstream_body"
    assert repr(HTML_502) in error_message(line)
    # A 502 from a proxy may pass: it was retried.
    assert len(upstream.calls_for("r1 do:html502")) == POLICY.max_attempts


def test_non_json_success_body_is_an_error_line_not_an_output_line(
        upstream: FakeUpstream) -> None:
    out, err, _ = run_chunk(backend_for(upstream), [request("r1", "text200")])

    assert not out, "a 200 whose body is not JSON is no answer"
    line = err["r1"]
    assert line["response"]["status_code"] == 502
    assert line["response"]["body"]["error"]["code"] == "invalid_upstream_body"
    assert "200" in error_message(line)
    assert repr(TEXT_200) in error_message(line)


# -- concurrency, credentials, model ---------------------------------------------------


def test_max_concurrency_caps_requests_in_flight(upstream: FakeUpstream) -> None:
    requests = [request(f"r{i}", "hold") for i in range(20)]
    out, err, _ = run_chunk(backend_for(upstream, max_concurrency=4), requests)

    assert len(out) == 20 and not err
    assert len(upstream.calls) == 20
    assert upstream.max_in_flight == 4


def test_api_key_env_and_model_option(upstream: FakeUpstream,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-fake-123")
    # No `/v1` in the base URL this time: the endpoint's path is kept as it is.
    backend = OpenAIBackend(base_url=upstream.base_url, api_key_env="FAKE_UPSTREAM_KEY",
                            model="gpt-4o-mini-2024-07-18")
    out, _, _ = run_chunk(backend, [request("r1", "ok")])

    (call,) = upstream.calls
    assert call.path == "/v1/chat/completions"
    assert call.headers["authorization"] == "Bearer sk-fake-123"
    assert call.headers["content-type"] == "application/json"
    assert call.body["model"] == "gpt-4o-mini-2024-07-18"
    assert call.body["messages"] == [{"role": "user", "content": "r1 do:ok"}]
    assert out["r1"]["response"]["body"]["model"] == "gpt-4o-mini-2024-07-18"


def test_without_a_key_no_authorization_header_is_sent(upstream: FakeUpstream) -> None:
    out, _, _ = run_chunk(backend_for(upstream), [request("r1", "ok")])

    (call,) = upstream.calls
    assert "authorization" not in call.headers
    assert call.body["model"] == "up"
    assert out["r1"]["response"]["body"]["model"] == "up"


def test_api_key_env_that_is_not_set_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="FAKE_UPSTREAM_MISSING"):
        OpenAIBackend(base_url="http://127.0.0.1:9", api_key_env="FAKE_UPSTREAM_MISSING")


def test_call_with_retry_returns_one_reply_per_request_in_order(
        upstream: FakeUpstream) -> None:
    plans = ["ok", "500,ok", "400", "drop,ok", "429ms,ok", "500"]
    requests = [request(f"r{i}", plan) for i, plan in enumerate(plans)]

    async def go() -> list[Reply]:
        backend = backend_for(upstream)
        await backend.start()
        try:
            return await execution.call_with_retry(backend, ENDPOINT, requests, POLICY)
        finally:
            await backend.aclose()

    replies = asyncio.run(go())
    assert [r.status_code for r in replies] == [200, 200, 400, 200, 200, 500]
    assert [r.retriable for r in replies] == [False, False, False, False, False, True]
    for req, reply in zip(requests[:2], replies[:2], strict=True):
        assert reply.body["choices"][0]["message"]["content"] == \
            f"echo: {req.body['messages'][0]['content']}"


# -- end to end, through the engine ----------------------------------------------------

#: plan -> (status code of the line, in the output file?, what the error line must say)
E2E_PLANS: dict[str, tuple[int, bool, str | None]] = {
    "ok": (200, True, None),
    "500,ok": (200, True, None),
    "429ms,ok": (200, True, None),
    "drop,ok": (200, True, None),
    "slow,ok": (200, True, None),
    "429junk,ok": (200, True, None),
    "500": (500, False, SERVER_ERROR["error"]["message"]),
    "400": (400, False, BAD_REQUEST["error"]["message"]),
    "slow": (504, False, "0.3s"),
    "drop": (502, False, "Server disconnected"),
    "html502": (502, False, repr(HTML_502)),
    "text200": (502, False, repr(TEXT_200)),
}


def test_end_to_end_through_the_worker(tmp_path: Path, upstream: FakeUpstream) -> None:
    plans = list(E2E_PLANS)
    lines = [chat_line(f"req-{i}", f"req-{i} do:{plans[i % len(plans)]}", model="up")
             for i in range(30)]
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'batchery.db'}")
    files = FsspecFileStore(str(tmp_path / "files"))
    try:
        store.set_deployments([Deployment(name="up", backend="openai", options={
            "base_url": upstream.base_url + "/v1", "timeout_s": 0.3, "max_concurrency": 8})])
        service = BatchService(store, files, chunk_size=7)
        record = service.upload("proj", io.BytesIO(jsonl(lines)), filename="in.jsonl",
                                purpose="batch")
        batch = service.create_batch("proj", input_file_id=record.id, endpoint=ENDPOINT)
        worker = worker_for(store, files, WorkerConfig(retry=POLICY, poll_s=0.05))
        deadline = time.monotonic() + 30
        try:
            while not (batch := service.get_batch("proj", batch.id)).status.is_terminal:
                assert time.monotonic() < deadline, f"stuck in {batch.status}"
                if not worker.run_once():
                    time.sleep(0.05)
        finally:
            # With the stop already asked for, run() only closes the backends and the loop.
            worker.stop()
            worker.run()

        assert batch.status == "completed", batch.errors
        out = _file_lines(service, batch.output_file_id)
        err = _file_lines(service, batch.error_file_id)
        assert not set(out) & set(err), "a line is in both files"
        assert sorted([*out, *err]) == sorted(line["custom_id"] for line in lines)
        assert (batch.total, batch.completed, batch.failed) == (30, len(out), len(err))
        assert batch.input_tokens == 3 * len(out) and batch.output_tokens == 5 * len(out)
        for line in lines:
            custom_id, plan = line["custom_id"], line["body"]["messages"][0]["content"]
            status, ok, says = E2E_PLANS[plan.rpartition(" do:")[2]]
            got = (out if ok else err)[custom_id]
            assert got["response"]["status_code"] == status, (custom_id, plan, got)
            if says is not None:
                assert says in error_message(got), (custom_id, plan, got)
        # The lines that could pass were asked again; the 400s were asked once.
        for custom_id in err:
            n = len([c for c in upstream.calls if c.key.startswith(f"{custom_id} do:")])
            expected = 1 if err[custom_id]["response"]["status_code"] == 400 else 3
            assert n == expected, (custom_id, n)
    finally:
        store.close()


def _file_lines(service: BatchService, file_id: str | None) -> dict[str, Line]:
    if file_id is None:
        return {}
    _, stream = service.open_content("proj", file_id)
    with stream:
        return parse_lines(stream.read())
