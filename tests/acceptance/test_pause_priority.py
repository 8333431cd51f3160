"""Pause and resume, priorities and warnings (issue #11, items 1 and 5) end to end: a real
`batchery serve` on SQLite and on PostgreSQL, the official `openai` and `anthropic` SDKs
(their generic `post` for the routes they have no method for), the job API over HTTP, the
CLI and `batchery.Client`."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types.messages import MessageBatch
from openai import OpenAI
from openai.types import Batch

from batchery.client import APIError, Client
from tests.acceptance import jobs_support
from tests.acceptance.engine_support import (
    Database,
    custom_ids,
    file_lines,
    serve,
    until,
    wait_batch,
)
from tests.conftest import Server
from tests.helpers import by_label, chat_file, eventually, metric_samples

pytestmark = pytest.mark.slow

#: Three speeds of echo model, and a job endpoint of a predictor that sleeps per batch.
DEPLOYMENTS: list[dict[str, Any]] = [{"name": "echo", "backend": "echo"},
               {"name": "echo-slow", "backend": "echo", "options": {"latency_ms": 30}},
               {"name": "echo-heavy", "backend": "echo", "options": {"latency_ms": 100}}]
ENDPOINTS = [{"name": "nums", "default_deployment": "v1", "deployments": [
    jobs_support.deployment("v1", "Doubler", {"sleep": 0.3},
                            workers={"min": 0, "max": 1, "idle_seconds": 30})]}]



@pytest.fixture
def start(db: Database, tmp_path: Path, server_factory: Any) -> Callable[..., Server]:
    config = jobs_support.write_config(tmp_path / "config.yaml", ENDPOINTS, DEPLOYMENTS)

    def started(*args: str) -> Server:
        return serve(server_factory, db, config, *args)

    return started


@pytest.fixture
def clients() -> Iterator[Callable[[Server], tuple[OpenAI, anthropic.Anthropic]]]:
    made: list[Any] = []

    def make(server: Server) -> tuple[OpenAI, anthropic.Anthropic]:
        made.extend([OpenAI(base_url=server.v1, api_key="k", max_retries=0),
                     anthropic.Anthropic(base_url=server.base_url, api_key="k",
                                         max_retries=0)])
        return made[-2], made[-1]

    yield make
    for client in made:
        client.close()


def _create(client: OpenAI, n: int, model: str, **extra: Any) -> Batch:
    upload = client.files.create(file=("in.jsonl", chat_file(n, model=model)), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window=extra.pop("completion_window", "24h"),
                                 extra_body=extra or None)


def _control(client: OpenAI, batch_id: str, action: str) -> Batch:
    return client.post(f"/batches/{batch_id}/{action}", cast_to=Batch)


def _status(batch: Batch) -> str:
    """A batch's status as the server sent it (`paused` is not among the SDK's values)."""
    return str(batch.status)


def _extra(obj: Any, name: str) -> Any:
    """An extension field of an SDK object (the SDKs keep unknown fields)."""
    return (obj.model_extra or {}).get(name)


def _counts(client: OpenAI, batch_id: str) -> tuple[int, int]:
    counts = client.batches.retrieve(batch_id).request_counts
    assert counts is not None
    return counts.completed, counts.failed


def _chunks(server: Server) -> dict[str, float]:
    """The server's chunks by state, from /metrics."""
    return by_label(metric_samples(server.base_url), "batchery_chunks", "state")


def _holds(read: Callable[[], Any], expected: Any, for_s: float) -> None:
    """`read()` stays `expected` at every look for `for_s` seconds."""
    until_t = time.monotonic() + for_s
    while time.monotonic() < until_t:
        assert read() == expected
        time.sleep(0.1)


# -- pause and resume --------------------------------------------------------------------

def test_pause_holds_with_workers_idle_and_resume_finishes_every_line_once(
        start: Callable[..., Server], clients: Any) -> None:
    server = start("--workers", "2", "--chunk-size", "10")
    client, _ = clients(server)
    n = 400
    batch = _create(client, n, "echo-slow")
    until(lambda: sum(_counts(client, batch.id)) >= 40, 60, "lines to run")

    paused = _control(client, batch.id, "pause")
    assert _status(paused) == "paused" and _extra(paused, "paused_at") is not None
    assert _status(_control(client, batch.id, "pause")) == "paused"  # idempotent
    # The chunks in hand end (/metrics: none is held; the batch is the server's only one);
    # then nothing moves, however long we look.
    eventually(lambda: _chunks(server).get("leased", 0) == 0, "the chunks in hand to end")
    held = _counts(client, batch.id)
    assert sum(held) < n, "the batch ran out before the pause could hold anything"
    _holds(lambda: _counts(client, batch.id), held, for_s=3)
    assert _status(client.batches.retrieve(batch.id)) == "paused"

    resumed = _control(client, batch.id, "resume")
    assert resumed.status == "in_progress" and _extra(resumed, "paused_at") is None
    done = wait_batch(client, batch.id, 60)
    assert done.status == "completed", server.log()[-3000:]
    assert sorted(custom_ids(file_lines(client, done.output_file_id))) == \
        sorted(f"req-{i}" for i in range(n))  # every line, once
    assert done.error_file_id is None
    with pytest.raises(openai.ConflictError, match="ended with status 'completed'"):
        _control(client, batch.id, "pause")
    with pytest.raises(openai.ConflictError, match="cannot be resumed"):
        _control(client, batch.id, "resume")


