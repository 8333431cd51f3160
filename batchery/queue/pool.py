"""The one pool supervisor: keeps each pool of worker processes at the size its work asks
for, whatever the work is.

A *plan* names the pools wanted now: the batch workers of `batchery serve` (a fixed size,
replaced when they die) and one pool per deployment that serves jobs (sized to its queue,
between `min` and `max`, extra workers leaving by themselves when idle). The supervisor
starts what is missing, replaces what died, and stops the pools that are no longer
wanted, or whose deployment changed (SIGTERM, then SIGKILL after a grace). Pools marked
`capped` share one budget of processes: the operator's cap on pools made over the API.

How a worker process is started is the caller's: `spawn` gets the worker's command-line
arguments and returns something shaped like a `subprocess.Popen`. An `executor` may start
them elsewhere instead (Ray actors): it is given the pool's name and resources as well.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from batchery.model.deployments import Resources

log = logging.getLogger("batchery.pool")


class Process(Protocol):
    """A started worker: the part of `subprocess.Popen` the supervisor uses."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(frozen=True, kw_only=True)
class PoolPlan:
    """One pool as its work wants it now."""

    name: str
    #: Workers always running (replaced when they die).
    minimum: int
    maximum: int
    #: How many workers the pool's work could use at once now.
    demand: int
    #: The worker's command-line arguments.
    args: tuple[str, ...]
    #: Workers beyond `minimum` exit after this many idle seconds (None: never).
    idle_s: float | None = None
    #: Counts toward the shared cap (pools made over the API).
    capped: bool = False
    #: What the pool runs; when it changes, the pool's workers are stopped and started anew.
    version: object = None
    #: What each worker needs from a cluster (an executor's business; local processes
    #: ignore it).
    resources: Resources | None = None

    @property
    def target(self) -> int:
        return max(self.minimum, min(self.maximum, self.demand))


class Executor(Protocol):
    """Starts a pool's workers somewhere other than as local processes (a Ray cluster)."""

    def start(self, pool: str, args: Sequence[str], resources: Resources | None) -> Process:
        ...


@dataclass
class _Worker:
    proc: Process
    permanent: bool  #: one of the pool's `minimum`; the others exit when idle


class Supervisor:
    def __init__(self, spawn: Callable[[Sequence[str]], Process],
                 plan: Callable[[], Sequence[PoolPlan]], *, cap: int | None = None,
                 every_s: float = 1.0, retire_grace_s: float = 5.0,
                 executor: Executor | None = None) -> None:
        self.spawn, self.plan, self.cap, self.executor = spawn, plan, cap, executor
        self.every_s, self.retire_grace_s = every_s, retire_grace_s
        self._pools: dict[str, list[_Worker]] = {}
        self._versions: dict[str, object] = {}
        #: Workers told to stop, with the monotonic time at which they are killed.
        self._retiring: list[tuple[Process, float]] = []
        self._at_cap = False  #: whether the cap was logged (once per spell)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pools", daemon=True)

    def start(self) -> None:
        self.scale()
        self._thread.start()

    def size(self, name: str) -> int:
        return len(self._reap(name))

    def _run(self) -> None:
        while not self._stopping.wait(self.every_s):
            try:
                self.scale()
            except Exception:
                log.exception("could not resize the worker pools")

    def scale(self) -> None:
        wanted = {p.name: p for p in self.plan()}
        self._retire_gone(wanted)
        room = None if self.cap is None else self.cap - sum(
            len(self._reap(name)) for name, p in wanted.items() if p.capped)
        refused = False
        for plan in wanted.values():
            budget = room if plan.capped else None
            started, short = self._grow(plan, budget)
            if plan.capped and room is not None:
                room -= started
            refused = refused or short
        if refused and not self._at_cap:
            log.warning("the deployments made over the API run %d worker processes, this "
                        "server's cap (security.max_api_pool_processes); starting no more",
                        self.cap)
        self._at_cap = refused
        self._finish_retiring()

    def _grow(self, plan: PoolPlan, budget: int | None) -> tuple[int, bool]:
        """Start workers up to the plan's target, at most `budget` (None: no cap). Returns
        how many started, and whether the budget held some back."""
        workers = self._reap(plan.name)
        self._versions[plan.name] = plan.version
        self._drop_unplaced(plan, workers)
        started = 0
        while len(workers) < plan.target and not self._stopping.is_set():
            if budget is not None and started >= budget:
                return started, True
            permanent = sum(w.permanent for w in workers) < plan.minimum
            idle = [] if permanent or plan.idle_s is None else ["--idle-exit", str(plan.idle_s)]
            args = [*plan.args, *idle]
            proc = (self.spawn(args) if self.executor is None
                    else self.executor.start(plan.name, args, plan.resources))
            workers.append(_Worker(proc=proc, permanent=permanent))
            started += 1
            log.info("started worker pid %d for %s (%d of at most %d)", proc.pid, plan.name,
                     len(workers), plan.maximum)
        return started, False

    def _drop_unplaced(self, plan: PoolPlan, workers: list[_Worker]) -> None:
        """Workers an executor has not placed yet (a Ray actor waiting for a node: its
        `placed` is False) hold no work. Those beyond what the pool's work wants now are
        let go, or a cluster's autoscaler would keep adding nodes that nobody needs."""
        waiting = sorted((w for w in workers if not getattr(w.proc, "placed", True)),
                         key=lambda w: w.permanent)
        for worker in waiting[:max(0, len(workers) - plan.target)]:
            worker.proc.kill()
            workers.remove(worker)
            log.info("dropped a worker of %s that was never placed: its work is gone",
                     plan.name)

    def _retire_gone(self, wanted: dict[str, PoolPlan]) -> None:
        """SIGTERM the workers of pools no longer wanted, or whose work changed."""
        for name in list(self._pools):
            if name in wanted and self._versions.get(name) == wanted[name].version:
                continue
            kill_at = time.monotonic() + self.retire_grace_s
            for worker in self._pools.pop(name):
                if worker.proc.poll() is None:
                    worker.proc.send_signal(signal.SIGTERM)
                    self._retiring.append((worker.proc, kill_at))
                    log.info("stopping worker pid %d: %s is gone or changed", worker.proc.pid,
                             name)
            self._versions.pop(name, None)

    def _finish_retiring(self) -> None:
        """Reap the retired workers that exited; SIGKILL those past their grace."""
        now = time.monotonic()
        still: list[tuple[Process, float]] = []
        for proc, kill_at in self._retiring:
            if proc.poll() is not None:
                continue  # poll() reaped it
            if now < kill_at:
                still.append((proc, kill_at))
                continue
            log.warning("worker pid %d did not stop within %gs of SIGTERM; killing it",
                        proc.pid, self.retire_grace_s)
            proc.kill()
            proc.wait()
        self._retiring = still

    def _reap(self, name: str) -> list[_Worker]:
        workers = self._pools.setdefault(name, [])
        for worker in list(workers):
            code = worker.proc.poll()
            if code is None:
                continue
            workers.remove(worker)
            if code != 0:
                log.warning("worker pid %d of %s exited with %s; %s", worker.proc.pid, name,
                            code, "starting another" if worker.permanent else "not replaced "
                            "unless its work needs it")
        return workers

    def stop(self, grace_s: float = 35.0) -> None:
        """SIGTERM every worker, and SIGKILL those still running after `grace_s`."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        procs = ([w.proc for pool in self._pools.values() for w in pool]
                 + [proc for proc, _ in self._retiring])
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except Exception:  # subprocess.TimeoutExpired, or the executor's own
                proc.kill()
                proc.wait()
