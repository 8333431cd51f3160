"""Worker pools as Ray actors (issue #14, "Done when"), on a real local Ray cluster that
this module starts: a head node with a custom resource `special`, and a second node on the
same machine with another (`other`). The server keeps its state in PostgreSQL and its
files in moto's S3 server, as a cluster of several machines would.

The tests talk to Ray through a driver of their own in a subprocess (`RayDriver`), so this
process never imports Ray."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.acceptance.engine_support import (
    custom_ids,
    echo,
    file_lines,
    until,
    wait_batch,
    write_config,
)
from tests.acceptance.jobs_support import PREDICTORS, Jobs
from tests.conftest import Server, free_port, start_server
from tests.s3_server import moto_server, s3_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RAY = str(Path(sys.executable).with_name("ray"))
#: Answers the tests' questions about the cluster, one JSON line per question.
DRIVER = """
import json, sys
import ray
ray.init(address=sys.argv[1], namespace="batchery", log_to_driver=False,
         logging_level="ERROR")
for line in sys.stdin:
    op, arg = json.loads(line)
    if op == "nodes":
        out = [{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes()
               if n["Alive"]]
    elif op == "actors":
        out = sorted(ray.util.list_named_actors())
    else:
        ray.kill(ray.get_actor(arg), no_restart=True)
        out = arg
    print("=> " + json.dumps(out), flush=True)
"""


class RayDriver:
    def __init__(self, address: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, address],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)

    def ask(self, op: str, arg: str = "") -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([op, arg]) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("=> "):
                return json.loads(line[3:])
        raise AssertionError("the Ray driver of the tests exited")

    def actors(self, prefix: str) -> list[str]:
        return [name for name in self.ask("actors") if name.startswith(prefix)]

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # the driver's loop ends
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@dataclass
class Cluster:
    address: str
    head: str  #: the node id of the head, which alone has `special`
    other: str  #: the node id of the second node, which alone has `other`
    ray: RayDriver
    s3: str  #: moto's endpoint

    @staticmethod
    def node_of(host: str) -> str:
        """The start of a node's id, from a worker listing's `host` (`<ip>/<id start>`)."""
        return host.rsplit("/", 1)[1]


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`ray start --block`: the node lives as long as this process, which stops what it
    started when terminated (so no `ray stop`, which would stop every cluster here)."""
    with log.open("ab") as out:
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats",
                                 "--node-ip-address", "127.0.0.1", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    until(lambda: "Ray runtime started" in log.read_text(errors="replace")
          or proc.poll() is not None, 90, "a Ray node to start")
    assert proc.poll() is None, log.read_text(errors="replace")
    return proc


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Ray's socket paths must stay short: a temp dir of its own, right under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="bray-", dir="/tmp"))
    nodes: list[subprocess.Popen[bytes]] = []
    driver: RayDriver | None = None
    with moto_server() as s3:
        # The nodes' own environment reaches the store, as an instance role would.
        env = {**os.environ, **s3_env(s3)}
        address = f"127.0.0.1:{free_port()}"
        try:
            nodes.append(_start_node(
                ["--head", "--port", address.rsplit(":", 1)[1], "--num-cpus", "2",
                 "--resources", '{"special": 1}', "--include-dashboard", "false",
                 "--temp-dir", str(temp)], temp / "head.log", env))
            nodes.append(_start_node(
                ["--address", address, "--num-cpus", "1", "--resources", '{"other": 1}'],
                temp / "node.log", env))
            driver = RayDriver(address)
            found = until(lambda: _two_nodes(driver), 60, "the second Ray node to join")
            head = next(n["id"] for n in found if "special" in n["resources"])
            other = next(n["id"] for n in found if "other" in n["resources"])
            yield Cluster(address=address, head=head, other=other, ray=driver, s3=s3)
        finally:
            if driver is not None:
                driver.close()
            for proc in reversed(nodes):
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(temp, ignore_errors=True)


def _two_nodes(driver: RayDriver) -> list[dict[str, Any]] | None:
    nodes: list[dict[str, Any]] = driver.ask("nodes")
    return nodes if len(nodes) == 2 else None


@pytest.fixture
def files_url(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """A bucket of moto's for the test's file store."""
    for name, value in s3_env(cluster.s3).items():
        monkeypatch.setenv(name, value)
    import boto3

    s3 = boto3.client("s3")
    bucket = f"b{time.time_ns()}"
    s3.create_bucket(Bucket=bucket)
    s3.close()
    return f"s3://{bucket}/batchery"


@pytest.fixture
def serve(cluster: Cluster, pg_url: str, files_url: str, tmp_path: Path) -> Iterator[Any]:
    """Starts `batchery serve --ray-address` on PostgreSQL and S3 with a config of
    deployments, and returns it with a job client; both are closed at the end."""
    started: list[Server] = []
    clients: list[Jobs] = []

    def start(deployments: list[dict[str, Any]], *args: str) -> tuple[Server, Jobs]:
        config = write_config(tmp_path / f"config{len(started)}.yaml", deployments=[
            d for d in deployments if "deployments" not in d],
            endpoints=[d for d in deployments if "deployments" in d])
        server = start_server(tmp_path, "--config", str(config), "--ray-address",
                              cluster.address, "--database-url", pg_url,
                              "--files-url", files_url, *args,
                              env=s3_env(cluster.s3), name=f"server{len(started)}")
        started.append(server)
        clients.append(Jobs(server.base_url))
        return server, clients[-1]

    yield start
    for client in clients:
        client.http.close()
    for server in started:
        server.stop()


def endpoint(name: str, *, resources: dict[str, Any] | None = None,
             workers: dict[str, Any] | None = None, sleep: float = 0.0) -> dict[str, Any]:
    """An endpoint of one deployment `v1`: `job_predictors.Doubler` (logs a line a batch)."""
    deployment: dict[str, Any] = {
        "name": "v1", "backend": "python",
        "options": {"predictor": "job_predictors:Doubler", "python_path": [str(PREDICTORS)],
                    "config": {"sleep": sleep}},
        "workers": workers or {"min": 0, "max": 2, "idle_seconds": 30}}
    if resources is not None:
        deployment["resources"] = resources
    return {"name": name, "deployments": [deployment]}


def _requests(n: int, model: str = "echo") -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}]}},
    ).encode() + b"\n" for i in range(n))


