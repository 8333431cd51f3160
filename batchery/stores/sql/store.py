"""`SqlStore`: the metadata store on SQLAlchemy Core, for SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from batchery import ids
from batchery.batches import (
    CANCELLABLE,
    PHASE_STATUSES,
    Batch,
    BatchError,
    BatchStatus,
    EndReason,
)
from batchery.chunks import Chunk, ChunkLease, ChunkResult, ChunkSpec, ChunkState
from batchery.deployments import CONFIG, Deployment, Endpoint, pool_from_dict
from batchery.exceptions import Conflict, NotFound
from batchery.files import INTERNAL_PURPOSE_PREFIX, FileRecord
from batchery.store import Page, PhaseLease, Store, WorkerInfo
from batchery.stores.sql import engine as engines
from batchery.stores.sql import migrate, tables
from batchery.stores.sql.job_store import SqlJobStore, deployment_row, endpoint_row
from batchery.stores.sql.tables import batches, chunks, deployments, endpoints, files, workers
from batchery.stores.sql.webhook_store import SqlWebhookStore, emit_event
from batchery.webhooks import model as webhooks

_OPEN_CHUNK_STATES = (ChunkState.QUEUED.value, ChunkState.LEASED.value)


class SqlStore(SqlJobStore, SqlWebhookStore, Store):
    def __init__(self, engine: Engine, *, run_migrations: bool = True) -> None:
        self.engine = engine
        self._now = engines.db_now(engine)
        self._pg = engine.dialect.name == "postgresql"
        # Whole Unix seconds, truncated like int(time.time()): PostgreSQL's cast rounds.
        self._now_s = sa.cast(sa.func.floor(self._now) if self._pg else self._now,
                              sa.BigInteger)
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

    def blob_in_use(self, storage_key: str) -> bool:
        ended = [s.value for s in BatchStatus if s.is_terminal]
        query = sa.select(batches.c.id).where(
            batches.c.status.not_in(ended),
            sa.or_(batches.c.input_key == storage_key,
                   batches.c.input_file_id.in_(
                       sa.select(files.c.id).where(files.c.storage_key == storage_key))),
        ).limit(1)
        with self.engine.begin() as conn:
            return conn.execute(query).first() is not None

    # -- batches -----------------------------------------------------------------------

    def insert_batch(self, batch: Batch) -> None:
        with self.engine.begin() as conn:
            conn.execute(batches.insert().values(**_batch_row(batch)))

    def get_batch(self, project: str | None, batch_id: str) -> Batch | None:
        with self.engine.begin() as conn:
            return self._get_batch(conn, project, batch_id)

    def _get_batch(self, conn: Connection, project: str | None, batch_id: str) -> Batch | None:
        query = batches.select().where(batches.c.id == batch_id)
        if project is not None:
            query = query.where(batches.c.project == project)
        row = conn.execute(query).mappings().first()
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
                     end_reason=EndReason.CANCELLED.value))
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
                batches.c.status.in_([BatchStatus.VALIDATING.value,
                                      BatchStatus.IN_PROGRESS.value]),
                batches.c.expires_at <= now,
            ).values(status=BatchStatus.FINALIZING.value, finalizing_at=now,
                     end_reason=EndReason.EXPIRED.value))
            return result.rowcount

    # -- batch-level phases ------------------------------------------------------------

    def claim_phase(self, owner: str, lease_s: float) -> PhaseLease | None:
        token = ids.lease_token()
        needs_work = sa.or_(
            batches.c.status.in_([s.value for s in PHASE_STATUSES]),
            sa.and_(batches.c.status == BatchStatus.IN_PROGRESS.value,
                    batches.c.remote.is_not(None)))
        candidate = (sa.select(batches.c.seq)
                     .where(needs_work,
                            sa.or_(batches.c.lease_expires_at.is_(None),
                                   batches.c.lease_expires_at < self._now))
                     .order_by(batches.c.seq).limit(1)
                     .with_for_update(skip_locked=True))
        with self.engine.begin() as conn:
            seq = conn.execute(candidate).scalar()
            if seq is None:
                return None
            conn.execute(batches.update().where(batches.c.seq == seq).values(
                lease_owner=owner, lease_token=token, lease_expires_at=self._now + lease_s))
            row = conn.execute(batches.select().where(batches.c.seq == seq)).mappings().one()
        return PhaseLease(batch=_batch(row), token=token)

    def _phase_fence(self, lease: PhaseLease) -> sa.ColumnElement[bool]:
        return sa.and_(batches.c.id == lease.batch.id, batches.c.lease_token == lease.token,
                       batches.c.status == lease.batch.status.value)

    def renew_phase(self, lease: PhaseLease, lease_s: float) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(batches.update().where(self._phase_fence(lease)).values(
                lease_expires_at=self._now + lease_s))
            return result.rowcount == 1

    def release_phase(self, lease: PhaseLease, retry_in: float | None = None) -> None:
        # A released lease that "expires" in the future doubles as a not-before time.
        expires = self._now + retry_in if retry_in else None
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(
                batches.c.id == lease.batch.id, batches.c.lease_token == lease.token,
            ).values(lease_owner=None, lease_token=None, lease_expires_at=expires))

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
            result = conn.execute(batches.update().where(self._phase_fence(lease)).values(
                status=BatchStatus.IN_PROGRESS.value, in_progress_at=now, total=total,
                model=model, input_key=input_key, remote=remote, lease_owner=None,
                lease_token=None, lease_expires_at=None))
            if result.rowcount != 1:
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
            result = conn.execute(batches.update().where(self._phase_fence(lease)).values(
                status=BatchStatus.FAILED.value, failed_at=now,
                errors=[e.to_dict() for e in errors], lease_owner=None, lease_token=None,
                lease_expires_at=None))
            if result.rowcount != 1:
                return False
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

    def finish_batch(self, lease: PhaseLease, *, outputs: Sequence[FileRecord],
                     output_file_id: str | None, error_file_id: str | None,
                     completed: int, failed: int, unrun: int, now: int) -> bool:
        reason = lease.batch.end_reason or EndReason.DONE
        status = reason.final_status
        stamp = {BatchStatus.COMPLETED: "completed_at", BatchStatus.CANCELLED: "cancelled_at",
                 BatchStatus.EXPIRED: "expired_at"}[status]
        with self.engine.begin() as conn:
            result = conn.execute(batches.update().where(self._phase_fence(lease)).values(
                status=status.value, output_file_id=output_file_id,
                error_file_id=error_file_id, completed=completed, failed=failed, unrun=unrun,
                lease_owner=None, lease_token=None, lease_expires_at=None, **{stamp: now}))
            if result.rowcount != 1:
                return False
            for record in outputs:
                conn.execute(files.insert().values(**_file_row(record)))
            conn.execute(chunks.delete().where(chunks.c.batch_id == lease.batch.id))
            _emit_batch_event(conn, lease.batch, status, now)
        return True

    # -- the chunk queue ---------------------------------------------------------------

    def claim_chunk(self, owner: str, lease_s: float) -> ChunkLease | None:
        token = ids.lease_token()
        candidate = (sa.select(chunks.c.id)
                     .join(batches, batches.c.id == chunks.c.batch_id)
                     .where(chunks.c.state == ChunkState.QUEUED.value,
                            batches.c.status == BatchStatus.IN_PROGRESS.value,
                            sa.or_(chunks.c.not_before.is_(None),
                                   chunks.c.not_before <= self._now))
                     .order_by(chunks.c.id).limit(1)
                     .with_for_update(skip_locked=True, of=chunks))
        with self.engine.begin() as conn:
            chunk_id = conn.execute(candidate).scalar()
            if chunk_id is None:
                return None
            conn.execute(chunks.update().where(chunks.c.id == chunk_id).values(
                state=ChunkState.LEASED.value, lease_owner=owner, lease_token=token,
                lease_expires_at=self._now + lease_s))
            row = conn.execute(
                sa.select(chunks, batches.c.endpoint, batches.c.input_key)
                .join(batches, batches.c.id == chunks.c.batch_id)
                .where(chunks.c.id == chunk_id)).mappings().one()
        return ChunkLease(chunk_id=chunk_id, batch_id=row["batch_id"], token=token,
                          spec=_spec(row), attempts=row["attempts"], endpoint=row["endpoint"],
                          input_key=row["input_key"])

    def _chunk_fence(self, lease: ChunkLease) -> sa.ColumnElement[bool]:
        return sa.and_(chunks.c.id == lease.chunk_id, chunks.c.lease_token == lease.token,
                       chunks.c.state == ChunkState.LEASED.value)

    def renew_chunk(self, lease: ChunkLease, lease_s: float) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(chunks.update().where(self._chunk_fence(lease)).values(
                lease_expires_at=self._now + lease_s))
            return result.rowcount == 1

    def complete_chunk(self, lease: ChunkLease, result: ChunkResult) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(chunks.update().where(self._chunk_fence(lease)).values(
                state=ChunkState.DONE.value, lease_token=None, lease_owner=None,
                n_ok=result.n_ok, n_err=result.n_err, out_key=result.out_key,
                err_key=result.err_key))
            if done.rowcount != 1:
                return False
            conn.execute(batches.update().where(batches.c.id == lease.batch_id).values(
                completed=batches.c.completed + result.n_ok,
                failed=batches.c.failed + result.n_err,
                input_tokens=batches.c.input_tokens + result.input_tokens,
                output_tokens=batches.c.output_tokens + result.output_tokens))
            self._finalize_if_drained(conn, lease.batch_id)
        return True

    def _finalize_if_drained(self, conn: Connection, batch_id: str) -> None:
        still_open = sa.exists().where(chunks.c.batch_id == batch_id,
                                       chunks.c.state.in_(_OPEN_CHUNK_STATES))
        conn.execute(batches.update().where(
            batches.c.id == batch_id, batches.c.status == BatchStatus.IN_PROGRESS.value,
            ~still_open,
        ).values(status=BatchStatus.FINALIZING.value, end_reason=EndReason.DONE.value,
                 finalizing_at=self._now_s))

    def release_chunk(self, lease: ChunkLease, *, error: str | None, count_attempt: bool,
                      max_attempts: int, delay_s: float = 0.0) -> None:
        attempts = lease.attempts + (1 if count_attempt else 0)
        with self.engine.begin() as conn:
            self._requeue(conn, lease.chunk_id, lease.token, attempts, max_attempts, error,
                          delay_s)

    def _requeue(self, conn: Connection, chunk_id: int, token: str, attempts: int,
                 max_attempts: int, error: str | None, delay_s: float) -> bool:
        give_up = attempts >= max_attempts
        state = ChunkState.FAILED if give_up else ChunkState.QUEUED
        result = conn.execute(chunks.update().where(
            chunks.c.id == chunk_id, chunks.c.lease_token == token,
            chunks.c.state == ChunkState.LEASED.value,
        ).values(state=state.value, attempts=attempts, lease_token=None, lease_owner=None,
                 lease_expires_at=None, last_error=error,
                 not_before=self._now + delay_s if delay_s else None)
                              .returning(chunks.c.batch_id, chunks.c.n_lines))
        row = result.first()
        if row is not None and give_up:
            conn.execute(batches.update().where(batches.c.id == row.batch_id).values(
                failed=batches.c.failed + row.n_lines))
            self._finalize_if_drained(conn, row.batch_id)
        return row is not None

    def reset_leases(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(chunks.update().where(chunks.c.state == ChunkState.LEASED.value)
                         .values(state=ChunkState.QUEUED.value, lease_token=None,
                                 lease_owner=None, lease_expires_at=None))
            conn.execute(batches.update().where(batches.c.lease_token.is_not(None))
                         .values(lease_token=None, lease_owner=None, lease_expires_at=None))
            conn.execute(tables.webhook_deliveries.update()
                         .where(tables.webhook_deliveries.c.lease_token.is_not(None))
                         .values(lease_token=None, lease_owner=None, lease_expires_at=None))

    def reap_expired(self, max_attempts: int) -> int:
        expired = sa.select(chunks.c.id, chunks.c.lease_token, chunks.c.attempts).where(
            chunks.c.state == ChunkState.LEASED.value, chunks.c.lease_expires_at < self._now)
        with self.engine.begin() as conn:
            return sum(self._requeue(conn, row.id, row.lease_token, row.attempts + 1,
                                     max_attempts, "the worker holding this chunk stopped "
                                     "renewing its lease", 0.0)
                       for row in list(conn.execute(expired)))

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
                  "current": info.current, "chunks_done": info.chunks_done}
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
            return [WorkerInfo(**dict(r)) for r in rows]


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
                      projects=tuple(allowed) if allowed is not None else None)


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
                 "chunk_size", "max_tasks", "unrun", "remote", "webhook_url")


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
                 last_error=row["last_error"])
