"""Proof of the one lease engine for OpenAI batches (issue #10, "Done when"): a real
server, worker processes the tests start and SIGKILL, the official SDK, on SQLite and on
PostgreSQL. A lost lease is never the line's fault; only a line that takes its worker
down again and again fails; cancels and progress are prompt; small batches spread."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.acceptance.engine_support import (
    LEASE_S,
    Database,
    Workers,
    custom_ids,
    echo,
    file_lines,
    live_workers,
    python,
    serve,
    until,
    wait_batch,
    write_config,
)
from tests.conftest import Server
from tests.helpers import chat_file, chat_line, jsonl

pytestmark = pytest.mark.slow




@pytest.fixture
def client_of() -> Iterator[Any]:
    made: list[OpenAI] = []

    def make(server: Server) -> OpenAI:
        made.append(OpenAI(base_url=server.v1, api_key="k", max_retries=3))
        return made[-1]

    yield make
    for client in made:
        client.close()


def _create(client: OpenAI, data: bytes) -> Any:
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def _completed(batch: Any) -> int:
    counts = batch.request_counts
    return 0 if counts is None else int(counts.completed)


def test_repeated_sigkills_leave_no_error_lines(db: Database, tmp_path: Path,
                                                workers_dir: Path, server_factory: Any,
                                                client_of: Any) -> None:
    """Three workers, one SIGKILLed and replaced each time more lines are done (8 times at
    most): every line is answered exactly once, none in the error file. The kills follow
    the progress, not the clock, so they land while work is under way on any machine, and
    a slow one still finishes."""
    config = write_config(tmp_path / "config.yaml", [echo("echo-slow", 5)])
    server = serve(server_factory, db, config, "--workers", "0")
    workers = Workers(server, db, workers_dir)
    workers.start(3)
    rng = random.Random(10)
    n, kills, seen, max_kills = 2000, 0, 0, 8

    def kill_after_progress() -> None:
        nonlocal kills, seen
        completed = _completed(client.batches.retrieve(batch.id))
        if kills < max_kills and completed > seen:
            workers.kill(rng.randrange(3))
            kills += 1
            seen = completed

    try:
        client = client_of(server)
        batch = _create(client, chat_file(n, model="echo-slow"))
        done = wait_batch(client, batch.id, 300, between=kill_after_progress)
        out = custom_ids(file_lines(client, done.output_file_id))
        errors = file_lines(client, done.error_file_id)
    finally:
        workers.close()
    assert kills >= 4, f"the batch ended before the kills began ({kills})"
    assert errors == [], f"{len(errors)} error lines, first: {errors[:1]}"
    assert done.error_file_id is None
    assert done.status == "completed", workers.log()[-3000:]
    assert sorted(out) == sorted(f"req-{i}" for i in range(n))  # each exactly once
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (n, n, 0)


def test_a_poison_line_is_isolated_and_fails_alone(db: Database, tmp_path: Path,
                                                   workers_dir: Path, server_factory: Any,
                                                   client_of: Any) -> None:
    """A request whose model ends its worker's process every time it meets it: that one
    line fails with `worker_crashed`; every other line is answered exactly once."""
    config = write_config(tmp_path / "config.yaml", [python("pids", {"poison": "poison"})])
    server = serve(server_factory, db, config, "--workers", "0")
    workers = Workers(server, db, workers_dir)
    workers.start(2)
    n, poison = 40, 17
    lines = [chat_line(f"req-{i}", "poison" if i == poison else f"hello {i}", model="pids")
             for i in range(n)]
    deaths = 0

    def restart_the_dead() -> None:
        nonlocal deaths
        deaths += workers.replace_dead()

    try:
        client = client_of(server)
        batch = _create(client, jsonl(lines))
        # Isolating one line takes several crashes, each a lease of LEASE_S to run out.
        done = wait_batch(client, batch.id, 60, between=restart_the_dead)
        out = file_lines(client, done.output_file_id)
        errors = file_lines(client, done.error_file_id)
    finally:
        workers.close()
    assert deaths >= 1  # the poison did take workers down
    assert done.status == "completed", workers.log()[-3000:]
    assert [e["custom_id"] for e in errors] == [f"req-{poison}"], \
        f"{len(errors)} error lines: {[e['custom_id'] for e in errors][:10]}"
    (error,) = errors
    assert error["response"] is None
    assert error["error"]["code"] == "worker_crashed"
    assert "exit" in error["error"]["message"].lower(), error["error"]
    assert sorted(custom_ids(out)) == sorted(f"req-{i}" for i in range(n) if i != poison)
    assert all(line["response"]["status_code"] == 200 for line in out)
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (n, n - 1, 1)


def test_deleting_the_input_right_after_create_always_ends(db: Database, tmp_path: Path,
                                                           server_factory: Any,
                                                           client_of: Any) -> None:
    """Upload, create, delete the input file at once (or a moment later): every batch
    ends (a deadline of minutes: ten batches of 50 lines take seconds), and nothing loops
    on errors. The batch pinned its input when it was
    created, so it runs to the end: a client cleaning up takes nothing away from it."""
    config = write_config(tmp_path / "config.yaml", [echo("echo-slow", 2)])
    # The server's own workers, so their tracebacks land in the server's log.
    server = serve(server_factory, db, config, "--workers", "2",
                   "--lease-seconds", str(LEASE_S))
    client = client_of(server)
    rng = random.Random(3)
    created: list[tuple[str, int]] = []
    for round_ in range(10):
        upload = client.files.create(file=("in.jsonl", chat_file(50, model="echo-slow")),
                                     purpose="batch")
        batch = client.batches.create(input_file_id=upload.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        created.append((batch.id, round_))
        if round_ % 2:
            time.sleep(rng.uniform(0.0, 0.4))
        client.files.delete(upload.id)
    ended = {}
    for batch_id, _ in created:
        ended[batch_id] = wait_batch(client, batch_id, 180)
    for batch in ended.values():
        assert batch.status == "completed", (batch.id, batch.status, batch.errors)
        assert batch.request_counts.completed == 50
        # The input's blob went with the end of the batch that kept it.
        with pytest.raises(openai.NotFoundError):
            client.files.content(batch.input_file_id)
    tracebacks = server.log().count("Traceback")
    assert tracebacks <= 3 * len(created), server.log()[-4000:]


def test_cancel_is_prompt_while_workers_are_busy(db: Database, tmp_path: Path,
                                                 workers_dir: Path, server_factory: Any,
                                                 client_of: Any) -> None:
    """A chunk runs for 50 s here (100 lines of 0.5 s, one after another); a cancel once
    some lines are done ends the batch with no chunk run to its end, and keeps the lines
    done. The workers hold the default lease, so the cancel cannot lean on a short lease
    running out."""
    config = write_config(tmp_path / "config.yaml", [echo("echo-slow", 500)])
    server = serve(server_factory, db, config, "--workers", "0", "--chunk-size", "100")
    workers = Workers(server, db, workers_dir, lease_s=None)
    workers.start(2)
    n = 300
    try:
        client = client_of(server)
        batch = _create(client, chat_file(n, model="echo-slow"))
        until(lambda: _completed(client.batches.retrieve(batch.id)) > 0, 30,
              "the first lines to be done", detail=lambda: workers.log()[-3000:])
        client.batches.cancel(batch.id)

        def cancelled() -> Any:
            found = client.batches.retrieve(batch.id)
            return found if found.status == "cancelled" else None

        # A cancel that waited for the chunks in flight would take some 50 s.
        done = until(cancelled, 30, "the batch to be cancelled", every=0.05)
        out = file_lines(client, done.output_file_id)
        errors = file_lines(client, done.error_file_id)
    finally:
        workers.close()
    completed = done.request_counts.completed
    # Two workers, a chunk of 100 each: had either run its chunk to the end, 100 would be
    # done.
    assert 0 < completed < 100
    assert len(out) == completed
    assert len(errors) == n - completed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sorted(custom_ids(out) + custom_ids(errors)) == sorted(f"req-{i}" for i in range(n))


def test_progress_shows_while_the_batch_runs(db: Database, tmp_path: Path,
                                             workers_dir: Path, server_factory: Any,
                                             client_of: Any) -> None:
    """300 lines of 60 ms on 2 workers (about 10 s): the counts move in many steps, and
    never back."""
    config = write_config(tmp_path / "config.yaml", [echo("echo-slow", 60)])
    server = serve(server_factory, db, config, "--workers", "0")
    workers = Workers(server, db, workers_dir)
    workers.start(2)
    n = 300
    seen: list[tuple[int, int]] = []
    try:
        client = client_of(server)
        batch = _create(client, chat_file(n, model="echo-slow"))
        deadline = time.monotonic() + 60
        while (now := client.batches.retrieve(batch.id)).status not in (
                "completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, f"still {now.status}: {now.request_counts}"
            if now.request_counts is not None:
                seen.append((now.request_counts.completed, now.request_counts.failed))
            time.sleep(0.2)
    finally:
        workers.close()
    assert now.status == "completed"
    assert now.request_counts.completed == n
    between = {completed for completed, _ in seen if 0 < completed < n}
    assert len(between) >= 5, f"completed took only the values {sorted(between)}"
    for before, after in itertools.pairwise(seen):
        assert after[0] >= before[0] and after[1] >= before[1], f"went back: {before} {after}"


def test_a_small_batch_spreads_over_the_workers(db: Database, tmp_path: Path,
                                                workers_dir: Path, server_factory: Any,
                                                client_of: Any) -> None:
    """20 lines of 0.2 s, 2 idle workers: both run some of them. Each output line names
    the pid of the worker process that answered it."""
    config = write_config(tmp_path / "config.yaml", [python("pids", {"sleep": 0.2})])
    server = serve(server_factory, db, config, "--workers", "0")
    workers = Workers(server, db, workers_dir)
    workers.start(2)
    n = 20
    try:
        until(lambda: live_workers(server) >= 2, 60, "both workers to report",
              detail=lambda: workers.log()[-3000:])
        client = client_of(server)
        batch = _create(client, jsonl(chat_line(f"req-{i}", f"hello {i}", model="pids")
                                      for i in range(n)))
        done = wait_batch(client, batch.id, 60)
        out = file_lines(client, done.output_file_id)
        pids = workers.pids()
    finally:
        workers.close()
    assert done.status == "completed" and len(out) == n
    ran = {line["response"]["body"]["pid"] for line in out}
    assert ran == pids, f"lines ran on {ran}; the workers are {pids}"
