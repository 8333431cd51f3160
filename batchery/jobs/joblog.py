"""Per-job logs: the runner's own events and whatever the user's predictor logs with
`logging`, attributed to the job by a context variable and written to the store in
small batches (often enough that `logs?follow=true` shows lines as they happen).

Readers show a log in time order, whichever worker wrote each line. A follower only
shows lines older than `SETTLE_S`: by then every worker has written its lines of that
time, so a line flushed late still comes in its place, never after newer ones."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator

from batchery.ports.jobs import JobObservations, NewLogLine

#: The job whose work is running in this context (and in the predictor's thread, which
#: runs in a copy of it).
current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "batchery_current_job", default=None)
_log = logging.getLogger("batchery.jobs")
#: How often buffered lines are written, in seconds.
FLUSH_S = 0.3
#: How old a line must be before a follower shows it, in seconds: the longest a worker
#: holds a line (`FLUSH_S`, plus the write itself) with room to spare. Lines a worker
#: could not write for longer (its database unreachable) are kept in their place, but a
#: follower that has passed their time does not show them.
SETTLE_S = 2.0
#: Lines kept at most while the store cannot be reached; the oldest are dropped first.
MAX_BUFFERED = 10_000


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = current_job.set(job_id)
    try:
        yield
    finally:
        current_job.reset(token)


class JobLog(logging.Handler):
    """Installed on the root logger of a worker process for as long as it runs jobs."""

    def __init__(self, store: JobObservations, source: str) -> None:
        super().__init__(level=logging.INFO)
        self.store = store
        self.source = source
        self._pending: list[NewLogLine] = []
        self._last_ts = 0.0
        self._guard = threading.Lock()
        #: One flush at a time, so this worker's lines are stored in the order written.
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="job-log", daemon=True)
        self.setFormatter(logging.Formatter("%(message)s"))

    def start(self) -> None:
        logging.getLogger().addHandler(self)
        self._thread.start()

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        super().close()

    def write(self, job_id: str, level: str, message: str) -> None:
        """A line from the runner itself (also echoed to the worker's own log)."""
        _log.log(logging.getLevelName(level), "job %s: %s", job_id, message,
                 extra={"batchery_job_log": True})
        self._add(NewLogLine(job_id=job_id, ts=time.time(), level=level, source=self.source,
                             message=message))

    def emit(self, record: logging.LogRecord) -> None:
        job_id = current_job.get()
        if job_id is None or getattr(record, "batchery_job_log", False):
            return
        try:
            message = self.format(record)
        except Exception:  # a bad format string must not break the user's predictor
            message = str(record.msg)
        if not record.name.startswith("batchery"):
            message = f"[{record.name}] {message}"
        self._add(NewLogLine(job_id=job_id, ts=record.created, level=record.levelname,
                             source=self.source, message=message))

    def _add(self, line: NewLogLine) -> None:
        with self._guard:
            # Never earlier than this worker's previous line: a record created on one
            # thread just before another's line, or a clock stepped back, must not show
            # this worker's lines out of the order it wrote them.
            if line.ts < self._last_ts:
                line = dataclasses.replace(line, ts=self._last_ts)
            self._last_ts = line.ts
            self._pending.append(line)
            if len(self._pending) > MAX_BUFFERED:
                del self._pending[0]

    def flush(self) -> None:
        with self._flushing:
            with self._guard:
                lines, self._pending = self._pending, []
            if not lines:
                return
            try:
                self.store.append_logs(lines)
            except Exception:
                with self._guard:  # keep them for the next try
                    self._pending[:0] = lines[-MAX_BUFFERED:]

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.flush()
