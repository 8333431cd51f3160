"""`batchery serve` and `batchery worker`."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from batchery import backends
from batchery.backends.threads import HOST_WORKERS_ENV
from batchery.cli import api_procs
from batchery.cli.options import ChunkSize, DatabaseUrl, DataDir, FilesUrl, LeaseSeconds, MaxTasks
from batchery.model.batches import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_TASKS
from batchery.model.deployments import API, Resources, WorkerPoolSpec, widest
from batchery.model.exceptions import ConfigError
from batchery.model.leases import DEFAULT_LEASE_S
from batchery.model.owners import HEARTBEAT_S, OwnershipConflict
from batchery.ports.store import Store
from batchery.queue.pool import Executor, PoolPlan, Supervisor
from batchery.queue.worker import WorkerConfig
from batchery.runtime import Runtime, open_runtime
from batchery.security.auth import KeyRing
from batchery.security.trust import TrustPolicy
from batchery.settings import DEFAULT_DATA_DIR, Settings
from batchery.stores.sql.store import SqlStore
from batchery.workers import worker as new_worker

#: Errors stay one line whatever the terminal's width.
console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("batchery")


def _default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(worker)


#: Whether workers load the config's in-process models before they claim work.
PRELOAD_ENV = "BATCHERY_PRELOAD"
Preload = Annotated[bool, typer.Option(
    "--preload/--no-preload", envvar=PRELOAD_ENV,
    help="Workers load the config's in-process models (sentence-transformers, llama-cpp, "
         "vllm; see each deployment's `preload` option) before they take work: a warm pool. "
         "--no-preload loads each on its first request.")]


def serve(
    host: Annotated[str, typer.Option(envvar="BATCHERY_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="BATCHERY_PORT", min=0, max=65535)] = 8000,
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
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", envvar="BATCHERY_RAY_ADDRESS",
        help="Run every worker pool as actors on the Ray cluster at this address "
             "(host:port, or `auto`); needs the `ray` extra.")] = None,
    take_over: Annotated[bool, typer.Option(
        "--take-over", help="Replace deployments and endpoints that another running server "
                            "on this store declared differently.")] = False,
    api_workers: Annotated[int, typer.Option(
        "--api-workers", envvar="BATCHERY_API_WORKERS", min=1,
        help="Processes serving the HTTP API on the one port (reads spread over them).")] = 1,
    preload: Preload = True,
) -> None:
    """Run the HTTP API and a pool of worker processes."""
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
                        allow_code_deployments=allow_code_deployments, take_over=take_over)
    size = _default_workers() if workers is None else workers
    # The workers' in-process models share this host's cores out among them (an operator
    # running more on this host may set it higher).
    os.environ.setdefault(HOST_WORKERS_ENV, str(max(1, size)))
    os.environ[PRELOAD_ENV] = "true" if preload else "false"  # its workers read it
    _check_port(host, port)
    try:
        keys = KeyRing.load(keys_file)
        runtime = open_stores(settings, publish_deployments=True)
    except OwnershipConflict as exc:
        for line in exc.lines:
            console.print(f"[red]error:[/red] {escape(line)}", highlight=False)
        raise typer.Exit(2) from None
    except ConfigError as exc:
        message = str(exc)
        if config is not None and message.startswith("deployment '"):
            message = f"{config}: {message}"  # name the file the deployment is in
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        raise typer.Exit(2) from None
    alive = Alive(runtime.store, settings.server_identity().id)
    executor = None
    if ray_address:
        from batchery.cli import ray_pools

        try:
            executor = ray_pools.executor(ray_address, settings, log_level, runtime)
        except typer.Exit:
            runtime.close()
            raise
    # Jobs run on each deployment's own pool; `--workers 0` means the API alone.
    pools = supervisor(settings, runtime.store, log_level, batch_workers=size,
                       policy=runtime.policy, executor=executor)

    def on_shutdown() -> None:  # uvicorn ends the process by the signal it caught after this
        pools.stop()
        alive.stop()

    app = create_app(runtime, keys, on_shutdown=on_shutdown)
    alive.start()
    pools.start()
    names = ", ".join(d.name for d in runtime.store.list_deployments() if not d.endpoint)
    where = f" on Ray at {ray_address}" if ray_address else ""
    console.print(f"Batchery on http://{host}:{port}/v1 with {size} worker(s){where}; "
                  f"deployments: {names}; database: {redacted(settings.db_url)}; "
                  f"files: {redacted(settings.file_store_url)}", highlight=False)
    try:
        api_procs.serve(app, settings, host=host, port=port, log_level=log_level,
                        processes=api_workers)
    finally:
        pools.stop()
        alive.stop()
        if executor is not None:
            executor.close()
        runtime.close()


def open_stores(settings: Settings, *, publish_deployments: bool = False) -> Runtime:
    """`open_runtime`, with a database or data directory that cannot be opened reported as
    a `ConfigError` that names the option, not as a driver's traceback."""
    import sqlalchemy.exc

    if settings.database_url:
        what = f"--database-url {redacted(settings.database_url)}"
    else:
        what = f"--data-dir {settings.data_dir}: the SQLite database {settings.db_url}"
    try:
        return open_runtime(settings, publish_deployments=publish_deployments)
    except (sqlalchemy.exc.ArgumentError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"{what} is not a database URL Batchery can open ({_first_line(exc)}); valid: "
            f"postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH/TO/FILE.db") from None
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        raise ConfigError(f"{what}: cannot connect: {_first_line(exc.orig or exc)}") from None
    except OSError as exc:
        raise ConfigError(f"--data-dir {settings.data_dir}: cannot use it: "
                          f"{exc.strerror or exc} ({exc.filename or settings.data_dir})") \
            from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _check_port(host: str, port: int) -> None:
    """Refuse, in a sentence and before anything starts, a port that cannot be listened
    on (taken by another process, or a host that is not this machine's)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        console.print(f"[red]error:[/red] --host {escape(host)}: not an address or name of "
                      f"this machine ({exc.strerror or exc})", highlight=False)
        raise typer.Exit(2) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            reason = ("another process listens on it (another `batchery serve`?); choose "
                      "another with --port" if taken else f"{exc.strerror or exc}")
            console.print(f"[red]error:[/red] --port {port} on {escape(host)}: cannot listen: "
                          f"{reason}", highlight=False)
            raise typer.Exit(2) from None


class Alive:
    """Says every `HEARTBEAT_S` in the store that this server runs, and at the end that it
    stopped: what it declared is then free for another server's config."""

    def __init__(self, store: SqlStore, server_id: str) -> None:
        self.store, self.server_id = store, server_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="server-heartbeat",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.heartbeat_server(self.server_id)
            except Exception:
                log.warning("could not record this server's heartbeat", exc_info=True)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(Exception):
            self.store.stop_server(self.server_id)


