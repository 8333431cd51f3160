"""End-to-end throughput of Batchery on the `echo` backend, against a bare loop.

One run does all of this, in a fresh temporary directory:

1. writes a chat batch input file of `--lines` requests;
2. **baseline**: one process reads that file line by line, parses each line with orjson,
   answers it with `batchery.backends.echo.answer` (the function the echo backend uses),
   renders it with `batchery.batchapi.execution.response_line` and writes the output file;
3. **Batchery**: starts `batchery serve` with its default settings (no `BATCHERY_*`
   variables, one worker per CPU), waits for its workers to finish starting, uploads the
   file (streamed from disk), creates the batch, polls it to the end and downloads the
   output (streamed to disk), timing each phase, then checks that the output holds every
   `custom_id` exactly once;
4. records the peak RSS (`VmHWM`) of the server and of every worker, and the CPU time each
   used in each phase (and what the rest of the machine used meanwhile);
5. measures one claim + complete round trip of the chunk queue on SQLite;
6. unless `--profiler none`: runs a batch of `--profile-lines` again under a profiler and
   reports the top functions by own time of the workers and of the server: `py-spy`
   (sampling, all processes, when it is installed) or cProfile (one worker).

Figures go to stdout as Markdown and, with `--json PATH`, as JSON.

    .venv/bin/python benchmarks/bench_echo.py --lines 1000000
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import io
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from batchery.backends.echo import answer
from batchery.model.batches import DEFAULT_CHUNK_SIZE, Batch, BatchStatus
from batchery.model.chunks import ChunkPart, ChunkSpec
from batchery.stores.sql.engine import sqlite_url
from batchery.stores.sql.store import SqlStore
from batchery.wire.openai_lines import response_line

ENDPOINT = "/v1/chat/completions"
_IO_BUFFER = 1 << 20
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
          "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
          "sierra", "tango", "uniform", "victor", "whiskey")
_TERMINAL = {"completed", "failed", "expired", "cancelled"}
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


# -- input -----------------------------------------------------------------------------


def generate_input(path: Path, n: int) -> int:
    """Write `n` chat requests, one JSON object a line; returns the file's size in bytes."""
    with path.open("wb", buffering=_IO_BUFFER) as out:
        for i in range(n):
            words = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(12))
            out.write(orjson.dumps({
                "custom_id": f"request-{i}", "method": "POST", "url": ENDPOINT,
                "body": {"model": "echo",
                         "messages": [{"role": "user", "content": f"Line {i}: {words}"}],
                         "max_tokens": 32},
            }, option=orjson.OPT_APPEND_NEWLINE))
    return path.stat().st_size


# -- baseline --------------------------------------------------------------------------


def run_baseline(source: Path, target: Path) -> tuple[float, float]:
    """A worker's work on every line, in one bare loop: returns `(wall s, CPU s)`."""
    started, cpu = time.perf_counter(), time.process_time()
    with source.open("rb", buffering=_IO_BUFFER) as lines, \
            target.open("wb", buffering=_IO_BUFFER) as out:
        for raw in lines:
            obj = orjson.loads(raw)
            out.write(response_line(obj["custom_id"], answer(obj["url"], obj["body"])))
    return time.perf_counter() - started, time.process_time() - cpu


# -- processes: peak RSS and CPU time, from /proc --------------------------------------


def _proc_peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from its third field on (the command name may hold spaces)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _proc_cpu_s(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _machine_busy_s() -> float:
    """CPU time the whole machine has spent busy since boot, all CPUs together."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(v) for v in stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS_PER_S


def _descendants(root: int) -> list[int]:
    """`root` and every process below it, found through the parent ids in /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry)] = int(_stat_fields(int(entry))[1])
    found, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found += sorted(frontier)
    return found


