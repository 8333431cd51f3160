"""The worker: one OS process that claims work from the store and runs it.

Each loop it looks for batch-level work first (validation, assembling results), then for a
chunk. Every piece of work is held under a lease that a heartbeat thread renews; a lease
lost (to a cancel, an expiry, or a reaper that thought we were dead) stops the work, and
anything it would have written is fenced out by the store. A worker that runs batches also
sends webhook deliveries from the outbox, in a thread of its own (`batchery.webhooks.delivery`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from batchery import backends, execution, phases, remote
from batchery.backend import ModelBackend
from batchery.batches import BatchError, BatchStatus, canonical_endpoint
from batchery.chunks import DEFAULT_LEASE_S, DEFAULT_MAX_ATTEMPTS, ChunkLease
from batchery.chunks import ChunkResult as Result
from batchery.deployments import Deployment
from batchery.exceptions import ConfigError
from batchery.filestore import FileStore
from batchery.heartbeat import Heartbeat
from batchery.jobs.runner import JobRunner
from batchery.retry import RetryPolicy
from batchery.store import PhaseLease, Store, WorkerInfo
from batchery.webhooks.delivery import WebhookDelivery
from batchery.webhooks.ports import WebhookOutbox

log = logging.getLogger("batchery.worker")

@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    lease_s: float = DEFAULT_LEASE_S
    #: Sleep between polls when there is nothing to do, in seconds.
    poll_s: float = 0.2
    #: How often to reap lost leases, expire batches and report this worker, in seconds.
    housekeeping_s: float = 1.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    #: After a stop is asked for, how long the chunk in hand may still run, in seconds.
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


#: After batch-level work raised, how long before any worker tries it again, in seconds.
PHASE_RETRY_S = 5.0


class Worker:
    """Don't run more than one Worker per process: backends hold one model each."""

    def __init__(self, store: Store, files: FileStore, config: WorkerConfig | None = None,
                 *, worker_id: str | None = None) -> None:
        self.store = store
        self.files = files
        self.config = config or WorkerConfig()
        self.info = WorkerInfo(
            id=worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}",
            host=socket.gethostname(), pid=os.getpid(), state="starting",
            started_at=time.time())
        # Plain attributes, not a threading.Event: stop() runs inside signal handlers, where
        # taking the Event's lock can deadlock with the main thread.
        self._stop_asked_at: float | None = None
        self._cancel_asked = False
        self._backends: dict[str, ModelBackend] = {}
        #: The deployments behind `_backends`, with the projects that may use them.
        self._usable: dict[str, Deployment] = {}
        self._runner = asyncio.Runner()
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_housekeeping = 0.0
        self._last_work = time.monotonic()
        self.jobs: JobRunner | None = None
        if self.config.jobs:
            self.jobs = JobRunner(store, files, worker_id=self.info.id, host=self.info.host,
                                  pid=self.info.pid, lease_s=self.config.lease_s,
                                  deployments=self.config.deployments,
                                  overdue=self._overdue, retry=self.config.retry)
        self.webhooks: WebhookDelivery | None = None
        if self.config.webhooks and self.config.batches and isinstance(store, WebhookOutbox):
            self.webhooks = WebhookDelivery(store, self.info.id)

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
        if self.jobs is not None:
            self.jobs.start()
        if self.webhooks is not None:
            self.webhooks.start()
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
            if self.webhooks is not None:
                self.webhooks.stop()
            self._report("stopped", None)
            self._close_backends()
            self._runner.close()
            if self.jobs is not None:
                self.jobs.close()
            log.info("worker %s stopped", self.info.id)

    def _idle_too_long(self) -> bool:
        limit = self.config.idle_exit_s
        return limit is not None and time.monotonic() - self._last_work > limit

    def _idle(self) -> None:
        deadline = time.monotonic() + self.config.poll_s
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, self.config.poll_s))

    def run_once(self) -> bool:
        """Do one piece of work if there is any; returns whether there was."""
        self._housekeeping()
        if self.config.batches:
            phase = self.store.claim_phase(self.info.id, self.config.lease_s)
            if phase is not None:
                self._run_phase(phase)
                return True
            chunk = self.store.claim_chunk(self.info.id, self.config.lease_s)
            if chunk is not None:
                self._run_chunk(chunk)
                return True
        if self.jobs is not None and self.jobs.run_once():
            return True
        self._report("idle", None)
        return False

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.config.housekeeping_s
        if self.config.batches:
            reaped = self.store.reap_expired(self.config.max_attempts)
            if reaped:
                log.warning("requeued %d chunk(s) whose worker stopped renewing its lease",
                            reaped)
            self.store.expire_due(int(time.time()))
        if self.jobs is not None:
            self.jobs.housekeeping()
        self._report(self.info.state, self.info.current)

    def _report(self, state: str, current: str | None) -> None:
        self.info = dataclasses.replace(self.info, state=state, current=current,
                                        last_heartbeat=time.time())
        try:
            self.store.heartbeat_worker(self.info)
        except Exception:
            log.exception("could not record this worker's heartbeat")

    def _overdue(self) -> bool:
        asked = self._stop_asked_at
        return asked is not None and time.monotonic() - asked > self.config.grace_s

    # -- batch-level work --------------------------------------------------------------

    def _run_phase(self, lease: PhaseLease) -> None:
        batch = lease.batch
        self._report("running", f"{batch.id}:{batch.status.value}")
        heartbeat = Heartbeat(lambda: self.store.renew_phase(lease, self.config.lease_s),
                              self.config.lease_s / 3)
        try:
            with heartbeat:
                if batch.status is BatchStatus.VALIDATING:
                    phases.validate(self.store, self.files, lease, lambda: heartbeat.lost,
                                    backends.remote_endpoints, backends.endpoints_of)
                elif batch.remote is not None:
                    self._advance_remote(lease)
                else:
                    phases.finalize(self.store, self.files, lease, lambda: heartbeat.lost)
        except phases.LeaseLost:
            log.info("batch %s changed while this worker worked on it; leaving it", batch.id)
        except Exception:
            log.exception("batch-level work on %s failed; it will be retried in %gs",
                          batch.id, PHASE_RETRY_S)
            self.store.release_phase(lease, retry_in=PHASE_RETRY_S)
        finally:
            # Free the batch at once if the work did not (a cancel cut validation short, say);
            # fenced by the token, so it is a no-op once the lease moved on.
            self.store.release_phase(lease)

    def _advance_remote(self, lease: PhaseLease) -> None:
        assert lease.batch.remote is not None
        name = lease.batch.remote["deployment"]
        deployment = self._deployment(name, lease.batch.project)
        if deployment is None:
            self.store.fail_batch(lease, [BatchError(
                code="model_not_found", param="body.model",
                message=f"The deployment '{name}' is no longer configured.")],
                int(time.time()))
            return
        try:
            backend = backends.create_remote(deployment)
        except ConfigError as exc:
            # An operator's error (an unset variable, another BATCHERY_SECRET_KEY): waiting
            # will not mend it. Without a connector the provider's job cannot be cancelled.
            cause = str(exc).removeprefix(f"deployment '{name}': ")
            remote.fail(self.store, lease, f"The connector of the deployment '{name}' cannot "
                        f"be built on this worker: {cause}", None)
            return
        try:
            remote.advance(self.store, self.files, lease, backend)
        finally:
            backend.close()

    # -- chunks ------------------------------------------------------------------------

    def _run_chunk(self, lease: ChunkLease) -> None:
        self._report("running", f"{lease.batch_id}:{lease.spec.index}")
        self._cancel_asked = False
        heartbeat = Heartbeat(lambda: self.store.renew_chunk(lease, self.config.lease_s),
                              self.config.lease_s / 3, on_lost=self._cancel_task,
                              overdue=self._overdue, on_overdue=self._cancel_task)
        try:
            with heartbeat:
                output = self._execute(lease)
        except asyncio.CancelledError:
            if heartbeat.lost:
                log.info("chunk %s of %s: lease lost (batch cancelled or expired?)",
                         lease.spec.index, lease.batch_id)
            else:
                self.store.release_chunk(lease, error="handed back: the worker stopped",
                                         count_attempt=False,
                                         max_attempts=self.config.max_attempts)
            return
        except Exception:
            error = traceback.format_exc()
            log.error("chunk %s of %s failed:\n%s", lease.spec.index, lease.batch_id, error)
            self.store.release_chunk(lease, error=error, count_attempt=True,
                                     max_attempts=self.config.max_attempts,
                                     delay_s=self.config.retry.delay(lease.attempts + 1))
            return
        self._commit(lease, output)

    def _execute(self, lease: ChunkLease) -> execution.ChunkOutput:
        data = self.files.read_range(lease.input_key, lease.spec.start_offset,
                                     lease.spec.end_offset)
        lines = execution.split_lines(data)
        return self._runner.run(self._execute_async(lease, lines))

    async def _execute_async(self, lease: ChunkLease, lines: list[bytes]
                             ) -> execution.ChunkOutput:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self._cancel_asked:  # the heartbeat asked before this task existed
            raise asyncio.CancelledError
        batch = self.store.get_batch(None, lease.batch_id)
        project = batch.project if batch is not None else None

        async def backend_for(model: str) -> ModelBackend | None:
            return await self._backend(model, project)

        try:
            return await execution.run_chunk(lines, canonical_endpoint(lease.endpoint),
                                             backend_for, self.config.retry)
        finally:
            self._task = None

    def _cancel_task(self) -> None:
        self._cancel_asked = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)

    def _commit(self, lease: ChunkLease, output: execution.ChunkOutput) -> None:
        prefix = f"{phases.parts_prefix(lease.batch_id)}/{lease.spec.index:07d}-{lease.token}"
        out_key = self._write_part(f"{prefix}.out", output.out)
        err_key = self._write_part(f"{prefix}.err", output.err)
        result = Result(n_ok=output.n_ok, n_err=output.n_err, out_key=out_key, err_key=err_key,
                        input_tokens=output.input_tokens, output_tokens=output.output_tokens)
        if self.store.complete_chunk(lease, result):
            self.info = dataclasses.replace(self.info,
                                            chunks_done=self.info.chunks_done + 1)
            return
        log.info("chunk %s of %s: lease lost before commit; results dropped",
                 lease.spec.index, lease.batch_id)
        for key in (out_key, err_key):
            if key:
                self.files.delete(key)

    def _write_part(self, key: str, data: bytearray) -> str | None:
        if not data:
            return None
        with self.files.open_write(key) as out:
            out.write(data)
        return key

    # -- backends ----------------------------------------------------------------------

    def _deployment(self, name: str, project: str | None) -> Deployment | None:
        """The deployment, if the batch's project may use it. Validation already refused
        the others; checked again in case it changed hands since."""
        found = next((d for d in self.store.list_deployments() if d.name == name), None)
        if found is None or project is None or not found.usable_by(project):
            return None
        return found

    async def _backend(self, model: str, project: str | None) -> ModelBackend | None:
        deployment = self._usable.get(model)
        if deployment is None or project is None or not deployment.usable_by(project):
            deployment = self._deployment(model, project)
            if deployment is None:
                return None
            self._usable[model] = deployment
        backend = self._backends.get(model)
        if backend is not None:
            return backend
        backend = backends.create(deployment)
        await backend.start()
        self._backends[model] = backend
        log.info("loaded deployment %s (backend %s)", model, deployment.backend)
        return backend

    def _close_backends(self) -> None:
        async def close_all() -> None:
            for backend in self._backends.values():
                await backend.aclose()

        try:
            self._runner.run(close_all())
        except Exception:
            log.exception("closing backends failed")
        self._backends.clear()
