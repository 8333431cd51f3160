"""Shared parts of the lease-engine proof tests (`test_one_engine_*`): a `batchery serve`
on SQLite or on its own PostgreSQL database, worker processes that a test starts, kills
and replaces, and waiting with deadlines."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import yaml
from openai import OpenAI

from tests.conftest import Server

T = TypeVar("T")

PREDICTORS = Path(__file__).resolve().parent.parent / "predictors"
#: Every proof test runs on both stores; PostgreSQL ones get a fresh database each.
DATABASES = [pytest.param("sqlite", id="sqlite"),
             pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]
#: Short leases: a killed worker's work comes back within seconds.
LEASE_S = 2.0
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class Database:
    """Where a server and its workers keep their state: `args` for both command lines."""

    kind: str
    args: tuple[str, ...] = ()


def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """The store a parametrized test runs on (its `request.param`). On PostgreSQL the
    files go to a shared folder too, as they would for workers on other machines."""
    if request.param == "sqlite":
        return Database("sqlite")
    url = request.getfixturevalue("pg_url")
    return Database("postgres", ("--database-url", url,
                                 "--files-url", str(tmp_path / "shared-files")))


def serve(server_factory: Any, db: Database, config: Path, *args: str) -> Server:
    server: Server = server_factory("--config", str(config), *db.args, *args)
    return server


def write_config(path: Path, deployments: list[dict[str, Any]] | None = None,
                 endpoints: list[dict[str, Any]] | None = None) -> Path:
    document: dict[str, Any] = {}
    if deployments:
        document["deployments"] = deployments
    if endpoints:
        document["endpoints"] = endpoints
    path.write_text(yaml.safe_dump(document))
    return path


def echo(name: str, latency_ms: float) -> dict[str, Any]:
    return {"name": name, "backend": "echo", "options": {"latency_ms": latency_ms}}


def python(name: str, config: dict[str, Any] | None = None,
           workers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `python` deployment of `engine_predictors.PidEcho`."""
    found: dict[str, Any] = {"name": name, "backend": "python", "options": {
        "predictor": "engine_predictors:PidEcho", "python_path": [str(PREDICTORS)],
        "config": config or {}}}
    if workers is not None:
        found["workers"] = workers
    return found


# -- worker processes ----------------------------------------------------------------

@dataclass
class Workers:
    """`batchery worker` processes a test runs beside a server started with `--workers 0`;
    each has a log of its own. `lease_s` None: the default lease."""

    server: Server
    db: Database
    log_dir: Path
    lease_s: float | None = LEASE_S
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: int = 0

    def start(self, n: int) -> None:
        self.procs.extend(self._spawn() for _ in range(n))

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.started += 1
        lease = [] if self.lease_s is None else ["--lease-seconds", str(self.lease_s)]
        cmd = [sys.executable, "-m", "batchery", "worker",
               "--data-dir", str(self.server.data_dir), *self.db.args, *lease]
        with (self.log_dir / f"worker-{self.started}.log").open("wb") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def kill(self, i: int) -> None:
        """SIGKILL worker `i` (nothing runs on its way out), and start another in its place."""
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()
        self.procs[i] = self._spawn()

    def replace_dead(self) -> int:
        """Start a worker in place of each that exited; returns how many had."""
        dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
        for i in dead:
            self.procs[i] = self._spawn()
        return len(dead)

    def pids(self) -> set[int]:
        return {p.pid for p in self.procs}

    def log(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.log_dir.glob("worker-*.log")))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def live_workers(server: Server) -> int:
    """Workers that report to the store and have not stopped, by `/metrics`."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return sum(int(float(n)) for n in re.findall(r"^batchery_workers\{[^}]*\} (\S+)$", text,
                                                 flags=re.MULTILINE))


def is_batchery_worker(pid: int) -> bool:
    """Whether `pid` is still a `batchery worker` process: checked before each kill, so a
    pid the kernel reused is never signalled."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"batchery" in args and b"worker" in args


def sigkill(pid: int) -> bool:
    if not is_batchery_worker(pid):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


# -- waiting ---------------------------------------------------------------------------

def until(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.1,
          detail: Callable[[], str] = lambda: "") -> T:
    """The first truthy value of `check()`, polled until `timeout` seconds have passed;
    `detail()` adds to the failure's message (a log's tail, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail()}")
        time.sleep(every)


def wait_batch(client: OpenAI, batch_id: str, timeout: float,
               between: Callable[[], None] = lambda: None) -> Any:
    """The batch once it has ended; `between` runs after each look (to kill workers...)."""
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in TERMINAL:
        assert time.monotonic() < deadline, \
            f"batch still {batch.status} after {timeout}s: {batch.request_counts}"
        between()
        time.sleep(0.2)
    return batch


def file_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in client.files.content(file_id).content.splitlines() if x]


def custom_ids(lines: list[dict[str, Any]]) -> list[str]:
    return [line["custom_id"] for line in lines]


# -- looking inside: the shared store and file store, and pausing workers ---------------

def _arg(db: Database, name: str) -> str | None:
    args = list(db.args)
    return args[args.index(name) + 1] if name in args else None


def store_url(server: Server, db: Database) -> str:
    """The database that `server` and its workers share."""
    return _arg(db, "--database-url") or f"sqlite:///{server.data_dir.resolve() / 'batchery.db'}"


def files_root(server: Server, db: Database) -> Path:
    """The folder of the file store that `server` and its workers share."""
    return Path(_arg(db, "--files-url") or server.data_dir / "files")


def files_under(root: Path, prefix: str) -> list[str]:
    """The files (not folders) under `prefix` of the file store at `root`."""
    base = root / prefix
    return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file()) \
        if base.exists() else []


def unreferenced_blobs(root: Path, file_ids: set[str]) -> list[str]:
    """Blobs under `files/` that no file record names (by id: `files/<file id>`)."""
    return [key for key in files_under(root, "files") if key.split("/", 1)[1] not in file_ids]


def sigstop(pid: int) -> bool:
    if not is_batchery_worker(pid):
        return False
    os.kill(pid, signal.SIGSTOP)
    return True


def sigcont(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