def _role(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        args = cmdline.read().split(b"\0")
    for role in (b"serve", b"worker"):
        if role in args:
            return role.decode()
    return args[0].decode(errors="replace").rsplit("/", 1)[-1] if args else "?"


@dataclass
class ProcessStats:
    pid: int
    role: str
    peak_rss_mb: float = 0.0
    #: CPU seconds (user + system) used so far, at each mark.
    cpu_at: dict[str, float] = field(default_factory=dict)


class ProcessMonitor:
    """Polls the peak RSS (`VmHWM`) of a process and of all its descendants, and takes
    their CPU time at marks (`mark("in_progress")`) to split it between the phases.

    `VmHWM` is the kernel's own high-water mark, so a slow poll (each one reads /proc
    whole, which costs CPU the workers would rather have) loses nothing but a process that
    lives less than a second."""

    def __init__(self, root: int, every_s: float = 1.0) -> None:
        self.root = root
        self.every_s = every_s
        self.procs: dict[int, ProcessStats] = {}
        self.marks: list[str] = []
        #: At each mark: (machine busy CPU s, this benchmark process's CPU s).
        self.machine_at: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-monitor", daemon=True)

    def __enter__(self) -> ProcessMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.every_s):
                return

    def mark(self, label: str) -> None:
        self.sample(label)

    def sample(self, mark: str | None = None) -> None:
        with self._lock:
            if mark is not None:
                self.marks.append(mark)
                self.machine_at[mark] = (_machine_busy_s(), _proc_cpu_s(os.getpid()))
            for pid in _descendants(self.root):
                try:
                    rss, cpu = _proc_peak_rss_mb(pid), _proc_cpu_s(pid)
                    stats = self.procs.get(pid) or ProcessStats(pid=pid, role=_role(pid))
                except (OSError, KeyError, ValueError, IndexError):
                    continue  # gone, or a zombie
                stats.peak_rss_mb = round(max(stats.peak_rss_mb, rss), 1)
                if mark is not None:
                    stats.cpu_at[mark] = cpu
                self.procs[pid] = stats

    def tree_cpu_s(self) -> float:
        return sum(_proc_cpu_s(pid) for pid in _descendants(self.root))

    def processes(self) -> list[dict[str, Any]]:
        """One row a process, the server first: peak RSS, and CPU seconds by phase (from
        one mark to the next)."""
        rows = []
        for p in sorted(self.procs.values(), key=lambda p: (p.role != "serve", p.pid)):
            cpu = {}
            for before, after in zip(self.marks, self.marks[1:], strict=False):
                if before in p.cpu_at and after in p.cpu_at:
                    cpu[before] = round(p.cpu_at[after] - p.cpu_at[before], 2)
            rows.append({"pid": p.pid, "role": p.role, "peak_rss_mb": p.peak_rss_mb,
                         "cpu_s": cpu})
        return rows

    def elsewhere_cpu_s(self, first: str, last: str) -> dict[str, float]:
        """Between two marks: CPU seconds of this benchmark process, and of everything
        else on the machine that is neither Batchery nor this benchmark."""
        busy = self.machine_at[last][0] - self.machine_at[first][0]
        bench = self.machine_at[last][1] - self.machine_at[first][1]
        ours = sum(p.cpu_at[last] - p.cpu_at[first] for p in self.procs.values()
                   if first in p.cpu_at and last in p.cpu_at)
        return {"benchmark_client": round(bench, 2),
                "other_processes": round(max(0.0, busy - bench - ours), 2)}


def wait_until_idle(monitor: ProcessMonitor, workers: int, timeout_s: float = 120.0) -> None:
    """Wait for `workers` worker processes to have started and for the whole tree to idle
    (imports done), so that their start-up is not timed as part of the upload."""
    deadline = time.monotonic() + timeout_s
    last = monitor.tree_cpu_s()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = monitor.tree_cpu_s()
        started = sum(_role(pid) == "worker" for pid in _descendants(monitor.root))
        if started >= workers and now - last < 0.1:
            return
        last = now
    raise RuntimeError("the workers did not settle")


# -- the server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """This environment without `BATCHERY_*`, so that every setting is the default."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BATCHERY_")}


@contextlib.contextmanager
def running_server(data_dir: Path, log_path: Path, *, extra: list[str] | None = None,
                   python_args: list[str] | None = None) -> Iterator[tuple[str, int]]:
    """`batchery serve --data-dir DATA_DIR --port FREE`; yields `(base url, pid)`."""
    port = _free_port()
    command = [sys.executable, *(python_args or []), "-m", "batchery", "serve",
               "--data-dir", str(data_dir), "--port", str(port), *(extra or [])]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base, proc)
            yield base, proc.pid
        finally:
            _stop(proc)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"batchery serve exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("batchery serve did not become ready")


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- one batch through the API ---------------------------------------------------------


