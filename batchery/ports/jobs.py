"""The job store port: endpoints, jobs, their batch queue under leases, per-job worker
states and logs. Like the chunk queue, every write a lease guards is fenced by its token."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from batchery.model.deployments import Deployment, Endpoint
from batchery.model.idempotency import IdempotencyKey
from batchery.model.jobs import (
    BatchLease,
    BatchSpec,
    Job,
    JobBatch,
    JobLease,
    JobStatus,
    JobWorker,
    LogLine,
)
from batchery.model.paging import Page


@dataclass(frozen=True, kw_only=True, slots=True)
class NewLogLine:
    job_id: str
    ts: float
    level: str
    source: str
    message: str


@dataclass(frozen=True, slots=True)
class LogCursor:
    """A place in a job's log, which is in time order: by `ts`, ties by `id`. The lines
    after a cursor are those after the line it was taken from."""

    ts: float
    id: int

    @classmethod
    def of(cls, line: LogLine) -> LogCursor:
        return cls(line.ts, line.id)


@dataclass(frozen=True, kw_only=True, slots=True)
class ReapedBatch:
    job_id: str
    index: int
    owner: str | None
    dropped: bool  #: the job had ended: the batch will not run again


class EndpointRegistry(Protocol):
    @abstractmethod
    def list_endpoints(self) -> list[Endpoint]: ...

    @abstractmethod
    def create_endpoint(self, endpoint: Endpoint, deployments: Sequence[Deployment]) -> None:
        """Raises Conflict if the name is taken by an endpoint or a deployment."""

    @abstractmethod
    def add_deployment(self, deployment: Deployment) -> None:
        """Add a deployment to its endpoint. Raises NotFound or Conflict."""

    @abstractmethod
    def set_default_deployment(self, endpoint: str, deployment: str) -> Endpoint:
        """Switch the endpoint's default (a short name). Raises NotFound."""

    @abstractmethod
    def delete_endpoint(self, name: str) -> None:
        """Remove an endpoint made over the API, with its deployments. Raises NotFound, or
        Conflict for one from the config file or with jobs in progress."""


class JobRecords(Protocol):
    @abstractmethod
    def insert_job(self, job: Job, key: IdempotencyKey | None = None) -> IdempotencyKey | None:
        """Insert the job. With `key` (extension), in the same transaction: when the key is
        taken already (and not expired), insert nothing and return the record holding it."""

    @abstractmethod
    def get_job(self, project: str | None, job_id: str) -> Job | None: ...

    @abstractmethod
    def list_jobs(self, project: str, *, endpoint: str | None, status: JobStatus | None,
                  after: str | None, limit: int) -> Page[Job]:
        """Newest first; `after` pages to older jobs."""

    @abstractmethod
    def end_job(self, job_id: str, status: JobStatus, error: str | None,
                project: str | None = None) -> Job:
        """Stop a job in progress with a terminal `status` (stopped, timed_out, failed):
        queued batches are dropped, those in flight may end, then results are assembled.
        Raises NotFound, or Conflict once the job has ended."""

    @abstractmethod
    def time_out_jobs(self, now: float) -> list[str]:
        """End the jobs whose deadline has passed (paused ones too) as timed_out; returns
        their ids."""

    @abstractmethod
    def pause_job(self, project: str, job_id: str, now: float) -> Job:
        """(extension) A job in progress becomes `paused`: none of its batches is claimed
        (those in flight finish), and it does not complete, until it is resumed. Its input
        is still enqueued. Pausing a paused job changes nothing. Raises NotFound, or
        Conflict once the job has ended."""

    @abstractmethod
    def resume_job(self, project: str, job_id: str) -> Job:
        """(extension) A paused job takes the status its stage implies again (pending,
        enqueuing or running), and completes at once if no batch is left. A job that is
        not paused is returned as it is. Raises NotFound, or Conflict once it has ended."""

    @abstractmethod
    def list_job_batches(self, job_id: str, states: Collection[str] | None = None
                         ) -> list[JobBatch]: ...

    @abstractmethod
    def batch_state_counts(self, job_id: str) -> dict[str, int]: ...

    @abstractmethod
    def job_view(self, project: str | None, job_id: str
                 ) -> tuple[Job, dict[str, int], list[JobWorker]] | None:
        """The job, its batch state counts and its workers' reports, read together (one
        consistent snapshot, the cost of one read): what a status poll shows."""

    @abstractmethod
    def job_demand(self) -> dict[str, int]:
        """Per deployment (qualified name): how many workers its jobs could use now (a
        paused job's queued batches wait, so they count for nothing)."""

    @abstractmethod
    def job_counts(self) -> dict[str, dict[str, int]]:
        """Jobs per status and job batches per state, for metrics."""


