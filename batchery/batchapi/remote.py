"""Batches handed whole to a provider's batch API (OpenAI, Anthropic, or another Batchery).

A remote batch has no chunks. A worker advances it one step at a time under the batch's
phase lease: submit, then poll with growing intervals, forward a cancel or an expiry, and
at the end copy the provider's results into our own files. Between steps the batch is
released with a delay, so polling costs no worker time.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np
import orjson

from batchery.batchapi import phases
from batchery.model.batches import Batch, BatchError, BatchStatus, EndReason
from batchery.model.exceptions import BackendError
from batchery.ports.filestore import FileStore
from batchery.ports.remote import RemoteBatchBackend
from batchery.ports.store import PhaseLease, PhaseStore
from batchery.wire import anthropic
from batchery.wire.openai_lines import error_line

log = logging.getLogger("batchery.batchapi.remote")

#: Polling: the first poll comes this long after submission (or a cancel), and the wait
#: doubles after each poll up to MAX_POLL_S.
FIRST_POLL_S = 1.0
MAX_POLL_S = 30.0
#: After a failed call to the provider the step is tried again after RETRY_FIRST_S, the
#: wait doubling after each further failure of the step, up to RETRY_MAX_S.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
#: Consecutive failures of one step (submit, poll, cancel, download) after which the batch
#: fails with `remote_error`.
MAX_CONSECUTIVE_FAILURES = 5


class Step(enum.Enum):
    """One step of a remote batch; the value names it in errors and logs."""

    SUBMIT = "submitting the batch to the provider"
    POLL = "polling the provider's batch"
    CANCEL = "cancelling the provider's batch"
    DOWNLOAD = "downloading the provider's results"


def retry_delay(failures: int) -> float:
    """The wait before trying a step again after its `failures`-th failure in a row."""
    return float(min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S))


def _stopping(batch: Batch) -> bool:
    return batch.status is BatchStatus.CANCELLING or batch.status is BatchStatus.FINALIZING


def advance(store: PhaseStore, files: FileStore, lease: PhaseLease,
            backend: RemoteBatchBackend) -> None:
    """Take one step with a remote batch."""
    batch = lease.batch
    assert batch.remote is not None
    state = dict(batch.remote)
    if state["job"] is None and _stopping(batch):
        _finish(store, files, lease, backend, None)  # never submitted: nothing to fetch
        return
    step = _next_step(batch, state, backend)
    try:
        if step is Step.DOWNLOAD:
            _finish(store, files, lease, backend, state["job"])
            return
        state["job"] = _call(step, files, batch, state["job"], backend)
    except BackendError as exc:
        _count_failure(store, lease, state, step, exc, backend)
        return
    state.update(failures=0, failed_step=None)
    if step is Step.CANCEL:
        state.update(cancel_sent=True, poll_s=FIRST_POLL_S)
    _after_call(store, files, lease, state, backend)


def _next_step(batch: Batch, state: dict[str, Any], backend: RemoteBatchBackend) -> Step:
    if state["job"] is None:
        return Step.SUBMIT
    if _stopping(batch) and not state["cancel_sent"]:
        return Step.CANCEL
    # A provider job seen ended is not polled again: a download that failed is retried
    # (and counted) on its own.
    if backend.progress(state["job"]).ended:
        return Step.DOWNLOAD
    return Step.POLL


def _call(step: Step, files: FileStore, batch: Batch, job: dict[str, Any] | None,
          backend: RemoteBatchBackend) -> dict[str, Any]:
    """The provider's job object after `step`'s call."""
    if job is None:
        with files.open_read(batch.input_key or "") as stream:
            return backend.submit(batch, _request_lines(stream))
    if step is Step.CANCEL:
        return backend.cancel(job)
    return backend.refresh(job)


def _after_call(store: PhaseStore, files: FileStore, lease: PhaseLease, state: dict[str, Any],
                backend: RemoteBatchBackend) -> None:
    """Record the provider's job, then wait for the next poll or fetch its results."""
    progress = backend.progress(state["job"])
    if progress.errors is not None:
        store.fail_batch(lease, progress.errors, int(time.time()))
        return
    wait = state["poll_s"]
    if not progress.ended:
        state["poll_s"] = min(wait * 2, MAX_POLL_S)
    store.save_remote(lease, state, completed=progress.completed, failed=progress.failed)
    if not progress.ended:
        store.release_phase(lease, retry_in=wait)
        return
    try:
        _finish(store, files, lease, backend, state["job"])
    except BackendError as exc:
        _count_failure(store, lease, state, Step.DOWNLOAD, exc, backend)