@dataclass
class EndToEnd:
    lines: int
    chunks: int
    upload_s: float = 0.0
    create_s: float = 0.0
    validation_s: float = 0.0
    execution_s: float = 0.0
    finalizing_s: float = 0.0
    download_s: float = 0.0
    total_s: float = 0.0
    #: The batch's own second-resolution timestamps, as the API reports them.
    server_timestamps: dict[str, int | None] = field(default_factory=dict)
    output_bytes: int = 0
    output_ok: bool = False

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.total_s

    @property
    def chunk_cost_ms(self) -> float:
        return 1000 * self.execution_s / self.chunks


def run_batch(base: str, source: Path, target: Path, n: int, chunk_size: int, *,
              on_phase: Callable[[str], None] = lambda _: None,
              poll_s: float = 0.1) -> EndToEnd:
    """Upload, create, poll and download one batch. `on_phase` hears each phase begin:
    `upload`, then each batch status as first seen, `download` and `done`."""
    result = EndToEnd(lines=n, chunks=-(-n // chunk_size))
    headers = {"Authorization": "Bearer bench"}
    with httpx.Client(base_url=f"{base}/v1", headers=headers,
                      timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        on_phase("upload")
        started = time.perf_counter()
        with source.open("rb") as stream:  # httpx sends a file object block by block
            response = client.post("/files", data={"purpose": "batch"},
                                   files={"file": (source.name, stream, "application/jsonl")})
        response.raise_for_status()
        uploaded = time.perf_counter()
        result.upload_s = uploaded - started
        response = client.post("/batches", json={"input_file_id": response.json()["id"],
                                                 "endpoint": ENDPOINT,
                                                 "completion_window": "24h"})
        response.raise_for_status()
        created = time.perf_counter()
        result.create_s = created - uploaded
        batch = response.json()
        on_phase(batch["status"])
        seen = _poll(client, batch["id"], poll_s, on_phase)
        batch = seen.pop("batch")
        if batch["status"] != BatchStatus.COMPLETED.value:
            raise RuntimeError(f"batch ended {batch['status']}: {batch.get('errors')}")
        in_progress = seen.get("in_progress", seen.get("finalizing", seen["completed"]))
        finalizing = seen.get("finalizing", seen["completed"])
        result.validation_s = in_progress - created
        result.execution_s = finalizing - in_progress
        result.finalizing_s = seen["completed"] - finalizing
        result.server_timestamps = {k: batch.get(k) for k in (
            "created_at", "in_progress_at", "finalizing_at", "completed_at")}
        on_phase("download")
        before_download = time.perf_counter()
        with client.stream("GET", f"/files/{batch['output_file_id']}/content") as response, \
                target.open("wb", buffering=_IO_BUFFER) as out:
            response.raise_for_status()
            for block in response.iter_raw():
                out.write(block)
        finished = time.perf_counter()
        on_phase("done")
        result.download_s = finished - before_download
        result.total_s = finished - started
    result.output_bytes = target.stat().st_size
    result.output_ok = check_output(target, n)
    return result


def _poll(client: httpx.Client, batch_id: str, poll_s: float,
          on_phase: Callable[[str], None]) -> dict[str, Any]:
    """Poll until the batch ends; returns when each status was first seen, and the batch."""
    seen: dict[str, Any] = {}
    while True:
        response = client.get(f"/batches/{batch_id}")
        now = time.perf_counter()
        response.raise_for_status()
        batch = response.json()
        if batch["status"] not in seen:
            seen[batch["status"]] = now
            on_phase(batch["status"])
        if batch["status"] in _TERMINAL:
            seen["batch"] = batch
            return seen
        time.sleep(poll_s)


def check_output(path: Path, n: int) -> bool:
    """Whether the output has `n` successful lines holding each `request-<i>` once."""
    seen = bytearray(n)
    count = 0
    with path.open("rb", buffering=_IO_BUFFER) as lines:
        for raw in lines:
            line = orjson.loads(raw)
            index = int(line["custom_id"].removeprefix("request-"))
            if seen[index] or line["response"]["status_code"] != 200:
                return False
            seen[index] = 1
            count += 1
    return count == n and all(seen)


# -- the chunk queue on SQLite ---------------------------------------------------------


def store_round_trip(db_path: Path, rounds: int = 500) -> dict[str, float]:
    """Milliseconds per `claim_chunk` + `complete_chunk`, and per empty `claim_phase` (which
    a worker also runs before each chunk), on a fresh SQLite store."""
    store = SqlStore.from_url(sqlite_url(db_path))
    try:
        now = int(time.time())
        store.insert_batch(Batch(
            id="batch_bench", project="bench", endpoint=ENDPOINT, input_file_id="file-bench",
            completion_window="24h", status=BatchStatus.VALIDATING, created_at=now,
            expires_at=now + 86_400, chunk_size=DEFAULT_CHUNK_SIZE, max_tasks=rounds))
        phase = store.claim_phase("bench", 30.0)
        assert phase is not None
        specs = [ChunkSpec(index=i, start_offset=i, end_offset=i + 1, first_line=i + 1,
                           n_lines=1) for i in range(rounds + 1)]
        store.start_batch(phase, total=len(specs), model="echo", input_key="files/bench",
                          chunks=specs, now=now)
        result = ChunkPart(n_ok=1, n_err=0, out_key="parts/x.out", err_key=None, offsets=(0,))
        started = time.perf_counter()
        for _ in range(rounds):
            lease = store.claim_chunk("bench", 30.0)
            assert lease is not None
            store.complete_chunk(lease, result)
        claim_complete = (time.perf_counter() - started) / rounds
        started = time.perf_counter()
        for _ in range(rounds):
            store.claim_phase("bench", 30.0)
        claim_phase = (time.perf_counter() - started) / rounds
    finally:
        store.close()
    return {"claim_complete_ms": round(1000 * claim_complete, 3),
            "empty_claim_phase_ms": round(1000 * claim_phase, 3)}


# -- profiles --------------------------------------------------------------------------


#: Where a process waits rather than works: left out of the hot spots.
_IDLE = frozenset({"<method 'poll' of 'select.epoll' objects>",
                   "<method 'acquire' of '_thread.lock' objects>",
                   "<built-in method time.sleep>"})


def _short(path: str) -> str:
    return re.sub(r"^.*/(site-packages|lib/python3\.\d+)/|^.*/(?=batchery/)", "", path)


def _cprofile_top(profile: Path, limit: int) -> list[dict[str, Any]]:
    """The functions with the most own time, as shares of the time not spent waiting on
    locks and sockets."""
    stats = pstats.Stats(str(profile), stream=io.StringIO())
    entries = [(key, value) for key, value in stats.stats.items()  # type: ignore[attr-defined]
               if key[2] not in _IDLE]
    total = sum(value[2] for _, value in entries) or 1.0
    rows = []
    for (file, line, name), (_cc, calls, own, cumulative, _callers) in entries:
        where = name if file == "~" else f"{name} ({_short(file)}:{line})"
        rows.append({"function": where, "calls": calls, "own_pct": 100 * own / total,
                     "cumulative_pct": 100 * cumulative / total})
    rows.sort(key=lambda r: r["own_pct"], reverse=True)
    return [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
            for r in rows[:limit]]


def _cprofile_run(root: Path, source: Path, n: int, limit: int) -> dict[str, Any]:
    """The server (without workers of its own) and one worker, each under cProfile."""
    data_dir = root / "profile-data"
    server_prof, worker_prof = root / "serve.prof", root / "worker.prof"
    with running_server(data_dir, root / "profile-serve.log", extra=["--workers", "0"],
                        python_args=["-m", "cProfile", "-o", str(server_prof)]) as (base, _), \
            (root / "profile-worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", str(worker_prof), "-m", "batchery",
             "worker", "--data-dir", str(data_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
        try:
            run_batch(base, source, root / "profile-output.jsonl", n, DEFAULT_CHUNK_SIZE)
        finally:
            _stop(worker)
    return {"tool": "cProfile (one worker; deterministic, so it inflates small functions)",
            "worker": _cprofile_top(worker_prof, limit),
            "serve": _cprofile_top(server_prof, limit)}


def _py_spy_run(py_spy: str, root: Path, source: Path, n: int, limit: int) -> dict[str, Any]:
    """The default server and its workers, sampled together by py-spy."""
    raw = root / "py-spy.txt"
    with running_server(root / "profile-data", root / "profile-serve.log") as (base, pid), \
            ProcessMonitor(pid) as monitor:
        wait_until_idle(monitor, os.cpu_count() or 1)
        spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--subprocesses",
                                "--rate", "100", "--format", "raw", "--nonblocking",
                                "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)  # py-spy attaching
            run_batch(base, source, root / "profile-output.jsonl", n, DEFAULT_CHUNK_SIZE)
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    return {"tool": "py-spy (sampling at 100 Hz; all workers together; shares of the samples "
                    "where a thread was working)",
            **_py_spy_top(raw, limit)}


#: py-spy frames (function names) where a thread waits rather than works.
_PY_SPY_IDLE = frozenset({"Condition.wait", "EpollSelector.select", "Thread._wait_for_tstate_lock",
                          "Event.wait", "Queue.get"})


def _py_spy_top(raw: Path, limit: int) -> dict[str, Any]:
    """Own-time shares per role from py-spy's collapsed stacks (`frame;frame;... count`),
    by function, waits left out."""
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    cumulative: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        processes = [i for i, f in enumerate(frames) if f.startswith("process ")]
        if not processes or processes[-1] == len(frames) - 1:
            continue
        role = "worker" if " worker " in frames[processes[-1]] else "serve"
        # `name (/path/to/file.py:LINE)` -> `name (file.py)`
        functions = [re.sub(r"\((?:\S*?/(?:site-packages|python3\.\d+|main)/)?([^():]+)"
                            r"(?::\d+)?\)", r"(\1)", f) for f in frames[processes[-1] + 1:]]
        if functions[-1].split(" (")[0] in _PY_SPY_IDLE:
            continue
        own[role][functions[-1]] += int(count)
        for function in set(functions):
            cumulative[role][function] += int(count)
    result = {}
    for role in ("worker", "serve"):
        total = sum(own[role].values()) or 1
        result[role] = [{"function": f, "own_pct": round(100 * c / total, 1),
                         "cumulative_pct": round(100 * cumulative[role][f] / total, 1)}
                        for f, c in own[role].most_common(limit)]
    return result


def profile(kind: str, root: Path, source: Path, n: int, limit: int = 10) -> dict[str, Any]:
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable)
                                                                       .parent))
    if kind == "py-spy" or (kind == "auto" and py_spy):
        if not py_spy:
            raise SystemExit("py-spy is not installed (pip install py-spy)")
        found = _py_spy_run(py_spy, root, source, n, limit)
    else:
        found = _cprofile_run(root, source, n, limit)
    return {"lines": n, **found}


# -- the machine and the report --------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        ram_kb = int(meminfo.readline().split()[1])
    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    return {"nproc": os.cpu_count(), "ram_gib": round(ram_kb / 2**20, 1), "cpu": cpu,
            "python": platform.python_version(), "loadavg_at_start": " ".join(load),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _phase_table(e: dict[str, Any]) -> list[str]:
    return ["| phase | seconds |", "| --- | ---: |",
            *(f"| {phase} | {e[phase + '_s']} |" for phase in
              ("upload", "create", "validation", "execution", "finalizing", "download",
               "total"))]


def _process_table(processes: list[dict[str, Any]]) -> list[str]:
    return ["| process | pid | peak RSS (MB) | CPU s by phase |", "| --- | ---: | ---: | --- |",
            *(f"| {p['role']} | {p['pid']} | {p['peak_rss_mb']} | "
              f"{', '.join(f'{k} {v}' for k, v in p['cpu_s'].items() if v)} |"
              for p in processes)]


def _profile_tables(found: dict[str, Any]) -> list[str]:
    out = [f"Profile: {found['tool']}, {found['lines']:,} lines."]
    for role in ("worker", "serve"):
        out += ["", f"Top functions by own time, {role}:", "",
                "| function | own % | cumulative % |", "| --- | ---: | ---: |"]
        out += [f"| `{h['function']}` | {h['own_pct']} | {h['cumulative_pct']} |"
                for h in found[role]]
    return out


def markdown(report: dict[str, Any]) -> str:
    m, b, e, s = report["machine"], report["baseline"], report["batchery"], report["store"]
    out = [
        f"- command: `{report['command']}`",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB, Python {m['python']};"
        f" load average at start {m['loadavg_at_start']}; {m['date']}",
        f"- input: {report['lines']:,} lines, {report['input_mb']} MB",
        f"- baseline: {b['seconds']} s ({b['cpu_s']} CPU s), **{b['lines_per_s']:,} lines/s**",
        f"- Batchery end to end: {e['total_s']} s, **{e['lines_per_s']:,} lines/s** "
        f"({report['workers']} workers)",
        f"- ratio Batchery / baseline: **{report['ratio']}**",
        "", *_phase_table(e), "",
        f"- batch timestamps (s): {e['server_timestamps']}",
        f"- chunks: {e['chunks']}; execution time per chunk: {e['chunk_cost_ms']} ms; "
        f"worker CPU per chunk during execution: {report['worker_cpu_ms_per_chunk']} ms "
        f"(the baseline: {report['baseline_cpu_ms_per_1000_lines']} ms per 1000 lines)",
        f"- store round trip (SQLite): claim + complete {s['claim_complete_ms']} ms; "
        f"empty claim_phase {s['empty_claim_phase_ms']} ms",
        f"- output: {e['output_bytes']:,} bytes, every custom_id once: {e['output_ok']}",
        f"- CPU s used during the batch by this benchmark's client: "
        f"{report['elsewhere']['benchmark_client']}, by other processes on the machine: "
        f"{report['elsewhere']['other_processes']}",
        "", *_process_table(report["processes"]),
    ]
    if report.get("profile"):
        out += ["", *_profile_tables(report["profile"])]
    return "\n".join(out)


def _chunk_size(serve_args: list[str]) -> int:
    if "--chunk-size" in serve_args:
        return int(serve_args[serve_args.index("--chunk-size") + 1])
    return DEFAULT_CHUNK_SIZE


def _batchery_run(root: Path, source: Path, args: argparse.Namespace,
                  report: dict[str, Any]) -> None:
    extra = [*([] if args.workers is None else ["--workers", str(args.workers)]),
             *args.serve_arg]
    with running_server(root / "data", root / "serve.log", extra=extra) as (base, pid), \
            ProcessMonitor(pid) as monitor:
        wait_until_idle(monitor, args.workers if args.workers is not None
                        else os.cpu_count() or 1)
        run = run_batch(base, source, root / "output.jsonl", args.lines, _chunk_size(extra),
                        on_phase=monitor.mark)
    if not run.output_ok:
        raise SystemExit("the output does not hold every custom_id exactly once")
    processes = monitor.processes()
    workers = [p for p in processes if p["role"] == "worker"]
    report.update(
        batchery={**{k: round(v, 2) if isinstance(v, float) else v
                     for k, v in asdict(run).items()},
                  "lines_per_s": round(run.lines_per_s),
                  "chunk_cost_ms": round(run.chunk_cost_ms, 2)},
        ratio=round(run.lines_per_s / report["baseline"]["lines_per_s"], 3),
        processes=processes, workers=len(workers),
        worker_cpu_ms_per_chunk=round(1000 * sum(p["cpu_s"].get("in_progress", 0.0)
                                                 for p in workers) / run.chunks, 2),
        elsewhere=monitor.elsewhere_cpu_s("upload", "done"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--profiler", choices=("auto", "py-spy", "cprofile", "none"),
                        default="auto", help="auto: py-spy when installed, else cProfile")
    parser.add_argument("--profile-lines", type=int, default=200_000,
                        help="lines in the profiled run (at most --lines)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--workers", type=int,
                        help="pass --workers to batchery serve (default: its own default, one "
                             "per CPU); for experiments only")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG on to batchery serve (repeat it: --serve-arg=--chunk-size "
                             "--serve-arg=5000); for experiments only")
    args = parser.parse_args()

    report: dict[str, Any] = {"command": " ".join([".venv/bin/python", *sys.argv]),
                              "machine": machine(), "lines": args.lines}
    root = Path(tempfile.mkdtemp(prefix="batchery-bench-"))
    try:
        source = root / "input.jsonl"
        report["input_mb"] = round(generate_input(source, args.lines) / 1e6, 1)
        print(f"input: {args.lines:,} lines in {root}", file=sys.stderr)

        seconds, cpu = run_baseline(source, root / "baseline-output.jsonl")
        report["baseline"] = {"seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
                              "lines_per_s": round(args.lines / seconds)}
        report["baseline_cpu_ms_per_1000_lines"] = round(1e6 * cpu / args.lines, 2)
        print(f"baseline: {seconds:.2f} s", file=sys.stderr)

        _batchery_run(root, source, args, report)
        print(f"batchery: {report['batchery']['total_s']:.2f} s", file=sys.stderr)

        report["store"] = store_round_trip(root / "store-bench.db")
        if args.profiler != "none":
            n = min(args.profile_lines, args.lines)
            profile_source = source if n == args.lines else root / "profile-input.jsonl"
            if n != args.lines:
                generate_input(profile_source, n)
            report["profile"] = profile(args.profiler, root, profile_source, n)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
