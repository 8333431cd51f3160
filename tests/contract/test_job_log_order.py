"""Job logs read in time order, whichever worker wrote each line and whenever it reached
the store: paging by cursor or by line id, the follower's `before` bound, and the worker's
`JobLog` keeping its own lines in the order it wrote them. Runs on every adapter."""

from __future__ import annotations

import logging
import time

from batchery.jobs.joblog import JobLog, job_context
from batchery.model.jobs import LogLine
from batchery.ports.jobs import LogCursor, NewLogLine
from batchery.stores.sql.store import SqlStore

JOB = "job_order"
#: Timestamps as `time.time()` gives them, with every bit of a double in use: a cursor
#: must find its line again after a round trip through the database.
T0 = 1_712_345_678.123_456_7


def line(ts: float, source: str, message: str, job_id: str = JOB) -> NewLogLine:
    return NewLogLine(job_id=job_id, ts=ts, level="INFO", source=source, message=message)


def messages(lines: list[LogLine]) -> list[str]:
    return [x.message for x in lines]


def read_all(store: SqlStore, *, page: int, by_id: bool = False,
             before: float | None = None) -> list[LogLine]:
    """Every line, a page at a time, resuming from a cursor or (as older callers do) from
    the id of the last line read."""
    seen: list[LogLine] = []
    after: LogCursor | int = 0
    while batch := store.read_logs(JOB, after=after, limit=page, before=before):
        seen.extend(batch)
        after = batch[-1].id if by_id else LogCursor.of(batch[-1])
    return seen


def test_lines_of_several_workers_are_read_in_time_order(store: SqlStore) -> None:
    # Worker a flushes first, though b wrote lines in between; c shares a's timestamp.
    store.append_logs([line(T0 + 0.1, "a", "a1"), line(T0 + 0.3, "a", "a2"),
                       line(T0 + 0.5, "a", "a3")])
    store.append_logs([line(T0 + 0.2, "b", "b1"), line(T0 + 0.4, "b", "b2"),
                       line(T0 + 0.6, "b", "b3")])
    store.append_logs([line(T0 + 0.3, "c", "c1"), line(T0, "other", "x", job_id="job_x")])
    expected = ["a1", "b1", "a2", "c1", "b2", "a3", "b3"]  # a2 and c1 tie: by id
    assert messages(store.read_logs(JOB, after=0, limit=100)) == expected
    for page in (1, 2, 3):
        assert messages(read_all(store, page=page)) == expected
        assert messages(read_all(store, page=page, by_id=True)) == expected


def test_an_id_cursor_means_after_that_line_in_time_order(store: SqlStore) -> None:
    store.append_logs([line(T0 + 0.5, "a", "late-flushed newer")])
    store.append_logs([line(T0 + 0.1, "b", "older"), line(T0 + 0.9, "b", "newest")])
    store.append_logs([line(T0, "other", "elsewhere", job_id="job_x")])
    by_message = {x.message: x for x in store.read_logs(JOB, after=0, limit=10)}
    # The line with the lowest id is not the first: what follows it is what is newer.
    after_first_written = store.read_logs(JOB, after=by_message["late-flushed newer"].id,
                                          limit=10)
    assert messages(after_first_written) == ["newest"]
    assert messages(store.read_logs(JOB, after=by_message["older"].id, limit=10)) == [
        "late-flushed newer", "newest"]
    # An id that is not one of the job's lines reads from the start.
    other = store.read_logs("job_x", after=0, limit=10)[0]
    assert messages(store.read_logs(JOB, after=other.id, limit=10)) == [
        "older", "late-flushed newer", "newest"]
    assert store.read_logs(JOB, after=by_message["newest"].id, limit=10) == []


def test_before_keeps_lines_a_worker_may_still_precede(store: SqlStore) -> None:
    store.append_logs([line(T0 + 1, "a", "a1"), line(T0 + 3, "a", "a3")])
    assert messages(store.read_logs(JOB, after=0, limit=10, before=T0 + 3)) == ["a1"]
    assert messages(store.read_logs(JOB, after=0, limit=10, before=T0 + 3.000_001)) == [
        "a1", "a3"]


def test_a_follower_neither_misses_nor_repeats_a_late_flushed_line(store: SqlStore) -> None:
    """A follower reads up to a horizon that trails the clock by the settle window; each
    worker flushes its lines before the horizon passes them, but in any order."""
    shown: list[LogLine] = []
    cursor: LogCursor | int = 0

    def follow(horizon: float) -> None:
        nonlocal cursor
        while batch := store.read_logs(JOB, after=cursor, limit=2, before=horizon):
            shown.extend(batch)
            cursor = LogCursor.of(batch[-1])

    store.append_logs([line(T0 + 1.0, "fast", "f1"), line(T0 + 1.2, "fast", "f2")])
    follow(T0 + 1.1)
    store.append_logs([line(T0 + 1.15, "slow", "s1")])  # older than f2, flushed after it
    store.append_logs([line(T0 + 1.4, "fast", "f3")])
    follow(T0 + 1.3)
    store.append_logs([line(T0 + 1.3, "slow", "s2"), line(T0 + 1.5, "slow", "s3")])
    follow(T0 + 1.45)
    follow(T0 + 10)  # the job is over: the rest
    follow(T0 + 10)
    assert messages(shown) == ["f1", "s1", "f2", "s2", "f3", "s3"]
    assert messages(shown) == messages(read_all(store, page=100))


def test_a_workers_own_lines_keep_the_order_it_wrote_them(store: SqlStore) -> None:
    """A record made on one thread just before another thread's line, or a clock stepped
    back, gives a line an older timestamp than the worker's previous one."""
    joblog = JobLog(store, "w1")
    joblog.write(JOB, "INFO", "first")
    record = logging.LogRecord("predictor", logging.INFO, __file__, 1, "second", None, None)
    record.created = time.time() - 5.0
    with job_context(JOB):
        joblog.emit(record)
    joblog.flush()
    joblog.write(JOB, "INFO", "third")
    joblog.close()
    lines = store.read_logs(JOB, after=0, limit=10)
    assert messages(lines) == ["first", "[predictor] second", "third"]
    assert lines[1].ts == lines[0].ts
