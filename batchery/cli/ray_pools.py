"""`batchery serve --ray-address`: the worker pools of `serve` as actors on a Ray cluster,
and what each actor runs (`actor_worker`: the loop of `batchery worker`, in the actor).

Every node must reach the database and the file store. A cluster of several nodes is
refused an embedded SQLite database or a file store some node cannot see; on a cluster of
one node, such state is fine, and every actor is placed on that node (an autoscaler may
add others later, which could not reach it).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from batchery import workers
from batchery.cli import server
from batchery.queue.worker import Worker, WorkerConfig, WorkerContext
from batchery.runtime import Runtime, open_runtime
from batchery.settings import Settings

if TYPE_CHECKING:
    from batchery.executors.ray_executor import RayExecutor

log = logging.getLogger("batchery.ray")


def executor(address: str, settings: Settings, log_level: str, runtime: Runtime
             ) -> RayExecutor:
    """Connect to the cluster and check it can hold this server's state; exit 2 if not."""
    try:
        from batchery.executors.ray_executor import RayExecutor
    except ImportError:
        _refuse("--ray-address needs Ray: pip install 'batchery[ray]'")
    found = RayExecutor(address, actor_worker, args=server.worker_args(
        _absolute(settings), log_level))
    try:
        found.connect()
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
        _refuse(f"cannot connect to the Ray cluster at {address}: {exc}")
    problem = refusal(settings, found)
    if problem:
        found.close()
        _refuse(problem)
    runtime.jobs.pending_workers = found.pending
    return found


def _refuse(message: str) -> Any:
    server.console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


def _absolute(settings: Settings) -> Settings:
    """Paths as every actor reads them: an actor does not start in this directory."""
    files = settings.files_url
    if files and "://" not in files:
        files = str(Path(files).resolve())
    return dataclasses.replace(settings, data_dir=settings.data_dir.resolve(), files_url=files)


def refusal(settings: Settings, cluster: RayExecutor) -> str | None:
    """Why the cluster cannot run this server's workers, in one sentence; None if it can.
    On a one-node cluster, state only this machine holds pins the actors to that node."""
    nodes = len(cluster.nodes())
    local_files = _local_path(settings.file_store_url)
    sqlite = settings.db_url.startswith("sqlite")
    if nodes <= 1:
        if sqlite or local_files is not None:
            cluster.pinned_to = cluster.this_node()
            log.info("the database or file store is on this machine: every Ray actor is "
                     "placed on its node")
        return None
    if sqlite:
        return (f"the Ray cluster has {nodes} nodes, and they cannot share the embedded "
                f"SQLite database: give --database-url postgresql://...")
    if settings.file_store_url.startswith("memory://"):
        return (f"the Ray cluster has {nodes} nodes, and they cannot share a memory:// file "
                f"store: give --files-url an object store (s3://...) or a shared directory")
    if local_files is not None:
        missing = _unseen(local_files, cluster)
        if missing:
            return (f"the file store {local_files} is not visible on {len(missing)} of the "
                    f"Ray cluster's {nodes} nodes: give --files-url an object store "
                    f"(s3://...) or a directory every node mounts")
    return None


def _local_path(url: str) -> str | None:
    """The directory of a file store on a local file system; None for any other."""
    if url.startswith("file://"):
        return url.removeprefix("file://")
    return None if "://" in url else url


def _unseen(directory: str, cluster: RayExecutor) -> list[str]:
    """The nodes that do not see `directory`: a marker written here is looked for there."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    marker = Path(directory) / f".batchery-ray-probe-{secrets.token_hex(4)}"
    marker.touch()
    try:
        return cluster.nodes_without(str(marker))
    finally:
        marker.unlink(missing_ok=True)


# -- inside the actor ------------------------------------------------------------------

class _ActorWorker:
    """A worker and the stores it opened, closed when its loop ends."""

    def __init__(self, worker: Worker, runtime: Runtime) -> None:
        self.worker, self.runtime = worker, runtime

    def run(self) -> None:
        try:
            self.worker.run()
        finally:
            self.runtime.close()

    def stop(self) -> None:
        self.worker.stop()


def actor_worker(args: Sequence[str], worker_id: str, host: str) -> _ActorWorker:
    """The worker a Ray actor runs: `batchery worker` with `args`, in the actor's process,
    named as the actor is and showing its node as its host."""
    params = _parse(args)
    server._logging(params["log_level"])
    # Ray may have configured the root logger first: the job logs need INFO records.
    logging.getLogger().setLevel(params["log_level"].upper())
    settings, config = server.worker_settings(**params)
    runtime = open_runtime(settings)
    try:
        return _ActorWorker(_worker(runtime, config, worker_id, host), runtime)
    except BaseException:
        runtime.close()
        raise


def _parse(args: Sequence[str]) -> dict[str, Any]:
    """`batchery worker`'s options from its arguments, parsed as the command parses them."""
    app = typer.Typer()
    app.command()(server.worker)
    command = typer.main.get_command(app)
    with command.make_context("batchery worker", list(args)) as ctx:
        return dict(ctx.params)


def _worker(runtime: Runtime, config: WorkerConfig, worker_id: str, host: str) -> Worker:
    def handlers(ctx: WorkerContext) -> Any:
        ctx.host = host  # the node: several may share a machine, and its name
        return workers.handlers(runtime.store, runtime.files, ctx)

    made = Worker(runtime.store, handlers, config, worker_id=worker_id)
    made.info = dataclasses.replace(made.info, host=host)
    return made