def _count_failure(store: PhaseStore, lease: PhaseLease, state: dict[str, Any], step: Step,
                   exc: BackendError, backend: RemoteBatchBackend) -> None:
    """Count a failed step: a permanent error, or the last failure in a row allowed, fails
    the batch; anything else tries the step again after a growing wait."""
    same_step = state.get("failed_step") == step.name
    failures = (state.get("failures", 0) if same_step else 0) + 1
    state.update(failures=failures, failed_step=step.name)
    log.warning("batch %s: %s failed (%d/%d in a row): %s", lease.batch.id, step.value,
                failures, MAX_CONSECUTIVE_FAILURES, exc)
    if exc.permanent:
        fail(store, lease, f"{_capital(step.value)} failed: {exc}", backend, state["job"])
        return
    if failures >= MAX_CONSECUTIVE_FAILURES:
        fail(store, lease, f"{_capital(step.value)} failed {failures} times in a row; the "
                           f"last error: {exc}", backend, state["job"])
        return
    store.save_remote(lease, state, completed=lease.batch.completed, failed=lease.batch.failed)
    store.release_phase(lease, retry_in=retry_delay(failures))


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def fail(store: PhaseStore, lease: PhaseLease, message: str,
         backend: RemoteBatchBackend | None, job: dict[str, Any] | None = None) -> None:
    """Fail the batch with `remote_error`. A provider job still running is cancelled, once
    and on a best-effort basis, so that nobody pays for work whose results are dropped;
    without a connector (`backend` None) it cannot be."""
    if job is not None and backend is not None and not backend.progress(job).ended:
        try:
            backend.cancel(job)
        except Exception as exc:
            log.warning("batch %s: could not cancel the provider's job %s: %s",
                        lease.batch.id, job.get("id"), exc)
    store.fail_batch(lease, [BatchError(code="remote_error", message=message)],
                     int(time.time()))


def _request_lines(stream: IO[bytes]) -> Iterator[bytes]:
    for line in stream:
        if line.strip():
            yield line


def _finish(store: PhaseStore, files: FileStore, lease: PhaseLease, backend: RemoteBatchBackend,
            job: dict[str, Any] | None) -> None:
    """Copy the provider's results, report requests it never answered, and end the batch."""
    batch = lease.batch
    prefix = phases.parts_prefix(batch.id)
    out_key, err_key = f"{prefix}/remote.out", f"{prefix}/remote.err"
    with files.open_write(out_key) as out, files.open_write(err_key) as err:
        if job is not None:
            backend.fetch(job, out, err)
    tally = _Tally(messages=batch.endpoint == anthropic.MESSAGES_ENDPOINT)
    for key in (out_key, err_key):
        with files.open_read(key) as stream:
            tally.scan(stream)
    reason = batch.end_reason or EndReason.DONE
    if batch.status is BatchStatus.CANCELLING:
        reason = EndReason.CANCELLED
    missing_key = f"{prefix}/remote.missing"
    with files.open_write(missing_key) as missing, \
            files.open_read(batch.input_key or "") as source:
        tally.write_missing(source, missing, reason,
                            backend.rejected_line if job is not None else lambda _: None)
    phases.finish_from_parts(store, files, lease, [out_key], [err_key, missing_key],
                             completed=tally.completed, failed=tally.failed,
                             unrun=tally.unrun)


class _Tally:
    """Counts result lines by outcome, and remembers which custom_ids were answered (as
    8-byte hashes, so memory stays small whatever the batch size)."""

    def __init__(self, *, messages: bool) -> None:
        self.messages = messages
        self.completed = self.failed = self.unrun = 0
        self._seen: list[int] = []
        self._sorted: np.ndarray[Any, np.dtype[np.int64]] | None = None

    def scan(self, stream: IO[bytes]) -> None:
        for raw in stream:
            if not raw.strip():
                continue
            line = orjson.loads(raw)
            self._seen.append(hash(line["custom_id"]))
            self._count(line)

    def _count(self, line: dict[str, Any]) -> None:
        if self.messages:
            kind = line["result"]["type"]
            ok, unrun = kind == "succeeded", kind in ("canceled", "expired")
        else:
            response, error = line.get("response") or {}, line.get("error") or {}
            ok = 200 <= response.get("status_code", 0) < 300
            unrun = error.get("code") in ("batch_cancelled", "batch_expired")
        self.completed += ok
        self.failed += not ok
        self.unrun += unrun

    def answered(self, custom_id: str) -> bool:
        if self._sorted is None:
            self._sorted = np.sort(np.array(self._seen, dtype=np.int64))
        i = int(np.searchsorted(self._sorted, hash(custom_id)))
        return i < len(self._sorted) and int(self._sorted[i]) == hash(custom_id)

    def write_missing(self, source: IO[bytes], out: IO[bytes], reason: EndReason,
                      rejected: Callable[[bytes], bytes | None]) -> None:
        for raw in _request_lines(source):
            custom_id = orjson.loads(raw)["custom_id"]
            if self.answered(custom_id):
                continue
            if (line := rejected(raw)) is not None:  # never sent: it failed, it did not go unrun
                out.write(line)
                self.failed += 1
                continue
            out.write(self._missing_line(custom_id, reason))
            self.failed += 1
            self.unrun += reason is not EndReason.DONE

    def _missing_line(self, custom_id: str, reason: EndReason) -> bytes:
        if self.messages:
            kind = {EndReason.CANCELLED: "canceled", EndReason.EXPIRED: "expired"}.get(
                reason, "errored")
            return anthropic.unrun_line(custom_id, kind, "The provider returned no result.")
        code, message = {
            EndReason.CANCELLED: ("batch_cancelled", "This request was not executed because "
                                                     "the batch was cancelled."),
            EndReason.EXPIRED: ("batch_expired", "This request could not be executed before "
                                                 "the completion window expired."),
        }.get(reason, ("server_error", "The provider returned no result for this request."))
        return error_line(custom_id, code, message)
