"""`SqlStore`: the metadata store on SQLAlchemy Core, for SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from batchery.model import webhooks
from batchery.model.batches import (
    CANCELLABLE,
    PAUSABLE,
    PHASE_STATUSES,
    RUNNING,
    Batch,
    BatchError,
    BatchStatus,
    EndReason,
)
from batchery.model.chunks import Chunk, ChunkLease, ChunkPart, ChunkSpec, ChunkState
from batchery.model.deployments import CONFIG, Deployment, Endpoint, pool_from_dict
from batchery.model.exceptions import Conflict, NotFound
from batchery.model.files import INTERNAL_PURPOSE_PREFIX, FileRecord
from batchery.model.idempotency import IdempotencyKey
from batchery.model.jobs import BatchState
from batchery.ports.store import Page, PhaseLease, Store, WorkerInfo
from batchery.stores.sql import engine as engines
from batchery.stores.sql import migrate, tables
from batchery.stores.sql.idempotency_store import SqlIdempotencyStore, take_key
from batchery.stores.sql.job_store import SqlJobStore, deployment_row, endpoint_row
from batchery.stores.sql.leases import Leases
from batchery.stores.sql.log_store import SqlLogStore
from batchery.stores.sql.owners import SqlOwnerStore
from batchery.stores.sql.tables import (
    batches,
    chunk_parts,
    chunks,
    deployments,
    endpoints,
    files,
    job_batches,
    jobs,
    workers,
)
from batchery.stores.sql.webhook_store import SqlWebhookStore, emit_event

_OPEN_CHUNK_STATES = (ChunkState.QUEUED.value, ChunkState.LEASED.value)
_BATCH_BY_ID = batches.select().where(batches.c.id == sa.bindparam("batch_id"))
_PROJECT_BATCH_BY_ID = _BATCH_BY_ID.where(batches.c.project == sa.bindparam("project"))


class SqlStore(SqlLogStore, SqlJobStore, SqlWebhookStore, SqlIdempotencyStore, SqlOwnerStore,
               Store):
    def __init__(self, engine: Engine, *, run_migrations: bool = True) -> None:
        self.engine = engine
        #: For transactions that only read: on SQLite they wait for no writer.
        self._read = engines.reader(engine)
        self._now = engines.db_now(engine)
        self._pg = engine.dialect.name == "postgresql"
        # Whole Unix seconds, truncated like int(time.time()): PostgreSQL's cast rounds.
        self._now_s = sa.cast(sa.func.floor(self._now) if self._pg else self._now,
                              sa.BigInteger)
        self._phases = Leases(batches, key="id", now=self._now)
        self._chunks = Leases(chunks, key="id", now=self._now, state="state",
                              queued=ChunkState.QUEUED.value, leased=ChunkState.LEASED.value)
        self._job_phases = Leases(jobs, key="id", now=self._now)
        self._job_batches = Leases(job_batches, key="id", now=self._now, state="state",
                                   queued=BatchState.QUEUED.value,
                                   leased=BatchState.LEASED.value)
        self._candidates: dict[tuple[str, ...] | None, sa.Select[Any]] = {}
        self._prepare_chunk_statements()
        if run_migrations:
            migrate.upgrade(engine)

    @classmethod
    def from_url(cls, url: str) -> SqlStore:
        return cls(engines.create(url))

    def close(self) -> None:
        self.engine.dispose()

    # -- files -------------------------------------------------------------------------

    def insert_file(self, record: FileRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(files.insert().values(**_file_row(record)))

    def get_file(self, project: str | None, file_id: str) -> FileRecord | None:
        query = files.select().where(files.c.id == file_id)
        if project is not None:
            query = query.where(files.c.project == project)
        with self.engine.begin() as conn:
            row = conn.execute(query).mappings().first()
        return _file(row) if row else None

    def list_files(self, project: str, *, purpose: str | None, after: str | None, limit: int,
                   order: str, now: int | None = None) -> Page[FileRecord]:
        query = files.select().where(files.c.project == project)
        if now is not None:
            query = query.where(sa.or_(files.c.expires_at.is_(None), files.c.expires_at > now))
        if purpose:
            query = query.where(files.c.purpose == purpose)
        else:
            query = query.where(files.c.purpose.not_like(f"{INTERNAL_PURPOSE_PREFIX}%"))
        rows = self._page(query, files, project, after, limit, descending=order != "asc")
        return Page([_file(r) for r in rows[:limit]], len(rows) > limit)

    def file_bytes(self, project: str, *, now: int) -> int:
        query = sa.select(sa.func.coalesce(sa.func.sum(files.c.bytes), 0)).where(
            files.c.project == project,
            sa.or_(files.c.expires_at.is_(None), files.c.expires_at > now))
        with self.engine.begin() as conn:
            return int(conn.execute(query).scalar_one())

    def delete_file(self, project: str, file_id: str) -> FileRecord | None:
        with self.engine.begin() as conn:
            row = conn.execute(files.select().where(files.c.id == file_id,
                                                    files.c.project == project)
                               ).mappings().first()
            if row is None:
                return None
            conn.execute(files.delete().where(files.c.seq == row["seq"]))
        return _file(row)

    def blob_in_use(self, storage_key: str, file_id: str | None = None) -> bool:
        ended = [s.value for s in BatchStatus if s.is_terminal]
        readers = [batches.c.input_key == storage_key,
                   batches.c.input_file_id.in_(
                       sa.select(files.c.id).where(files.c.storage_key == storage_key))]
        if file_id is not None:
            # A batch not validated yet knows its input only by the file's id.
            readers.append(batches.c.input_file_id == file_id)
        query = sa.select(batches.c.id).where(
            batches.c.status.not_in(ended), sa.or_(*readers)).limit(1)
        with self.engine.begin() as conn:
            return conn.execute(query).first() is not None

    # -- batches -----------------------------------------------------------------------

    def insert_batch(self, batch: Batch,
                     key: IdempotencyKey | None = None) -> IdempotencyKey | None:
        with self.engine.begin() as conn:
            if key is not None and (held := take_key(conn, key)) is not None:
                return held
            conn.execute(batches.insert().values(**_batch_row(batch)))
        return None

    def get_batch(self, project: str | None, batch_id: str) -> Batch | None:
        with self._read.begin() as conn:
            return self._get_batch(conn, project, batch_id)

    def _get_batch(self, conn: Connection, project: str | None, batch_id: str) -> Batch | None:
        # Statements built once: building one per call cost more than running it.
        if project is None:
            row = conn.execute(_BATCH_BY_ID, {"batch_id": batch_id}).mappings().first()
        else:
            row = conn.execute(_PROJECT_BATCH_BY_ID, {"batch_id": batch_id,
                                                      "project": project}).mappings().first()
        return _batch(row) if row else None

    def list_batches(self, project: str, *, after: str | None, limit: int,
                     before: str | None = None, endpoint: str | None = None,
                     exclude_endpoint: str | None = None, id_prefix: str | None = None,
                     exclude_id_prefix: str | None = None) -> Page[Batch]:
        query = batches.select().where(batches.c.project == project)
        if endpoint is not None:
            query = query.where(batches.c.endpoint == endpoint)
        if exclude_endpoint is not None:
            query = query.where(batches.c.endpoint != exclude_endpoint)
        if id_prefix is not None:
            query = query.where(batches.c.id.startswith(id_prefix, autoescape=True))
        if exclude_id_prefix is not None:
            query = query.where(~batches.c.id.startswith(exclude_id_prefix, autoescape=True))
        if before:
            # The page just newer than `before`: read upwards, then present newest first.
            rows = self._page(query, batches, project, before, limit, descending=False)
            return Page([_batch(r) for r in reversed(rows[:limit])], len(rows) > limit)
        rows = self._page(query, batches, project, after, limit, descending=True)
        return Page([_batch(r) for r in rows[:limit]], len(rows) > limit)

    def _page(self, query: sa.Select[Any], table: sa.Table, project: str,
              anchor_id: str | None, limit: int, *, descending: bool) -> list[RowMapping]:
        """Up to `limit + 1` rows past `anchor_id` (older if descending, else newer)."""
        if anchor_id:
            # Only the caller's project's ids are anchors: another project's id pages like
            # an unknown one (an empty page), so it does not tell that the id exists.
            anchor = sa.select(table.c.seq).where(
                table.c.id == anchor_id, table.c.project == project).scalar_subquery()
            query = query.where(table.c.seq < anchor if descending else table.c.seq > anchor)
        query = query.order_by(table.c.seq.desc() if descending else table.c.seq.asc())
        with self.engine.begin() as conn:
            return list(conn.execute(query.limit(limit + 1)).mappings())

    def delete_batch(self, project: str, batch_id: str) -> bool:
        ended = [s.value for s in BatchStatus if s.is_terminal]
        with self.engine.begin() as conn:
            result = conn.execute(batches.delete().where(
                batches.c.id == batch_id, batches.c.project == project,
                batches.c.status.in_(ended)))
            return result.rowcount == 1

    def request_cancel(self, project: str, batch_id: str, now: int) -> Batch:
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(
                batches.c.id == batch_id, batches.c.project == project,
                batches.c.status.in_([s.value for s in CANCELLABLE]),
            ).values(status=BatchStatus.CANCELLING.value, cancelling_at=now,
                     end_reason=EndReason.CANCELLED.value, paused_at=None))
            batch = self._get_batch(conn, project, batch_id)
        if batch is None:
            raise NotFound(f"No batch found with id '{batch_id}'.")
        if batch.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED,
                                BatchStatus.FINALIZING):
            raise Conflict(f"Cannot cancel a batch with status '{batch.status.value}'.")
        return batch

    def expire_due(self, now: int) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(batches.update().where(
                # A paused batch's window runs on: it expires like any other.
                batches.c.status.in_([BatchStatus.VALIDATING.value,
                                      BatchStatus.IN_PROGRESS.value,
                                      BatchStatus.PAUSED.value]),
                batches.c.expires_at <= now,
            ).values(status=BatchStatus.FINALIZING.value, finalizing_at=now,
                     end_reason=EndReason.EXPIRED.value, paused_at=None))
            return result.rowcount

    def pause_batch(self, project: str, batch_id: str, now: int) -> Batch:
        with self.engine.begin() as conn:
            # Validation is not held back: the batch is marked, and `start_batch` leaves
            # it paused instead of in progress.
            conn.execute(batches.update().where(
                batches.c.id == batch_id, batches.c.project == project,
                batches.c.status.in_([s.value for s in PAUSABLE]),
                batches.c.paused_at.is_(None),
            ).values(paused_at=now, status=sa.case(
                (batches.c.status == BatchStatus.IN_PROGRESS.value, BatchStatus.PAUSED.value),
                else_=batches.c.status)))
            batch = self._get_batch(conn, project, batch_id)
        if batch is None:
            raise NotFound(f"No batch found with id '{batch_id}'.")
        if batch.paused_at is None:
            raise Conflict(_no_control("paused", batch.status))
        return batch

    def resume_batch(self, project: str, batch_id: str, now: int) -> Batch:
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(
                batches.c.id == batch_id, batches.c.project == project,
                batches.c.paused_at.is_not(None),
                batches.c.status.in_([s.value for s in PAUSABLE]),
            ).values(paused_at=None, status=sa.case(
                (batches.c.status == BatchStatus.PAUSED.value, BatchStatus.IN_PROGRESS.value),
                else_=batches.c.status)))
            batch = self._get_batch(conn, project, batch_id)
            if batch is not None and batch.remote is None \
                    and batch.status is BatchStatus.IN_PROGRESS:
                # Every chunk may have ended while it was paused: then it is done now.
                self._finalize_if_drained(conn, batch_id)
                batch = self._get_batch(conn, project, batch_id)
        if batch is None:
            raise NotFound(f"No batch found with id '{batch_id}'.")
        if batch.status.is_terminal:
            raise Conflict(_no_control("resumed", batch.status))
        return batch

    def lines_ahead(self, priority: int) -> int:
        # Paused batches wait for their owner, so they are not ahead of anyone; remote
        # ones run at a provider, on no worker of ours.
        left = sa.func.coalesce(sa.func.sum(sa.case(
            (batches.c.total > batches.c.completed + batches.c.failed,
             batches.c.total - batches.c.completed - batches.c.failed), else_=0)), 0)
        query = sa.select(left).where(
            batches.c.status.in_([BatchStatus.VALIDATING.value, BatchStatus.IN_PROGRESS.value]),
            batches.c.priority >= priority, batches.c.remote.is_(None))
        with self.engine.begin() as conn:
            return int(conn.execute(query).scalar_one())

    def recent_runs(self, since: int, limit: int = 500) -> list[Batch]:
        c = batches.c
        stopped = sa.func.coalesce(c.finalizing_at, c.cancelling_at, c.completed_at,
                                   c.cancelled_at, c.expired_at, c.failed_at)
        query = batches.select().where(
            c.in_progress_at.is_not(None), c.remote.is_(None),
            sa.or_(stopped.is_(None), stopped >= since),
        ).order_by(c.in_progress_at.desc()).limit(limit)
        with self.engine.begin() as conn:
            return [_batch(r) for r in conn.execute(query).mappings()]

    # -- batch-level phases ------------------------------------------------------------

    def claim_phase(self, owner: str, lease_s: float) -> PhaseLease | None:
        # A batch ending (cancelled, expired, drained) waits until no chunk is still being
        # run under a live lease: those workers wind down within a second or two and commit
        # what they finished, so it is kept.
        running = sa.exists().where(chunks.c.batch_id == batches.c.id,
                                    chunks.c.state == ChunkState.LEASED.value,
                                    chunks.c.lease_expires_at >= self._now)
        ending = [s.value for s in PHASE_STATUSES if s is not BatchStatus.VALIDATING]
        needs_work = sa.or_(
            batches.c.status == BatchStatus.VALIDATING.value,
            sa.and_(batches.c.status.in_(ending), ~running),
            sa.and_(batches.c.status == BatchStatus.IN_PROGRESS.value,
                    batches.c.remote.is_not(None)))
        # Taking over a lease that ran out means the worker before us died at this work:
        # that counts as a failed try, so work that kills its worker cannot loop forever.
        died = sa.case((batches.c.lease_token.is_not(None), 1), else_=0)
        with self.engine.begin() as conn:
            claimed = self._phases.claim(
                conn, owner, lease_s, where=[needs_work],
                order_by=[batches.c.priority.desc(), batches.c.expires_at, batches.c.seq],
                values={"phase_attempts": batches.c.phase_attempts + died})
        if claimed is None:
            return None
        row = claimed.row
        return PhaseLease(batch=_batch(row), token=claimed.token,
                          attempts=row["phase_attempts"], last_error=row["phase_error"])

    def _phase_fence(self, lease: PhaseLease) -> sa.ColumnElement[bool]:
        return self._phases.fence(lease.batch.id, lease.token,
                                  batches.c.status == lease.batch.status.value)

    def renew_phase(self, lease: PhaseLease, lease_s: float) -> bool:
        with self.engine.begin() as conn:
            return self._phases.renew(conn, lease.batch.id, lease.token, lease_s,
                                      batches.c.status == lease.batch.status.value)

    def release_phase(self, lease: PhaseLease, retry_in: float | None = None,
                      error: str | None = None) -> None:
        # Released without an error, the work went well: the count of failed tries starts
        # again. With one, it grows, and the error is kept as the reason if they run out.
        counts = ({"phase_attempts": batches.c.phase_attempts + 1, "phase_error": error}
                  if error is not None else {"phase_attempts": 0, "phase_error": None})
        with self.engine.begin() as conn:
            self._phases.release(conn, lease.batch.id, lease.token, delay_s=retry_in or 0.0,
                                 values=counts)

    def save_remote(self, lease: PhaseLease, remote: dict[str, Any], *, completed: int,
                    failed: int) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(batches.update().where(self._phase_fence(lease)).values(
                remote=remote, completed=completed, failed=failed))
            return result.rowcount == 1

    def start_batch(self, lease: PhaseLease, *, total: int, model: str | None,
                    input_key: str, chunks: Sequence[ChunkSpec], now: int,
                    remote: dict[str, Any] | None = None) -> bool:
        with self.engine.begin() as conn:
            if not self._phases.commit(conn, lease.batch.id, lease.token, {
                    "status": _started_status(), "in_progress_at": now,
                    "total": total, "model": model, "input_key": input_key,
                    "remote": remote, "phase_attempts": 0, "phase_error": None},
                    batches.c.status == lease.batch.status.value):
                return False
            rows = [{"batch_id": lease.batch.id, "idx": c.index, "start_offset": c.start_offset,
                     "end_offset": c.end_offset, "first_line": c.first_line,
                     "n_lines": c.n_lines, "state": ChunkState.QUEUED.value}
                    for c in chunks]
            if rows and remote is None:
                conn.execute(tables.chunks.insert(), rows)  # `chunks` is the argument here
        return True

    def fail_batch(self, lease: PhaseLease, errors: Sequence[BatchError], now: int) -> bool:
        with self.engine.begin() as conn:
            if not self._phases.commit(conn, lease.batch.id, lease.token, {
                    "status": BatchStatus.FAILED.value, "failed_at": now,
                    "errors": [e.to_dict() for e in errors], "phase_attempts": 0},
                    batches.c.status == lease.batch.status.value):
                return False
            self._drop_chunks(conn, lease.batch.id)
            _emit_batch_event(conn, lease.batch, BatchStatus.FAILED, now)
        return True

    def abort_open_chunks(self, batch_id: str) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(chunks.update().where(
                chunks.c.batch_id == batch_id, chunks.c.state.in_(_OPEN_CHUNK_STATES),
            ).values(state=ChunkState.ABORTED.value, lease_token=None, lease_owner=None))
            return result.rowcount

    def list_chunks(self, batch_id: str) -> list[Chunk]:
        query = chunks.select().where(chunks.c.batch_id == batch_id).order_by(chunks.c.idx)
        with self.engine.begin() as conn:
            return [_chunk(r) for r in conn.execute(query).mappings()]

    def list_parts(self, batch_id: str) -> list[ChunkPart]:
        query = (chunk_parts.select().where(chunk_parts.c.batch_id == batch_id)
                 .order_by(chunk_parts.c.lo, chunk_parts.c.id))
        with self.engine.begin() as conn:
            return [_part(r) for r in conn.execute(query).mappings()]

    def list_parts_after(self, batch_id: str, after_id: int,
                         limit: int | None = None) -> list[tuple[int, ChunkPart]]:
        query = (chunk_parts.select().where(chunk_parts.c.batch_id == batch_id,
                                            chunk_parts.c.id > after_id)
                 .order_by(chunk_parts.c.id).limit(limit))
        with self.engine.begin() as conn:
            return [(r["id"], _part(r)) for r in conn.execute(query).mappings()]

    def done_offsets(self, batch_id: str, start: int, end: int) -> set[int]:
        query = sa.select(chunk_parts.c.offsets).where(
            chunk_parts.c.batch_id == batch_id, chunk_parts.c.lo < end,
            chunk_parts.c.hi >= start)
        with self.engine.begin() as conn:
            return {o for (offsets,) in conn.execute(query) for o in offsets
                    if start <= o < end}

    def finish_batch(self, lease: PhaseLease, *, outputs: Sequence[FileRecord],
                     output_file_id: str | None, error_file_id: str | None,
                     completed: int, failed: int, unrun: int, now: int) -> bool:
        reason = lease.batch.end_reason or EndReason.DONE
        status = reason.final_status
        stamp = {BatchStatus.COMPLETED: "completed_at", BatchStatus.CANCELLED: "cancelled_at",
                 BatchStatus.EXPIRED: "expired_at"}[status]
        with self.engine.begin() as conn:
            if not self._phases.commit(conn, lease.batch.id, lease.token, {
                    "status": status.value, "output_file_id": output_file_id,
                    "error_file_id": error_file_id, "completed": completed, "failed": failed,
                    "unrun": unrun, "phase_attempts": 0, stamp: now},
                    batches.c.status == lease.batch.status.value):
                return False
            for record in outputs:
                conn.execute(files.insert().values(**_file_row(record)))
            self._drop_chunks(conn, lease.batch.id)
            _emit_batch_event(conn, lease.batch, status, now)
        return True

    @staticmethod
    def _drop_chunks(conn: Connection, batch_id: str) -> None:
        conn.execute(chunks.delete().where(chunks.c.batch_id == batch_id))
        conn.execute(chunk_parts.delete().where(chunk_parts.c.batch_id == batch_id))

    # -- the chunk queue ---------------------------------------------------------------

    def _prepare_chunk_statements(self) -> None:
        """The statements a worker runs for every chunk, built once with bind parameters
        (building a SQLAlchemy statement costs more CPU than running it on SQLite)."""
        # By priority, then the earliest deadline, then age.
        self._claim_chunk_query = self._chunks.claim_query(
            join=(batches, batches.c.id == chunks.c.batch_id),
            where=[batches.c.status == BatchStatus.IN_PROGRESS.value],
            order_by=[batches.c.priority.desc(), batches.c.expires_at, chunks.c.id])
        self._chunk_batch = sa.select(batches.c.endpoint, batches.c.input_key).where(
            batches.c.id == sa.bindparam("b_id"))
        counts = {"n_ok": chunks.c.n_ok + sa.bindparam("p_ok"),
                  "n_err": chunks.c.n_err + sa.bindparam("p_err"), "expiries": 0}
        self._part_counts = self._chunks.fenced_update(counts, keep_lease=True)
        self._part_counts_done = self._chunks.fenced_update(
            {**counts, "state": ChunkState.DONE.value})
        self._add_to_batch = batches.update().where(batches.c.id == sa.bindparam("b_id")).values(
            completed=batches.c.completed + sa.bindparam("p_ok"),
            failed=batches.c.failed + sa.bindparam("p_err"),
            input_tokens=batches.c.input_tokens + sa.bindparam("p_in"),
            output_tokens=batches.c.output_tokens + sa.bindparam("p_out"),
            cached_tokens=batches.c.cached_tokens + sa.bindparam("p_cached"),
            reasoning_tokens=batches.c.reasoning_tokens + sa.bindparam("p_reasoning"),
            cost=batches.c.cost + sa.bindparam("p_cost"))
        self._insert_part = chunk_parts.insert()
        still_open = sa.exists().where(chunks.c.batch_id == sa.bindparam("b_id"),
                                       chunks.c.state.in_(_OPEN_CHUNK_STATES))
        self._finalize_drained = batches.update().where(
            batches.c.id == sa.bindparam("b_id"),
            batches.c.status == BatchStatus.IN_PROGRESS.value, ~still_open,
        ).values(status=BatchStatus.FINALIZING.value, end_reason=EndReason.DONE.value,
                 finalizing_at=self._now_s)
        used = batches.c.input_tokens + batches.c.output_tokens
        crossed = sa.or_(
            sa.and_(batches.c.max_total_tokens.is_not(None), used >= batches.c.max_total_tokens),
            sa.and_(batches.c.max_cost.is_not(None), batches.c.cost >= batches.c.max_cost))
        self._ceiling = batches.update().where(
            batches.c.id == sa.bindparam("b_id"), crossed,
            batches.c.status.in_([BatchStatus.IN_PROGRESS.value, BatchStatus.PAUSED.value]),
        ).values(status=BatchStatus.CANCELLING.value, cancelling_at=self._now_s,
                 end_reason=EndReason.BUDGET_EXCEEDED.value, paused_at=None)

    def claim_chunk(self, owner: str, lease_s: float) -> ChunkLease | None:
        with self.engine.begin() as conn:
            claimed = self._chunks.claim(conn, owner, lease_s, query=self._claim_chunk_query)
            if claimed is None:
                return None
            batch = conn.execute(self._chunk_batch, {"b_id": claimed.row["batch_id"]}).one()
        row = claimed.row
        return ChunkLease(chunk_id=claimed.key, batch_id=row["batch_id"], token=claimed.token,
                          spec=_spec(row), attempts=row["attempts"], endpoint=batch.endpoint,
                          input_key=batch.input_key, expiries=row["expiries"],
                          answered=row["n_ok"] + row["n_err"])

    def _running(self, batch_id: str) -> sa.ColumnElement[bool]:
        """The chunk's batch still wants its lines run (not cancelled, expired or failed). A
        paused one does: the chunks in hand when it was paused finish and commit."""
        return sa.exists().where(batches.c.id == batch_id,
                                 batches.c.status.in_([s.value for s in RUNNING]))

    def renew_chunk(self, lease: ChunkLease, lease_s: float) -> bool:
        with self.engine.begin() as conn:
            return self._chunks.renew(conn, lease.chunk_id, lease.token, lease_s,
                                      self._running(lease.batch_id))

    def commit_part(self, lease: ChunkLease, part: ChunkPart) -> bool:
        with self.engine.begin() as conn:
            if not self._commit_part(conn, lease, part):
                return False
            if part.spent:
                self._stop_at_ceiling(conn, lease.batch_id)
            return True

    def _commit_part(self, conn: Connection, lease: ChunkLease, part: ChunkPart, *,
                     done: bool = False) -> bool:
        """Record answered lines, fenced by the chunk's lease (which it keeps, unless `done`:
        then the same write ends the chunk). Progress proves the chunk does not kill its
        workers: its run of expiries starts again."""
        if not self._chunks.run_fenced(
                conn, self._part_counts_done if done else self._part_counts, lease.chunk_id,
                lease.token, {"p_ok": part.n_ok, "p_err": part.n_err}):
            return False
        if not part.offsets:
            return True
        conn.execute(self._add_to_batch, {
            "b_id": lease.batch_id, "p_ok": part.n_ok, "p_err": part.n_err,
            "p_in": part.input_tokens, "p_out": part.output_tokens,
            "p_cached": part.cached_tokens, "p_reasoning": part.reasoning_tokens,
            "p_cost": part.cost})
        # The part goes in after the batch's row is locked by the update above: ids are
        # then handed out in the order parts commit, so a reader paging a running batch's
        # parts by id (`list_parts_after`) never passes one that commits later.
        conn.execute(self._insert_part, {
            "batch_id": lease.batch_id, "chunk_id": lease.chunk_id, "lo": min(part.offsets),
            "hi": max(part.offsets), "offsets": list(part.offsets), "n_ok": part.n_ok,
            "n_err": part.n_err, "out_key": part.out_key, "err_key": part.err_key})
        return True

    def _stop_at_ceiling(self, conn: Connection, batch_id: str) -> None:
        """(extension) A batch whose spend reached a ceiling stops like a cancel, in the
        transaction of the commit that got it there: its chunks' renewals fail from now on,
        and its unrun lines are reported `budget_exceeded`. A batch whose last lines got it
        there has nothing left to stop: it is finalizing already, and completes."""
        conn.execute(self._ceiling, {"b_id": batch_id})

    def complete_chunk(self, lease: ChunkLease, part: ChunkPart | None = None) -> bool:
        with self.engine.begin() as conn:
            # One fenced write records the last part's counts and ends the chunk.
            if part is not None:
                if not self._commit_part(conn, lease, part, done=True):
                    return False
            elif not self._chunks.commit(conn, lease.chunk_id, lease.token,
                                         {"state": ChunkState.DONE.value}):
                return False
            self._finalize_if_drained(conn, lease.batch_id)
            if part is not None and part.spent:
                self._stop_at_ceiling(conn, lease.batch_id)
        return True

    def split_chunk(self, lease: ChunkLease, specs: Sequence[ChunkSpec],
                    done: Sequence[tuple[int, int]], expiries: int) -> bool:
        """Replace a leased chunk by `specs`, each carrying the (ok, errors) counts of its
        lines already answered (`done`) and `expiries`, and all queued."""
        with self.engine.begin() as conn:
            if not self._chunks.commit(conn, lease.chunk_id, lease.token,
                                       {"state": ChunkState.SPLIT.value}):
                return False
            top = conn.execute(sa.select(sa.func.max(chunks.c.idx)).where(
                chunks.c.batch_id == lease.batch_id)).scalar_one()
            conn.execute(chunks.insert(), [
                {"batch_id": lease.batch_id, "idx": top + 1 + i, "start_offset": s.start_offset,
                 "end_offset": s.end_offset, "first_line": s.first_line, "n_lines": s.n_lines,
                 "state": ChunkState.QUEUED.value, "attempts": lease.attempts,
                 "expiries": expiries, "n_ok": ok, "n_err": err}
                for i, (s, (ok, err)) in enumerate(zip(specs, done, strict=True))])
        return True

    def _finalize_if_drained(self, conn: Connection, batch_id: str) -> None:
        conn.execute(self._finalize_drained, {"b_id": batch_id})

    def release_chunk(self, lease: ChunkLease, *, error: str | None, count_attempt: bool,
                      max_attempts: int, delay_s: float = 0.0) -> None:
        attempts = lease.attempts + (1 if count_attempt else 0)
        with self.engine.begin() as conn:
            if attempts < max_attempts:
                self._chunks.release(conn, lease.chunk_id, lease.token, delay_s=delay_s,
                                     values={"attempts": attempts, "last_error": error})
                return
            # Out of attempts: its lines not answered yet go to the error file.
            failed = conn.execute(chunks.update().where(
                self._chunks.fence(lease.chunk_id, lease.token),
            ).values(state=ChunkState.FAILED.value, attempts=attempts, last_error=error,
                     lease_token=None, lease_owner=None, lease_expires_at=None)
                .returning(chunks.c.n_lines - chunks.c.n_ok - chunks.c.n_err)).scalar()
            if failed is None:
                return
            conn.execute(batches.update().where(batches.c.id == lease.batch_id).values(
                failed=batches.c.failed + failed))
            self._finalize_if_drained(conn, lease.batch_id)

    def reset_leases(self) -> None:
        with self.engine.begin() as conn:
            self._chunks.free_all(conn)
            self._phases.free_all(conn)
            conn.execute(tables.webhook_deliveries.update()
                         .where(tables.webhook_deliveries.c.lease_token.is_not(None))
                         .values(lease_token=None, lease_owner=None, lease_expires_at=None))

    def reap_expired(self) -> int:
        """Requeue chunks whose lease ran out. Their worker died: no attempt is counted, but
        the expiry is, so that a chunk that keeps killing workers gets split."""
        with self.engine.begin() as conn:
            return sum(self._chunks.requeue_expired(conn, row.key, row.lease_token, {
                "expiries": chunks.c.expiries + 1,
                "last_error": "the worker holding this chunk stopped renewing its lease"})
                for row in self._chunks.expired(conn))

    # -- deployments and workers -------------------------------------------------------

    def set_deployments(self, items: Sequence[Deployment],
                        declared: Sequence[Endpoint] = ()) -> None:
        names = [d.name for d in items] + [e.name for e in declared]
        with self.engine.begin() as conn:
            # The config file wins over a name the API took since the last start.
            conn.execute(deployments.delete().where(sa.or_(
                deployments.c.source == CONFIG, deployments.c.name.in_(names),
                deployments.c.endpoint.in_([e.name for e in declared]))))
            conn.execute(endpoints.delete().where(sa.or_(
                endpoints.c.source == CONFIG, endpoints.c.name.in_(names))))
            if items:
                conn.execute(deployments.insert(), [deployment_row(d) for d in items])
            if declared:
                conn.execute(endpoints.insert(), [endpoint_row(e) for e in declared])

    def list_deployments(self) -> list[Deployment]:
        with self.engine.begin() as conn:
            rows = conn.execute(deployments.select().order_by(deployments.c.name)).mappings()
            found = [_deployment(r) for r in rows]
            defaults = conn.execute(endpoints.select()).mappings()
            by_name = {d.name: d for d in found}
            aliases = [dataclasses.replace(target, name=e["name"], endpoint=None,
                                           workers=None, alias_of=target.name)
                       for e in defaults
                       if (target := by_name.get(f"{e['name']}/{e['default_deployment']}"))]
        return sorted(found + aliases, key=lambda d: d.name)

    def heartbeat_worker(self, info: WorkerInfo) -> None:
        values = {"host": info.host, "pid": info.pid, "state": info.state,
                  "started_at": info.started_at, "last_heartbeat": info.last_heartbeat,
                  "current": info.current, "chunks_done": info.chunks_done,
                  "load_s": info.load_s or None, "load_errors": info.load_errors or None}
        with self.engine.begin() as conn:
            updated = conn.execute(workers.update().where(workers.c.id == info.id)
                                   .values(**values))
            if updated.rowcount == 0:
                conn.execute(workers.insert().values(id=info.id, **values))

    def counts(self) -> dict[str, dict[str, int]]:
        with self.engine.begin() as conn:
            by_status = conn.execute(sa.select(batches.c.status, sa.func.count())
                                     .group_by(batches.c.status))
            by_state = conn.execute(sa.select(chunks.c.state, sa.func.count())
                                    .group_by(chunks.c.state))
            return {"batches": {s: int(n) for s, n in by_status},
                    "chunks": {s: int(n) for s, n in by_state}}

    def list_workers(self) -> list[WorkerInfo]:
        with self.engine.begin() as conn:
            rows = conn.execute(workers.select().order_by(workers.c.started_at)).mappings()
            return [WorkerInfo(**{**dict(r), "load_s": r["load_s"] or {},
                                  "load_errors": r["load_errors"] or {}}) for r in rows]


def _started_status() -> sa.ColumnElement[Any]:
    """What a batch becomes once validated: paused if a pause came while it validated."""
    return sa.case((batches.c.paused_at.is_not(None), BatchStatus.PAUSED.value),
                   else_=BatchStatus.IN_PROGRESS.value)


def _no_control(action: str, status: BatchStatus) -> str:
    """Why a batch with `status` cannot be paused or resumed, in a sentence."""
    if status.is_terminal:
        return (f"The batch has ended with status '{status.value}'; a batch that has ended "
                f"cannot be {action}.")
    return (f"The batch is '{status.value}': it is ending, so it can no longer be "
            f"{action}.")


def _emit_batch_event(conn: Connection, batch: Batch, status: BatchStatus, now: int) -> None:
    """Queue the batch's end event in the transaction that ends it: committed together, or
    not at all."""
    event_type = webhooks.batch_event_type(status, batch.endpoint)
    if event_type is not None:
        emit_event(conn, webhooks.new_event(batch.project, event_type, batch.id, now),
                   batch.webhook_url)


def _deployment(row: RowMapping) -> Deployment:
    allowed = row["projects"]
    return Deployment(name=row["name"], backend=row["backend"], options=row["options"],
                      endpoint=row["endpoint"], workers=pool_from_dict(row["workers"]),
                      source=row["source"], project=row["project"],
                      projects=tuple(allowed) if allowed is not None else None,
                      prices=row["prices"])


def _file_row(record: FileRecord) -> dict[str, Any]:
    return {"id": record.id, "project": record.project, "filename": record.filename,
            "purpose": record.purpose, "bytes": record.bytes, "created_at": record.created_at,
            "expires_at": record.expires_at, "storage_key": record.storage_key}


def _file(row: RowMapping) -> FileRecord:
    return FileRecord(id=row["id"], project=row["project"], filename=row["filename"],
                      purpose=row["purpose"], bytes=row["bytes"], created_at=row["created_at"],
                      expires_at=row["expires_at"], storage_key=row["storage_key"])


_BATCH_FIELDS = ("id", "project", "endpoint", "input_file_id", "completion_window", "model",
                 "output_file_id", "error_file_id", "created_at", "expires_at",
                 "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                 "cancelling_at", "cancelled_at", "total", "completed", "failed",
                 "input_tokens", "output_tokens", "metadata", "input_key",
                 "chunk_size", "max_tasks", "unrun", "remote", "webhook_url", "priority",
                 "paused_at", "retry_of", "max_cost", "max_total_tokens", "cost", "warnings",
                 "cached_tokens", "reasoning_tokens")


def _batch_row(batch: Batch) -> dict[str, Any]:
    row = {name: getattr(batch, name) for name in _BATCH_FIELDS}
    row["status"] = batch.status.value
    row["end_reason"] = batch.end_reason.value if batch.end_reason else None
    row["errors"] = [e.to_dict() for e in batch.errors] if batch.errors is not None else None
    return row


def _batch(row: RowMapping) -> Batch:
    values = {name: row[name] for name in _BATCH_FIELDS}
    errors = row["errors"]
    return Batch(status=BatchStatus(row["status"]),
                 end_reason=EndReason(row["end_reason"]) if row["end_reason"] else None,
                 errors=[BatchError(**e) for e in errors] if errors is not None else None,
                 **values)


def _spec(row: RowMapping) -> ChunkSpec:
    return ChunkSpec(index=row["idx"], start_offset=row["start_offset"],
                     end_offset=row["end_offset"], first_line=row["first_line"],
                     n_lines=row["n_lines"])


def _chunk(row: RowMapping) -> Chunk:
    return Chunk(id=row["id"], batch_id=row["batch_id"], spec=_spec(row),
                 state=ChunkState(row["state"]), attempts=row["attempts"], n_ok=row["n_ok"],
                 n_err=row["n_err"], out_key=row["out_key"], err_key=row["err_key"],
                 last_error=row["last_error"], expiries=row["expiries"])


def _part(row: RowMapping) -> ChunkPart:
    return ChunkPart(n_ok=row["n_ok"], n_err=row["n_err"], out_key=row["out_key"],
                     err_key=row["err_key"], offsets=tuple(row["offsets"]))
