"""Worker pools on Ray against local processes: the same batches through `batchery serve`,
its workers once local processes and once actors on a Ray cluster, in one run.

One run does all of this, in a fresh temporary directory:

1. starts a one-node Ray cluster (`ray start --head --block`, on a free port, with
   `--num-cpus` CPUs and a temp dir of its own), which it stops at the end;
2. writes the inputs: `--lines` chat requests for the `echo` deployment and, unless
   `--embedding-lines 0`, that many embedding requests for `all-minilm-l6-v2` (the packaged
   model of the `embeddings` extra);
3. for each workload, first with local worker processes, then with `--ray-address`: starts
   `batchery serve --workers N` on a fresh SQLite database and file store, times until all
   N workers report (their start-up), uploads the input, times the batch from creation to
   `completed`, downloads the output and checks that it holds every `custom_id` once;
4. prints Markdown: the figures of both, and the overhead of Ray on each.

    .venv/bin/python benchmarks/bench_ray.py --lines 200000 --embedding-lines 2000
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

RAY = str(Path(sys.executable).with_name("ray"))
_TERMINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass(frozen=True)
class Workload:
    name: str
    endpoint: str
    lines: int
    body: Callable[[int], dict[str, object]]


def _chat(i: int) -> dict[str, object]:
    return {"model": "echo", "messages": [{"role": "user", "content": f"request {i}"}]}


def _embedding(i: int) -> dict[str, object]:
    return {"model": "all-minilm-l6-v2",
            "input": f"sentence number {i} about the weather in a small town"}


@dataclass
class Run:
    workload: str
    mode: str
    workers_ready_s: float
    upload_s: float
    batch_s: float
    download_s: float
    lines: int

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.batch_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def ray_cluster(root: Path, cpus: int) -> Iterator[str]:
    """A one-node cluster for the run; `--block`, so stopping this process stops it."""
    temp = Path(tempfile.mkdtemp(prefix="bray-", dir="/tmp"))  # socket paths stay short
    port = free_port()
    log = root / "ray.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", str(cpus),
             "--temp-dir", str(temp), "--include-dashboard", "false", "--disable-usage-stats",
             "--node-ip-address", "127.0.0.1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait(lambda: "Ray runtime started" in log.read_text(errors="replace")
             or proc.poll() is not None, 120, "Ray to start")
        if proc.poll() is not None:
            raise RuntimeError(f"Ray did not start:\n{log.read_text(errors='replace')}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(temp, ignore_errors=True)


def write_input(path: Path, workload: Workload) -> None:
    with path.open("wb") as out:
        for i in range(workload.lines):
            out.write(orjson.dumps({"custom_id": f"r{i}", "method": "POST",
                                    "url": workload.endpoint, "body": workload.body(i)}))
            out.write(b"\n")


@contextmanager
def serve(root: Path, name: str, workers: int, *args: str) -> Iterator[tuple[str, float]]:
    """`batchery serve` on fresh state; yields its URL once it answers, with the time it
    was started (for the workers' start-up)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHERY_")}
    started = time.monotonic()
    with (root / f"{name}.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchery", "serve", "--port", str(port), "--data-dir",
             str(root / f"{name}-data"), "--workers", str(workers), *args],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: _answers(base) or proc.poll() is not None, 120, "the server")
        if proc.poll() is not None:
            raise RuntimeError((root / f"{name}.log").read_text(errors="replace"))
        yield base, started
    finally:
        proc.terminate()
        proc.wait(60)


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def live_workers(base: str) -> int:
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(int(float(n)) for n in re.findall(r"^batchery_workers\{[^}]*\} (\S+)$", text,
                                                 flags=re.MULTILINE))


