"""The metadata store port: files, batches, the chunk queue with its leases, and workers.

Every state change that a lease guards is *fenced*: it names the lease token and does
nothing (returning False) when the lease has been lost, so a slow or partitioned worker can
never write or count a chunk twice.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchery.model.batches import Batch, BatchError
from batchery.model.chunks import Chunk, ChunkLease, ChunkPart, ChunkSpec
from batchery.model.deployments import Deployment, Endpoint
from batchery.model.files import FileRecord
from batchery.model.idempotency import IdempotencyKey
from batchery.model.paging import Page
from batchery.ports.idempotency import IdempotencyKeys
from batchery.ports.jobs import (
    JobBatchQueue,
    JobObservations,
    JobPhaseQueue,
    JobRecords,
    JobStore,
)

__all__ = ["Page", "Store"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PhaseLease:
    """A worker's claim on a batch's batch-level work: validation or assembling results."""

    batch: Batch
    token: str
    #: Earlier tries of this work that failed (raised, or lost their worker) in a row.
    attempts: int = 0
    #: The last of those failures, in a line.
    last_error: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    state: str
    started_at: float
    last_heartbeat: float = 0.0
    current: str | None = None
    chunks_done: int = 0
    #: The models this worker loaded when it started (its warm pool): name -> seconds.
    load_s: dict[str, float] = field(default_factory=dict)
    #: The models it could not load when it started: name -> why, in a sentence.
    load_errors: dict[str, str] = field(default_factory=dict)


#: A worker that reported within this many seconds counts as live.
LIVE_WORKER_S = 30.0


def count_live(workers: Sequence[WorkerInfo], now: float) -> int:
    """How many of `workers` are live: not stopped, and heard from lately."""
    return sum(1 for w in workers
               if w.state != "stopped" and now - w.last_heartbeat < LIVE_WORKER_S)


class FileRecords(Protocol):
    @abstractmethod
    def insert_file(self, record: FileRecord) -> None: ...

    @abstractmethod
    def get_file(self, project: str | None, file_id: str) -> FileRecord | None:
        """The file, if it exists and `project` may see it (None: any project)."""

    @abstractmethod
    def list_files(self, project: str, *, purpose: str | None, after: str | None, limit: int,
                   order: str, now: int | None = None) -> Page[FileRecord]:
        """Files of `project`; with `now`, those not expired by then."""

    @abstractmethod
    def file_bytes(self, project: str, *, now: int) -> int:
        """Total bytes of `project`'s files not expired by `now` (its quota's usage)."""

    @abstractmethod
    def delete_file(self, project: str, file_id: str) -> FileRecord | None:
        """Remove the record; returns it, or None if there was none."""

    @abstractmethod
    def blob_in_use(self, storage_key: str, file_id: str | None = None) -> bool:
        """Whether an unfinished batch still reads this blob, or the file `file_id` (whose
        record may be gone already)."""


class BatchRecords(Protocol):
    @abstractmethod
    def insert_batch(self, batch: Batch,
                     key: IdempotencyKey | None = None) -> IdempotencyKey | None:
        """Insert the batch. With `key` (extension), in the same transaction: when the key
        is taken already (and not expired), insert nothing and return the record holding
        it."""

    @abstractmethod
    def get_batch(self, project: str | None, batch_id: str) -> Batch | None: ...

    @abstractmethod
    def list_batches(self, project: str, *, after: str | None, limit: int,
                     before: str | None = None, endpoint: str | None = None,
                     exclude_endpoint: str | None = None, id_prefix: str | None = None,
                     exclude_id_prefix: str | None = None) -> Page[Batch]:
        """Newest first; `after` pages to older batches, `before` to newer ones. The id
        prefixes keep one API's batches (Gemini's) apart from the others'."""

    @abstractmethod
    def delete_batch(self, project: str, batch_id: str) -> bool:
        """Remove an ended batch's record; False if there was no such ended batch."""

    @abstractmethod
    def request_cancel(self, project: str, batch_id: str, now: int) -> Batch:
        """Move a running batch to `cancelling`. Raises NotFound, or Conflict once ended."""

    @abstractmethod
    def expire_due(self, now: int) -> int:
        """Send batches whose window has run out (paused ones too) to `finalizing`;
        returns how many."""

    @abstractmethod
    def pause_batch(self, project: str, batch_id: str, now: int) -> Batch:
        """(extension) Hold a batch back: an `in_progress` one becomes `paused` and no
        chunk of it is claimed; a validating one is marked, and becomes `paused` once
        validated. Chunks in hand finish and commit. Pausing a paused batch changes
        nothing. Raises NotFound, or Conflict once it is ending or ended."""

    @abstractmethod
    def resume_batch(self, project: str, batch_id: str, now: int) -> Batch:
        """(extension) Undo a pause: `paused` becomes `in_progress` again (and
        `finalizing` at once if every chunk ended meanwhile). A batch that is not paused
        is returned as it is. Raises NotFound, or Conflict once it has ended."""

    @abstractmethod
    def lines_ahead(self, priority: int) -> int:
        """(extension) Requests not answered yet of the batches that are validating or in
        progress at `priority` or higher, which workers would run before a new batch of
        that priority (paused and remote batches are left out)."""

    @abstractmethod
    def recent_runs(self, since: int, limit: int = 500) -> list[Batch]:
        """(extension) The batches our workers ran at some time since `since` (still
        running, or stopped since), the most recently started first: what throughput is
        measured on."""