def test_a_paused_message_batch_stays_in_progress_and_can_be_cancelled(
        start: Callable[..., Server], clients: Any) -> None:
    server = start("--workers", "2", "--chunk-size", "10")
    _, client = clients(server)

    def make() -> MessageBatch:
        made: MessageBatch = client.messages.batches.create(requests=[
            {"custom_id": f"m{i}", "params": {"model": "echo-slow", "max_tokens": 16,
                                              "messages": [{"role": "user", "content": "hi"}]}}
            for i in range(40)])
        return made

    def control(batch_id: str, action: str) -> MessageBatch:
        answer: MessageBatch = client.post(f"/v1/messages/batches/{batch_id}/{action}",
                                           cast_to=MessageBatch)
        return answer

    batch = make()
    paused = control(batch.id, "pause")  # at once: not one request may run
    assert paused.processing_status == "in_progress"
    assert _extra(paused, "paused_at") is not None
    _holds(lambda: client.messages.batches.retrieve(batch.id).processing_status,
           "in_progress", for_s=3)
    shown = client.messages.batches.retrieve(batch.id)
    assert _extra(shown, "paused_at") == _extra(paused, "paused_at")
    resumed = control(batch.id, "resume")
    assert resumed.processing_status == "in_progress" and _extra(resumed, "paused_at") is None
    done = _ended(client, batch.id)
    assert done.request_counts.succeeded == 40, server.log()[-3000:]
    with pytest.raises(anthropic.ConflictError, match="has ended and can no longer be paused"):
        control(batch.id, "pause")

    held = make()
    control(held.id, "pause")
    # Workers woken by the create may have taken a chunk before the pause landed; from the
    # pause on, nothing more runs. A message batch's counts show nothing until it ends (as
    # Anthropic's do), but its usage (an extension) grows as lines are committed, one input
    # token a line here; /metrics shows when no chunk is held any more (the only batch
    # left is this one).
    def answered() -> int:
        usage = _extra(client.messages.batches.retrieve(held.id), "usage") or {}
        return int(usage.get("input_tokens", 0))

    eventually(lambda: _chunks(server).get("leased", 0) == 0, "the chunk in hand to end")
    before = answered()
    _holds(answered, before, for_s=2)
    client.messages.batches.cancel(held.id)  # a paused batch cancels like any other
    cancelled = _ended(client, held.id)
    assert cancelled.request_counts.succeeded == before
    assert cancelled.request_counts.canceled == 40 - before
    assert _extra(cancelled, "paused_at") is None


def _ended(client: anthropic.Anthropic, batch_id: str) -> MessageBatch:
    def ended() -> MessageBatch | None:
        batch: MessageBatch = client.messages.batches.retrieve(batch_id)
        return batch if batch.processing_status == "ended" else None

    return until(ended, 60, f"message batch {batch_id} to end")


def test_job_pause_holds_its_batches_and_resume_finishes_it(
        start: Callable[..., Server]) -> None:
    server = start("--workers", "1")
    jobs = jobs_support.Jobs(server.base_url)
    try:
        job = jobs.submit("nums", {"item_list": {"items": list(range(12)), "batch_size": 1}})
        jobs.wait_for(job["id"], lambda j: j["batch_metrics"]["succeeded"] >= 2)
        paused = jobs.http.post(f"/jobs/{job['id']}/pause")
        assert paused.status_code == 200, paused.text
        assert paused.json()["status"] == "paused" and paused.json()["paused_at"] is not None

        def progress() -> tuple[int, int]:
            shown = jobs.get(job["id"])
            return shown["batch_metrics"]["succeeded"], shown["batches_in_flight"]

        # The batch in hand ends; then nothing moves.
        held = eventually(lambda: p if (p := progress())[1] == 0 else None,
                          "the batch in hand to end")
        assert held[0] < 12
        _holds(progress, held, for_s=3)

        resumed = jobs.http.post(f"/jobs/{job['id']}/resume").json()
        assert resumed["status"] == "running" and resumed["paused_at"] is None
        done = jobs.wait(job["id"])
        assert done["status"] == "succeeded", jobs.logs(job["id"])
        assert sorted(r["item"] for r in jobs.results(job["id"])) == list(range(12))
        refused = jobs.http.post(f"/jobs/{job['id']}/pause")
        assert refused.status_code == 409
        assert "ended with status 'succeeded'" in refused.json()["error"]["message"]
    finally:
        jobs.http.close()


