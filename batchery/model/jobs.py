"""Jobs: the domain values of the native job API (Cortex Batch API / Azure ML batch
endpoint semantics). A job cuts a dataset into batches that workers run through a
deployment's predictor; everything here is plain data."""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field
from typing import Any


def job_id() -> str:
    # Time first, so ids sort by submission, then randomness.
    return f"job_{int(time.time() * 1000):x}{secrets.token_hex(6)}"


class JobStatus(enum.StrEnum):
    PENDING = "pending"  #: submitted; no worker has started cutting it into batches
    ENQUEUING = "enqueuing"  #: the input is being cut into batches (they may already run)
    RUNNING = "running"  #: every batch is queued; workers are running them
    SUCCEEDED = "succeeded"  #: every batch succeeded
    COMPLETED_WITH_FAILURES = "completed_with_failures"  #: some batches were dead-lettered
    FAILED = "failed"  #: the input could not be read, or too many batches failed
    TIMED_OUT = "timed_out"  #: the job's `timeout` ran out
    STOPPED = "stopped"  #: a user stopped it
    #: (extension) paused: none of its batches is claimed until it is resumed; batches in
    #: flight finish, and its `timeout` keeps running
    PAUSED = "paused"

    @property
    def is_terminal(self) -> bool:
        return self not in IN_PROGRESS


IN_PROGRESS = frozenset({JobStatus.PENDING, JobStatus.ENQUEUING, JobStatus.RUNNING,
                         JobStatus.PAUSED})


class JobStage(enum.StrEnum):
    """What work a job still needs, which its public status does not always show: a
    stopped job is `stopped` at once, while its batches in flight end and its results
    are assembled."""

    ENQUEUE = "enqueue"  #: a worker must (finish) cutting the input into batches
    RUN = "run"  #: batches are queued or running
    COMPLETE = "complete"  #: results must be assembled and `on_job_complete` called
    DONE = "done"  #: nothing left to do


