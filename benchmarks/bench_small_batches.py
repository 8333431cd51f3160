"""Small batches: how long a 100-line echo batch takes from create to `completed`.

Starts `batchery serve` with its default settings on a fresh data directory, uploads one
100-line input file, then creates `--runs` batches one after another, each polled to its
end every `--poll-ms` milliseconds, and reports the p50 and p90 from the create call's
start to the first poll that sees `completed`. The baseline, in the same run, is the same
create-and-poll cycle against a batch that is already `completed` (`GET` only): what the
API and the polling cost by themselves.

    .venv/bin/python benchmarks/bench_small_batches.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _input(lines: int) -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "echo", "messages": [{"role": "user", "content": f"hi {i}"}]},
    }) + b"\n" for i in range(lines))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(base: str, lines: int, runs: int, poll_s: float) -> dict[str, Any]:
    with httpx.Client(base_url=base, timeout=30) as http:
        upload = http.post("/v1/files", files={"file": ("in.jsonl", _input(lines))},
                           data={"purpose": "batch"}).json()
        body = {"input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h"}
        # Warm up: workers loaded, first batch done.
        _one(http, body, poll_s)
        took = [_one(http, body, poll_s) for _ in range(runs)]
        done_id = http.get("/v1/batches", params={"limit": 1}).json()["data"][0]["id"]
        baseline = []
        for _ in range(runs):
            started = time.perf_counter()
            assert http.get(f"/v1/batches/{done_id}").json()["status"] == "completed"
            baseline.append(time.perf_counter() - started)
    return {"p50_ms": round(1000 * statistics.median(took), 1),
            "p90_ms": round(1000 * _percentile(took, 0.9), 1),
            "min_ms": round(1000 * min(took), 1), "max_ms": round(1000 * max(took), 1),
            "baseline_get_p50_ms": round(1000 * statistics.median(baseline), 2)}


def _one(http: httpx.Client, body: dict[str, Any], poll_s: float) -> float:
    started = time.perf_counter()
    batch = http.post("/v1/batches", json=body).json()
    while True:
        status = http.get(f"/v1/batches/{batch['id']}").json()["status"]
        if status == "completed":
            return time.perf_counter() - started
        if status in ("failed", "expired", "cancelled"):
            raise SystemExit(f"batch {batch['id']} ended {status}")
        time.sleep(poll_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="batchery-small-") as tmp:
        log = Path(tmp) / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHERY_")}
        with log.open("wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "batchery", "serve", "--port",
                                       str(port), "--data-dir", str(Path(tmp) / "data")],
                                      stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/v1/models", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the server did not start:\n{log.read_text()}")
                time.sleep(0.1)
            time.sleep(2)  # its workers start
            figures = measure(base, args.lines, args.runs, args.poll_ms / 1000)
        finally:
            server.terminate()
            server.wait(30)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "lines": args.lines, "runs": args.runs, "poll_ms": args.poll_ms, **figures}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
