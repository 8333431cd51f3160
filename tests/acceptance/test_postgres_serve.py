"""The whole service on PostgreSQL: the API, its pool, and a worker joining from outside."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import OpenAI

from batchery.ports.store import WorkerInfo
from batchery.stores.sql.store import SqlStore
from tests.conftest import Server
from tests.helpers import SDK_DEPLOYMENTS, chat_file, eventually


@pytest.mark.postgres
def test_batches_run_on_postgres_with_an_outside_worker(pg_url: str, tmp_path: Path,
                                                        server_factory: Any) -> None:
    """500 lines of 40 ms in chunks of 25 (some 20 s of work for one worker): the pool's
    worker and one started by hand on the same database and files share them."""
    files_dir = tmp_path / "shared-files"
    config = tmp_path / "deployments.yaml"
    config.write_text(SDK_DEPLOYMENTS)
    server: Server = server_factory("--database-url", pg_url, "--files-url", str(files_dir),
                                    "--workers", "1", "--chunk-size", "25",
                                    "--config", str(config))
    outside = subprocess.Popen(
        [sys.executable, "-m", "batchery", "worker", "--database-url", pg_url,
         "--files-url", str(files_dir), "--data-dir", str(tmp_path / "elsewhere")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = SqlStore.from_url(pg_url)

    def outside_info() -> WorkerInfo | None:
        return next((w for w in store.list_workers() if w.pid == outside.pid), None)

    try:
        # It has joined (it reports to the store) before there is any work to share.
        eventually(outside_info, "the outside worker to report", timeout=60)
        with OpenAI(base_url=server.v1, api_key="k") as client:
            f = client.files.create(file=chat_file(500, model="echo-slow"), purpose="batch")
            batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            deadline = time.monotonic() + 90
            while (done := client.batches.retrieve(batch.id)).status != "completed":
                assert time.monotonic() < deadline and done.status != "failed", done
                time.sleep(0.3)
            out = client.files.content(done.output_file_id).content.splitlines()
        info = outside_info()
        assert info is not None and info.chunks_done > 0, info  # it did some of the work
    finally:
        store.close()
        outside.terminate()
        assert outside.wait(40) == 0
    ids = [orjson.loads(x)["custom_id"] for x in out]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(500))
    assert not (server.data_dir / "batchery.db").exists()  # nothing went to SQLite


@pytest.mark.postgres
def test_jobs_run_on_postgres_with_a_pinned_outside_worker(pg_url: str, tmp_path: Path,
                                                           server_factory: Any) -> None:
    from tests.acceptance.jobs_support import Jobs, deployment, write_config

    files_dir = tmp_path / "shared-files"
    config = write_config(tmp_path / "config.yaml", [{"name": "nums", "deployments": [
        deployment("v1", "Doubler", workers={"min": 1, "max": 1, "idle_seconds": 5})]}])
    server: Server = server_factory("--database-url", pg_url, "--files-url", str(files_dir),
                                    "--workers", "1", "--config", str(config))
    outside = subprocess.Popen(
        [sys.executable, "-m", "batchery", "worker", "--no-batches", "--deployment",
         "nums/v1", "--database-url", pg_url, "--files-url", str(files_dir),
         "--data-dir", str(tmp_path / "elsewhere")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs = Jobs(server.base_url)
    try:
        job = jobs.submit("nums", {"item_list": {"items": list(range(40)), "batch_size": 2},
                                   "workers": 2, "config": {"sleep": 0.1}})
        done = jobs.wait(job["id"])
        assert done["status"] == "succeeded", jobs.logs(job["id"])
        rows = jobs.results(job["id"])
        assert sorted(r["index"] for r in rows) == list(range(40))
        pids = {w["pid"] for w in jobs.listing(f"/jobs/{job['id']}/workers")}
        assert outside.pid in pids and len(pids) == 2  # the pool's worker and ours
    finally:
        jobs.http.close()
        outside.terminate()
        assert outside.wait(40) == 0