def redacted(url: str) -> str:
    """`url` without the password (or secret key) it may carry, for printing. The user
    information runs to the last `@`: a secret may hold `/` or `@` unescaped."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, host = rest.rsplit("@", 1)
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


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
    cmd = [sys.executable, "-m", "batchery", "worker", *worker_args(settings, log_level),
           *extra]
    return subprocess.Popen(cmd, env=env)


def worker_args(settings: Settings, log_level: str) -> list[str]:
    """The `batchery worker` arguments every worker of `serve` gets: the same stores."""
    args = ["--data-dir", str(settings.data_dir), "--lease-seconds", str(settings.lease_s),
            "--log-level", log_level]
    if settings.database_url:
        args += ["--database-url", settings.database_url]
    if settings.files_url:
        args += ["--files-url", settings.files_url]
    return args


#: The pool of a deployment serving jobs that declares none.
DEFAULT_JOB_POOL = WorkerPoolSpec(min=0, max=1, idle_seconds=120.0)
#: The batch workers' pool, in the supervisor's plan.
BATCH_POOL = "batches"


def batch_pool(size: int, resources: Resources | None = None) -> PoolPlan:
    """The worker processes of `batchery serve` that run the OpenAI and Anthropic batches:
    a fixed number, replaced when they die. Each may run any deployment's lines, so on a
    cluster each needs the most that a batch deployment declares (`batch_resources`)."""
    return PoolPlan(name=BATCH_POOL, minimum=size, maximum=size, demand=size,
                    args=("--no-jobs",), resources=resources, version=resources)


def batch_resources(store: Store) -> Resources | None:
    """The widest `resources` of the deployments that batches run (not those of jobs)."""
    return widest(d.workers.resources for d in store.list_deployments()
                  if d.workers and d.workers.resources and not d.alias_of
                  and not backends.serves_jobs(d.backend))


def job_pools(store: Store) -> list[PoolPlan]:
    """A pool per deployment that serves jobs, sized to its jobs' queue: `min` workers
    always, one more per batch its jobs could run at once up to `max`. Extra workers exit
    by themselves after `idle_seconds` without work; a worker that dies (a predictor that
    crashed its process) is replaced while there is work for it. The pools of deployments
    made over the API share the operator's `max_api_pool_processes`; a deployment that is
    deleted, or changes, has its workers stopped."""
    demand = store.job_demand()
    plans = []
    for d in store.list_deployments():
        if not backends.serves_jobs(d.backend) or d.alias_of:
            continue
        spec = d.workers or DEFAULT_JOB_POOL
        plans.append(PoolPlan(name=d.name, minimum=spec.min, maximum=spec.max,
                              demand=demand.get(d.name, 0), idle_s=spec.idle_seconds,
                              args=("--no-batches", "--deployment", d.name),
                              capped=d.source == API, version=d, resources=spec.resources))
    return plans


def supervisor(settings: Settings, store: Store, log_level: str, *, batch_workers: int,
               policy: TrustPolicy, executor: Executor | None = None) -> Supervisor:
    """The pools of `batchery serve`: its batch workers and, unless the API runs alone
    (`--workers 0`), the pools of the deployments that serve jobs."""
    def plan() -> list[PoolPlan]:
        wanted = batch_resources(store) if executor is not None else None
        return [batch_pool(batch_workers, wanted), *(job_pools(store) if batch_workers else [])]

    return Supervisor(lambda args: _spawn_worker(settings, log_level, *args), plan,
                      cap=policy.limits.max_api_pool_processes, executor=executor)



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
    preload: Preload = True,
    log_level: Annotated[str, typer.Option(envvar="BATCHERY_LOG_LEVEL")] = "info",
) -> None:
    """Join the work: claim chunks from the store and run them. Stops cleanly on SIGTERM."""
    _logging(log_level)
    _exit_with_pool_parent()
    settings, config = worker_settings(
        data_dir=data_dir, database_url=database_url, files_url=files_url,
        lease_seconds=lease_seconds, grace_seconds=grace_seconds, jobs=jobs, batches=batches,
        deployment=deployment, idle_exit=idle_exit, preload=preload)
    try:
        runtime = open_stores(settings)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    the_worker = new_worker(runtime.store, runtime.files, config, doorbell=runtime.doorbell)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        the_worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        the_worker.run()
    finally:
        runtime.close()


def worker_settings(*, data_dir: Path, database_url: str | None, files_url: str | None,
                    lease_seconds: float, grace_seconds: float, jobs: bool, batches: bool,
                    deployment: list[str] | None, idle_exit: float | None,
                    preload: bool = True, **_: object) -> tuple[Settings, WorkerConfig]:
    """The settings and the loop's configuration of a worker, from `batchery worker`'s
    options (a Ray actor parses the same arguments)."""
    settings = Settings(data_dir=data_dir, database_url=database_url, files_url=files_url,
                        lease_s=lease_seconds)
    config = dataclasses.replace(
        settings.worker_config(), grace_s=grace_seconds, jobs=jobs, batches=batches,
        deployments=frozenset(deployment) if deployment else None, idle_exit_s=idle_exit,
        preload=preload)
    return settings, config


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