class JobPhaseQueue(Protocol):
    @abstractmethod
    def claim_job_phase(self, owner: str, lease_s: float,
                        deployments: Collection[str] | None) -> JobLease | None:
        """Claim a job to enqueue, or one to complete (every batch ended, none in flight),
        among those of `deployments` (None: any)."""

    @abstractmethod
    def renew_job_phase(self, lease: JobLease, lease_s: float) -> bool: ...

    @abstractmethod
    def release_job_phase(self, lease: JobLease, retry_in: float | None = None,
                          error: str | None = None) -> None:
        """Give the job back; with `retry_in`, nobody claims it for that many seconds.
        With `error` the try failed (counted in the next lease's `attempts`)."""

    @abstractmethod
    def add_batches(self, lease: JobLease, batches: Sequence[BatchSpec], now: float) -> bool:
        """Record enqueued batches (queued at once), fenced by the lease."""

    @abstractmethod
    def finish_enqueue(self, lease: JobLease) -> bool:
        """enqueuing -> running; straight to completing when nothing is left to run."""

    @abstractmethod
    def fail_enqueue(self, lease: JobLease, error: str, *, permanent: bool,
                     max_attempts: int) -> bool:
        """Count a failed enqueue; fail the job when `permanent` or out of attempts.
        Returns whether the job failed."""

    @abstractmethod
    def finish_job(self, lease: JobLease, *, results_url: str | None, now: float) -> Job | None:
        """Completing -> done, with the final status; None if the lease was lost."""


class JobBatchQueue(Protocol):
    @abstractmethod
    def claim_batch(self, owner: str, lease_s: float,
                    deployments: Collection[str] | None) -> BatchLease | None:
        """The oldest queued batch of a job in progress whose `workers` limit allows one
        more, among those of `deployments` (None: any)."""

    @abstractmethod
    def renew_batch(self, lease: BatchLease, lease_s: float) -> bool: ...

    @abstractmethod
    def complete_batch(self, lease: BatchLease, *, out_key: str | None,
                       duration_s: float) -> bool:
        """Record the batch's success (and its results part), fenced by the lease."""

    @abstractmethod
    def fail_batch_attempt(self, lease: BatchLease, error: str, *, delay_s: float,
                           dead: bool = False) -> bool:
        """Count a failed attempt: the batch is queued again after `delay_s`, or becomes a
        dead letter once out of retries (or at once with `dead`). Returns whether it is
        now a dead letter."""

    @abstractmethod
    def split_batch(self, lease: BatchLease, specs: Sequence[BatchSpec]) -> bool:
        """Replace the leased batch, whose workers keep dying, by queued batches over
        `specs` (its items, cut in parts)."""

    @abstractmethod
    def release_batch(self, lease: BatchLease) -> None:
        """Hand a batch back untried (the worker is stopping)."""

    @abstractmethod
    def reap_expired_batches(self) -> list[ReapedBatch]:
        """Requeue batches whose lease ran out, counting an expiry (the worker died: not an
        attempt), and mark their workers failed."""


class JobObservations(Protocol):
    @abstractmethod
    def report_job_worker(self, worker: JobWorker) -> None: ...

    @abstractmethod
    def touch_job_workers(self, worker_id: str, now: float) -> None:
        """Heartbeat: this worker is alive for every job it has not left."""

    @abstractmethod
    def list_job_workers(self, job_id: str) -> list[JobWorker]: ...

    @abstractmethod
    def append_logs(self, lines: Sequence[NewLogLine]) -> None: ...

    @abstractmethod
    def read_logs(self, job_id: str, *, after: LogCursor | int, limit: int,
                  before: float | None = None) -> list[LogLine]:
        """Up to `limit` of the job's lines in time order (by `ts`, ties by `id`), those
        after `after`: a cursor, or the id of a line read before (an id that is not one of
        the job's lines, 0 among them, reads from the start). With `before`, only lines
        whose `ts` is earlier: a follower reads lines old enough that every worker has
        written its own, so none can land behind its cursor later."""


class JobStore(EndpointRegistry, JobRecords, JobPhaseQueue, JobBatchQueue, JobObservations,
               Protocol):
    """Everything the job API keeps in the database."""
