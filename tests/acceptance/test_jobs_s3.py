"""Jobs over an S3 bucket: moto's server speaks the S3 protocol over HTTP, and both the
API (listing at submit) and the workers (reading) reach it through s3fs."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.jobs_support import Jobs, deployment, write_config
from tests.conftest import start_server
from tests.s3_server import moto_server, s3_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in s3_env(endpoint).items():
        monkeypatch.setenv(name, value)
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="data")
    objects = {
        "in/2024/a.csv": b"x,y\n1,2\n3,4\n",
        "in/2024/b.jsonl": b'{"x": 5, "y": 6}\n',
        "in/2025/c.csv": b"x,y\n7,8\n",
        "in/2025/skip.csv": b"x,y\n99,99\n",
        "in/readme.txt": b"not data",
        "other/d.csv": b"x,y\n0,0\n",
    }
    table = io.BytesIO()
    pq.write_table(pa.table({"x": [9], "y": [10]}), table)
    objects["in/2025/e.parquet"] = table.getvalue()
    for key, body in objects.items():
        s3.put_object(Bucket="data", Key=key, Body=body)
    s3.close()
    return "data"


def test_jobs_read_s3_inputs_with_includes_and_excludes(
        bucket: str, endpoint: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", [
        {"name": "s3", "deployments": [deployment("v1", "ConfigEcho")]}])
    server = start_server(tmp_path, "--config", str(config), "--workers", "1",
                          env=dict(os.environ))
    jobs = Jobs(server.base_url)
    try:
        selection = {"paths": ["s3://data/in/"], "includes": ["**.csv", "**.jsonl",
                                                              "**.parquet"],
                     "excludes": ["**/skip*"], "batch_size": 2}
        dry = jobs.submit("s3", {"delimited_files": selection, "dry_run": True})
        assert dry["files"] == ["s3://data/in/2024/a.csv", "s3://data/in/2024/b.jsonl",
                                "s3://data/in/2025/c.csv", "s3://data/in/2025/e.parquet"]
        assert dry["total_items"] == 5 and dry["total_batch_count"] == 3

        job = jobs.submit("s3", {"delimited_files": selection})
        done = jobs.wait(job["id"])
        assert done["status"] == "succeeded", jobs.logs(job["id"])
        rows = jobs.results(job["id"])  # ordered by batch: in item order
        assert [r["item"] for r in rows] == [{"x": 1, "y": 2}, {"x": 3, "y": 4},
                                             {"x": 5, "y": 6}, {"x": 7, "y": 8},
                                             {"x": 9, "y": 10}]

        listed = jobs.submit("s3", {"file_path_lister": {
            "paths": ["s3://data/in/20"], "excludes": ["**.parquet"], "batch_size": 10},
            "output_path": "s3://data/results"})
        done = jobs.wait(listed["id"])
        assert done["status"] == "succeeded", jobs.logs(listed["id"])
        assert done["results_url"] == f"s3://data/results/{listed['id']}/results.jsonl"
        assert sorted(r["item"] for r in jobs.results(listed["id"])) == [
            "s3://data/in/2024/a.csv", "s3://data/in/2024/b.jsonl",
            "s3://data/in/2025/c.csv", "s3://data/in/2025/skip.csv"]

        missing = jobs.http.post("/endpoints/s3/jobs", json={"file_path_lister": {
            "paths": ["s3://data/nothing-here/"], "batch_size": 1}})
        assert missing.status_code == 400
        assert missing.json()["error"]["param"] == "file_path_lister.paths"
    finally:
        jobs.http.close()
        server.stop()
