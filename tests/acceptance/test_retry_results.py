"""Issue #11, items 2 and 3 (extensions), end to end on SQLite and PostgreSQL: results read
while a batch or a job runs, page by page with a cursor, every line exactly once; and
retrying only what failed, for OpenAI batches, message batches and jobs, with the official
SDKs (their raw-request methods where they have no method of their own)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from openai import OpenAI
from openai.types import Batch

from batchery.client import APIError, Client
from tests.acceptance import jobs_support
from tests.acceptance.engine_support import (
    DATABASES,
    Database,
    custom_ids,
    database,
    file_lines,
    until,
    wait_batch,
    write_config,
)
from tests.conftest import Server
from tests.helpers import chat_file

pytestmark = pytest.mark.slow

N = 60
#: Echo fails these lines of `chat_file(N)` on purpose (`failure_rate` 0.3, seed 3): a
#: 500 reply, which a retry reruns by default.
FLAKY = {"name": "flaky", "backend": "echo", "options": {"failure_rate": 0.3, "seed": 3}}
SOUND = {"name": "flaky", "backend": "echo"}
#: Sees every line 40 ms, one at a time: a batch of N runs for seconds.
SLOW = {"name": "flaky", "backend": "echo",
        "options": {"failure_rate": 0.3, "seed": 3, "latency_ms": 40}}


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    found = database(request, tmp_path)
    if found.kind == "sqlite":
        # Named outright, so that a second server (another config) finds the same state.
        return Database("sqlite", ("--database-url", f"sqlite:///{tmp_path / 'state.db'}",
                                   "--files-url", str(tmp_path / "files")))
    return found


def start(server_factory: Any, db: Database, tmp_path: Path, deployments: list[dict[str, Any]],
          *args: str) -> Server:
    config = write_config(tmp_path / f"config-{time.monotonic_ns()}.yaml", deployments)
    server: Server = server_factory("--config", str(config), *db.args, "--workers", "1",
                                    "--chunk-size", "10", *args)
    return server


@pytest.fixture
def clients() -> Iterator[Any]:
    made: list[Any] = []

    def make(server: Server) -> OpenAI:
        client = OpenAI(base_url=server.v1, api_key="sk-any", max_retries=0)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def create(client: OpenAI, data: bytes) -> Batch:
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def retry(client: OpenAI, batch_id: str, **body: Any) -> Batch:
    """`POST /v1/batches/{id}/retry` through the SDK's raw-request method."""
    return client.post(f"/batches/{batch_id}/retry", body=body, cast_to=Batch)


def pages(http: httpx.Client, path: str, after: str | None = None,
          limit: int = 7) -> tuple[list[dict[str, Any]], str, bool, bool]:
    params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
    response = http.get(path, params=params)
    assert response.status_code == 200, response.text
    rows = [orjson.loads(x) for x in response.content.splitlines()]
    return (rows, response.headers["batchery-next-cursor"],
            response.headers["batchery-has-more"] == "true",
            response.headers["batchery-results-final"] == "true")


def read_all(http: httpx.Client, path: str, limit: int = 1000) -> list[dict[str, Any]]:
    rows, after, final = [], None, False
    while not final:
        got, after, more, final = pages(http, path, after, limit)
        rows += got
        assert more or final, "an ended batch's results read whole"
    return rows


def batchery(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchery", *args], capture_output=True,
                          text=True, timeout=120)


# -- results while running -------------------------------------------------------------

