"""What open dashboard pages cost the server: N pages left open on a running batch, each
polling its live fragment every 2 s as `batchery/ui/static/ui.js` does, against the same
server with no page open, measured in one run.

    .venv/bin/python benchmarks/bench_ui_polling.py [--pages 20] [--seconds 30]

It starts `batchery serve` in open mode with a slow echo deployment and one long batch,
then reads the API process's CPU time (from /proc) over two windows of equal length: no
page open, then N pollers (threads with their own HTTP connection, like browser tabs). It
prints the server's CPU share in each window, the difference per page, and the poll
latencies (p50, p99).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson

POLL_S = 2.0  # ui.js polls a live fragment every 2 s
CONFIG = """deployments:
  - name: echo-slow
    backend: echo
    options: {latency_ms: 50}
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def start(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    config = tmp / "config.yaml"
    config.write_text(CONFIG)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchery", "serve", "--port", str(port), "--data-dir",
         str(tmp / "data"), "--config", str(config), "--workers", "1", "--log-level",
         "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def long_batch(base: str, lines: int) -> str:
    body = b"".join(orjson.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "echo-slow", "messages": [{"role": "user", "content": "hi"}]}})
        + b"\n" for i in range(lines))
    headers = {"authorization": "Bearer local"}
    file = httpx.post(f"{base}/v1/files", headers=headers, data={"purpose": "batch"},
                      files={"file": ("in.jsonl", body)}).json()
    batch = httpx.post(f"{base}/v1/batches", headers=headers, json={
        "input_file_id": file["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json()
    return str(batch["id"])


def poll(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(url).raise_for_status()
            latencies.append(time.perf_counter() - started)
            stop.wait(POLL_S)


def window(pid: int, seconds: float) -> float:
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start(Path(tmp), args.port)
        try:
            base = f"http://127.0.0.1:{args.port}"
            batch_id = long_batch(base, 100_000)
            time.sleep(3)  # let validation pass, so the batch is running
            idle = window(proc.pid, args.seconds)
            stop, latencies = threading.Event(), []
            url = f"{base}/ui/fragments/batches/{batch_id}"
            threads = [threading.Thread(target=poll, args=(url, stop, latencies))
                       for _ in range(args.pages)]
            for i, thread in enumerate(threads):
                thread.start()
                time.sleep(POLL_S / args.pages * (i % 2))  # spread the tabs a little
            busy = window(proc.pid, args.seconds)
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            proc.terminate()
            proc.wait(30)
    ordered = sorted(latencies)
    print(f"pages: {args.pages}, polling every {POLL_S:.0f} s, windows of {args.seconds:.0f} s")
    print(f"API process CPU, no page open: {idle:.1%} of a core")
    print(f"API process CPU, {args.pages} pages open: {busy:.1%} of a core "
          f"({(busy - idle) / args.pages:.2%} per page)")
    print(f"fragment latency: p50 {statistics.median(ordered) * 1000:.1f} ms, "
          f"p99 {ordered[int(len(ordered) * 0.99) - 1] * 1000:.1f} ms over {len(ordered)} polls")


if __name__ == "__main__":
    main()
