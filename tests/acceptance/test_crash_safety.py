"""Kill workers at any moment: the batch still ends with every line exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.helpers import chat_file

CONFIG = """
deployments:
  - name: echo-slow
    backend: echo
    options: {latency_ms: 8}
"""


def _worker(server: Server, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "batchery", "worker", "--data-dir", str(server.data_dir),
             "--lease-seconds", "2", *extra], stdout=out, stderr=subprocess.STDOUT)


def _wait(client: OpenAI, batch_id: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in (
            "completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"stuck in {batch.status}: {batch.request_counts}"
        time.sleep(0.2)
    return batch


def _ids(client: OpenAI, file_id: str | None) -> list[str]:
    if file_id is None:
        return []
    content = client.files.content(file_id).content
    return [orjson.loads(x)["custom_id"] for x in content.splitlines()]


@pytest.mark.slow
def test_sigkilled_workers_lose_nothing_and_duplicate_nothing(
        tmp_path: Path, server_factory: Any) -> None:
    config = tmp_path / "deployments.yaml"
    config.write_text(CONFIG)
    server: Server = server_factory("--config", str(config), "--workers", "0",
                                    "--chunk-size", "20")
    log = tmp_path / "workers.log"
    workers = [_worker(server, log) for _ in range(3)]
    rng = random.Random(7)
    kills = 0
    n = 3000
    try:
        with OpenAI(base_url=server.v1, api_key="k", max_retries=3) as client:
            f = client.files.create(file=chat_file(n, model="echo-slow"), purpose="batch")
            batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            # A kill only once some line was committed since the last one: on a loaded
            # machine a new worker may take longer to start than the time between kills,
            # and killing it before it works would only measure the machine. The bound is
            # on a stall, not on the batch's whole time.
            progress, at_last_kill, moved_at = 0, -1, time.monotonic()
            while (state := client.batches.retrieve(batch.id)).status not in (
                    "completed", "failed"):
                counts = state.request_counts
                now_done = counts.completed if counts is not None else 0
                if now_done > progress:
                    progress, moved_at = now_done, time.monotonic()
                assert time.monotonic() - moved_at < 120, \
                    f"no line committed for 120 s ({progress} of {n}, {kills} kills)"
                time.sleep(rng.uniform(0.3, 0.9))
                if progress == at_last_kill:
                    continue
                at_last_kill = progress
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                kills += 1
                workers[victim] = _worker(server, log)
            done = _wait(client, batch.id, 30)
            out, errors = _ids(client, done.output_file_id), _ids(client, done.error_file_id)
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert done.status == "completed", log.read_text()[-3000:]
    assert kills >= 5
    assert errors == []
    assert len(out) == n and set(out) == {f"req-{i}" for i in range(n)}
    assert done.request_counts.total == done.request_counts.completed == n
    assert done.request_counts.failed == 0
    assert "requeued" in log.read_text()  # lost leases were really taken over


@pytest.mark.slow
def test_sigterm_hands_back_the_chunk_after_the_grace_period(
        tmp_path: Path, server_factory: Any) -> None:
    config = tmp_path / "deployments.yaml"
    config.write_text(CONFIG.replace("latency_ms: 8", "latency_ms: 60"))
    server: Server = server_factory("--config", str(config), "--workers", "0",
                                    "--chunk-size", "100")
    log = tmp_path / "workers.log"
    with OpenAI(base_url=server.v1, api_key="k") as client:
        f = client.files.create(file=chat_file(200, model="echo-slow"), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        first = _worker(server, log, "--grace-seconds", "0.5")
        deadline = time.monotonic() + 20
        while client.batches.retrieve(batch.id).status != "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # mid-chunk: a chunk takes 6 s here
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
        # It stopped after its 0.5 s grace, not at the end of its 6 s chunk: what finished
        # before the hand-back is committed and kept; the rest of the chunk is handed back,
        # not counted as failed.
        kept = client.batches.retrieve(batch.id).request_counts
        assert 0 < kept.completed < 100 and kept.failed == 0
        second = _worker(server, log, "--grace-seconds", "30")
        try:
            done = _wait(client, batch.id, 60)
            # A worker asked to stop with a long grace finishes its chunk before exiting.
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
        out = _ids(client, done.output_file_id)
    assert done.status == "completed"
    # Each line exactly once: the second worker skipped what the first one committed.
    assert sorted(out) == sorted(f"req-{i}" for i in range(200))
    assert os.path.exists(log)
