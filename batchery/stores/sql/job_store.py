"""The job store on SQLAlchemy Core: mixed into `SqlStore`, whose engine and database
clock it shares."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from batchery.model import webhooks
from batchery.model.deployments import API, Deployment, Endpoint
from batchery.model.exceptions import Conflict, NotFound
from batchery.model.idempotency import IdempotencyKey
from batchery.model.jobs import (
    IN_PROGRESS,
    OPEN_BATCH_STATES,
    BatchLease,
    BatchMetrics,
    BatchSpec,
    BatchState,
    InputKind,
    Job,
    JobBatch,
    JobInput,
    JobLease,
    JobOptions,
    JobStage,
    JobStatus,
    JobWorker,
    OutputMode,
    WorkerState,
)
from batchery.model.leases import SPLIT_AFTER_EXPIRIES
from batchery.model.paging import Page
from batchery.ports.jobs import JobStore, ReapedBatch
from batchery.stores.sql.idempotency_store import take_key
from batchery.stores.sql.leases import Leases
from batchery.stores.sql.tables import (
    deployments,
    endpoints,
    job_batches,
    job_workers,
    jobs,
)
from batchery.stores.sql.webhook_store import emit_event

_IN_PROGRESS = [s.value for s in IN_PROGRESS]
_ACTIVE_STAGES = (JobStage.ENQUEUE.value, JobStage.RUN.value)
#: Worker states that still expect heartbeats.
_LIVE_WORKER_STATES = (WorkerState.INITIALIZING.value, WorkerState.RUNNING.value,
                       WorkerState.IDLE.value)


class SqlJobStore(JobStore):
    engine: Engine
    _read: Engine
    _now: sa.ColumnElement[float]
    _job_phases: Leases
    _job_batches: Leases
    #: `_pick_batch`'s candidate query, by the deployments a worker claims for.
    _candidates: dict[tuple[str, ...] | None, sa.Select[Any]]

    # -- endpoints ---------------------------------------------------------------------

    def list_endpoints(self) -> list[Endpoint]:
        with self.engine.begin() as conn:
            rows = conn.execute(endpoints.select().order_by(endpoints.c.name)).mappings()
            return [_endpoint(r) for r in rows]

    def create_endpoint(self, endpoint: Endpoint, members: Sequence[Deployment]) -> None:
        with self.engine.begin() as conn:
            if _name_taken(conn, endpoint.name):
                raise Conflict(f"The name '{endpoint.name}' is not available.")
            conn.execute(endpoints.insert().values(**endpoint_row(endpoint)))
            for member in members:
                self._insert_deployment(conn, member)

    def add_deployment(self, deployment: Deployment) -> None:
        assert deployment.endpoint is not None
        with self.engine.begin() as conn:
            if conn.execute(endpoints.select().where(
                    endpoints.c.name == deployment.endpoint)).first() is None:
                raise NotFound(f"No endpoint named '{deployment.endpoint}'.", param="endpoint")
            self._insert_deployment(conn, deployment)

    def _insert_deployment(self, conn: Connection, deployment: Deployment) -> None:
        if _name_taken(conn, deployment.name):
            # Names are one namespace per server: whose it is stays unsaid.
            raise Conflict(f"The name '{deployment.short_name}' is not available.")
        conn.execute(deployments.insert().values(**deployment_row(deployment)))

    def set_default_deployment(self, endpoint: str, deployment: str) -> Endpoint:
        with self.engine.begin() as conn:
            row = conn.execute(endpoints.select().where(endpoints.c.name == endpoint)
                               ).mappings().first()
            if row is None:
                raise NotFound(f"No endpoint named '{endpoint}'.", param="endpoint")
            member = conn.execute(deployments.select().where(
                deployments.c.name == f"{endpoint}/{deployment}")).first()
            if member is None:
                raise NotFound(f"The endpoint '{endpoint}' has no deployment named "
                               f"'{deployment}'.", param="default_deployment")
            conn.execute(endpoints.update().where(endpoints.c.name == endpoint)
                         .values(default_deployment=deployment))
            return _endpoint({**row, "default_deployment": deployment})

    def delete_endpoint(self, name: str) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(endpoints.select().where(endpoints.c.name == name)
                               ).mappings().first()
            if row is None:
                raise NotFound(f"No endpoint named '{name}'.", param="endpoint")
            if row["source"] != API:
                raise Conflict(f"The endpoint '{name}' is declared in the config file; "
                               f"remove it there.")
            busy = conn.execute(sa.select(jobs.c.id).where(
                jobs.c.endpoint == name, jobs.c.stage != JobStage.DONE.value).limit(1)).first()
            if busy is not None:
                raise Conflict(f"The endpoint '{name}' has jobs in progress.")
            conn.execute(deployments.delete().where(deployments.c.endpoint == name))
            conn.execute(endpoints.delete().where(endpoints.c.name == name))

    # -- jobs --------------------------------------------------------------------------

    def insert_job(self, job: Job, key: IdempotencyKey | None = None) -> IdempotencyKey | None:
        with self.engine.begin() as conn:
            if key is not None and (held := take_key(conn, key)) is not None:
                return held
            conn.execute(jobs.insert().values(**_job_row(job)))
        return None

    def get_job(self, project: str | None, job_id: str) -> Job | None:
        with self._read.begin() as conn:
            return _get_job(conn, project, job_id)

    def list_jobs(self, project: str, *, endpoint: str | None, status: JobStatus | None,
                  after: str | None, limit: int) -> Page[Job]:
        query = jobs.select().where(jobs.c.project == project)
        if endpoint is not None:
            query = query.where(jobs.c.endpoint == endpoint)
        if status is not None:
            query = query.where(jobs.c.status == status.value)
        if after:
            # Scoped by project: another project's job id pages like an unknown id.
            anchor = sa.select(jobs.c.seq).where(jobs.c.id == after,
                                                 jobs.c.project == project).scalar_subquery()
            query = query.where(jobs.c.seq < anchor)
        with self.engine.begin() as conn:
            rows = list(conn.execute(query.order_by(jobs.c.seq.desc()).limit(limit + 1))
                        .mappings())
        return Page([_job(r) for r in rows[:limit]], len(rows) > limit)

    def end_job(self, job_id: str, status: JobStatus, error: str | None,
                project: str | None = None) -> Job:
        with self.engine.begin() as conn:
            job = _get_job(conn, project, job_id)
            if job is None:
                raise NotFound(f"No job found with id '{job_id}'.")
            if not _end(conn, job_id, status, error):
                raise Conflict(f"The job has already ended with status '{job.status.value}'.")
            ended = _get_job(conn, project, job_id)
        assert ended is not None
        return ended

    def time_out_jobs(self, now: float) -> list[str]:
        with self.engine.begin() as conn:
            due = [r.id for r in conn.execute(sa.select(jobs.c.id).where(
                jobs.c.status.in_(_IN_PROGRESS), jobs.c.deadline <= now))]
            return [job_id for job_id in due
                    if _end(conn, job_id, JobStatus.TIMED_OUT, "the job's timeout ran out")]

    def pause_job(self, project: str, job_id: str, now: float) -> Job:
        with self.engine.begin() as conn:
            # A job completing has no batch left to hold back (and its completion must see
            # the status it ran with).
            conn.execute(jobs.update().where(
                jobs.c.id == job_id, jobs.c.project == project,
                jobs.c.status.in_(_IN_PROGRESS), jobs.c.stage.in_(_ACTIVE_STAGES),
                jobs.c.paused_at.is_(None),
            ).values(status=JobStatus.PAUSED.value, paused_at=now))
            job = _get_job(conn, project, job_id)
        if job is None:
            raise NotFound(f"No job found with id '{job_id}'.")
        if job.paused_at is None:
            raise Conflict(_no_control(job, "paused"))
        return job

    def resume_job(self, project: str, job_id: str) -> Job:
        resumed = sa.case(
            (jobs.c.stage != JobStage.ENQUEUE.value, JobStatus.RUNNING.value),
            (jobs.c.started_at.is_(None), JobStatus.PENDING.value),
            else_=JobStatus.ENQUEUING.value)
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(
                jobs.c.id == job_id, jobs.c.project == project,
                jobs.c.status == JobStatus.PAUSED.value,
            ).values(status=resumed, paused_at=None))
            # Every batch may have ended while it was paused: then it completes now.
            _complete_if_drained(conn, job_id)
            job = _get_job(conn, project, job_id)
        if job is None:
            raise NotFound(f"No job found with id '{job_id}'.")
        if job.status.is_terminal:
            raise Conflict(_no_control(job, "resumed"))
        return job

    def list_job_batches(self, job_id: str, states: Collection[str] | None = None
                         ) -> list[JobBatch]:
        query = job_batches.select().where(job_batches.c.job_id == job_id)
        if states is not None:
            query = query.where(job_batches.c.state.in_(list(states)))
        with self.engine.begin() as conn:
            rows = conn.execute(query.order_by(job_batches.c.idx)).mappings()
            return [JobBatch(job_id=r["job_id"], spec=_spec(r), state=BatchState(r["state"]),
                             attempts=r["attempts"], last_error=r["last_error"],
                             out_key=r["out_key"], duration_s=r["duration_s"]) for r in rows]

    def batch_state_counts(self, job_id: str) -> dict[str, int]:
        with self._read.begin() as conn:
            return _batch_states(conn, job_id)

    def job_view(self, project: str | None, job_id: str
                 ) -> tuple[Job, dict[str, int], list[JobWorker]] | None:
        with self._read.begin() as conn:
            job = _get_job(conn, project, job_id)
            if job is None:
                return None
            return job, _batch_states(conn, job_id), _job_workers(conn, job_id)

    def job_demand(self) -> dict[str, int]:
        open_batches = (sa.select(job_batches.c.job_id, sa.func.count().label("n"))
                        .where(job_batches.c.state.in_(OPEN_BATCH_STATES))
                        .group_by(job_batches.c.job_id).subquery())
        query = (sa.select(jobs.c.endpoint, jobs.c.deployment, jobs.c.stage, jobs.c.options,
                           jobs.c.paused_at, sa.func.coalesce(open_batches.c.n, 0).label("n"))
                 .outerjoin(open_batches, open_batches.c.job_id == jobs.c.id)
                 .where(jobs.c.stage != JobStage.DONE.value))
        demand: dict[str, int] = {}
        with self.engine.begin() as conn:
            for row in conn.execute(query):
                # A paused job's batches wait; those in flight have their workers.
                n = 0 if row.paused_at is not None else row.n
                limit = row.options.get("workers") or n
                want = min(limit, n) + (0 if row.stage == JobStage.RUN.value else 1)
                key = f"{row.endpoint}/{row.deployment}"
                demand[key] = demand.get(key, 0) + want
        return demand

    def job_counts(self) -> dict[str, dict[str, int]]:
        with self.engine.begin() as conn:
            by_status = conn.execute(sa.select(jobs.c.status, sa.func.count())
                                     .group_by(jobs.c.status))
            by_state = conn.execute(sa.select(job_batches.c.state, sa.func.count())
                                    .group_by(job_batches.c.state))
            return {"jobs": {s: int(n) for s, n in by_status},
                    "job_batches": {s: int(n) for s, n in by_state}}

    # -- job-level work ----------------------------------------------------------------

    def claim_job_phase(self, owner: str, lease_s: float,
                        deployments: Collection[str] | None) -> JobLease | None:
        in_flight = sa.exists().where(job_batches.c.job_id == jobs.c.id,
                                      job_batches.c.state == BatchState.LEASED.value)
        needs_work = sa.or_(jobs.c.stage == JobStage.ENQUEUE.value,
                            sa.and_(jobs.c.stage == JobStage.COMPLETE.value, ~in_flight))
        # Taking over a lease that ran out: the worker before us died at this work.
        died = sa.case((jobs.c.lease_token.is_not(None), 1), else_=0)
        with self.engine.begin() as conn:
            claimed = self._job_phases.claim(
                conn, owner, lease_s, where=[needs_work, _of_deployments(deployments)],
                order_by=[jobs.c.priority.desc(), jobs.c.seq],
                values={"phase_attempts": jobs.c.phase_attempts + died})
        if claimed is None:
            return None
        row = claimed.row
        return JobLease(job=_job(row), token=claimed.token, attempts=row["phase_attempts"],
                        last_error=row["phase_error"])

    def _job_fence(self, lease: JobLease) -> sa.ColumnElement[bool]:
        return self._job_phases.fence(lease.job.id, lease.token,
                                      jobs.c.stage == lease.job.stage.value)

    def renew_job_phase(self, lease: JobLease, lease_s: float) -> bool:
        with self.engine.begin() as conn:
            return self._job_phases.renew(conn, lease.job.id, lease.token, lease_s,
                                          jobs.c.stage == lease.job.stage.value)

    def release_job_phase(self, lease: JobLease, retry_in: float | None = None,
                          error: str | None = None) -> None:
        counts = ({"phase_attempts": jobs.c.phase_attempts + 1, "phase_error": error}
                  if error is not None else {"phase_attempts": 0, "phase_error": None})
        with self.engine.begin() as conn:
            self._job_phases.release(conn, lease.job.id, lease.token,
                                     delay_s=retry_in or 0.0, values=counts)

    def add_batches(self, lease: JobLease, batches: Sequence[BatchSpec], now: float) -> bool:
        n_items = sum(b.n_items for b in batches)
        with self.engine.begin() as conn:
            result = conn.execute(jobs.update().where(self._job_fence(lease)).values(
                status=sa.case((jobs.c.status == JobStatus.PENDING.value,
                                JobStatus.ENQUEUING.value), else_=jobs.c.status),
                started_at=sa.func.coalesce(jobs.c.started_at, now),
                total_batch_count=jobs.c.total_batch_count + len(batches),
                total_items=jobs.c.total_items + n_items))
            if result.rowcount != 1:
                return False
            if batches:
                conn.execute(job_batches.insert(), [
                    {"job_id": lease.job.id, "idx": b.index, "segment_key": b.segment_key,
                     "start_offset": b.start_offset, "end_offset": b.end_offset,
                     "first_item": b.first_item, "n_items": b.n_items,
                     "state": BatchState.QUEUED.value} for b in batches])
        return True

    def finish_enqueue(self, lease: JobLease) -> bool:
        with self.engine.begin() as conn:
            # A job paused while it was enqueued stays paused.
            running = sa.case((jobs.c.paused_at.is_not(None), JobStatus.PAUSED.value),
                              else_=JobStatus.RUNNING.value)
            if not self._job_phases.commit(conn, lease.job.id, lease.token, {
                    "status": running, "stage": JobStage.RUN.value,
                    "phase_attempts": 0, "phase_error": None},
                    jobs.c.stage == lease.job.stage.value):
                return False
            _complete_if_drained(conn, lease.job.id)
        return True

    def fail_enqueue(self, lease: JobLease, error: str, *, permanent: bool,
                     max_attempts: int) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(jobs.update().where(self._job_fence(lease)).values(
                enqueue_attempts=jobs.c.enqueue_attempts + 1)
                .returning(jobs.c.enqueue_attempts))
            attempts = result.scalar()
            if attempts is None:
                return False
            if permanent or attempts >= max_attempts:
                return _end(conn, lease.job.id, JobStatus.FAILED, f"enqueuing failed: {error}")
        return False

    def finish_job(self, lease: JobLease, *, results_url: str | None, now: float) -> Job | None:
        final = sa.case(
            (jobs.c.status.not_in(_IN_PROGRESS), jobs.c.status),
            (jobs.c.dead_letters > 0, JobStatus.COMPLETED_WITH_FAILURES.value),
            else_=JobStatus.SUCCEEDED.value)
        with self.engine.begin() as conn:
            if not self._job_phases.commit(conn, lease.job.id, lease.token, {
                    "status": final, "stage": JobStage.DONE.value, "results_url": results_url,
                    "ended_at": now, "phase_attempts": 0},
                    jobs.c.stage == lease.job.stage.value):
                return None
            conn.execute(job_workers.update().where(
                job_workers.c.job_id == lease.job.id,
                job_workers.c.state.in_(_LIVE_WORKER_STATES),
            ).values(state=WorkerState.SUCCEEDED.value, current_batch=None))
            ended = _get_job(conn, None, lease.job.id)
            assert ended is not None
            # The job's end event: once it has wholly ended (results assembled), in the
            # same transaction, with its final status.
            event_type = webhooks.job_event_type(ended.status.value)
            if event_type is not None:
                emit_event(conn, webhooks.new_event(ended.project, event_type, ended.id,
                                                    int(now)), ended.webhook_url)
            return ended

    # -- the batch queue ---------------------------------------------------------------

    def claim_batch(self, owner: str, lease_s: float,
                    deployments: Collection[str] | None) -> BatchLease | None:
        with self.engine.begin() as conn:
            claimed = self._job_batches.claim(
                conn, owner, lease_s, pick=lambda c, _: self._pick_batch(c, deployments))
            if claimed is None:
                return None
            job = _get_job(conn, None, claimed.row["job_id"])
        assert job is not None
        row = claimed.row
        return BatchLease(id=claimed.key, job=job, spec=_spec(row), token=claimed.token,
                          attempts=row["attempts"], expiries=row["expiries"])

    def _pick_batch(self, conn: Connection, deployments: Collection[str] | None) -> int | None:
        """The oldest queued batch this claim may lease, locked; None if there is none.

        The count of a job's leased batches in the candidate query is taken from the
        statement's snapshot: on PostgreSQL, concurrent claims lock different batches of
        the same job and each counts the others' leases as not there yet, so together they
        would exceed the job's `workers`. For a job with a limit the claim therefore also
        locks the job's row and counts again once it holds it. It takes that lock with SKIP
        LOCKED, like the batch row, so a claim never waits for a row while holding one (no
        deadlock with `_end`, which locks the job before its batches); a job whose row is
        busy is passed over for this claim. Jobs without a limit never touch the job row.
        On SQLite transactions start with BEGIN IMMEDIATE, one writer at a time, so the
        first count already holds there."""
        candidate = self._candidates.get(key := _deployments_key(deployments))
        if candidate is None:
            candidate = self._candidates[key] = self._candidate_query(deployments)
        passed_over: list[str] = []
        while True:
            query = (candidate.where(job_batches.c.job_id.not_in(passed_over))
                     if passed_over else candidate)
            found = conn.execute(query).first()
            if found is None:
                return None
            if found.workers is None or self._below_limit(conn, found.job_id, found.workers):
                return int(found.id)
            passed_over.append(found.job_id)

    def _candidate_query(self, deployments: Collection[str] | None) -> sa.Select[Any]:
        """The query for `_pick_batch`'s candidate: built once per set of deployments (a
        worker always asks for the same), since building it costs more than running it."""
        other = job_batches.alias("other")
        in_flight = (sa.select(sa.func.count()).select_from(other)
                     .where(other.c.job_id == jobs.c.id,
                            other.c.state == BatchState.LEASED.value)
                     .correlate(jobs).scalar_subquery())
        workers = jobs.c.options["workers"].as_integer()
        candidate = (sa.select(job_batches.c.id, job_batches.c.job_id, workers.label("workers"))
                     .join(jobs, jobs.c.id == job_batches.c.job_id)
                     .where(self._job_batches.claimable(),
                            jobs.c.stage.in_(_ACTIVE_STAGES), jobs.c.paused_at.is_(None),
                            _of_deployments(deployments),
                            sa.or_(workers.is_(None), in_flight < workers))
                     # By priority, then the earliest deadline (none: last), then age.
                     .order_by(jobs.c.priority.desc(), jobs.c.deadline.is_(None),
                               jobs.c.deadline, job_batches.c.id).limit(1)
                     .with_for_update(skip_locked=True, of=job_batches))
        return candidate

    @staticmethod
    def _below_limit(conn: Connection, job_id: str, workers: int) -> bool:
        """Whether the job may have one more batch leased: locks its row (skipping it when
        another transaction holds it), then counts its leased batches anew. That count is a new
        statement after the lock, so it sees every lease committed by whoever held the row
        before; whoever takes the row next sees ours."""
        locked = conn.execute(sa.select(jobs.c.seq).where(jobs.c.id == job_id)
                              .with_for_update(skip_locked=True)).first()
        if locked is None:
            return False
        leased = conn.execute(sa.select(sa.func.count()).select_from(job_batches).where(
            job_batches.c.job_id == job_id,
            job_batches.c.state == BatchState.LEASED.value)).scalar_one()
        return int(leased) < workers

    def _job_running(self, job_id: str) -> sa.ColumnElement[bool]:
        """The batch's job still runs (it was not stopped, failed or timed out)."""
        return sa.exists().where(jobs.c.id == job_id, jobs.c.stage.in_(_ACTIVE_STAGES))

    def renew_batch(self, lease: BatchLease, lease_s: float) -> bool:
        with self.engine.begin() as conn:
            return self._job_batches.renew(conn, lease.id, lease.token, lease_s,
                                           self._job_running(lease.job.id))

    def complete_batch(self, lease: BatchLease, *, out_key: str | None,
                       duration_s: float) -> bool:
        with self.engine.begin() as conn:
            if not self._job_batches.commit(conn, lease.id, lease.token, {
                    "state": BatchState.SUCCEEDED.value, "out_key": out_key,
                    "duration_s": duration_s, "expiries": 0}):
                return False
            conn.execute(jobs.update().where(jobs.c.id == lease.job.id).values(
                batches_succeeded=jobs.c.batches_succeeded + 1,
                items_succeeded=jobs.c.items_succeeded + lease.spec.n_items,
                batch_time_s=jobs.c.batch_time_s + duration_s))
            _complete_if_drained(conn, lease.job.id)
        return True

    def fail_batch_attempt(self, lease: BatchLease, error: str, *, delay_s: float,
                           dead: bool = False) -> bool:
        with self.engine.begin() as conn:
            return bool(_requeue(conn, self._job_batches, lease.id, lease.token, error,
                                 delay_s, dead=dead))

    def split_batch(self, lease: BatchLease, specs: Sequence[BatchSpec]) -> bool:
        with self.engine.begin() as conn:
            if not self._job_batches.commit(conn, lease.id, lease.token,
                                            {"state": BatchState.SPLIT.value}):
                return False
            top = conn.execute(sa.select(sa.func.max(job_batches.c.idx)).where(
                job_batches.c.job_id == lease.job.id)).scalar_one()
            conn.execute(job_batches.insert(), [
                {"job_id": lease.job.id, "idx": top + 1 + i, "segment_key": s.segment_key,
                 "start_offset": s.start_offset, "end_offset": s.end_offset,
                 "first_item": s.first_item, "n_items": s.n_items,
                 "state": BatchState.QUEUED.value, "attempts": lease.attempts,
                 "expiries": SPLIT_AFTER_EXPIRIES - 1} for i, s in enumerate(specs)])
            conn.execute(jobs.update().where(jobs.c.id == lease.job.id).values(
                total_batch_count=jobs.c.total_batch_count + len(specs) - 1))
        return True

    def release_batch(self, lease: BatchLease) -> None:
        with self.engine.begin() as conn:
            self._job_batches.release(conn, lease.id, lease.token)

    def reap_expired_batches(self) -> list[ReapedBatch]:
        reaped: list[ReapedBatch] = []
        with self.engine.begin() as conn:
            for row in self._job_batches.expired(
                    conn, job_batches.c.job_id, job_batches.c.idx, jobs.c.stage,
                    join=(jobs, jobs.c.id == job_batches.c.job_id)):
                # The worker died: no attempt is counted, the expiry is. A job that has
                # ended runs nothing more: its batch is dropped rather than requeued.
                dropped = row.stage not in _ACTIVE_STAGES
                values: dict[str, Any] = {
                    "expiries": job_batches.c.expiries + 1,
                    "last_error": "the worker running this batch stopped renewing its lease "
                                  "(it died or hung)"}
                if dropped:
                    values["state"] = BatchState.ABORTED.value
                if not self._job_batches.requeue_expired(conn, row.key, row.lease_token,
                                                         values):
                    continue
                if row.lease_owner:
                    conn.execute(job_workers.update().where(
                        job_workers.c.job_id == row.job_id,
                        job_workers.c.worker_id == row.lease_owner,
                    ).values(state=WorkerState.FAILED.value))
                if dropped:
                    _complete_if_drained(conn, row.job_id)
                reaped.append(ReapedBatch(job_id=row.job_id, index=row.idx,
                                          owner=row.lease_owner, dropped=dropped))
        return reaped

    # -- workers and logs --------------------------------------------------------------

    def report_job_worker(self, worker: JobWorker) -> None:
        values = {"host": worker.host, "pid": worker.pid, "state": worker.state.value,
                  "current_batch": worker.current_batch, "batches_done": worker.batches_done,
                  "started_at": worker.started_at, "last_heartbeat": worker.last_heartbeat}
        key = sa.and_(job_workers.c.job_id == worker.job_id,
                      job_workers.c.worker_id == worker.worker_id)
        with self.engine.begin() as conn:
            if conn.execute(job_workers.update().where(key).values(**values)).rowcount == 0:
                conn.execute(job_workers.insert().values(
                    job_id=worker.job_id, worker_id=worker.worker_id, **values))

    def touch_job_workers(self, worker_id: str, now: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(job_workers.update().where(
                job_workers.c.worker_id == worker_id,
                job_workers.c.state.in_(_LIVE_WORKER_STATES),
            ).values(last_heartbeat=now))

    def list_job_workers(self, job_id: str) -> list[JobWorker]:
        with self._read.begin() as conn:
            return _job_workers(conn, job_id)


def _deployments_key(names: Collection[str] | None) -> tuple[str, ...] | None:
    return None if names is None else tuple(sorted(names))


# -- helpers that run inside a transaction -------------------------------------------------

def _batch_states(conn: Connection, job_id: str) -> dict[str, int]:
    return {state: int(n) for state, n in conn.execute(_BATCH_STATES, {"p_job": job_id})}


def _job_workers(conn: Connection, job_id: str) -> list[JobWorker]:
    return [JobWorker(job_id=r["job_id"], worker_id=r["worker_id"], host=r["host"],
                      pid=r["pid"], state=WorkerState(r["state"]),
                      current_batch=r["current_batch"], batches_done=r["batches_done"],
                      started_at=r["started_at"], last_heartbeat=r["last_heartbeat"])
            for r in conn.execute(_JOB_WORKERS, {"p_job": job_id}).mappings()]


def _of_deployments(names: Collection[str] | None) -> sa.ColumnElement[bool]:
    if names is None:
        return sa.true()
    qualified = jobs.c.endpoint + "/" + jobs.c.deployment
    return qualified.in_(list(names))


#: The reads of `GET /api/v1/jobs/{id}` (which pollers repeat), built once: building a
#: statement costs more than running it.
_JOB_BY_ID = jobs.select().where(jobs.c.id == sa.bindparam("p_job"))
_PROJECT_JOB_BY_ID = _JOB_BY_ID.where(jobs.c.project == sa.bindparam("p_project"))
_BATCH_STATES = (sa.select(job_batches.c.state, sa.func.count())
                 .where(job_batches.c.job_id == sa.bindparam("p_job"))
                 .group_by(job_batches.c.state))
_JOB_WORKERS = (job_workers.select().where(job_workers.c.job_id == sa.bindparam("p_job"))
                .order_by(job_workers.c.started_at))


def _get_job(conn: Connection, project: str | None, job_id: str) -> Job | None:
    if project is None:
        row = conn.execute(_JOB_BY_ID, {"p_job": job_id}).mappings().first()
    else:
        row = conn.execute(_PROJECT_JOB_BY_ID, {"p_job": job_id,
                                                "p_project": project}).mappings().first()
    return _job(row) if row else None


def _end(conn: Connection, job_id: str, status: JobStatus, error: str | None) -> bool:
    """A job in progress takes its terminal status; its queued batches are dropped."""
    result = conn.execute(jobs.update().where(
        jobs.c.id == job_id, jobs.c.status.in_(_IN_PROGRESS),
    ).values(status=status.value, error=error, paused_at=None, stage=sa.case(
        (jobs.c.stage.in_(_ACTIVE_STAGES), JobStage.COMPLETE.value), else_=jobs.c.stage)))
    if result.rowcount != 1:
        return False
    conn.execute(job_batches.update().where(
        job_batches.c.job_id == job_id, job_batches.c.state == BatchState.QUEUED.value,
    ).values(state=BatchState.ABORTED.value))
    return True


def _no_control(job: Job, action: str) -> str:
    """Why `job` cannot be paused or resumed, in a sentence."""
    if job.status.is_terminal:
        return (f"The job has ended with status '{job.status.value}'; a job that has ended "
                f"cannot be {action}.")
    return (f"The job is completing (every batch has ended), so it can no longer be "
            f"{action}.")


def _complete_if_drained(conn: Connection, job_id: str) -> None:
    still_open = sa.exists().where(job_batches.c.job_id == job_id,
                                   job_batches.c.state.in_(OPEN_BATCH_STATES))
    # A paused job completes once resumed, so that it completes as a running job does.
    conn.execute(jobs.update().where(
        jobs.c.id == job_id, jobs.c.stage == JobStage.RUN.value, jobs.c.paused_at.is_(None),
        ~still_open,
    ).values(stage=JobStage.COMPLETE.value))


def _requeue(conn: Connection, leases: Leases, batch_id: int, token: str, error: str,
             delay_s: float, *, dead: bool = False) -> bool | None:
    """Count a failed attempt of a leased batch: back to the queue, or a dead letter once
    out of retries (or at once, with `dead`). None if the lease was not current."""
    row = conn.execute(
        sa.select(job_batches.c.attempts, job_batches.c.job_id, job_batches.c.n_items,
                  jobs.c.options, jobs.c.stage)
        .join(jobs, jobs.c.id == job_batches.c.job_id)
        .where(leases.fence(batch_id, token))).first()
    if row is None:
        return None
    attempts = row.attempts + 1
    dead = dead or bool(attempts > int(row.options.get("max_retries", 3)))
    values: dict[str, Any] = {"attempts": attempts, "last_error": error}
    if dead:
        leases.commit(conn, batch_id, token, {**values, "state": BatchState.FAILED.value})
    elif row.stage in _ACTIVE_STAGES:
        leases.release(conn, batch_id, token, delay_s=delay_s, values=values)
    else:  # a job that has ended runs nothing more: its batch is dropped
        leases.commit(conn, batch_id, token, {**values, "state": BatchState.ABORTED.value})
    counters: dict[str, Any] = {"failed_attempts": jobs.c.failed_attempts + 1}
    if dead:
        counters |= {"dead_letters": jobs.c.dead_letters + 1,
                     "items_failed": jobs.c.items_failed + row.n_items}
    conn.execute(jobs.update().where(jobs.c.id == row.job_id).values(**counters))
    if dead:
        threshold = int(row.options.get("error_threshold", -1))
        failed = conn.execute(sa.select(jobs.c.dead_letters).where(
            jobs.c.id == row.job_id)).scalar_one()
        if 0 <= threshold < failed:
            _end(conn, row.job_id, JobStatus.FAILED,
                 f"{failed} batch(es) failed, more than the error_threshold of {threshold}")
    _complete_if_drained(conn, row.job_id)
    return dead


def _name_taken(conn: Connection, name: str) -> bool:
    return (conn.execute(endpoints.select().where(endpoints.c.name == name)).first()
            is not None or
            conn.execute(deployments.select().where(deployments.c.name == name)).first()
            is not None)


def deployment_row(d: Deployment) -> dict[str, Any]:
    return {"name": d.name, "backend": d.backend, "options": d.options,
            "endpoint": d.endpoint, "workers": d.workers.to_dict() if d.workers else None,
            "source": d.source, "project": d.project,
            "projects": list(d.projects) if d.projects is not None else None,
            "prices": d.prices}


def endpoint_row(endpoint: Endpoint) -> dict[str, Any]:
    return {"name": endpoint.name, "default_deployment": endpoint.default_deployment,
            "source": endpoint.source, "created_at": endpoint.created_at or time.time(),
            "project": endpoint.project,
            "projects": list(endpoint.projects) if endpoint.projects is not None else None}


def _endpoint(row: Any) -> Endpoint:
    allowed = row["projects"]
    return Endpoint(name=row["name"], default_deployment=row["default_deployment"],
                    source=row["source"], created_at=row["created_at"],
                    project=row["project"],
                    projects=tuple(allowed) if allowed is not None else None)


def _job_row(job: Job) -> dict[str, Any]:
    o = job.options
    return {"id": job.id, "project": job.project, "endpoint": job.endpoint,
            "deployment": job.deployment, "status": job.status.value,
            "stage": job.stage.value,
            "input": {"kind": job.input.kind.value, **job.input.to_dict()},
            "options": {"workers": o.workers, "config": o.config, "timeout": o.timeout_s,
                        "batch_timeout": o.batch_timeout_s, "max_retries": o.max_retries,
                        "error_threshold": o.error_threshold, "output": o.output.value},
            "output_path": job.output_path, "created_at": job.created_at,
            "deadline": job.deadline, "webhook_url": job.webhook_url,
            "priority": job.priority, "paused_at": job.paused_at, "retry_of": job.retry_of,
            "warnings": job.warnings}


def _job(row: RowMapping) -> Job:
    raw_input, raw = dict(row["input"]), row["options"]
    kind = InputKind(raw_input.pop("kind"))
    job_input = JobInput(kind=kind, batch_size=raw_input["batch_size"],
                         items=raw_input.get("items"),
                         paths=tuple(raw_input.get("paths", ())),
                         includes=tuple(raw_input.get("includes", ())),
                         excludes=tuple(raw_input.get("excludes", ())),
                         file_ids=tuple(raw_input.get("file_ids", ())))
    options = JobOptions(workers=raw["workers"], config=raw["config"],
                         timeout_s=raw["timeout"], batch_timeout_s=raw["batch_timeout"],
                         max_retries=raw["max_retries"], error_threshold=raw["error_threshold"],
                         output=OutputMode(raw["output"]))
    metrics = BatchMetrics(succeeded=row["batches_succeeded"], failed=row["failed_attempts"],
                           dead_letters=row["dead_letters"], total_time_s=row["batch_time_s"])
    return Job(id=row["id"], project=row["project"], endpoint=row["endpoint"],
               deployment=row["deployment"], input=job_input, options=options,
               output_path=row["output_path"], status=JobStatus(row["status"]),
               stage=JobStage(row["stage"]), total_batch_count=row["total_batch_count"],
               total_items=row["total_items"], items_succeeded=row["items_succeeded"],
               items_failed=row["items_failed"], metrics=metrics, error=row["error"],
               created_at=row["created_at"], started_at=row["started_at"],
               ended_at=row["ended_at"], results_url=row["results_url"],
               webhook_url=row["webhook_url"], priority=row["priority"],
               paused_at=row["paused_at"], retry_of=row["retry_of"],
               warnings=row["warnings"])


def _spec(row: RowMapping) -> BatchSpec:
    return BatchSpec(index=row["idx"], segment_key=row["segment_key"],
                     start_offset=row["start_offset"], end_offset=row["end_offset"],
                     first_item=row["first_item"], n_items=row["n_items"])
