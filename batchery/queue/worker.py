"""The worker: one OS process that claims leased work from the store and runs it.

The loop knows no product. What it runs comes from *handlers*, one per kind of work (batch
phases, batch chunks, job phases, job batches, webhook deliveries), which the composition
root (`batchery.runtime.worker`) builds. Each turn of the loop asks the handlers in order
for one piece of work; between turns it does the handlers' housekeeping (reaping leases
whose worker died, expiring, timing out) and reports this worker's state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from batchery.model.leases import DEFAULT_LEASE_S, DEFAULT_MAX_ATTEMPTS
from batchery.model.retry import RetryPolicy
from batchery.ports.doorbell import Doorbell
from batchery.ports.store import WorkerInfo

log = logging.getLogger("batchery.worker")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    lease_s: float = DEFAULT_LEASE_S
    #: Sleep between polls when there is nothing to do, in seconds.
    poll_s: float = 0.2
    #: How often to reap lost leases, expire batches and report this worker, in seconds.
    housekeeping_s: float = 1.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    #: After a stop is asked for, how long the work in hand may still run, in seconds.
    grace_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Run the OpenAI and Anthropic batches' work.
    batches: bool = True
    #: Run jobs' work, of these deployments (qualified names; None: all).
    jobs: bool = True
    deployments: frozenset[str] | None = None
    #: Exit after this many seconds without work (a pool's extra workers); None: never.
    idle_exit_s: float | None = None
    #: Send webhook deliveries from the outbox, in a thread of this process (only workers
    #: that run batches do: a job pool's workers are many, and come and go).
    webhooks: bool = True
    #: Load the config file's in-process models before claiming work (a warm pool).
    preload: bool = True

    @property
    def renew_s(self) -> float:
        """How often a lease is renewed. At least once a second, which is also how soon a
        worker notices that the work in hand was cancelled or stopped."""
        return min(self.lease_s / 3, 1.0)


class Reporter(Protocol):
    def heartbeat_worker(self, info: WorkerInfo) -> None: ...


@dataclass(kw_only=True)
class WorkerContext:
    """What the handlers of one worker share."""

    id: str
    host: str
    pid: int
    config: WorkerConfig
    #: Whether a stop was asked for longer ago than the grace period.
    overdue: Callable[[], bool]
    #: Record what this worker does: `report(state, current)`.
    report: Callable[[str, str | None], None]
    #: One event loop per process, for the async parts of every handler.
    runner: asyncio.Runner
    #: Count one more unit of work done, for the workers listing.
    done: Callable[[], None]
    #: Tell the other idle workers there is new work (a batch validated, a job enqueued).
    ring: Callable[[], None] = lambda: None
    #: Record a model loaded when this worker started: `loaded(model, seconds, error)`,
    #: with the seconds it took, or the error (a sentence) that stopped it.
    loaded: Callable[[str, float | None, str | None], None] = lambda *_: None
    #: Whether this worker's last turn found work: a handler may then look for its kind of
    #: work less often (the turn after the last piece of work asks every handler again).
    busy: bool = False


class Handler(Protocol):
    """One kind of leased work."""

    def start(self) -> None: ...

    def run_once(self) -> bool:
        """Claim one piece of this kind of work and run it; False if there was none."""

    def housekeeping(self) -> None: ...

    def close(self) -> None: ...


#: Builds a worker's handlers, in the order they are asked for work.
HandlerFactory = Callable[[WorkerContext], Sequence[Handler]]


class Worker:
    """Don't run more than one Worker per process: backends hold one model each."""

    def __init__(self, registry: Reporter, handlers: HandlerFactory,
                 config: WorkerConfig | None = None, *, worker_id: str | None = None,
                 doorbell: Doorbell | None = None) -> None:
        self.registry = registry
        self.config = config or WorkerConfig()
        #: Rung when there is new work: an idle worker wakes at once, not at its next poll.
        self.doorbell = doorbell
        self.info = WorkerInfo(
            id=worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}",
            host=socket.gethostname(), pid=os.getpid(), state="starting",
            started_at=time.time())
        # A plain attribute, not a threading.Event: stop() runs inside signal handlers,
        # where taking the Event's lock can deadlock with the main thread.
        self._stop_asked_at: float | None = None
        self._runner = asyncio.Runner()
        self._next_housekeeping = 0.0
        self._reported_state: str | None = None
        self._reported_current: str | None = None
        self._reported_at = 0.0
        self._last_work = time.monotonic()
        self.context = WorkerContext(id=self.info.id, host=self.info.host, pid=self.info.pid,
                                     config=self.config, overdue=self._overdue,
                                     report=self._report, runner=self._runner,
                                     done=self._count_done,
                                     loaded=self._loaded,
                                     ring=doorbell.ring if doorbell else lambda: None)
        self.handlers = list(handlers(self.context))

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Finish (or, after the grace period, hand back) the work in hand, then exit."""
        if self._stop_asked_at is None:
            self._stop_asked_at = time.monotonic()

    @property
    def stopping(self) -> bool:
        return self._stop_asked_at is not None

    def run(self) -> None:
        log.info("worker %s started", self.info.id)
        for handler in self.handlers:
            handler.start()
        # What start-up made (modules, the app's objects) lives as long as the process: out
        # of the collector's way, so that a chunk's collections walk only what it made.
        gc.collect()
        gc.freeze()
        try:
            while not self.stopping:
                if self.run_once():
                    self._last_work = time.monotonic()
                elif self._idle_too_long():
                    log.info("worker %s: idle for %gs; exiting", self.info.id,
                             self.config.idle_exit_s)
                    break
                else:
                    self._idle()
        finally:
            self._report("stopped", None, force=True)
            for handler in reversed(self.handlers):
                try:
                    handler.close()
                except Exception:
                    log.exception("closing %s failed", type(handler).__name__)
            self._runner.close()
            if self.doorbell is not None:
                self.doorbell.close()
            log.info("worker %s stopped", self.info.id)

    def _idle_too_long(self) -> bool:
        limit = self.config.idle_exit_s
        return limit is not None and time.monotonic() - self._last_work > limit

    def _idle(self) -> None:
        if self.doorbell is not None:
            self.doorbell.wait(self.config.poll_s)
            return
        deadline = time.monotonic() + self.config.poll_s
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, self.config.poll_s))

    def run_once(self) -> bool:
        """Do one piece of work if there is any; returns whether there was."""
        self._housekeeping()
        for handler in self.handlers:
            if handler.run_once():
                self.context.busy = True
                return True
        if self.context.busy:
            # The first turn without work: ask every handler again before idling.
            self.context.busy = False
            return self.run_once()
        self._report("idle", None)
        return False

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.config.housekeeping_s
        for handler in self.handlers:
            try:
                handler.housekeeping()
            except Exception:
                log.exception("housekeeping of %s failed", type(handler).__name__)
        self._report(self.info.state, self.info.current, force=True)

    def _report(self, state: str, current: str | None, *, force: bool = False) -> None:
        """Record what this worker does: at once when it changes, else at most once per
        housekeeping period. Running chunk after chunk is no change (a write per chunk
        would cost a transaction per chunk): the chunk in hand is written with the next."""
        self.info = dataclasses.replace(self.info, state=state, current=current,
                                        last_heartbeat=time.time())
        now = time.monotonic()
        changed = state != self._reported_state \
            or (current != self._reported_current and state != "running")
        if not force and not changed and now - self._reported_at < self.config.housekeeping_s:
            return
        self._reported_state, self._reported_current = state, current
        self._reported_at = now
        try:
            self.registry.heartbeat_worker(self.info)
        except Exception:
            log.exception("could not record this worker's heartbeat")

    def _loaded(self, model: str, seconds: float | None, error: str | None) -> None:
        loads, errors = dict(self.info.load_s), dict(self.info.load_errors)
        loads.pop(model, None)
        errors.pop(model, None)
        if error is not None:
            errors[model] = error
        else:
            loads[model] = round(seconds or 0.0, 3)
        self.info = dataclasses.replace(self.info, load_s=loads, load_errors=errors)

    def _count_done(self) -> None:
        self.info = dataclasses.replace(self.info, chunks_done=self.info.chunks_done + 1)

    def _overdue(self) -> bool:
        asked = self._stop_asked_at
        return asked is not None and time.monotonic() - asked > self.config.grace_s