def run_batch(base: str, source: Path, target: Path, workload: Workload) -> tuple[float, ...]:
    """Upload, batch, download; returns the seconds of each."""
    with httpx.Client(base_url=base + "/v1", timeout=600) as http:
        t0 = time.monotonic()
        with source.open("rb") as body:
            uploaded = http.post("/files", files={"file": ("in.jsonl", body)},
                                 data={"purpose": "batch"}).json()
        t1 = time.monotonic()
        batch = http.post("/batches", json={"input_file_id": uploaded["id"],
                                            "endpoint": workload.endpoint,
                                            "completion_window": "24h"}).json()
        while batch["status"] not in _TERMINAL:
            time.sleep(0.1)
            batch = http.get(f"/batches/{batch['id']}").json()
        t2 = time.monotonic()
        if batch["status"] != "completed" or batch["request_counts"]["failed"]:
            raise RuntimeError(f"the batch did not complete well: {batch}")
        with http.stream("GET", f"/files/{batch['output_file_id']}/content") as response, \
                target.open("wb") as out:
            for part in response.iter_bytes():
                out.write(part)
        t3 = time.monotonic()
    ids = sorted(orjson.loads(line)["custom_id"] for line in target.read_bytes().splitlines())
    if ids != sorted(f"r{i}" for i in range(workload.lines)):
        raise RuntimeError("the output does not hold every custom_id exactly once")
    return t1 - t0, t2 - t1, t3 - t2


def measure(root: Path, workload: Workload, mode: str, workers: int,
            *args: str) -> Run:
    source = root / f"{workload.name}.jsonl"
    with serve(root, f"{workload.name}-{mode}", workers, *args) as (base, started):
        wait(lambda: live_workers(base) >= workers, 300, "the workers")
        ready = time.monotonic() - started
        upload, batch, download = run_batch(base, source, root / "out.jsonl", workload)
    return Run(workload=workload.name, mode=mode, workers_ready_s=ready, upload_s=upload,
               batch_s=batch, download_s=download, lines=workload.lines)


def report(runs: list[Run], args: argparse.Namespace) -> str:
    load = os.getloadavg()
    out = [
        "| | |", "| --- | --- |",
        f"| date | {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC |",
        f"| machine | {os.cpu_count()} CPUs, {platform.system()} |",
        f"| Python | {platform.python_version()} |",
        f"| load average at the end | {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) |",
        f"| Ray | one node, `--num-cpus {args.ray_cpus}`, 0.25 CPU per actor |",
        f"| settings | `batchery serve --workers {args.workers}`, SQLite and local files |",
        "", "| workload | workers | lines | workers ready (s) | upload (s) | batch (s) "
        "| lines/s | download (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    out += [f"| {r.workload} | {r.mode} | {r.lines:,} | {r.workers_ready_s:.1f} | "
            f"{r.upload_s:.2f} | {r.batch_s:.2f} | {r.lines_per_s:,.0f} | {r.download_s:.2f} |"
            for r in runs]
    out += ["", "| workload | Ray's overhead on the batch | on the workers' start-up |",
            "| --- | ---: | ---: |"]
    for name in dict.fromkeys(r.workload for r in runs):
        local, ray = (next(r for r in runs if r.workload == name and r.mode == mode)
                      for mode in ("local processes", "Ray actors"))
        out.append(f"| {name} | {100 * (ray.batch_s / local.batch_s - 1):+.1f} % | "
                   f"{ray.workers_ready_s - local.workers_ready_s:+.1f} s |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000, help="echo chat requests")
    parser.add_argument("--embedding-lines", type=int, default=2_000,
                        help="embedding requests (0: skip the embeddings workload)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    workloads = [Workload("echo", "/v1/chat/completions", args.lines, _chat)]
    if args.embedding_lines:
        workloads.append(Workload("embeddings", "/v1/embeddings", args.embedding_lines,
                                  _embedding))
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    runs: list[Run] = []
    try:
        for workload in workloads:
            write_input(root / f"{workload.name}.jsonl", workload)
        with ray_cluster(root, args.ray_cpus) as address:
            for workload in workloads:
                runs.append(measure(root, workload, "local processes", args.workers))
                runs.append(measure(root, workload, "Ray actors", args.workers,
                                    "--ray-address", address))
                print(f"{workload.name}: done", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(report(runs, args))


if __name__ == "__main__":
    main()