class PhaseQueue(Protocol):
    @abstractmethod
    def claim_phase(self, owner: str, lease_s: float) -> PhaseLease | None:
        """Claim a batch that is validating, finalizing or cancelling (once no chunk of it
        runs under a live lease), or a running remote batch, whose lease is free or expired
        (and whose `release_phase(retry_in=…)` delay is over)."""

    @abstractmethod
    def renew_phase(self, lease: PhaseLease, lease_s: float) -> bool:
        """Extend the lease; False if it was lost or the batch changed status."""

    @abstractmethod
    def release_phase(self, lease: PhaseLease, retry_in: float | None = None,
                      error: str | None = None) -> None:
        """Give the batch back; with `retry_in`, nobody claims it for that many seconds.
        With `error` the try failed (counted in the next lease's `attempts`); without, the
        count of failed tries starts again."""

    @abstractmethod
    def start_batch(self, lease: PhaseLease, *, total: int, model: str | None,
                    input_key: str, chunks: Sequence[ChunkSpec], now: int,
                    remote: dict[str, Any] | None = None) -> bool:
        """validating -> in_progress, creating the chunks (or, for a batch handed to a
        provider, recording `remote` instead), in one transaction."""

    @abstractmethod
    def save_remote(self, lease: PhaseLease, remote: dict[str, Any], *, completed: int,
                    failed: int) -> bool:
        """Record a remote batch's provider job and live counts, fenced by the lease."""

    @abstractmethod
    def fail_batch(self, lease: PhaseLease, errors: Sequence[BatchError], now: int) -> bool:
        """validating -> failed with `errors`."""

    @abstractmethod
    def abort_open_chunks(self, batch_id: str) -> int:
        """Mark queued and leased chunks aborted; their leases stop being honoured."""

    @abstractmethod
    def list_chunks(self, batch_id: str) -> list[Chunk]: ...

    @abstractmethod
    def finish_batch(self, lease: PhaseLease, *, outputs: Sequence[FileRecord],
                     output_file_id: str | None, error_file_id: str | None,
                     completed: int, failed: int, unrun: int, now: int) -> bool:
        """Record the result files and move the batch to its terminal status. `unrun`
        counts the requests (among `failed`) that never ran: cancelled or expired."""