class BatchState(enum.StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  #: out of retries: a dead letter
    ABORTED = "aborted"  #: the job ended before this batch ran
    #: its workers kept dying: two batches of half its items each replaced it
    SPLIT = "split"


OPEN_BATCH_STATES = (BatchState.QUEUED.value, BatchState.LEASED.value)


class OutputMode(enum.StrEnum):
    APPEND_ROW = "append_row"  #: predictions go to the job's results file, a line per item
    SUMMARY_ONLY = "summary_only"  #: the predictor writes its own output


class InputKind(enum.StrEnum):
    ITEM_LIST = "item_list"
    FILE_PATH_LISTER = "file_path_lister"
    DELIMITED_FILES = "delimited_files"


DEFAULT_MAX_RETRIES = 3
#: -1: failed batches never fail the job.
DEFAULT_ERROR_THRESHOLD = -1


@dataclass(frozen=True, kw_only=True, slots=True)
class JobOptions:
    workers: int | None = None  #: most workers running this job's batches at once
    config: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    batch_timeout_s: float | None = None
    max_retries: int = DEFAULT_MAX_RETRIES
    error_threshold: int = DEFAULT_ERROR_THRESHOLD
    output: OutputMode = OutputMode.APPEND_ROW


@dataclass(frozen=True, kw_only=True, slots=True)
class JobInput:
    kind: InputKind
    batch_size: int
    items: list[Any] | None = None  #: item_list
    paths: tuple[str, ...] = ()  #: the file inputs
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    file_ids: tuple[str, ...] = ()  #: the project's uploaded files, read after `paths`

    def to_dict(self) -> dict[str, Any]:
        if self.kind is InputKind.ITEM_LIST:
            return {"items": self.items, "batch_size": self.batch_size}
        shown = {"paths": list(self.paths), "includes": list(self.includes),
                 "excludes": list(self.excludes), "batch_size": self.batch_size}
        return shown | ({"file_ids": list(self.file_ids)} if self.file_ids else {})


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchMetrics:
    """A job's batches so far. A batch is tried until it succeeds or runs out of retries
    (then it is a dead letter), so attempts and batches are counted apart."""

    succeeded: int = 0  #: batches that succeeded (each once, whatever its attempts)
    failed: int = 0  #: failed attempts, so a batch retried twice counts twice
    dead_letters: int = 0  #: batches out of retries
    total_time_s: float = 0.0  #: of the succeeded attempts

    @property
    def average_time_per_batch(self) -> float | None:
        """Seconds per succeeded batch (its successful attempt); None before the first."""
        return self.total_time_s / self.succeeded if self.succeeded else None


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    id: str
    project: str
    endpoint: str
    deployment: str  #: the deployment's name within its endpoint
    input: JobInput
    options: JobOptions
    output_path: str
    status: JobStatus = JobStatus.PENDING
    stage: JobStage = JobStage.ENQUEUE
    total_batch_count: int = 0  #: batches enqueued so far; final once enqueuing ends
    total_items: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    metrics: BatchMetrics = field(default_factory=BatchMetrics)
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    results_url: str | None = None
    #: An extra receiver of this job's end event (extension), signed with the project's
    #: webhook secret.
    webhook_url: str | None = None
    #: Work of higher priority is claimed first; then the earliest deadline.
    priority: int = 0
    #: When the job was paused, if it is.
    paused_at: float | None = None
    #: The job whose dead letters this one runs again.
    retry_of: str | None = None
    #: Things the caller should know (no live worker, say).
    warnings: list[str] | None = None

    @property
    def qualified_deployment(self) -> str:
        return f"{self.endpoint}/{self.deployment}"

    @property
    def deadline(self) -> float | None:
        # Measured from submission, enqueuing included, as Cortex does.
        if self.options.timeout_s is None:
            return None
        return self.created_at + self.options.timeout_s

    def spec(self) -> dict[str, Any]:
        """What the predictor's constructor receives as `job`."""
        return {"id": self.id, "job_id": self.id, "endpoint": self.endpoint,
                "deployment": self.deployment, "config": self.options.config,
                "workers": self.options.workers, "total_batch_count": self.total_batch_count,
                "batch_size": self.input.batch_size, "input": self.input.kind.value,
                "output": self.options.output.value, "output_path": self.output_path,
                "created_at": self.created_at}


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchSpec:
    """A slice of a job's enqueued items: lines [start, end) bytes of a segment file."""

    index: int
    segment_key: str
    start_offset: int
    end_offset: int
    first_item: int
    n_items: int


@dataclass(frozen=True, kw_only=True, slots=True)
class JobBatch:
    job_id: str
    spec: BatchSpec
    state: BatchState
    attempts: int
    last_error: str | None = None
    out_key: str | None = None
    duration_s: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchLease:
    """A worker's claim on one batch. Every write is fenced by `token`."""

    id: int
    job: Job
    spec: BatchSpec
    token: str
    attempts: int
    #: Leases of this batch that ran out in a row, without a result (workers that died).
    expiries: int = 0

    @property
    def batch_id(self) -> str:
        return f"{self.job.id}:{self.spec.index}"


@dataclass(frozen=True, kw_only=True, slots=True)
class JobLease:
    """A worker's claim on a job's job-level work: enqueuing or completing."""

    job: Job
    token: str
    #: Earlier tries of this work that failed (raised, or lost their worker) in a row.
    attempts: int = 0
    #: The last of those failures, in a line.
    last_error: str | None = None


class WorkerState(enum.StrEnum):
    PENDING = "pending"  #: asked of a Ray cluster, not placed on a node yet (not stored)
    INITIALIZING = "initializing"  #: loading the predictor for this job
    RUNNING = "running"  #: running one of its batches
    IDLE = "idle"  #: predictor loaded, no batch in hand
    STALLED = "stalled"  #: alive by its lease but silent for too long (derived on read)
    FAILED = "failed"  #: the predictor would not load, or the process died mid-batch
    SUCCEEDED = "succeeded"  #: done with this job


@dataclass(frozen=True, kw_only=True, slots=True)
class JobWorker:
    job_id: str
    worker_id: str
    host: str
    pid: int
    state: WorkerState
    current_batch: int | None = None
    batches_done: int = 0
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    #: Why a pending worker waits, in Ray's terms.
    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LogLine:
    id: int
    job_id: str
    ts: float
    level: str
    source: str
    message: str

    def render(self) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.ts))
        millis = int((self.ts % 1) * 1000)
        return f"{stamp}.{millis:03d}Z {self.level:<7} {self.source}: {self.message}"
