"""`batchery.Client` and the `batchery jobs` / `batchery logs` commands against a real
server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import batchery
from batchery.client import APIError
from tests.acceptance.jobs_support import deployment, write_config
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("clients")
    config = write_config(root / "config.yaml", [{"name": "nums", "deployments": [
        deployment("v1", "Doubler")]}])
    server = start_server(root, "--config", str(config), "--workers", "1",
                          "--lease-seconds", "2", name="clients")
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[batchery.Client]:
    with batchery.Client(server.v1, api_key="k") as client:  # a /v1 URL works too
        yield client


def test_the_python_client(client: batchery.Client, capfd: pytest.CaptureFixture[str]) -> None:
    job = client.submit_job("nums", item_list={"items": [1, 2, 3, 4], "batch_size": 1},
                            workers=1, config={"sleep": 0.3})
    lines = list(client.logs(job["id"], follow=True))  # returns once the job has ended
    assert any("batch 3: succeeded" in line for line in lines)
    done = client.wait(job["id"], poll=0.1, progress=True)
    assert done["status"] == "succeeded"
    assert "succeeded" in capfd.readouterr().err  # the progress bar, on stderr
    rows = list(client.results(job["id"]))  # ordered by batch: in item order
    assert [r["prediction"]["double"] for r in rows] == [2, 4, 6, 8]
    assert {w["state"] for w in client.workers(job["id"])} <= {"idle", "succeeded"}
    assert client.list_jobs(endpoint="nums", limit=1)["data"][0]["id"] == job["id"]
    plan = client.submit_job("nums", item_list={"items": [1, 2, 3], "batch_size": 2},
                             dry_run=True)
    assert plan["total_batch_count"] == 2
    with pytest.raises(APIError) as caught:
        client.submit_job("nums", item_list={"items": [], "batch_size": 1})
    assert caught.value.status_code == 400 and caught.value.param == "item_list.items"
    with pytest.raises(APIError) as conflict:
        client.stop(job["id"])
    assert conflict.value.status_code == 409


def test_stop_and_dead_letters_through_the_client(client: batchery.Client) -> None:
    job = client.submit_job("nums", item_list={"items": [{"fail": True}, *range(30)],
                                               "batch_size": 1},
                            workers=1, max_retries=0, config={"sleep": 0.2})
    deadline = time.monotonic() + 30
    while client.get_job(job["id"])["batch_metrics"]["dead_letters"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.stop(job["id"])["status"] == "stopped"
    assert client.wait(job["id"], poll=0.1)["status"] == "stopped"
    (dead,) = client.failed_batches(job["id"])
    assert "ValueError" in dead["error"]
    with pytest.raises(TimeoutError):
        slow = client.submit_job("nums", item_list={"items": [1], "batch_size": 1},
                                 config={"sleep": 2})
        client.wait(slow["id"], poll=0.1, timeout=0.3)


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchery", *args, "--server",
                           server.base_url], capture_output=True, text=True, timeout=120)


def test_the_command_line(server: Server, tmp_path: Path) -> None:
    submitted = _cli(server, "jobs", "submit", "nums", "--items", "[1, 2, 3]",
                     "--batch-size", "2", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    assert "succeeded" in submitted.stderr

    out = tmp_path / "results.jsonl"
    assert _cli(server, "jobs", "results", job_id, "-o", str(out)).returncode == 0
    assert sorted(json.loads(x)["prediction"]["double"] for x in out.read_text().splitlines()) \
        == [2, 4, 6]
    shown = json.loads(_cli(server, "jobs", "get", job_id).stdout)
    assert shown["status"] == "succeeded" and shown["total_batch_count"] == 2
    assert job_id in _cli(server, "jobs", "list", "--endpoint", "nums").stdout
    assert "job ended: succeeded" in _cli(server, "logs", job_id, "-f").stdout
    assert "succeeded" in _cli(server, "jobs", "workers", job_id).stdout

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("1\n2\n3\n")
    (data / "b.txt").write_text("x")
    plan = _cli(server, "jobs", "submit", "nums", "--paths", str(data), "--delimited",
                "--include", "**.jsonl", "--batch-size", "2", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines() == [str(data / "a.jsonl"), "3 items in 2 batches"]

    failing = _cli(server, "jobs", "submit", "nums", "--items", "[{\"fail\": true}]",
                   "--batch-size", "1", "--max-retries", "0", "--wait")
    assert failing.returncode == 1 and "completed_with_failures" in failing.stderr
    failed_id = failing.stdout.split()[0]
    assert "ValueError: refusing item" in _cli(server, "jobs", "failed", failed_id).stdout

    bad = _cli(server, "jobs", "submit", "nums", "--batch-size", "1")
    assert bad.returncode == 1 and "param: item_list" in bad.stderr
    stopped = _cli(server, "jobs", "stop", job_id)
    assert stopped.returncode == 1 and "error 409" in stopped.stderr
