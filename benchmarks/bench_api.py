"""The API under load while a batch runs: reads per second, and many pollers.

Starts `batchery serve` (a keys file, so every request is authenticated; `--api-workers`
and `--workers` as given) on a fresh data directory with one `python` endpoint, runs a tiny
job to completion (so that `GET /api/v1/jobs/{id}` has a job to read), uploads an echo
batch of `--lines` lines and creates it. While that batch runs:

1. **Pollers**, measured first: windows of `--window` seconds, alternately unpolled and
   with `--pollers` clients each sending `GET /v1/batches/{id}` once a second (keep-alive,
   on raw asyncio streams so that the load generator stays cheap). Reports the pollers'
   p50/p99 latency and errors, and the batch's lines per second in the polled and in the
   unpolled windows (from `request_counts.completed` at each window's edges).
2. **Throughput**: `wrk` (Debian's `wrk`, on `PATH`) against `GET /healthz` (the floor: no
   key, no store), `GET /v1/batches/{id}` and `GET /api/v1/jobs/{id}`, for `--seconds` each
   with each of `--connections` open connections. Reports requests/s, wrk's latency
   percentiles, errors, and the CPU time the API processes used per request (from /proc:
   steadier than requests/s on a shared machine).

    .venv/bin/python benchmarks/bench_api.py --api-workers 1

The batch must outlast the measurement: at some 80,000 lines/s the default 4M lines do.

It prints Markdown and, with `--json PATH`, writes the figures as JSON. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")

PREDICTOR = '''
class Predictor:
    def __init__(self, config, job):
        pass

    def predict(self, batch, batch_id):
        return [{"n": item} for item in batch]
'''
CONFIG = '''
deployments:
  - name: echo
    backend: echo
endpoints:
  - name: bench
    default_deployment: v1
    deployments:
      - name: v1
        backend: python
        options:
          predictor: "bench_predictor:Predictor"
          python_path: ["."]
        workers: {min: 0, max: 1, idle_seconds: 1}
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _input(path: Path, lines: int) -> None:
    with path.open("wb") as out:
        for start in range(0, lines, 10_000):
            out.write(b"".join(orjson.dumps({
                "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "echo", "messages": [{"role": "user",
                                                        "content": f"hello number {i}"}]},
            }) + b"\n" for i in range(start, min(lines, start + 10_000))))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = ""

    # -- the server --------------------------------------------------------------------

    def start(self) -> None:
        from batchery.security.auth import add_key

        keys = self.work / "keys.yaml"
        _, self.key = add_key(keys, "bench")
        (self.work / "bench_predictor.py").write_text(PREDICTOR)
        (self.work / "config.yaml").write_text(CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHERY_")}
        cmd = [sys.executable, "-m", "batchery", "serve", "--port", str(self.port),
               "--data-dir", str(self.work / "data"), "--keys-file", str(keys),
               "--config", str(self.work / "config.yaml"), "--log-level", "warning",
               "--api-workers", str(self.args.api_workers), *self.args.serve_arg]
        if self.args.workers is not None:
            cmd += ["--workers", str(self.args.workers)]
        self.log = (self.work / "server.log").open("wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise SystemExit("the server did not start")
        self.http = httpx.Client(base_url=self.base, timeout=60,
                                 headers={"Authorization": f"Bearer {self.key}"})

    def api_pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid] + [p for p in _children(self.proc.pid)
                                  if "batchery.cli.api_procs" in _cmdline(p)]

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return [p for p in _children(self.proc.pid) if " worker " in _cmdline(p)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    # -- what is read ------------------------------------------------------------------

    def job(self) -> str:
        job = self.http.post("/api/v1/endpoints/bench/jobs", json={
            "item_list": {"items": list(range(8)), "batch_size": 4}}).raise_for_status().json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.http.get(f"/api/v1/jobs/{job['id']}").json()["status"] in (
                    "succeeded", "failed", "stopped"):
                return str(job["id"])
            time.sleep(0.2)
        raise SystemExit("the job did not end")

    def batch(self) -> str:
        path = self.work / "input.jsonl"
        _input(path, self.args.lines)
        with path.open("rb") as f:
            upload = self.http.post("/v1/files", files={"file": ("in.jsonl", f)},
                                    data={"purpose": "batch"}).raise_for_status().json()
        batch = self.http.post("/v1/batches", json={
            "input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).raise_for_status().json()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            got = self.get_batch(batch["id"])
            if got["status"] == "in_progress" and got["request_counts"]["completed"] > 0:
                return str(batch["id"])
            if got["status"] in ("failed", "completed", "cancelled", "expired"):
                raise SystemExit(f"the batch ended before it was measured: {got}")
            time.sleep(0.2)
        raise SystemExit("the batch did not start")

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        got: dict[str, Any] = self.http.get(f"/v1/batches/{batch_id}").json()
        return got

    def running(self, batch_id: str) -> bool:
        return bool(self.get_batch(batch_id)["status"] == "in_progress")

    # -- 1. throughput -----------------------------------------------------------------

    def wrk(self, path: str, label: str, connections: int, auth: bool = True
            ) -> dict[str, Any]:
        cmd = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{self.args.seconds}s",
               "--latency"]
        if auth:
            cmd += ["-H", f"Authorization: Bearer {self.key}"]
        pids = self.api_pids()
        cpu0 = sum(_cpu_s(p) for p in pids)
        load = _load()
        text = subprocess.run([*cmd, self.base + path], capture_output=True, text=True,
                              check=True).stdout
        cpu = sum(_cpu_s(p) for p in pids) - cpu0
        total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
        errors = 0
        if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
            errors += int(m.group(1))
        if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                          r"timeout (\d+)", text):
            errors += sum(int(g) for g in m.groups())
        lat = dict(re.findall(r"\s+(50|90|99)%\s+(\S+)", text))
        return {"path": label, "connections": connections,
                "rps": float(re.search(r"Requests/sec:\s+(\S+)", text).group(1)),  # type: ignore[union-attr]
                "requests": total, "errors": errors, "p50": lat.get("50"),
                "p99": lat.get("99"), "api_cpu_us_per_request": round(1e6 * cpu / total, 1)
                if total else None, "load_before": load}

    # -- 2. pollers --------------------------------------------------------------------

    async def _poller(self, path: str, until: float, latencies: list[float],
                      errors: list[str]) -> None:
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: Bearer {self.key}\r\n\r\n").encode()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            errors.append(f"connect: {exc}")
            return
        await asyncio.sleep(random.random())  # spread the pollers over the second
        next_at = time.monotonic()
        try:
            while next_at < until:
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors.append(f"status {status}")
                next_at += 1.0
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    async def _polled(self, path: str, seconds: float) -> tuple[list[float], list[str]]:
        latencies: list[float] = []
        errors: list[str] = []
        until = time.monotonic() + seconds
        await asyncio.gather(*(self._poller(path, until, latencies, errors)
                               for _ in range(self.args.pollers)))
        return latencies, errors

    def pollers(self, batch_id: str) -> dict[str, Any]:
        path = f"/v1/batches/{batch_id}"
        windows: list[dict[str, Any]] = []
        latencies: list[float] = []
        errors: list[str] = []
        for i in range(2 * self.args.windows):
            polled = i % 2 == 1
            load = _load()
            before = self.get_batch(batch_id)["request_counts"]["completed"]
            workers_cpu0 = sum(_cpu_s(p) for p in self.worker_pids())
            started = time.monotonic()
            if polled:
                lat, err = asyncio.run(self._polled(path, self.args.window))
                latencies += lat
                errors += err
            else:
                time.sleep(self.args.window)
            took = time.monotonic() - started
            after = self.get_batch(batch_id)
            windows.append({"polled": polled, "lines_per_s": round(
                (after["request_counts"]["completed"] - before) / took),
                "workers_cpu_s": round(sum(_cpu_s(p) for p in self.worker_pids())
                                       - workers_cpu0, 2),
                "still_running": after["status"] == "in_progress", "load_before": load})
        ordered = sorted(latencies)

        def pct(q: float) -> float | None:
            return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) \
                if ordered else None

        # A window in which the batch ended says nothing about its rate.
        polled_rates = [w["lines_per_s"] for w in windows if w["polled"] and w["still_running"]]
        unpolled_rates = [w["lines_per_s"] for w in windows
                          if not w["polled"] and w["still_running"]]
        if not polled_rates or not unpolled_rates:
            raise SystemExit(f"the batch ended during the poller windows: give more --lines "
                             f"({windows})")
        return {"pollers": self.args.pollers, "requests": len(latencies),
                "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                "max_ms": round(1000 * ordered[-1], 2) if ordered else None,
                "errors": len(errors), "error_sample": errors[:5], "windows": windows,
                "polled_lines_per_s": statistics.median(polled_rates),
                "unpolled_lines_per_s": statistics.median(unpolled_rates),
                "polled_over_unpolled": round(statistics.median(polled_rates)
                                              / statistics.median(unpolled_rates), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lines", type=int, default=4_000_000)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seconds", type=int, default=5, help="each wrk run")
    parser.add_argument("--connections", type=int, nargs="+", default=[32])
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--windows", type=int, default=2,
                        help="pairs of unpolled and polled windows")
    parser.add_argument("--skip-wrk", action="store_true")
    parser.add_argument("--serve-arg", action="append", default=[])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if not args.skip_wrk and shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH (apt-get install wrk), or pass --skip-wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    bench = Bench(args, work)
    result: dict[str, Any] = {"lines": args.lines, "api_workers": args.api_workers,
                              "cpus": os.cpu_count(), "load_at_start": _load()}
    try:
        bench.start()
        job_id = bench.job()
        batch_id = bench.batch()
        # The pollers first: the batch's rate is compared while it surely runs.
        result["pollers"] = bench.pollers(batch_id)
        result["wrk"] = []
        if not args.skip_wrk:
            for connections in args.connections:
                for path, label, auth in (
                        ("/healthz", "/healthz", False),
                        (f"/v1/batches/{batch_id}", "/v1/batches/{id}", True),
                        (f"/api/v1/jobs/{job_id}", "/api/v1/jobs/{id}", True)):
                    if not bench.running(batch_id):
                        raise SystemExit("the batch ended before the measurement did: "
                                         "give more --lines")
                    result["wrk"].append(bench.wrk(path, label, connections, auth))
        result["batch_still_running_at_end"] = bench.running(batch_id)
    finally:
        bench.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load at start {result['load_at_start']}; {args.lines} lines; "
          f"--api-workers {args.api_workers}")
    print("\n| GET | connections | req/s | p50 | p99 | errors | API CPU µs/request | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in result["wrk"]:
        print(f"| `{r['path']}` | {r['connections']} | {r['rps']:,.0f} | {r['p50']} | {r['p99']} "
              f"| {r['errors']} | {r['api_cpu_us_per_request']} | {r['load_before']} |")
    p = result["pollers"]
    print(f"\n{p['pollers']} pollers: {p['requests']} requests, p50 {p['p50_ms']} ms, "
          f"p99 {p['p99_ms']} ms, max {p['max_ms']} ms, errors {p['errors']}; batch "
          f"{p['polled_lines_per_s']:,} lines/s polled vs {p['unpolled_lines_per_s']:,} "
          f"unpolled ({p['polled_over_unpolled']}); batch still running at the end: "
          f"{result['batch_still_running_at_end']}")
    for w in p["windows"]:
        print(f"  {'polled  ' if w['polled'] else 'unpolled'} {w['lines_per_s']:>8,} lines/s, "
              f"workers {w['workers_cpu_s']} CPU s, load {w['load_before']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
