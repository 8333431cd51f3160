"""Per-job logs on SQLAlchemy Core: mixed into `SqlStore`, whose engine it shares.

A log is read in time order, by the writer's `ts` with ties broken by `id`, whichever
worker wrote each line and whenever it was flushed. Paging keeps a (ts, id) cursor, so a
page never repeats nor skips a line that was there when the previous page was read."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from batchery.model.jobs import LogLine
from batchery.ports.jobs import LogCursor, NewLogLine
from batchery.stores.sql.tables import job_logs


class SqlLogStore:
    engine: Engine

    def append_logs(self, lines: Sequence[NewLogLine]) -> None:
        if not lines:
            return
        with self.engine.begin() as conn:
            conn.execute(job_logs.insert(), [
                {"job_id": x.job_id, "ts": x.ts, "level": x.level[:8],
                 "source": x.source[:128], "message": x.message} for x in lines])

    def read_logs(self, job_id: str, *, after: LogCursor | int, limit: int,
                  before: float | None = None) -> list[LogLine]:
        query = job_logs.select().where(job_logs.c.job_id == job_id)
        if before is not None:
            query = query.where(job_logs.c.ts < before)
        with self.engine.begin() as conn:
            cursor = after if isinstance(after, LogCursor) else _cursor_at(conn, job_id, after)
            if cursor is not None:
                query = query.where(_after(cursor))
            query = query.order_by(job_logs.c.ts, job_logs.c.id).limit(limit)
            return [LogLine(id=r["id"], job_id=r["job_id"], ts=r["ts"], level=r["level"],
                            source=r["source"], message=r["message"])
                    for r in conn.execute(query).mappings()]


def _cursor_at(conn: Connection, job_id: str, line_id: int) -> LogCursor | None:
    """The place of the job's line `line_id`: callers that predate time order pass the id
    of the last line they read. None (from the start) for 0 or another job's line."""
    if line_id <= 0:
        return None
    row = conn.execute(sa.select(job_logs.c.ts).where(
        job_logs.c.id == line_id, job_logs.c.job_id == job_id)).first()
    return None if row is None else LogCursor(row.ts, line_id)


def _after(cursor: LogCursor) -> sa.ColumnElement[bool]:
    # Spelled out rather than as a row-value comparison: both databases then use the
    # `ts` bound of an index on (job_id, ts, id), should one be added.
    return sa.or_(job_logs.c.ts > cursor.ts,
                  sa.and_(job_logs.c.ts == cursor.ts, job_logs.c.id > cursor.id))