# -- priorities and warnings -------------------------------------------------------------

def test_a_small_urgent_batch_overtakes_a_large_one_on_one_worker(
        start: Callable[..., Server], clients: Any) -> None:
    server = start("--workers", "1", "--chunk-size", "5")
    client, _ = clients(server)
    large = _create(client, 300, "echo-heavy")  # 30 s of work, in chunks of half a second
    until(lambda: sum(_counts(client, large.id)) > 0, 60, "the large batch to start")

    small = _create(client, 10, "echo-heavy", priority=10)
    assert _extra(small, "priority") == 10
    done = wait_batch(client, small.id, 120)
    assert done.status == "completed" and done.request_counts.completed == 10
    # Overtaken: most of the large batch is still to run when the urgent one is done.
    behind = client.batches.retrieve(large.id)
    assert behind.status == "in_progress", "the large batch ended first"
    assert behind.request_counts is not None
    assert behind.request_counts.completed + behind.request_counts.failed < 300 // 2

    # What is queued at its priority or above (the rest of the large batch: some 25 s at
    # the measured pace) cannot run inside a 5-second window: the create says so.
    late = _create(client, 1, "echo", completion_window="5s")
    assert any("queued ahead" in w for w in _extra(late, "warnings") or []), late
    urgent = _create(client, 1, "echo", completion_window="5s", priority=20)
    assert _extra(urgent, "warnings") is None
    for bad in (5000, "high", 1.5):
        with pytest.raises(openai.BadRequestError, match="from -1000 to 1000"):
            _create(client, 1, "echo", priority=bad)
    client.batches.cancel(large.id)
    assert wait_batch(client, large.id, 30).status == "cancelled"


def test_without_a_live_worker_creates_warn(start: Callable[..., Server],
                                            clients: Any) -> None:
    server = start("--workers", "0")
    client, messages = clients(server)
    batch = _create(client, 2, "echo")
    assert "No worker is running" in (_extra(batch, "warnings") or [""])[0]
    assert _extra(client.batches.retrieve(batch.id), "warnings") == _extra(batch, "warnings")
    message_batch = messages.messages.batches.create(requests=[
        {"custom_id": "a", "params": {"model": "echo", "max_tokens": 8,
                                      "messages": [{"role": "user", "content": "hi"}]}}],
        extra_body={"priority": -3})
    assert _extra(message_batch, "priority") == -3
    assert "No worker is running" in (_extra(message_batch, "warnings") or [""])[0]
    job = httpx.post(server.base_url + "/api/v1/endpoints/nums/jobs", json={
        "item_list": {"items": [1], "batch_size": 1}, "priority": 4}).json()
    assert job["priority"] == 4 and "No worker is running" in job["warnings"][0]


def test_cli_and_client_pause_resume_and_print_warnings(tmp_path: Path,
                                                        server_factory: Any,
                                                        clients: Any) -> None:
    config = jobs_support.write_config(tmp_path / "config.yaml", ENDPOINTS, DEPLOYMENTS)
    server: Server = server_factory("--config", str(config), "--workers", "0")
    client, _ = clients(server)
    batch_id = _create(client, 2, "echo").id
    urls = ("--base-url", server.v1)

    paused = _cli("batches", "pause", batch_id, *urls)
    assert '"paused_at": null' not in paused.stdout and '"status": "validating"' in paused.stdout
    assert '"paused_at": null' in _cli("batches", "resume", batch_id, *urls).stdout
    waited = _cli("batches", "wait", batch_id, "--timeout", "0.5", *urls, code=3)
    assert "warning: No worker is running" in waited.stderr

    job_id = _cli("jobs", "submit", "nums", "--items", "[1, 2]", "--batch-size", "1",
                  "--priority", "7", "--server", server.base_url).stdout.strip()
    assert _cli("jobs", "pause", job_id, "--server", server.base_url).stdout.strip() == \
        f"{job_id}: paused"
    assert _cli("jobs", "resume", job_id, "--server", server.base_url).stdout.strip() == \
        f"{job_id}: pending"
    waited = _cli("jobs", "wait", job_id, "--timeout", "0.5", "--server", server.base_url,
                  code=3)
    assert "warning: No worker is running" in waited.stderr

    with Client(server.base_url) as api:
        assert api.pause_job(job_id)["status"] == "paused"
        assert api.get_job(job_id)["priority"] == 7
        assert api.resume_job(job_id)["status"] == "pending"
        assert api.pause_batch(batch_id)["paused_at"] is not None
        assert api.resume_batch(batch_id)["paused_at"] is None
        api.stop(job_id)
        with pytest.raises(APIError, match="cannot be paused") as refused:
            api.pause_job(job_id)
        assert refused.value.status_code == 409


def _cli(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "batchery", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == code, (done.stdout, done.stderr)
    return done
