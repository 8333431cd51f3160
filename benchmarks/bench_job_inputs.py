"""A job over a large CSV file, end to end, against a bare streaming loop.

    .venv/bin/python benchmarks/bench_job_inputs.py --size-gb 1.0 --compare-small

Generates a CSV (about 100 bytes a row), then in the same run:

* baseline: one process streams the file with pyarrow's CSV reader and hands each batch of
  rows (as dicts) to the same trivial predictor; its peak RSS is the process's `ru_maxrss`;
* Batchery: a real `batchery serve` with a `python` endpoint (a pool of up to 2 workers)
  runs a `delimited_files` job over the file with `output: summary_only`; the RSS of the
  server and every worker is sampled from /proc every 0.25 s until the job has ended.

Reports wall times, rows/s, the ratio baseline/Batchery, and peak RSS per process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PREDICTOR = '''
class Noop:
    def predict(self, batch):
        # Touch every row, as a real model reads its input.
        return None if sum(len(row) for row in batch) < 0 else None
'''


def generate(path: Path, size_bytes: int) -> int:
    """Write the CSV in blocks; returns the row count."""
    rng = np.random.default_rng(0)
    rows, block = 0, 100_000
    text = "x" * 64
    with path.open("w") as out:
        out.write("id,a,b,label\n")
        while path.stat().st_size < size_bytes:
            a, b = rng.random(block), rng.random(block)
            out.write("".join(f"{rows + i},{a[i]:.6f},{b[i]:.6f},{text}{i % 10}\n"
                              for i in range(block)))
            out.flush()
            rows += block
    return rows


def baseline(path: Path, batch_size: int) -> None:
    """Runs in its own process: prints seconds, rows and peak RSS (MB)."""
    from pyarrow import csv

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    started = time.perf_counter()
    rows, pending = 0, []
    with path.open("rb") as stream:
        for record_batch in csv.open_csv(stream):
            for row in record_batch.to_pylist():
                pending.append(row)
                if len(pending) == batch_size:
                    sum(len(r) for r in pending)
                    rows += len(pending)
                    pending = []
    rows += len(pending)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{time.perf_counter() - started} {rows} {usage.ru_maxrss / 1024} "
          f"{usage.ru_utime + usage.ru_stime - cpu_before}")


def _tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _name(pid: int) -> str:
    """What a process of the server's tree is: `serve`, `worker` or a pool's worker."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return "?"
    if "serve" in args:
        return "serve"
    return "pool-worker" if "--deployment" in args else "batch-worker"


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_job(path: Path, batch_size: int, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "noop_predictor.py").write_text(PREDICTOR)
    (work / "config.yaml").write_text(
        "endpoints:\n  - name: bench\n    deployments:\n      - name: v1\n"
        "        backend: python\n"
        "        options: {predictor: 'noop_predictor:Noop', python_path: ['.']}\n"
        "        workers: {min: 0, max: 2, idle_seconds: 30}\n")
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen(
        [sys.executable, "-m", "batchery", "serve", "--port", str(port), "--data-dir",
         str(work / "data"), "--config", str(work / "config.yaml"), "--workers", "1",
         "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/v1"
    peaks: dict[int, float] = {}
    cpu: dict[int, float] = {}
    names: dict[int, str] = {}
    peak_sum = 0.0
    try:
        _wait_up(base)
        before = {pid: _cpu_s(pid) or 0.0 for pid in _tree(server.pid)}
        started = time.perf_counter()
        job = httpx.post(f"{base}/endpoints/bench/jobs", timeout=600, json={
            "delimited_files": {"paths": [str(path)], "batch_size": batch_size},
            "output": "summary_only"}).json()
        enqueued_at = None
        while True:
            pids = _tree(server.pid)
            sizes = {pid: _rss_mb(pid) for pid in pids}
            for pid in pids:
                used = _cpu_s(pid)
                if used is not None:
                    cpu[pid] = max(cpu.get(pid, 0.0), used)
                    names.setdefault(pid, _name(pid))
            for pid, size in sizes.items():
                peaks[pid] = max(peaks.get(pid, 0.0), size)
            peak_sum = max(peak_sum, sum(sizes.values()))
            state = httpx.get(f"{base}/jobs/{job['id']}", timeout=30).json()
            if enqueued_at is None and state["enqueuing_done"]:
                enqueued_at = time.perf_counter() - started
            if state["ended_at"] is not None:
                break
            time.sleep(0.25)
        elapsed = time.perf_counter() - started
        return {"seconds": elapsed, "enqueue_s": enqueued_at, "status": state["status"],
                "rows": state["item_counts"]["succeeded"], "batches": state["total_batch_count"],
                "server_mb": peaks.get(server.pid, 0.0),
                "worker_mb": sorted((v for p, v in peaks.items() if p != server.pid),
                                    reverse=True),
                "sum_mb": peak_sum,
                "cpu_s": sum(used - before.get(pid, 0.0) for pid, used in cpu.items()),
                "cpu_by_process": {f"{names.get(pid, '?')} {pid}": round(
                    used - before.get(pid, 0.0), 1) for pid, used in cpu.items()}}
    finally:
        for pid in reversed(_tree(server.pid)):
            with_signal(pid, signal.SIGTERM)
        try:
            server.wait(40)
        except subprocess.TimeoutExpired:
            for pid in _tree(server.pid):
                with_signal(pid, signal.SIGKILL)
            server.wait()


def with_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_up(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(base.rsplit("/api/v1", 1)[0] + "/healthz", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def measure(size_gb: float, batch_size: int, work: Path) -> dict[str, Any]:
    path = work / f"data-{size_gb:g}gb.csv"
    rows = generate(path, int(size_gb * (1 << 30)))
    size_mb = path.stat().st_size / (1 << 20)
    out = subprocess.run([sys.executable, __file__, "--baseline-only", str(path),
                          "--batch-size", str(batch_size)], capture_output=True, text=True,
                         check=True).stdout.split()
    base_s, base_rows, base_mb, base_cpu = float(out[0]), int(out[1]), float(out[2]), \
        float(out[3])
    assert base_rows == rows
    job = run_job(path, batch_size, work / f"job-{size_gb:g}")
    assert job["status"] == "succeeded" and job["rows"] == rows, job
    path.unlink()
    return {"size_mb": size_mb, "rows": rows, "base_s": base_s, "base_mb": base_mb,
            "base_cpu": base_cpu, **job}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--compare-small", action="store_true",
                        help="also run a 0.25 GB file, to show memory does not follow size")
    parser.add_argument("--baseline-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_only:
        baseline(args.baseline_only, args.batch_size)
        return
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"load {os.getloadavg()[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-", dir=os.environ.get("BENCH_DIR")))
    try:
        sizes = ([0.25] if args.compare_small else []) + [args.size_gb]
        print("| file | rows | baseline s | Batchery s (enqueue done at) | ratio | "
              "baseline CPU s | Batchery CPU s (all processes) | baseline peak RSS | "
              "server peak | worker peaks | all processes peak |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for size in sizes:
            r = measure(size, args.batch_size, work)
            workers = ", ".join(f"{m:.0f}" for m in r["worker_mb"])
            print(f"| {r['size_mb']:.0f} MB | {r['rows']:,} | {r['base_s']:.1f} | "
                  f"{r['seconds']:.1f} ({r['enqueue_s']:.1f}) | "
                  f"{r['base_s'] / r['seconds']:.3f} | {r['base_cpu']:.1f} | "
                  f"{r['cpu_s']:.1f} | {r['base_mb']:.0f} MB | "
                  f"{r['server_mb']:.0f} MB | {workers} MB | {r['sum_mb']:.0f} MB |",
                  flush=True)
            print(f"CPU seconds per process: {r['cpu_by_process']}", flush=True)
        print(f"load at the end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