def test_results_while_running_return_every_line_once(db: Database, tmp_path: Path,
                                                      server_factory: Any,
                                                      clients: Any) -> None:
    server = start(server_factory, db, tmp_path, [SLOW])
    client = clients(server)
    batch = create(client, chat_file(N, model="flaky"))
    path = f"/batches/{batch.id}/results"
    seen: list[dict[str, Any]] = []
    while_running = 0
    after, final = None, False
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=server.v1, timeout=30) as http:
        while not final:
            assert time.monotonic() < deadline, f"results not final: {len(seen)} lines"
            rows, after, more, final = pages(http, path, after)
            status = client.batches.retrieve(batch.id)
            if rows and status.status in ("validating", "in_progress", "finalizing"):
                while_running += len(rows)
                assert status.output_file_id is None  # the hosted meaning: set at the end
            seen += rows
            if not more and not final:
                time.sleep(0.1)
        again = read_all(http, path)
        # A page at the end stays there; a cursor that is no cursor is a 400.
        assert pages(http, path, after) == ([], after, False, True)
        bad = http.get(path, params={"after": "not-a-cursor"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
        assert http.get(path, params={"limit": 0}).status_code == 400

    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert while_running > 0, "no line was read before the batch ended"
    cli = batchery("batches", "results", batch.id, "--base-url", server.v1, "--limit", "9",
                   "-o", str(tmp_path / "cli.jsonl"))
    assert cli.returncode == 0 and "every line has been read" in cli.stderr, cli.stderr
    assert [orjson.loads(x) for x in (tmp_path / "cli.jsonl").read_bytes().splitlines()] \
        == again
    ids = custom_ids(seen)
    assert sorted(ids) == sorted(f"req-{i}" for i in range(N))  # each exactly once
    failed = [r["custom_id"] for r in seen if r["response"]["status_code"] == 500]
    assert failed and len(failed) == done.request_counts.failed
    # The files hold the same lines, output then errors, as a fresh read returns them.
    files = file_lines(client, done.output_file_id) + file_lines(client, done.error_file_id)
    assert again == files
    assert sorted(map(orjson.dumps, seen)) == sorted(map(orjson.dumps, files))


# -- retrying what failed ----------------------------------------------------------------

def message_requests(n: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"m-{i}", "params": {
        "model": "flaky", "max_tokens": 16,
        "messages": [{"role": "user", "content": f"hello number {i}"}]}} for i in range(n)]


def message_results(http: httpx.Client, batch_id: str) -> dict[str, bytes]:
    response = http.get(f"/messages/batches/{batch_id}/results")
    assert response.status_code == 200, response.text
    found = {orjson.loads(x)["custom_id"]: x for x in response.content.splitlines()}
    assert len(found) == len(response.content.splitlines())  # each request once
    return found


def wait_message_batch(client: anthropic.Anthropic, batch_id: str) -> Any:
    return until(lambda: (b := client.messages.batches.retrieve(batch_id))
                 .processing_status == "ended" and b, 60, f"message batch {batch_id}")


def test_a_retry_reruns_only_what_failed_and_merges_the_results(
        db: Database, tmp_path: Path, server_factory: Any, clients: Any) -> None:
    flaky = start(server_factory, db, tmp_path, [FLAKY])
    client = clients(flaky)
    original = wait_batch(client, create(client, chat_file(N, model="flaky")).id, 60)
    out = {x["custom_id"]: x for x in file_lines(client, original.output_file_id)}
    errors = {x["custom_id"]: x for x in file_lines(client, original.error_file_id)}
    assert errors and out and len(out) + len(errors) == N

    # Against the same flaky model the failed lines fail again: still only they ran.
    again = retry(client, original.id)
    assert again.retry_of == original.id and again.id != original.id
    assert again.request_counts.total == N
    rerun = file_lines(client, again.input_file_id)
    assert sorted(custom_ids(rerun)) == sorted(errors)  # nothing that succeeded
    again = wait_batch(client, again.id, 60)
    assert again.status == "completed"
    counts = again.request_counts
    assert (counts.total, counts.completed, counts.failed) == (N, len(out), len(errors))
    assert file_lines(client, again.output_file_id) == list(out.values())  # carried as is
    assert sorted(custom_ids(file_lines(client, again.error_file_id))) == sorted(errors)

    ant = anthropic.Anthropic(base_url=flaky.base_url, api_key="sk-ant-any", max_retries=0)
    messages = wait_message_batch(ant, ant.messages.batches.create(
        requests=message_requests(20)).id)  # type: ignore[arg-type]
    with httpx.Client(base_url=flaky.v1, timeout=30) as http:
        first = message_results(http, messages.id)
        errored = {k for k, v in first.items() if b'"errored"' in v}
        assert errored and len(errored) < 20
        redo = ant.post(f"/v1/messages/batches/{messages.id}/retry", body={},
                        cast_to=anthropic.types.messages.MessageBatch)
        redone = wait_message_batch(ant, redo.id)
        assert redone.request_counts.succeeded == 20 - len(errored)
        assert redone.request_counts.errored == len(errored)
        merged = message_results(http, redo.id)
        assert set(merged) == set(first)
        assert {k: v for k, v in merged.items() if k not in errored} == \
            {k: v for k, v in first.items() if k not in errored}
    ant.close()

    # The model mended: a retry of the retry reruns the same lines, and now they pass.
    flaky.stop()
    sound = start(server_factory, db, tmp_path, [SOUND])
    client = clients(sound)
    last = retry(client, again.id)
    assert sorted(custom_ids(file_lines(client, last.input_file_id))) == sorted(errors)
    with httpx.Client(base_url=sound.v1, timeout=30) as http:
        last = wait_batch(client, last.id, 60)
        merged = file_lines(client, last.output_file_id)
        assert sorted(custom_ids(merged)) == sorted(f"req-{i}" for i in range(N))
        # What succeeded the first time was carried over, never run again: the very lines.
        assert [x for x in merged if x["custom_id"] in out] == list(out.values())
        assert last.error_file_id is None
        counts = last.request_counts
        assert (counts.total, counts.completed, counts.failed) == (N, N, 0)
        assert read_all(http, f"/batches/{last.id}/results") == merged
        # Nothing failed now: nothing to retry.
        nothing = http.post(f"/batches/{last.id}/retry", json={})
        assert nothing.status_code == 409 and "nothing to retry" in \
            nothing.json()["error"]["message"]
        redo_messages = http.post(f"/messages/batches/{redo.id}/retry", json={})
        assert redo_messages.status_code == 200, redo_messages.text
        with anthropic.Anthropic(base_url=sound.base_url, api_key="sk-ant-any") as ant:
            healed = wait_message_batch(ant, redo_messages.json()["id"])
        assert healed.request_counts.succeeded == 20
        assert set(message_results(http, healed.id)) == set(first)


def test_a_retry_answers_409_or_400_when_it_cannot_be_made(
        db: Database, tmp_path: Path, server_factory: Any, clients: Any) -> None:
    server = start(server_factory, db, tmp_path, [SLOW])
    client = clients(server)
    running = create(client, chat_file(N, model="flaky"))
    with httpx.Client(base_url=server.v1, timeout=30) as http:
        busy = http.post(f"/batches/{running.id}/retry")
        assert busy.status_code == 409 and "has ended" in busy.json()["error"]["message"]
        done = wait_batch(client, running.id, 90)
        assert done.request_counts.failed > 0
        bad = http.post(f"/batches/{done.id}/retry", json={"include": "server_error"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "include"
        none = http.post(f"/batches/{done.id}/retry", json={"include": ["batch_expired"]})
        assert none.status_code == 409 and "batch_expired" in none.json()["error"]["message"]
        assert http.post("/batches/batch_nope/retry").status_code == 404
        # Once its input file is deleted after the batch ended, its lines are gone.
        client.files.delete(done.input_file_id)
        gone = http.post(f"/batches/{done.id}/retry")
        assert gone.status_code == 409, gone.text
        assert "cannot be rebuilt" in gone.json()["error"]["message"]
        # An `include` that matches the 500 replies by their status class.
        server_errors = create(client, chat_file(N, model="flaky"))
        wait_batch(client, server_errors.id, 90)
        cli = batchery("batches", "retry", server_errors.id, "--include", "5xx",
                       "--base-url", server.v1)
        assert cli.returncode == 0, cli.stderr
        by_class = orjson.loads(cli.stdout)
        assert by_class["retry_of"] == server_errors.id
        assert by_class["request_counts"]["total"] == N


# -- jobs ----------------------------------------------------------------------------------

def job_server(server_factory: Any, db: Database, tmp_path: Path, broken: Path,
               seen: Path) -> Server:
    config = jobs_support.write_config(tmp_path / "jobs.yaml", [{
        "name": "flaky", "deployments": [{
            "name": "v1", "backend": "python",
            "options": {"predictor": "retry_predictors:Flaky",
                        "python_path": [str(jobs_support.PREDICTORS)],
                        "config": {"broken": str(broken), "seen": str(seen)}},
            "workers": {"min": 1, "max": 1, "idle_seconds": 30}}]}])
    server: Server = server_factory("--config", str(config), *db.args, "--workers", "1")
    return server


def test_job_results_while_running_and_a_retry_of_the_dead_letters(
        db: Database, tmp_path: Path, server_factory: Any) -> None:
    broken, seen = tmp_path / "broken", tmp_path / "seen.jsonl"
    broken.touch()
    server = job_server(server_factory, db, tmp_path, broken, seen)
    items: list[Any] = [{"n": i, "fail": i in (3, 4, 11)} for i in range(16)]
    with Client(server.base_url) as client:
        job = client.submit_job("flaky", item_list={"items": items, "batch_size": 2},
                                max_retries=0, config={"sleep": 0.3},
                                output_path=str(tmp_path / "out"))
        rows: list[dict[str, Any]] = []
        while_running = 0
        after = None
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, f"job results not final: {rows}"
            page = client.results_page(job["id"], after=after, limit=3)
            state = client.get_job(job["id"])
            if page.rows and state["ended_at"] is None:
                while_running += len(page.rows)
            rows += page.rows
            after = page.next_cursor
            if page.final:
                break
            if not page.has_more:
                time.sleep(0.1)
        done = client.get_job(job["id"])
        assert done["status"] == "completed_with_failures"
        assert while_running > 0, "no row was read before the job ended"
        # Batches 1, 2 and 5 (items 2-3, 4-5, 10-11) are dead letters: their rows are not in.
        good = [i for i in range(16) if i not in (2, 3, 4, 5, 10, 11)]
        assert sorted(r["item"]["n"] for r in rows) == good
        assert rows == list(client.results(job["id"]))  # the results file, the same rows

        broken.unlink()  # the predictor mended
        seen.unlink()
        retried = client.retry_job(job["id"])
        assert retried["retry_of"] == job["id"]
        with pytest.raises(APIError, match="has ended") as busy:
            client.retry_job(retried["id"])
        assert busy.value.status_code == 409
        finished = client.wait(retried["id"], timeout=90)
        assert finished["status"] == "succeeded"
        rerun = [orjson.loads(x)["n"] for x in seen.read_bytes().splitlines()]
        assert sorted(rerun) == [2, 3, 4, 5, 10, 11]  # only the dead letters' items
        merged = list(client.results(retried["id"]))
        assert merged[:len(rows)] == rows  # the original's rows first, as they were
        cli = batchery("jobs", "results", retried["id"], "--server", server.base_url,
                       "-o", str(tmp_path / "rows.jsonl"))
        assert cli.returncode == 0, cli.stderr
        assert [orjson.loads(x) for x in (tmp_path / "rows.jsonl").read_bytes().splitlines()] \
            == merged
        assert sorted(r["item"]["n"] for r in merged) == list(range(16))
        with pytest.raises(APIError, match="no dead-letter"):
            client.retry_job(retried["id"])
