"""`batchery serve` and `batchery worker`."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from batchery import backends
from batchery.cli.options import ChunkSize, DatabaseUrl, DataDir, FilesUrl, LeaseSeconds, MaxTasks
from batchery.model.batches import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_TASKS
from batchery.model.deployments import API, Deployment, WorkerPoolSpec
from batchery.model.exceptions import ConfigError
from batchery.model.leases import DEFAULT_LEASE_S
from batchery.ports.store import Store
from batchery.runtime import open_runtime
from batchery.security.auth import KeyRing
from batchery.security.trust import TrustPolicy
from batchery.settings import DEFAULT_DATA_DIR, Settings
from batchery.workers import worker as new_worker

console = Console(stderr=True)
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
    allow_code_deployments: Annotated[bool, typer.Option(
        "--allow-code-deployments", envvar="BATCHERY_ALLOW_CODE_DEPLOYMENTS",
        help="Let admin keys create `python` (code) deployments over REST.")] = False,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow listening beyond loopback without a keys file "
                           "(anyone who reaches the port may do anything).")] = False,
    log_level: Annotated[str, typer.Option(envvar="BATCHERY_LOG_LEVEL")] = "info",
) -> None:
    """Run the HTTP API and a pool of worker processes."""
    import uvicorn

    from batchery.api.app import create_app

    _logging(log_level)
    if keys_file is None and not insecure and not _is_loopback(host):
        console.print(
            f"[red]error:[/red] without --keys-file, Batchery runs in open mode (any caller may do "
            f"anything), so it listens only on loopback; refusing --host {host}. Give a keys "
            f"file (`batchery keys create --project NAME --role admin --keys-file FILE`), or "
            f"--insecure if every machine that can reach this port is trusted.")
        raise typer.Exit(2)
    settings = Settings(data_dir=data_dir, database_url=database_url, files_url=files_url,
                        config=config, keys_file=keys_file, chunk_size=chunk_size,
                        lease_s=lease_seconds, max_tasks=max_tasks,
                        message_batch_window_s=message_batch_window,
                        allow_code_deployments=allow_code_deployments)
    size = _default_workers() if workers is None else workers
    pool = WorkerPool(settings, size, log_level)
    try:
        keys = KeyRing.load(keys_file)
        runtime = open_runtime(settings, publish_deployments=True)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    # Jobs run on each deployment's own pool; `--workers 0` means the API alone.
    job_pools = DeploymentPools(settings, runtime.store, log_level, enabled=size > 0,
                                 policy=runtime.policy)

    def stop_all() -> None:
        job_pools.stop()
        pool.stop()

    app = create_app(runtime, keys, on_shutdown=stop_all)
    pool.start()
    job_pools.start()
    names = ", ".join(d.name for d in runtime.store.list_deployments() if not d.endpoint)
    console.print(f"Batchery on http://{host}:{port}/v1 with {pool.size} worker(s); "
                  f"deployments: {names}; data: {settings.data_dir.resolve()}")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(),
                    timeout_graceful_shutdown=5)
    finally:
        stop_all()
        runtime.close()


def _is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _spawn_worker(settings: Settings, log_level: str, *extra: str) -> subprocess.Popen[bytes]:
    # The worker asks the kernel to SIGTERM it if this process dies, even by SIGKILL.
    env = {**os.environ, POOL_PARENT_ENV: str(os.getpid())}
    cmd = [sys.executable, "-m", "batchery", "worker", "--data-dir", str(settings.data_dir),
           "--lease-seconds", str(settings.lease_s), "--log-level", log_level, *extra]
    if settings.database_url:
        cmd += ["--database-url", settings.database_url]
    if settings.files_url:
        cmd += ["--files-url", settings.files_url]
    return subprocess.Popen(cmd, env=env)


def _terminate(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class WorkerPool:
    """The worker subprocesses of `batchery serve` that run the OpenAI and Anthropic
    batches, restarted when they die."""

    def __init__(self, settings: Settings, size: int, log_level: str) -> None:
        self.settings = settings
        self.size = size
        self.log_level = log_level
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="worker-pool", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        return _spawn_worker(self.settings, self.log_level, "--no-jobs")

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
        _terminate(self._procs, grace_s)


#: The pool of a `python` deployment that declares none.
DEFAULT_JOB_POOL = WorkerPoolSpec(min=0, max=1, idle_seconds=120.0)
#: How often the pools are resized, in seconds.
SCALE_EVERY_S = 1.0
#: How long a deleted deployment's worker may take to stop after SIGTERM, in seconds.
RETIRE_GRACE_S = 5.0
#: Open mode's policy, for pools built without one.
_OPEN_POLICY = TrustPolicy()


@dataclass
class _PoolWorker:
    proc: subprocess.Popen[bytes]
    permanent: bool  #: one of the pool's `min`; the others exit when idle


class DeploymentPools:
    """A pool of worker processes per `python` deployment, sized to its jobs' queue:
    `min` workers always, one more per batch its jobs could run at once up to `max`. Extra
    workers exit by themselves after `idle_seconds` without work; a worker that dies (a
    predictor that crashed its process) is replaced while there is work for it.

    The pools of deployments made over the API run at most the operator's
    `max_api_pool_processes` processes together. A deployment that is deleted (or changes)
    has its workers stopped: SIGTERM, then SIGKILL after `RETIRE_GRACE_S`."""

    def __init__(self, settings: Settings, store: Store, log_level: str, *,
                 enabled: bool = True, policy: TrustPolicy = _OPEN_POLICY) -> None:
        self.settings, self.store, self.log_level = settings, store, log_level
        self.enabled = enabled
        self.policy = policy
        self._pools: dict[str, list[_PoolWorker]] = {}
        #: What each pool was started for: a deployment that differs now is another one.
        self._served: dict[str, Deployment] = {}
        #: Workers told to stop, with the monotonic time at which they are killed.
        self._retiring: list[tuple[subprocess.Popen[bytes], float]] = []
        self._at_cap = False  #: whether the cap on API pools was logged (once per spell)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-pools", daemon=True)

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(SCALE_EVERY_S):
            try:
                self.scale()
            except Exception:
                log.exception("could not resize the deployments' worker pools")

    def scale(self) -> None:
        demand = self.store.job_demand()
        wanted = {d.name: d for d in self.store.list_deployments()
                  if backends.serves_jobs(d.backend) and not d.alias_of}
        self._retire_gone(wanted)
        room = self.policy.limits.max_api_pool_processes - sum(
            len(self._reap(name)) for name, d in wanted.items() if d.source == API)
        refused = False
        for deployment in wanted.values():
            budget = room if deployment.source == API else None
            started, short = self._grow(deployment, demand.get(deployment.name, 0), budget)
            if deployment.source == API:
                room -= started
            refused = refused or short
        if refused and not self._at_cap:
            log.warning("the deployments made over the API run %d worker processes, this "
                        "server's cap (security.max_api_pool_processes); starting no more",
                        self.policy.limits.max_api_pool_processes)
        self._at_cap = refused
        self._finish_retiring()

    def _grow(self, deployment: Deployment, demand: int, budget: int | None
              ) -> tuple[int, bool]:
        """Start workers up to the pool's target, at most `budget` (None: no cap). Returns
        how many started, and whether the budget held some back."""
        spec = deployment.workers or DEFAULT_JOB_POOL
        workers = self._reap(deployment.name)
        self._served[deployment.name] = deployment
        target = max(spec.min, min(spec.max, demand))
        started = 0
        while len(workers) < target and not self._stopping.is_set():
            if budget is not None and started >= budget:
                return started, True
            permanent = sum(w.permanent for w in workers) < spec.min
            extra = [] if permanent else ["--idle-exit", str(spec.idle_seconds)]
            proc = _spawn_worker(self.settings, self.log_level, "--no-batches",
                                 "--deployment", deployment.name, *extra)
            workers.append(_PoolWorker(proc=proc, permanent=permanent))
            started += 1
            log.info("started worker pid %d for deployment %s (%d of at most %d)",
                     proc.pid, deployment.name, len(workers), spec.max)
        return started, False

    def _retire_gone(self, wanted: dict[str, Deployment]) -> None:
        """SIGTERM the workers of deployments deleted, or changed, since they started."""
        for name in list(self._pools):
            if name in wanted and self._served.get(name) == wanted[name]:
                continue
            kill_at = time.monotonic() + RETIRE_GRACE_S
            for worker in self._pools.pop(name):
                if worker.proc.poll() is None:
                    worker.proc.send_signal(signal.SIGTERM)
                    self._retiring.append((worker.proc, kill_at))
                    log.info("stopping worker pid %d: its deployment %s is gone or changed",
                             worker.proc.pid, name)
            self._served.pop(name, None)

    def _finish_retiring(self) -> None:
        """Reap the retired workers that exited; SIGKILL those past their grace."""
        now = time.monotonic()
        still: list[tuple[subprocess.Popen[bytes], float]] = []
        for proc, kill_at in self._retiring:
            if proc.poll() is not None:
                continue  # poll() reaped it
            if now < kill_at:
                still.append((proc, kill_at))
                continue
            log.warning("worker pid %d did not stop within %gs of SIGTERM; killing it",
                        proc.pid, RETIRE_GRACE_S)
            proc.kill()
            proc.wait()
        self._retiring = still

    def _reap(self, name: str) -> list[_PoolWorker]:
        workers = self._pools.setdefault(name, [])
        for worker in list(workers):
            code = worker.proc.poll()
            if code is None:
                continue
            workers.remove(worker)
            if code != 0:
                log.warning("worker pid %d of deployment %s exited with %s", worker.proc.pid,
                            name, code)
        return workers

    def stop(self, grace_s: float = 35.0) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        _terminate([w.proc for pool in self._pools.values() for w in pool]
                   + [proc for proc, _ in self._retiring], grace_s)


def worker(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
    files_url: FilesUrl = None,
    lease_seconds: LeaseSeconds = DEFAULT_LEASE_S,
    grace_seconds: Annotated[float, typer.Option(
        help="After SIGTERM, how long the chunk in hand may run before it is "
             "handed back.")] = 30.0,
    jobs: Annotated[bool, typer.Option(
        "--jobs/--no-jobs", help="Run jobs of the native job API.")] = True,
    batches: Annotated[bool, typer.Option(
        "--batches/--no-batches", help="Run OpenAI and Anthropic batches.")] = True,
    deployment: Annotated[list[str] | None, typer.Option(
        "--deployment", help="Only run jobs of this deployment (endpoint/name); "
                             "repeatable. Default: all.")] = None,
    idle_exit: Annotated[float | None, typer.Option(
        "--idle-exit", min=0.1, help="Exit after this many seconds without work.")] = None,
    log_level: Annotated[str, typer.Option(envvar="BATCHERY_LOG_LEVEL")] = "info",
) -> None:
    """Join the work: claim chunks from the store and run them. Stops cleanly on SIGTERM."""
    import dataclasses

    _logging(log_level)
    _exit_with_pool_parent()
    settings = Settings(data_dir=data_dir, database_url=database_url, files_url=files_url,
                        lease_s=lease_seconds)
    runtime = open_runtime(settings)
    config = dataclasses.replace(
        settings.worker_config(), grace_s=grace_seconds, jobs=jobs, batches=batches,
        deployments=frozenset(deployment) if deployment else None, idle_exit_s=idle_exit)
    the_worker = new_worker(runtime.store, runtime.files, config)

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

