"""The worker's side of jobs: enqueue a job's input, run its batches through the
deployment's predictor, and complete the job (results file, `on_job_complete`).

Runs inside a `Worker`, which calls `run_once` and `housekeeping` from its loop. Every
piece of work is held under a lease that a heartbeat renews, as for chunks."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import os
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import orjson

from batchery.backends.predictor import LoadedPredictor, load_predictor, parse_options
from batchery.jobs import enqueue, outputs, results
from batchery.jobs.joblog import JobLog, job_context
from batchery.model.exceptions import Conflict
from batchery.model.jobs import (
    BatchLease,
    BatchState,
    Job,
    JobBatch,
    JobLease,
    JobStage,
    JobStatus,
    JobWorker,
    OutputMode,
    WorkerState,
)
from batchery.model.leases import (
    MAX_PHASE_ATTEMPTS,
    PHASE_RETRY_S,
    WORKER_CRASHED,
    halves,
    is_poison,
    should_split,
)
from batchery.ports.filestore import FileStore
from batchery.ports.store import JobWorkStore
from batchery.queue.lease import LeaseLost
from batchery.queue.leased import Cancelled, Leased
from batchery.queue.parts import drop_parts, part_key, write_part
from batchery.queue.worker import WorkerContext
from batchery.security import secrets

T = TypeVar("T")
log = logging.getLogger("batchery.jobs")
ENQUEUE_ATTEMPTS = 3
#: Predictors kept loaded per worker (one per job).
MAX_LOADED = 2


def _folder(module: Any) -> str:
    return os.path.dirname(os.path.abspath(str(module.__file__))) + os.sep


#: Where frames that are not the user's come from: Batchery itself, and the machinery that
#: runs a predictor (asyncio, threads, context managers, imports).
_NOT_USERS = (_folder(__import__("batchery")), _folder(asyncio),
              _folder(__import__("concurrent.futures")), os.path.abspath(threading.__file__),
              os.path.abspath(contextlib.__file__), "<frozen importlib")


def _users(frame: traceback.FrameSummary) -> bool:
    return not frame.filename.startswith(_NOT_USERS)


def readable_traceback(exc: BaseException) -> str:
    """`exc`'s traceback as a predictor's author reads it: their own frames, with each run
    of Batchery's and asyncio's frames folded into one line, and the exception line. A
    trace without a frame of the user's is kept whole (the fault is then Batchery's).
    Chained exceptions (`raise … from`, an error while handling another) get the same."""
    shown = traceback.TracebackException.from_exception(exc)
    chain: list[tuple[traceback.TracebackException, str | None]] = []
    seen: set[int] = set()
    current: traceback.TracebackException | None = shown
    note: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, note))
        if current.__cause__ is not None:
            current, note = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, note = current.__context__, _CONTEXT
        else:
            current = None
    if not any(_users(f) for part, _ in chain for f in part.stack):
        return "".join(shown.format())
    out: list[str] = []
    for part, note in reversed(chain):
        if part.stack:
            out.append("Traceback (most recent call last):\n")
            folded = 0
            for frame in part.stack:
                if not _users(frame):
                    folded += 1
                    continue
                if folded:
                    out.append(_folded(folded))
                    folded = 0
                out.append(traceback.StackSummary.from_list([frame]).format()[0])
            if folded:
                out.append(_folded(folded))
        out.extend(part.format_exception_only())
        if note is not None:
            out.append(f"\n{note}\n\n")
    return "".join(out)


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _folded(count: int) -> str:
    return f"  … {count} frame{'s' if count > 1 else ''} of batchery/asyncio folded …\n"




class BatchFailed(Exception):
    """A batch attempt failed for a reason worth a clear line in the job's log."""