def _run_batch(server: Server, n: int) -> tuple[OpenAI, Any]:
    client = OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    uploaded = client.files.create(file=("in.jsonl", _requests(n)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    return client, batch


def _one_each(client: OpenAI, done: Any, n: int) -> None:
    """Every line of the batch answered, exactly once."""
    assert done.status == "completed", done
    lines = file_lines(client, done.output_file_id)
    assert sorted(custom_ids(lines)) == sorted(f"r{i}" for i in range(n))
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert file_lines(client, done.error_file_id) == []
    assert done.request_counts.completed == n and done.request_counts.failed == 0


def test_a_batch_and_jobs_run_on_actors_placed_by_their_resources(
        cluster: Cluster, serve: Any) -> None:
    pool = {"min": 0, "max": 3, "idle_seconds": 2}
    server, jobs = serve([
        {"name": "echo", "backend": "echo"},
        # Two of its workers fit on the head at once (special 0.5 each): a third waits.
        endpoint("special", resources={"custom": {"special": 0.5}}, workers=pool, sleep=0.3),
        endpoint("other", resources={"custom": {"other": 0.5}}, workers=pool),
        endpoint("nowhere", resources={"num_cpus": 0.1, "custom": {"absent": 1}},
                 workers={"min": 0, "max": 1, "idle_seconds": 30})], "--workers", "1")
    client, batch = _run_batch(server, 20)
    _one_each(client, wait_batch(client, batch.id, 90), 20)

    job = jobs.submit("special", {"item_list": {"items": list(range(12)), "batch_size": 1}})
    jobs.wait_for(job["id"], lambda j: j["worker_counts"].get("pending") == 1)
    waiting = [w for w in jobs.listing(f"/jobs/{job['id']}/workers")
               if w["state"] == "pending"]
    assert waiting and "waiting for Ray to place it on a node with" in waiting[0]["reason"]
    assert "special 0.5" in waiting[0]["reason"]
    _succeeds(jobs, job["id"], [{"double": 2 * i} for i in range(12)], cluster.head,
              "special")
    # Its work done, the actor never placed is let go, and the others leave when idle.
    until(lambda: cluster.ray.actors("special/") == [], 30, "the pool to empty")

    # A job whose input is a file uploaded to the object store.
    uploaded = jobs.http.post(server.v1 + "/files", data={"purpose": "user_data"}, files={
        "file": ("in.jsonl", b"".join(b'{"n": %d}\n' % i for i in range(8)))})
    assert uploaded.status_code == 200, uploaded.text
    job = jobs.submit("other", {"delimited_files": {"file_ids": [uploaded.json()["id"]],
                                                    "batch_size": 2}})
    _succeeds(jobs, job["id"], [{"seen": {"n": i}} for i in range(8)], cluster.other, "other")

    # No node has `absent`: the worker waits as `pending`, and says why.
    job = jobs.submit("nowhere", {"item_list": {"items": [1], "batch_size": 1}})
    view = jobs.wait_for(job["id"], lambda j: j["worker_counts"].get("pending") == 1)
    assert view["status"] == "pending"  # nobody could even enqueue it
    [waiting] = jobs.listing(f"/jobs/{job['id']}/workers")
    assert waiting["state"] == "pending" and waiting["id"].startswith("nowhere/v1:ray-")
    assert "no node of the Ray cluster has CPU 0.1, absent 1" in waiting["reason"]
    assert cluster.ray.actors("nowhere/") == [waiting["id"]]

    # The batch actor's node, on /metrics.
    metrics = jobs.http.get(server.base_url + "/metrics").text
    hosts = re.findall(r'^batchery_workers_by_host\{host="([^"]+)"', metrics, re.MULTILINE)
    assert hosts and {cluster.node_of(h) for h in hosts} <= {cluster.head[:8], cluster.other[:8]}


def _succeeds(jobs: Jobs, job_id: str, predictions: list[Any], node: str,
              endpoint: str) -> None:
    """The job ends well, its results read back from the object store, on actors named for
    its deployment on `node` alone."""
    done = jobs.wait(job_id)
    assert done["status"] == "succeeded", jobs.logs(job_id)
    rows = sorted(jobs.results(job_id), key=lambda r: r["index"])
    assert [r["prediction"] for r in rows] == predictions
    workers = jobs.listing(f"/jobs/{job_id}/workers")
    assert workers and {Cluster.node_of(w["host"]) for w in workers} == {node[:8]}
    assert all(w["id"].startswith(f"{endpoint}/v1:ray-") for w in workers)
    # The predictor's own log lines, written in the actors, are the job's.
    assert "[job_predictors] batch" in jobs.logs_with(job_id, "[job_predictors]")


def test_a_job_pool_scales_from_zero_to_its_max_and_back(cluster: Cluster, serve: Any) -> None:
    _, jobs = serve([endpoint("scale", sleep=0.5,
                              workers={"min": 0, "max": 3, "idle_seconds": 2})], "--workers", "1")
    assert cluster.ray.actors("scale/") == []
    job = jobs.submit("scale", {"item_list": {"items": list(range(24)), "batch_size": 1}})

    def at_max() -> list[str] | None:
        actors: list[str] = cluster.ray.actors("scale/")
        assert len(actors) <= 3
        return actors if len(actors) == 3 else None

    peak = until(at_max, 60, "three actors in the pool")
    done = jobs.wait(job["id"])
    assert done["status"] == "succeeded", jobs.logs(job["id"])
    # The three actors Ray showed are workers of the job, listed under their Ray names.
    assert set(peak) <= {w["id"] for w in jobs.listing(f"/jobs/{job['id']}/workers")}
    # Idle for 2 s, each actor leaves, and its resources go back to the cluster.
    until(lambda: cluster.ray.actors("scale/") == [], 60, "the pool to shrink to zero")


def test_killing_an_actor_mid_batch_loses_and_duplicates_nothing(
        cluster: Cluster, serve: Any) -> None:
    n = 120
    server, _ = serve([echo("echo", latency_ms=100)], "--workers", "2", "--chunk-size", "10",
                      "--lease-seconds", "3")
    client, batch = _run_batch(server, n)
    # Both batch actors hold a chunk: the one killed dies with its chunk in hand.
    until(lambda: _chunks_running(server) == 2, 60, "both actors to hold a chunk")
    victim = cluster.ray.actors("batches:")[0]
    cluster.ray.ask("kill", victim)
    _one_each(client, wait_batch(client, batch.id, 120), n)
    # The dead actor was replaced by another.
    until(lambda: len(cluster.ray.actors("batches:")) == 2, 30, "a new batch actor")
    assert victim not in cluster.ray.actors("batches:")


def _chunks_running(server: Server) -> int:
    import httpx

    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('batchery_chunks{state="leased"}'):
            return int(float(line.split()[-1]))
    return 0


def test_serve_refuses_state_the_nodes_cannot_share(cluster: Cluster, tmp_path: Path,
                                                     pg_url: str) -> None:
    def serve_exit(*args: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "batchery", "serve", "--ray-address",
                               cluster.address, "--port", str(free_port()),
                               "--data-dir", str(tmp_path / "data"), *args],
                              capture_output=True, text=True, timeout=120, check=False)
        return done.returncode, " ".join(done.stderr.split())

    code, said = serve_exit()
    assert code == 2 and "cannot share the embedded SQLite database" in said, said
    code, said = serve_exit("--database-url", pg_url, "--files-url", "memory://batchery")
    assert code == 2 and "memory:// file store" in said, said