class ChunkQueue(Protocol):
    @abstractmethod
    def claim_chunk(self, owner: str, lease_s: float) -> ChunkLease | None:
        """Claim the oldest queued chunk of a running batch."""

    @abstractmethod
    def renew_chunk(self, lease: ChunkLease, lease_s: float) -> bool:
        """Extend the lease; False once it is lost or the batch no longer runs (cancelled,
        expired): the worker then stops, and what it committed is kept."""

    @abstractmethod
    def commit_part(self, lease: ChunkLease, part: ChunkPart) -> bool:
        """Record lines answered so far, counted into the batch, fenced by the lease, which
        the worker keeps."""

    @abstractmethod
    def complete_chunk(self, lease: ChunkLease, part: ChunkPart | None = None) -> bool:
        """Commit the last part (if any) and the chunk's completion together, fenced."""

    @abstractmethod
    def split_chunk(self, lease: ChunkLease, specs: Sequence[ChunkSpec],
                    done: Sequence[tuple[int, int]], expiries: int) -> bool:
        """Replace the leased chunk by queued chunks over `specs`, with the (ok, error)
        counts of their lines already answered and a run of `expiries`."""

    @abstractmethod
    def release_chunk(self, lease: ChunkLease, *, error: str | None, count_attempt: bool,
                      max_attempts: int, delay_s: float = 0.0) -> None:
        """Hand the chunk back (or fail its unanswered lines for good once out of attempts)."""

    @abstractmethod
    def reset_leases(self) -> None:
        """Free every chunk and phase lease without counting an attempt. Only for a store
        with a single owner, which knows that no other process holds work (`batchery run`)."""

    @abstractmethod
    def reap_expired(self) -> int:
        """Requeue chunks whose lease ran out, counting an expiry (not an attempt); returns
        how many."""


class ChunkResults(Protocol):
    """The lines of a batch committed so far, in parts."""

    @abstractmethod
    def done_offsets(self, batch_id: str, start: int, end: int) -> set[int]:
        """Where the lines answered so far start, among input bytes [start, end)."""

    @abstractmethod
    def list_parts(self, batch_id: str) -> list[ChunkPart]:
        """Every part committed for the batch, in input order."""

    @abstractmethod
    def list_parts_after(self, batch_id: str, after_id: int,
                         limit: int | None = None) -> list[tuple[int, ChunkPart]]:
        """(extension) The parts committed for the batch whose id is above `after_id`, with
        their ids, in commit order (ids grow in the order parts commit), at most `limit`."""


class ResultsStore(FileRecords, BatchRecords, ChunkResults, Protocol):
    """(extension) What reading a batch's results while it runs, and retrying its failed
    lines, use."""

    @abstractmethod
    def list_chunks(self, batch_id: str) -> list[Chunk]: ...


class Registry(Protocol):
    @abstractmethod
    def set_deployments(self, deployments: Sequence[Deployment],
                        endpoints: Sequence[Endpoint] = ()) -> None:
        """Replace what the config file declares; what the API made is kept."""

    @abstractmethod
    def list_deployments(self) -> list[Deployment]:
        """Every deployment, plus an alias per endpoint standing for its default."""

    @abstractmethod
    def heartbeat_worker(self, info: WorkerInfo) -> None: ...

    @abstractmethod
    def list_workers(self) -> list[WorkerInfo]: ...

    @abstractmethod
    def counts(self) -> dict[str, dict[str, int]]:
        """How many batches are in each status and chunks in each state, for metrics."""


class BatchApiStore(FileRecords, BatchRecords, Registry, IdempotencyKeys, Protocol):
    """What the batch APIs' services use: files, batches, and which models exist."""


class PhaseStore(FileRecords, BatchRecords, PhaseQueue, ChunkResults, Registry, Protocol):
    """What batch-level work (validate, remote steps, assemble results) uses."""


class ChunkStore(BatchRecords, ChunkQueue, ChunkResults, Registry, Protocol):
    """What running chunks uses."""


class JobServiceStore(JobStore, FileRecords, Registry, IdempotencyKeys, Protocol):
    """What the jobs API uses: jobs and endpoints, and uploaded files as inputs."""


class JobWorkStore(JobRecords, JobPhaseQueue, JobBatchQueue, JobObservations, FileRecords,
                   Registry, Protocol):
    """What running jobs' work uses."""


class Store(FileRecords, BatchRecords, PhaseQueue, ChunkQueue, ChunkResults, Registry, JobStore,
            IdempotencyKeys, Protocol):
    """Everything Batchery keeps in its database."""

    @abstractmethod
    def close(self) -> None: ...
