"""Proof of the one lease engine for jobs (issue #10, "Done when"): a real server whose
deployment pool runs the job batches, plain HTTP, on SQLite and on PostgreSQL. A killed
worker costs no retry; an item that takes its worker down fails alone; a stop is prompt."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import orjson
import pytest

from tests.acceptance.engine_support import (
    LEASE_S,
    Database,
    python,
    serve,
    sigkill,
    until,
    write_config,
)
from tests.acceptance.jobs_support import Jobs

pytestmark = pytest.mark.slow

#: Two pool workers, always there: a dead one is replaced while the job has work.
POOL = {"min": 2, "max": 2, "idle_seconds": 30}



@pytest.fixture
def jobs(db: Database, tmp_path: Path, server_factory: Any) -> Iterator[Jobs]:
    """A server with the endpoint `work` (`engine_predictors.PidEcho`, configured per
    job) on a pool of two workers holding short leases."""
    config = write_config(tmp_path / "config.yaml", endpoints=[
        {"name": "work", "deployments": [python("v1", workers=POOL)]}])
    server = serve(server_factory, db, config, "--workers", "1",
                   "--lease-seconds", str(LEASE_S))
    client = Jobs(server.base_url)
    yield client
    client.http.close()


def _items(n: int) -> list[str]:
    return [f"item-{i}" for i in range(n)]


def _running(jobs: Jobs, job_id: str) -> dict[int, Any]:
    """The pids of the job's workers inside a batch now, with the batch each holds."""
    return {w["pid"]: w["current_batch"] for w in jobs.listing(f"/jobs/{job_id}/workers")
            if w["state"] == "running"}


def test_sigkilled_job_workers_leave_no_dead_letter(jobs: Jobs) -> None:
    """With `max_retries: 0`, workers SIGKILLed mid-batch again and again: a lost lease
    is no attempt, so every batch still succeeds, each exactly once."""
    n = 30
    job = jobs.submit("work", {"item_list": {"items": _items(n), "batch_size": 1},
                               "workers": 2, "max_retries": 0, "config": {"sleep": 0.5}})
    rng = random.Random(7)
    killed: set[int] = set()
    # One kill per batch: a batch whose worker dies again and again is, for all the engine
    # can tell, a poison batch; killing one of them that often would prove nothing.
    hit: set[Any] = set()
    next_kill = time.monotonic() + 1.0
    deadline = time.monotonic() + 60
    while (state := jobs.get(job["id"]))["ended_at"] is None:
        assert time.monotonic() < deadline, f"job did not end: {state}"
        if len(killed) < 5 and time.monotonic() >= next_kill:
            busy = [(pid, batch) for pid, batch in _running(jobs, job["id"]).items()
                    if pid not in killed and batch is not None and batch not in hit]
            if busy and sigkill((victim := rng.choice(busy))[0]):
                killed.add(victim[0])
                hit.add(victim[1])
                next_kill = time.monotonic() + rng.uniform(0.8, 1.2)
        time.sleep(0.1)
    assert len(killed) >= 3, f"the job ended after {len(killed)} kills"
    dead = jobs.listing(f"/jobs/{job['id']}/failed_batches")
    assert dead == [], f"dead letters: {dead}\n{jobs.logs(job['id'])[-3000:]}"
    assert state["status"] == "succeeded", state
    assert state["item_counts"] == {"total": n, "succeeded": n, "failed": 0}
    rows = jobs.results(job["id"])
    assert sorted(r["index"] for r in rows) == list(range(n))  # each exactly once


def test_a_poison_item_is_isolated_and_fails_alone(jobs: Jobs) -> None:
    """Batches of 4 items, one of which ends its worker's process every time it runs:
    only that item fails, as a dead letter of its own; every other item succeeds once."""
    n, poison = 20, 7
    job = jobs.submit("work", {"item_list": {"items": _items(n), "batch_size": 4},
                               "workers": 2,
                               "config": {"poison": f"item-{poison}", "sleep": 0.05}})
    # Isolating one item takes several crashes, each a lease of LEASE_S to run out.
    done = jobs.wait(job["id"], timeout=60)
    dead = jobs.listing(f"/jobs/{job['id']}/failed_batches")
    assert done["status"] == "completed_with_failures", (done, dead)
    assert [(d["first_item"], d["item_count"]) for d in dead] == [(poison, 1)], dead
    assert "exit" in dead[0]["error"].lower(), dead[0]["error"]
    assert done["item_counts"] == {"total": n, "succeeded": n - 1, "failed": 1}
    with fsspec.open(f"{done['output_path']}/failed_batches.jsonl", "rb") as saved:
        letters = [orjson.loads(line) for line in saved.read().splitlines() if line]
    assert [d["items"] for d in letters] == [[f"item-{poison}"]]
    rows = jobs.results(job["id"])
    assert sorted(r["index"] for r in rows) == [i for i in range(n) if i != poison]
    assert all(r["prediction"]["text"] == r["item"] for r in rows)


def test_stop_is_prompt_while_workers_are_busy(jobs: Jobs) -> None:
    """Both workers inside a 10-minute predict: the job is `stopped` (and ended) long before
    either predict could end."""
    job = jobs.submit("work", {"item_list": {"items": _items(4), "batch_size": 1},
                               "workers": 2, "config": {"sleep": 600}})
    busy: list[int] = []

    def both_busy() -> list[int] | None:
        pids = list(_running(jobs, job["id"]))
        return pids if len(pids) == 2 else None

    def stopped() -> dict[str, Any] | None:
        found = jobs.get(job["id"])
        return found if found["status"] == "stopped" and found["ended_at"] else None

    try:
        busy = until(both_busy, 60, "both workers to be inside predict")
        response = jobs.http.delete(f"/jobs/{job['id']}")
        assert response.status_code == 200, response.text
        done = until(stopped, 60, "the job to stop", every=0.05)
    finally:
        # Their predict sleeps on: don't let them hold the server's shutdown.
        for pid in busy:
            sigkill(pid)
    assert done["status"] == "stopped"
    assert jobs.results(job["id"]) == []
