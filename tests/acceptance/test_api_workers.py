"""`batchery serve --api-workers N`: N processes answer on the one port, and none outlives
the server; API hosts behind a load balancer share one PostgreSQL database; the reads that
pollers repeat never wait for a writer."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from batchery.stores.sql.store import SqlStore
from tests.conftest import Server, start_server
from tests.helpers import alive, chat_file, children, eventually


def _answering_pids(server: Server, want: int, timeout_s: float = 60.0) -> set[int]:
    """The pids that answer `/healthz`, each request on a new connection, until `want`
    of them have answered (or the time is up)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            seen.add(http.get("/healthz").json()["pid"])
    return seen


def _wait_until_gone(pids: set[int], timeout_s: float = 60.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_two_api_processes_answer_and_die_with_the_server(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--api-workers", "2", "--workers", "1")
    try:
        pids = _answering_pids(server, 2)
        assert len(pids) == 2, f"only {pids} answered:\n{server.log()}"
        assert server.process.pid in pids
        # The other one is a child of the server, and serves the whole API: a batch created
        # through any process runs, and any process reads it.
        api_children = pids - {server.process.pid}
        assert api_children <= children(server.process.pid)
        client = OpenAI(base_url=server.v1, api_key="anything", max_retries=0)
        upload = client.files.create(file=("in.jsonl", b"".join(
            b'{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}}\n'
            % i for i in range(20))), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 60
        while batch.status != "completed" and time.monotonic() < deadline:
            time.sleep(0.1)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed"
        assert batch.request_counts is not None and batch.request_counts.completed == 20
        everyone = children(server.process.pid)  # API process and batch worker
        assert api_children <= everyone and len(everyone) >= 2
        # Killed outright, the server cannot stop its children itself: they stop anyway.
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        assert _wait_until_gone(everyone) == set(), server.log()
    finally:
        server.stop()


def test_an_api_process_that_dies_is_replaced(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--api-workers", "2", "--workers", "0")
    try:
        pids = _answering_pids(server, 2)
        assert len(pids) == 2, server.log()
        (child,) = pids - {server.process.pid}
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 60
        again: set[int] = set()
        while time.monotonic() < deadline:
            again = _answering_pids(server, 2, timeout_s=5) - {child}
            if len(again) == 2:
                break
        assert len(again) == 2, server.log()
        # Stopped cleanly, the server takes its API processes with it.
        below = children(server.process.pid)
        server.stop()
        assert _wait_until_gone(below) == set(), server.log()
    finally:
        server.stop()


def test_api_hosts_share_one_postgres_database(pg_url: str, tmp_path: Path,
                                              server_factory: Any) -> None:
    """Two API servers (one of two processes) with no workers of their own, and a worker
    elsewhere, on one database and one file store: each step of a batch may go to any of
    them, as behind a round-robin load balancer."""
    files_dir = tmp_path / "shared-files"
    shared = ("--database-url", pg_url, "--files-url", str(files_dir), "--workers", "0")
    hosts: list[Server] = [server_factory(*shared, "--api-workers", "2", name="a"),
                           server_factory(*shared, name="b")]
    worker = subprocess.Popen(
        [sys.executable, "-m", "batchery", "worker", *shared[:4],
         "--data-dir", str(tmp_path / "elsewhere")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = SqlStore.from_url(pg_url)
    try:
        eventually(lambda: next((w for w in store.list_workers() if w.pid == worker.pid),
                                None), "the worker to report", timeout=60)
        turn = iter(range(10**6))

        def client() -> OpenAI:  # the next host, round robin
            return OpenAI(base_url=hosts[next(turn) % 2].v1, api_key="k", max_retries=0)

        upload = client().files.create(file=chat_file(300), purpose="batch")
        batch = client().batches.create(input_file_id=upload.id,
                                        endpoint="/v1/chat/completions",
                                        completion_window="24h")
        deadline = time.monotonic() + 120
        while (batch := client().batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline and batch.status != "failed", batch
            time.sleep(0.2)
        assert batch.output_file_id is not None
        outputs = [client().files.content(batch.output_file_id).content for _ in hosts]
    finally:
        store.close()
        worker.terminate()
        worker.wait(40)
    assert outputs[0] == outputs[1]
    ids = sorted(orjson.loads(line)["custom_id"] for line in outputs[0].splitlines())
    assert ids == sorted(f"req-{i}" for i in range(300))
    assert not any((h.data_dir / "batchery.db").exists() for h in hosts)


PREDICTOR = """
class Predictor:
    def __init__(self, config, job):
        pass

    def predict(self, batch, batch_id):
        return [{"n": item} for item in batch]
"""


def test_polls_are_answered_while_a_writer_holds_the_sqlite_database(tmp_path: Path) -> None:
    """`GET /v1/batches/{id}` and `GET /api/v1/jobs/{id}` answer while another process
    holds SQLite's write lock (which a writer would wait 60 s for)."""
    (tmp_path / "bench_predictor.py").write_text(PREDICTOR)
    (tmp_path / "config.yaml").write_text(
        "deployments:\n  - name: echo\n    backend: echo\n"
        "endpoints:\n  - name: e\n    default_deployment: v1\n    deployments:\n"
        "      - name: v1\n        backend: python\n        options:\n"
        "          predictor: 'bench_predictor:Predictor'\n          python_path: ['.']\n")
    server = start_server(tmp_path, "--workers", "0", "--config", str(tmp_path / "config.yaml"))
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            upload = http.post("/v1/files", files={"file": ("in.jsonl", chat_file(3))},
                               data={"purpose": "batch"}).json()
            batch = http.post("/v1/batches", json={
                "input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h"}).json()
            job = http.post("/api/v1/endpoints/e/jobs", json={
                "item_list": {"items": [1, 2, 3], "batch_size": 2}}).json()
            writer = sqlite3.connect(server.data_dir / "batchery.db", isolation_level=None)
            writer.execute("BEGIN IMMEDIATE")  # held until the reads are done
            try:
                got_batch = http.get(f"/v1/batches/{batch['id']}", timeout=20)
                got_job = http.get(f"/api/v1/jobs/{job['id']}", timeout=20)
            finally:
                writer.execute("ROLLBACK")
                writer.close()
        assert got_batch.status_code == 200 and got_batch.json()["status"] == "validating"
        assert got_job.status_code == 200 and got_job.json()["id"] == job["id"]
    finally:
        server.stop()
