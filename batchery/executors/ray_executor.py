"""Worker pools as Ray actors: each worker of a pool is a named actor on a Ray cluster that
runs the same worker loop, against the same store and file store, as a local worker
process would.

The pool supervisor starts and watches them through `ActorProcess`, which is shaped like
a `subprocess.Popen`: `poll()` reports the actor's exit or death, SIGTERM asks its loop to
stop gracefully (finishing or handing back the work in hand), and `kill()` is `ray.kill`.
Actors are owned by the serving process, so Ray ends them if it dies, as the kernel does for
local workers. What a worker needs from the cluster (CPUs, GPUs, memory, custom resources)
decides where Ray places it; a worker Ray cannot place yet is *pending*, and `pending()`
says why.

Actors run a function given by the composition (`Entry`): this module knows no product,
so it cannot build a worker itself. Ray sends that function by reference, so Batchery must
be installed on every node.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from batchery.model.deployments import Resources

log = logging.getLogger("batchery.ray")

#: The Ray namespace of every actor Batchery starts, so their names are Batchery's own.
NAMESPACE = "batchery"
#: CPUs a worker asks for unless its deployment says: a fraction, so that a small machine
#: holds several workers (a whole CPU each would leave none for Ray's own tasks, and a
#: 2-core node would deadlock).
DEFAULT_CPUS = 0.25
#: The exit code reported for an actor that died (killed, its node lost): as for SIGKILL.
DIED = -signal.SIGKILL
#: Calls an actor serves at once: its loop, and `where`/`stop` beside it.
_CONCURRENCY = 4


class WorkerLoop(Protocol):
    """What an actor runs: a worker that can be asked to stop from another thread."""

    def run(self) -> None: ...

    def stop(self) -> None: ...


#: Builds, inside an actor, the worker it runs: `(args, worker_id, host) -> loop`, where
#: `args` are `batchery worker`'s and `host` names the node. It must be importable on
#: every node (a module's function, not a closure).
Entry = Callable[[Sequence[str], str, str], WorkerLoop]


@dataclass(frozen=True)
class Placement:
    """Where an actor runs."""

    node_id: str
    ip: str
    pid: int

    @property
    def host(self) -> str:
        """The node, as the worker listings show it: its address and the start of its id
        (several nodes may share a machine, and so an address)."""
        return f"{self.ip}/{self.node_id[:8]}"


class BatcheryWorker:
    """The actor: one worker. Its class name and its actor name (`<pool>:<worker id>`) are
    what the Ray dashboard shows."""

    def __init__(self, entry: Entry, args: Sequence[str], worker_id: str) -> None:
        self._entry, self._args, self._id = entry, list(args), worker_id
        self._loop: WorkerLoop | None = None
        self._stop_asked = False
        self._placement = Placement(node_id=ray.get_runtime_context().get_node_id(),
                                    ip=ray.util.get_node_ip_address(), pid=os.getpid())

    def where(self) -> Placement:
        return self._placement

    def run(self) -> None:
        loop = self._entry(self._args, self._id, self._placement.host)
        self._loop = loop
        if self._stop_asked:  # a stop that came while the worker was being built
            loop.stop()
        loop.run()

    def stop(self) -> None:
        self._stop_asked = True
        if self._loop is not None:
            self._loop.stop()


_Actor = ray.remote(BatcheryWorker)


class ActorProcess:
    """A started actor, as the pool supervisor sees a worker process."""

    def __init__(self, actor: Any, name: str, needs: Mapping[str, float]) -> None:
        self.actor, self.name, self.needs = actor, name, dict(needs)
        self._where = actor.where.remote()
        self._run = actor.run.remote()
        self._placement: Placement | None = None
        self._code: int | None = None
        self._killed = False  #: by us: its death is no news
        self._guard = threading.Lock()  #: the supervisor and the API both ask

    @property
    def pid(self) -> int:
        """The actor's process id on its node; 0 until Ray has placed it."""
        placed = self.placement()
        return placed.pid if placed else 0

    @property
    def placed(self) -> bool:
        """Whether Ray has placed the actor on a node (the supervisor lets go of workers
        never placed that their pool no longer needs)."""
        return self.placement() is not None

    def placement(self) -> Placement | None:
        """Where the actor runs; None while Ray has not placed it (or if it died first)."""
        if self._placement is None and _ready(self._where):
            try:
                self._placement = ray.get(self._where)
            except ray.exceptions.RayError:
                return None
        return self._placement

    def poll(self) -> int | None:
        with self._guard:
            if self._code is None and _ready(self._run):
                self._code = self._exit_code()
                # The loop is over: the actor is ended so that its resources are freed.
                ray.kill(self.actor, no_restart=True)
            return self._code

    def _exit_code(self) -> int:
        try:
            ray.get(self._run)
            return 0
        except ray.exceptions.RayActorError as exc:
            if not self._killed:
                log.warning("Ray actor %s died: %s", self.name, _gist(exc))
            return DIED
        except ray.exceptions.RayError as exc:
            log.warning("the worker of Ray actor %s failed: %s", self.name, _gist(exc))
            return 1

    def send_signal(self, sig: int) -> None:
        """SIGTERM (or SIGINT) asks the worker to stop as a local one would on that signal;
        an actor not placed yet holds no work, and is ended at once."""
        if sig == signal.SIGKILL or self.placement() is None:
            self.kill()
        else:
            self.actor.stop.remote()

    def kill(self) -> None:
        self._killed = True
        ray.kill(self.actor, no_restart=True)

    def wait(self, timeout: float | None = None) -> int:
        if not ray.wait([self._run], timeout=timeout)[0]:
            raise TimeoutError(f"Ray actor {self.name} still runs after {timeout}s")
        code = self.poll()
        assert code is not None  # its loop's result is in
        return code