class JobRunner:
    """The jobs' work, as the worker loop runs it (a handler of `batchery.queue.worker`)."""

    def __init__(self, store: JobWorkStore, files: FileStore, ctx: WorkerContext) -> None:
        self.store = store
        self.files = files
        self.ctx = ctx
        self.worker_id, self.host, self.pid = ctx.id, ctx.host, ctx.pid
        self.lease_s = ctx.config.lease_s
        self.deployments = ctx.config.deployments
        self.retry = ctx.config.retry
        self.joblog = JobLog(store, ctx.id)
        self._loaded: OrderedDict[str, LoadedPredictor] = OrderedDict()
        self._reports: dict[str, JobWorker] = {}

    def start(self) -> None:
        self.joblog.start()

    def close(self) -> None:
        for job_id in list(self._loaded):
            self._unload(job_id, WorkerState.SUCCEEDED)
        self.joblog.close()

    def run_once(self) -> bool:
        phase = self.store.claim_job_phase(self.worker_id, self.lease_s, self.deployments)
        if phase is not None:
            with job_context(phase.job.id):
                self._run_phase(phase)
            return True
        lease = self.store.claim_batch(self.worker_id, self.lease_s, self.deployments)
        if lease is not None:
            with job_context(lease.job.id):
                self._run_batch(lease)
            return True
        return False

    def housekeeping(self) -> None:
        for reaped in self.store.reap_expired_batches():
            what = ("the job has ended: it is dropped" if reaped.dropped
                    else "it will run again (this costs it no retry)")
            self.joblog.write(reaped.job_id, "WARNING",
                              f"batch {reaped.index}: worker {reaped.owner} stopped "
                              f"renewing its lease (it died or hung); {what}")
        for job_id in self.store.time_out_jobs(time.time()):
            self.joblog.write(job_id, "WARNING", "the job's timeout ran out: timed_out")
        self.store.touch_job_workers(self.worker_id, time.time())
        for job_id in list(self._loaded):
            job = self.store.get_job(None, job_id)
            if job is None or job.stage is JobStage.DONE:
                self._unload(job_id, WorkerState.SUCCEEDED)

    # -- job-level work ----------------------------------------------------------------

    def _run_phase(self, lease: JobLease) -> None:
        job = lease.job
        if lease.attempts >= MAX_PHASE_ATTEMPTS:
            self._give_up(lease)
            return
        renew = lambda: self.store.renew_job_phase(lease, self.lease_s)  # noqa: E731
        try:
            with Leased(renew, self.ctx.config.renew_s) as held:
                if job.stage is JobStage.ENQUEUE:
                    self._enqueue(lease, lambda: held.lost)
                else:
                    self._complete(lease)
        except LeaseLost:
            log.info("job %s changed while this worker worked on it; leaving it", job.id)
        except Exception as exc:
            # The traceback once; later failures of the same work in a line each.
            detail = (readable_traceback(exc) if lease.attempts == 0
                      else f"{type(exc).__name__}: {exc}")
            self.joblog.write(job.id, "ERROR", f"job-level work failed (try "
                                               f"{lease.attempts + 1} of {MAX_PHASE_ATTEMPTS});"
                                               f" retrying in {PHASE_RETRY_S:g}s: {detail}")
            self.store.release_job_phase(lease, retry_in=PHASE_RETRY_S,
                                         error=f"{type(exc).__name__}: {exc}")
        finally:
            self.store.release_job_phase(lease)
            self.joblog.flush()

    def _give_up(self, lease: JobLease) -> None:
        """Job-level work that failed every try ends the job: nothing waits forever."""
        job = lease.job
        reason = (f"{'enqueuing' if job.stage is JobStage.ENQUEUE else 'completing'} the job "
                  f"failed {lease.attempts} times; the last error: "
                  f"{lease.last_error or 'its worker stopped (killed or crashed)'}")
        self.joblog.write(job.id, "ERROR", reason)
        with contextlib.suppress(Conflict):  # it may have ended already (stopped, say)
            self.store.end_job(job.id, JobStatus.FAILED, reason)
        if job.stage is JobStage.COMPLETE:
            # Completing is what failed: end the job without its results file.
            self.store.finish_job(lease, results_url=None, now=time.time())
        self.store.release_job_phase(lease)
        self.joblog.flush()

    def _enqueue(self, lease: JobLease, lost: Callable[[], bool]) -> None:
        try:
            enqueue.enqueue(self.store, self.files, lease, lost, self.joblog,
                            resolve=enqueue.resolver(self.store, self.files, lease.job),
                            on_batches=self.ctx.ring)
        except LeaseLost:
            raise
        except Exception as exc:
            permanent = not isinstance(exc, OSError | ConnectionError | TimeoutError)
            self.joblog.write(lease.job.id, "ERROR",
                              f"enqueuing failed: {exc}\n{readable_traceback(exc)}")
            if self.store.fail_enqueue(lease, str(exc), permanent=permanent,
                                       max_attempts=ENQUEUE_ATTEMPTS):
                self.joblog.write(lease.job.id, "ERROR", "the job failed while enqueuing")
            else:
                self.store.release_job_phase(lease, retry_in=PHASE_RETRY_S)

    def _complete(self, lease: JobLease) -> None:
        job = lease.job
        results_url = None
        if job.options.output is OutputMode.APPEND_ROW:
            results_url = f"{job.output_path}/{outputs.RESULTS_NAME}"
            size = outputs.write_atomically(results_url, self._result_parts(job))
            self.joblog.write(job.id, "INFO", f"wrote results ({size} bytes) to {results_url}")
        dead = self.store.list_job_batches(job.id, [BatchState.FAILED.value])
        if dead:
            # The items of dead letters outlive the job's segments, beside the results.
            url = f"{job.output_path}/{outputs.DEAD_LETTERS_NAME}"
            outputs.write_atomically(url, self._dead_letters(dead))
            self.joblog.write(job.id, "WARNING", f"{len(dead)} dead letter(s), with their "
                                                 f"items and last errors, in {url}")
        if job.status is JobStatus.RUNNING:  # every batch ended: not stopped or failed
            self._on_job_complete(job)
        finished = self.store.finish_job(lease, results_url=results_url, now=time.time())
        if finished is None:
            raise LeaseLost
        self.joblog.write(job.id, "INFO", f"job ended: {finished.status.value}")
        self.files.delete_prefix(enqueue.job_prefix(job.id))

    def _dead_letters(self, dead: list[JobBatch]) -> Iterator[bytes]:
        for batch in dead:
            spec = batch.spec
            data = self.files.read_range(spec.segment_key, spec.start_offset, spec.end_offset)
            # JSON lines go out as they are; an Arrow batch's items as JSON, the same.
            items = (enqueue.read_items(spec, data) if enqueue.is_arrow(spec) else
                     [orjson.Fragment(line) for line in data.splitlines() if line])
            yield orjson.dumps({
                "batch_id": f"{batch.job_id}:{spec.index}", "index": spec.index,
                "first_item": spec.first_item, "attempts": batch.attempts,
                "error": batch.last_error, "items": items,
            }) + b"\n"

    def _result_parts(self, job: Job) -> Iterator[bytes]:
        # (extension) A retry's results start with the rows of the job it retries.
        carried = results.carried_results(self.store, job)
        if carried is not None:
            yield from outputs.read(carried)
        for batch in self.store.list_job_batches(job.id, ["succeeded"]):
            if batch.out_key:
                with self.files.open_read(batch.out_key) as part:
                    while data := part.read(1 << 20):
                        yield data

    def _on_job_complete(self, job: Job) -> None:
        try:
            predictor = self._predictor(job)
        except Exception as exc:
            self.joblog.write(job.id, "ERROR", "could not load the predictor to run "
                                               f"on_job_complete:\n{readable_traceback(exc)}")
            return
        if not predictor.has_on_job_complete:
            return
        self.joblog.write(job.id, "INFO", "executing on_job_complete")
        try:
            self._run(predictor.on_job_complete())
        except Exception as exc:
            self.joblog.write(job.id, "ERROR",
                              f"on_job_complete raised:\n{readable_traceback(exc)}")

    # -- batches -----------------------------------------------------------------------

    def _run_batch(self, lease: BatchLease) -> None:
        job, index = lease.job, lease.spec.index
        if is_poison(lease.expiries, lease.spec.n_items):
            self._isolate(lease)
            return
        if should_split(lease.expiries, lease.spec.n_items):
            self._split(lease)
            return
        self.joblog.write(job.id, "INFO", f"batch {index}: started (attempt "
                                          f"{lease.attempts + 1}, {lease.spec.n_items} items)")
        started = time.monotonic()
        try:
            with Leased(lambda: self._renew(lease), self.ctx.config.renew_s,
                        overdue=self.ctx.overdue, runner=self.ctx.runner) as held:
                predictor = self._predictor(job)
                held.check()
                self._report(job, WorkerState.RUNNING, index)
                items = self._items(lease)
                predictions = held.run(self._predict(lease, predictor, items))
                out_key = self._write_part(lease, items, predictions)
        except Cancelled as cut:
            self._cancelled(lease, cut.lost)
            return
        except Exception as exc:
            self._failed(lease, exc, time.monotonic() - started)
            return
        duration = time.monotonic() - started
        if self.store.complete_batch(lease, out_key=out_key, duration_s=duration):
            report = self._reports.get(job.id)
            done = (report.batches_done if report else 0) + 1
            self._report(job, WorkerState.IDLE, None, batches_done=done)
            self.joblog.write(job.id, "INFO", f"batch {index}: succeeded in {duration:.3f}s")
        else:
            self.joblog.write(job.id, "WARNING", f"batch {index}: lease lost before its "
                                                 f"results were recorded; they are dropped")
            drop_parts(self.files, out_key)

    def _split(self, lease: BatchLease) -> None:
        """Cut a batch whose workers keep dying in two, to find the item at fault."""
        spec = lease.spec
        cut = halves(spec.n_items)
        head = dataclasses.replace(spec, n_items=cut)
        tail = dataclasses.replace(spec, first_item=spec.first_item + cut,
                                   n_items=spec.n_items - cut)
        if not enqueue.is_arrow(spec):
            # JSON lines: each half gets the bytes of its own lines. (Arrow streams say
            # which rows they hold: both halves keep the range, and read their items.)
            data = self.files.read_range(spec.segment_key, spec.start_offset, spec.end_offset)
            ends = [i + 1 for i, byte in enumerate(data) if byte == 0x0A]
            middle = spec.start_offset + ends[cut - 1]
            head = dataclasses.replace(head, end_offset=middle)
            tail = dataclasses.replace(tail, start_offset=middle)
        specs = [head, tail]
        if self.store.split_batch(lease, specs):
            self.joblog.write(lease.job.id, "WARNING",
                              f"batch {spec.index}: its workers stopped {lease.expiries} times "
                              f"in a row; split it in two to find the item at fault")
            # Now, not a moment later: the half this worker runs next may take it down.
            self.joblog.flush()

    def _isolate(self, lease: BatchLease) -> None:
        """A single item that took its worker down every time becomes a dead letter alone."""
        error = (f"{WORKER_CRASHED}: this item was tried {lease.expiries} times, and each "
                 f"time the worker running it exited before it finished (crashed or was "
                 f"killed); it was set aside so that the rest of the job could run")
        self.store.fail_batch_attempt(lease, error, delay_s=0.0, dead=True)
        self.joblog.write(lease.job.id, "ERROR", f"batch {lease.spec.index}: {error}")
        self.joblog.flush()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        # In a copy of *this* context: a Runner otherwise keeps the context it first ran
        # in, and every later job's log records would go to that first job.
        return self.ctx.runner.run(coro, context=contextvars.copy_context())

    def _renew(self, lease: BatchLease) -> bool:
        alive = self.store.renew_batch(lease, self.lease_s)
        # The main thread is inside the predictor: heartbeats come from here.
        self.store.touch_job_workers(self.worker_id, time.time())
        return alive

    def _items(self, lease: BatchLease) -> list[Any]:
        spec = lease.spec
        data = self.files.read_range(spec.segment_key, spec.start_offset, spec.end_offset)
        return enqueue.read_items(spec, data)

    async def _predict(self, lease: BatchLease, predictor: LoadedPredictor,
                       items: list[Any]) -> list[Any] | None:
        call = predictor.predict(items, lease.batch_id)
        timeout = lease.job.options.batch_timeout_s
        try:
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:
            # A sync predict may still be running in its thread: never reuse it.
            self._unload(lease.job.id, WorkerState.FAILED)
            raise BatchFailed(f"predict did not return within the batch_timeout of "
                              f"{timeout:g}s") from None

    def _write_part(self, lease: BatchLease, items: list[Any],
                    predictions: list[Any] | None) -> str | None:
        if lease.job.options.output is OutputMode.SUMMARY_ONLY:
            return None
        if predictions is None:
            predictions = [None] * len(items)
        if len(predictions) != len(items):
            raise BatchFailed(f"predict returned {len(predictions)} predictions for "
                              f"{len(items)} items; append_row needs one per item")
        out = bytearray()
        first = lease.spec.first_item
        for offset, (item, prediction) in enumerate(zip(items, predictions, strict=True)):
            row = {"batch_id": lease.batch_id, "index": first + offset, "item": item,
                   "prediction": prediction}
            try:
                out += orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)
            except TypeError as exc:
                raise BatchFailed(f"the prediction for item {offset} of the batch is not "
                                  f"JSON-serializable: {exc}") from None
            out += b"\n"
        key = part_key(enqueue.parts_prefix(lease.job.id), lease.spec.index, lease.token, 1,
                       ".jsonl")
        return write_part(self.files, key, out)

    def _cancelled(self, lease: BatchLease, lost: bool) -> None:
        index = lease.spec.index
        if lost:
            self.joblog.write(lease.job.id, "INFO", f"batch {index}: lease lost (the job "
                                                    f"was stopped or timed out?); leaving it")
        else:
            self.store.release_batch(lease)
            self.joblog.write(lease.job.id, "INFO", f"batch {index}: handed back, the worker "
                                                    f"is stopping")
        self._report(lease.job, WorkerState.IDLE, None)

    def _failed(self, lease: BatchLease, exc: Exception, duration: float) -> None:
        job, index = lease.job, lease.spec.index
        detail = str(exc) if isinstance(exc, BatchFailed) else readable_traceback(exc)
        dead = self.store.fail_batch_attempt(
            lease, detail, delay_s=self.retry.delay(lease.attempts + 1))
        what = "out of retries: it is now a dead letter" if dead else "it will be retried"
        self.joblog.write(job.id, "ERROR", f"batch {index}: failed after {duration:.3f}s "
                                           f"({what}):\n{detail}")
        if job.id in self._loaded:  # else loading it failed, and it was reported so
            self._report(job, WorkerState.IDLE, None)

    # -- predictors and worker states --------------------------------------------------

    def _predictor(self, job: Job) -> LoadedPredictor:
        loaded = self._loaded.get(job.id)
        if loaded is not None:
            self._loaded.move_to_end(job.id)
            return loaded
        deployment = next((d for d in self.store.list_deployments()
                           if d.name == job.qualified_deployment), None)
        if deployment is None:
            raise BatchFailed(f"the deployment '{job.qualified_deployment}' no longer exists")
        self._report(job, WorkerState.INITIALIZING, None)
        self.joblog.write(job.id, "INFO", f"worker {self.worker_id} (pid {self.pid}) is "
                                          f"loading the predictor")
        options = parse_options(secrets.open_options(deployment.options,
                                                     secrets.SecretBox.from_env()),
                                f"deployment '{deployment.name}' options")
        try:
            loaded = self._run(load_predictor(options, job.spec()))
        except Exception:
            self._report(job, WorkerState.FAILED, None)
            raise
        self._loaded[job.id] = loaded
        while len(self._loaded) > MAX_LOADED:
            self._unload(next(iter(self._loaded)), WorkerState.SUCCEEDED)
        self._report(job, WorkerState.IDLE, None)
        return loaded

    def _unload(self, job_id: str, state: WorkerState) -> None:
        loaded = self._loaded.pop(job_id, None)
        if loaded is not None:
            loaded.close()
        report = self._reports.pop(job_id, None)
        if report is not None and report.state is not WorkerState.FAILED:
            self._store_report(dataclasses.replace(report, state=state, current_batch=None,
                                                   last_heartbeat=time.time()))
            self.joblog.write(job_id, "INFO", f"worker {self.worker_id} left the job "
                                              f"({state.value})")

    def _report(self, job: Job, state: WorkerState, current: int | None, *,
                batches_done: int | None = None) -> None:
        now = time.time()
        previous = self._reports.get(job.id)
        report = JobWorker(job_id=job.id, worker_id=self.worker_id, host=self.host,
                           pid=self.pid, state=state, current_batch=current,
                           batches_done=(batches_done if batches_done is not None
                                         else previous.batches_done if previous else 0),
                           started_at=previous.started_at if previous else now,
                           last_heartbeat=now)
        self._reports[job.id] = report
        self._store_report(report)

    def _store_report(self, report: JobWorker) -> None:
        try:
            self.store.report_job_worker(report)
        except Exception:
            log.exception("could not record this worker's state for job %s", report.job_id)
