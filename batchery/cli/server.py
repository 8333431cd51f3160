"""`batchery serve`, `batchery worker` and `batchery keys`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

from batchery import auth
from batchery.batches import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_TASKS
from batchery.chunks import DEFAULT_LEASE_S
from batchery.cli.options import ChunkSize, DatabaseUrl, DataDir, FilesUrl, LeaseSeconds, MaxTasks
from batchery.exceptions import ConfigError
from batchery.runtime import open_runtime
from batchery.settings import DEFAULT_DATA_DIR, Settings
from batchery.worker import Worker

console = Console(stderr=True)
keys_app = typer.Typer(help="Manage API keys (stored hashed).", no_args_is_help=True)
log = logging.getLogger("batchery")


def _default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(worker)


def serve(
    host: Annotated[str, typer.Option(envvar="BATCHERY_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="BATCHERY_PORT")] = 8000,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
    files_url: FilesUrl = None,
    config: Annotated[Path | None, typer.Option(
        "--config", envvar="BATCHERY_CONFIG", exists=True, dir_okay=False,
        help="YAML file declaring deployments.")] = None,
    keys_file: Annotated[Path | None, typer.Option(
        "--keys-file", envvar="BATCHERY_KEYS_FILE",
        help="YAML file of hashed API keys; without it any key is accepted.")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", envvar="BATCHERY_WORKERS", min=0,
        help="Worker processes to run beside the API (0: the API alone). "
             "Default: one per CPU.")] = None,
    chunk_size: ChunkSize = DEFAULT_CHUNK_SIZE,
    lease_seconds: LeaseSeconds = DEFAULT_LEASE_S,
    max_tasks: MaxTasks = DEFAULT_MAX_TASKS,
    message_batch_window: Annotated[int, typer.Option(
        "--message-batch-window", envvar="BATCHERY_MESSAGE_BATCH_WINDOW", min=1,
        help="Seconds before an Anthropic message batch expires (24 h as hosted).")] = 86_400,
    log_level: Annotated[str, typer.Option(envvar="BATCHERY_LOG_LEVEL")] = "info",
) -> None:
    """Run the HTTP API and a pool of worker processes."""
    import uvicorn

    from batchery.api.app import create_app

    _logging(log_level)
    settings = Settings(data_dir=data_dir, database_url=database_url, files_url=files_url,
                        config=config, keys_file=keys_file, chunk_size=chunk_size,
                        lease_s=lease_seconds, max_tasks=max_tasks,
                        message_batch_window_s=message_batch_window)
    pool = WorkerPool(settings, _default_workers() if workers is None else workers, log_level)
    try:
        runtime = open_runtime(settings, publish_deployments=True)
        app = create_app(runtime, on_shutdown=pool.stop)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    pool.start()
    names = ", ".join(d.name for d in runtime.store.list_deployments())
    console.print(f"Batchery on http://{host}:{port}/v1 with {pool.size} worker(s); "
                  f"deployments: {names}; data: {settings.data_dir.resolve()}")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(),
                    timeout_graceful_shutdown=5)
    finally:
        pool.stop()
        runtime.close()


class WorkerPool:
    """Worker subprocesses of `batchery serve`, restarted when they die."""

    def __init__(self, settings: Settings, size: int, log_level: str) -> None:
        self.settings = settings
        self.size = size
        self.log_level = log_level
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="worker-pool", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The worker asks the kernel to SIGTERM it if this process dies, even by SIGKILL.
        env = {**os.environ, POOL_PARENT_ENV: str(os.getpid())}
        return subprocess.Popen(self._command(), env=env)

    def _command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "batchery", "worker", "--data-dir", str(s.data_dir),
               "--lease-seconds", str(s.lease_s), "--log-level", self.log_level]
        if s.database_url:
            cmd += ["--database-url", s.database_url]
        if s.files_url:
            cmd += ["--files-url", s.files_url]
        return cmd

    def start(self) -> None:
        self._procs = [self._spawn() for _ in range(self.size)]
        if self.size:
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, proc in enumerate(self._procs):
                if proc.poll() is not None and not self._stopping.is_set():
                    log.warning("worker pid %d exited with %s; starting another", proc.pid,
                                proc.returncode)
                    self._procs[i] = self._spawn()

    def stop(self, grace_s: float = 35.0) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def worker(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
    files_url: FilesUrl = None,
    lease_seconds: LeaseSeconds = DEFAULT_LEASE_S,
    grace_seconds: Annotated[float, typer.Option(
        help="After SIGTERM, how long the chunk in hand may run before it is "
             "handed back.")] = 30.0,
    log_level: Annotated[str, typer.Option(envvar="BATCHERY_LOG_LEVEL")] = "info",
) -> None:
    """Join the work: claim chunks from the store and run them. Stops cleanly on SIGTERM."""
    import dataclasses

    _logging(log_level)
    _exit_with_pool_parent()
    settings = Settings(data_dir=data_dir, database_url=database_url, files_url=files_url,
                        lease_s=lease_seconds)
    runtime = open_runtime(settings)
    config = dataclasses.replace(settings.worker_config(), grace_s=grace_seconds)
    the_worker = Worker(runtime.store, runtime.files, config)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        the_worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        the_worker.run()
    finally:
        runtime.close()


#: Set by `batchery serve` for its workers: the pid of the serving process.
POOL_PARENT_ENV = "BATCHERY_POOL_PARENT"
_PR_SET_PDEATHSIG = 1


def _exit_with_pool_parent() -> None:
    """A pool worker stops (SIGTERM, so cleanly) when its `batchery serve` dies."""
    parent = os.environ.get(POOL_PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


@keys_app.command("create")
def create_key(
    project: Annotated[str, typer.Option(help="The project the key belongs to.")],
    keys_file: Annotated[Path, typer.Option("--keys-file", envvar="BATCHERY_KEYS_FILE")],
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
) -> None:
    """Create an API key: prints it once, and stores only its hash."""
    key = auth.add_key(keys_file, project, name)
    typer.echo(key)