def _ready(ref: Any) -> bool:
    return bool(ray.wait([ref], timeout=0)[0])


def _gist(exc: BaseException) -> str:
    """The last line of Ray's message, which says why (killed, its node died, an error)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class RayExecutor:
    """Starts the workers of the pools as actors on the Ray cluster at `address`. `args`
    come before each worker's own (the store, the file store, the lease)."""

    def __init__(self, address: str, entry: Entry, *, args: Sequence[str] = (),
                 default_cpus: float = DEFAULT_CPUS) -> None:
        self.address, self.entry, self.args = address, entry, tuple(args)
        self.default_cpus = default_cpus
        #: With state only this node can reach (SQLite), every actor is placed on it.
        self.pinned_to: str | None = None
        self._started: dict[str, list[ActorProcess]] = {}
        self._guard = threading.Lock()

    def connect(self) -> None:
        ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=True)

    def close(self) -> None:
        ray.shutdown()

    # -- the cluster -----------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes, as `ray.nodes()` describes them."""
        return [n for n in ray.nodes() if n.get("Alive")]

    def this_node(self) -> str:
        """The id of the node this process is connected through."""
        return str(ray.get_runtime_context().get_node_id())

    def nodes_without(self, path: str, timeout_s: float = 60.0) -> list[str]:
        """The ids of the live nodes on which `path` does not exist (a directory that is
        not shared with them). One tiny task runs on each node."""
        probe = ray.remote(num_cpus=0)(os.path.exists)
        ids = [str(n["NodeID"]) for n in self.nodes()]
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id, soft=False)).remote(path) for node_id in ids]
        seen = ray.get(refs, timeout=timeout_s)
        return [node_id for node_id, found in zip(ids, seen, strict=True) if not found]

    # -- the pools ---------------------------------------------------------------------

    def start(self, pool: str, args: Sequence[str], resources: Resources | None) -> ActorProcess:
        """One worker of `pool`, as an actor named `<pool>:<worker id>`."""
        name = f"{pool}:ray-{secrets.token_hex(4)}"
        options = self.actor_options(resources)
        actor = _Actor.options(name=name, namespace=NAMESPACE, max_concurrency=_CONCURRENCY,
                               **options).remote(self.entry, [*self.args, *args], name)
        proc = ActorProcess(actor, name, _needs(options))
        with self._guard:
            live = [p for p in self._started.get(pool, []) if p.poll() is None]
            self._started[pool] = [*live, proc]
        return proc

    def actor_options(self, resources: Resources | None) -> dict[str, Any]:
        """Ray's options for a worker that needs `resources`: a fraction of a CPU unless
        the deployment says how many."""
        want = resources or Resources()
        options: dict[str, Any] = {
            "num_cpus": self.default_cpus if want.num_cpus is None else want.num_cpus}
        if want.num_gpus:
            options["num_gpus"] = want.num_gpus
        if want.memory:
            options["memory"] = want.memory
        if want.custom:
            options["resources"] = dict(want.custom)
        if self.pinned_to is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                self.pinned_to, soft=False)
        return options

    def pending(self, pool: str) -> list[tuple[str, str]]:
        """The workers of `pool` that Ray has not placed yet: `(name, why)`."""
        with self._guard:
            waiting = [p for p in self._started.get(pool, [])
                       if p.poll() is None and not p.placed]
        if not waiting:
            return []
        totals = [n.get("Resources", {}) for n in self.nodes()]
        return [(p.name, _why_pending(p.needs, totals)) for p in waiting]


def _needs(options: Mapping[str, Any]) -> dict[str, float]:
    """The resources an actor asks for, by Ray's names for them."""
    found = {"CPU": float(options["num_cpus"])}
    if "num_gpus" in options:
        found["GPU"] = float(options["num_gpus"])
    if "memory" in options:
        found["memory"] = float(options["memory"])
    return found | {k: float(v) for k, v in options.get("resources", {}).items()}


def _why_pending(needs: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> str:
    wanted = ", ".join(f"{k} {v:g}" for k, v in needs.items() if v)
    if any(all(node.get(k, 0.0) >= v for k, v in needs.items()) for node in nodes):
        return f"waiting for Ray to place it on a node with {wanted} free"
    return (f"no node of the Ray cluster has {wanted}; it waits for one to join (Ray's "
            f"autoscaler adds one if it can)")
