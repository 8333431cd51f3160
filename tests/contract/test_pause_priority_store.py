"""The store's promises for pausing and resuming (issue #11, item 1) and for the queue's
outlook that priorities' warnings read (item 5), over every adapter: a paused batch or job
claims no new work while the work in hand renews, commits and ends; resume picks up, and
finishes what drained meanwhile; the window and the timeout run on; ended objects refuse."""

from __future__ import annotations

import time

import pytest

from batchery.model.batches import BatchStatus, EndReason
from batchery.model.deployments import Deployment, Endpoint
from batchery.model.exceptions import Conflict, NotFound
from batchery.model.jobs import (
    BatchSpec,
    InputKind,
    Job,
    JobInput,
    JobOptions,
    JobStage,
    JobStatus,
    job_id,
)
from batchery.ports.store import Store
from batchery.stores.sql.store import SqlStore
from tests.contract.test_store import (
    LONG,
    NOW,
    OTHER,
    PROJECT,
    claim_chunk,
    claim_phase,
    get_batch,
    make_batch,
    result,
    specs,
    started_batch,
)

# -- batches -----------------------------------------------------------------------------


def test_a_paused_batch_claims_nothing_while_its_chunk_in_hand_finishes(store: Store) -> None:
    batch = started_batch(store, 3)
    running = claim_chunk(store)
    paused = store.pause_batch(PROJECT, batch.id, NOW + 5)
    assert paused.status is BatchStatus.PAUSED and paused.paused_at == NOW + 5
    # Idempotent: a second pause changes nothing, not even the time.
    assert store.pause_batch(PROJECT, batch.id, NOW + 9).paused_at == NOW + 5
    assert store.claim_chunk("w-other", LONG) is None
    # The chunk in hand keeps its lease, commits its parts and completes.
    assert store.renew_chunk(running, LONG)
    assert store.commit_part(running, result(4, 1, tag="a", first=running.spec.start_offset))
    assert store.complete_chunk(running, result(5, 0, tag="b",
                                                first=running.spec.start_offset + 5))
    counted = get_batch(store, batch.id)
    assert (counted.status, counted.completed, counted.failed) == (BatchStatus.PAUSED, 9, 1)

    resumed = store.resume_batch(PROJECT, batch.id, NOW + 20)
    assert resumed.status is BatchStatus.IN_PROGRESS and resumed.paused_at is None
    assert store.resume_batch(PROJECT, batch.id, NOW + 21) == resumed  # idempotent
    assert claim_chunk(store).batch_id == batch.id


def test_resume_finalizes_a_batch_whose_chunks_all_ended_while_paused(store: Store) -> None:
    batch = started_batch(store, 2)
    first, second = claim_chunk(store), claim_chunk(store, owner="w-2")
    store.pause_batch(PROJECT, batch.id, NOW + 5)
    assert store.complete_chunk(first, result(10, 0, tag="1", first=first.spec.start_offset))
    assert store.complete_chunk(second, result(10, 0, tag="2",
                                               first=second.spec.start_offset))
    # Drained, but paused: it waits for its owner rather than ending behind their back.
    assert get_batch(store, batch.id).status is BatchStatus.PAUSED
    assert store.claim_phase("w-phase", LONG) is None
    resumed = store.resume_batch(PROJECT, batch.id, NOW + 9)
    assert resumed.status is BatchStatus.FINALIZING
    assert resumed.end_reason is EndReason.DONE
    assert claim_phase(store, batch.id).batch.status is BatchStatus.FINALIZING


def test_a_batch_paused_while_validating_waits_once_validated(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id)
    marked = store.pause_batch(PROJECT, batch.id, NOW + 2)
    assert marked.status is BatchStatus.VALIDATING and marked.paused_at == NOW + 2
    assert store.start_batch(lease, total=20, model="echo", input_key="k",
                             chunks=specs(2), now=NOW + 3)
    assert get_batch(store, batch.id).status is BatchStatus.PAUSED
    assert store.claim_chunk("w", LONG) is None
    assert store.resume_batch(PROJECT, batch.id, NOW + 4).status is BatchStatus.IN_PROGRESS
    assert store.claim_chunk("w", LONG) is not None


def test_the_window_runs_on_and_cancel_works_while_paused(store: Store) -> None:
    cancelled = started_batch(store, 2)
    in_hand = claim_chunk(store)
    store.pause_batch(PROJECT, cancelled.id, NOW + 5)
    cancelling = store.request_cancel(PROJECT, cancelled.id, NOW + 6)
    assert cancelling.status is BatchStatus.CANCELLING and cancelling.paused_at is None
    # As for any cancel, the chunk in hand stops at its next renewal.
    assert not store.renew_chunk(in_hand, LONG)

    expiring = started_batch(store, 1)
    store.pause_batch(PROJECT, expiring.id, NOW + 5)
    assert store.expire_due(expiring.expires_at) == 1
    expired = get_batch(store, expiring.id)
    assert expired.status is BatchStatus.FINALIZING
    assert expired.end_reason is EndReason.EXPIRED and expired.paused_at is None


def test_pause_and_resume_refuse_ended_batches_and_hide_others(store: Store) -> None:
    batch = started_batch(store, 1)
    chunk = claim_chunk(store)
    assert store.complete_chunk(chunk, result(10, 0, first=chunk.spec.start_offset))
    ending = get_batch(store, batch.id)
    assert ending.status is BatchStatus.FINALIZING
    with pytest.raises(Conflict, match=r"'finalizing'.*can no longer be paused"):
        store.pause_batch(PROJECT, batch.id, NOW + 9)
    assert store.resume_batch(PROJECT, batch.id, NOW + 9).status is BatchStatus.FINALIZING
    lease = claim_phase(store, batch.id)
    assert store.finish_batch(lease, outputs=[], output_file_id=None, error_file_id=None,
                              completed=10, failed=0, unrun=0, now=NOW + 10)
    for pause_or_resume, action in ((store.pause_batch, "paused"),
                                    (store.resume_batch, "resumed")):
        with pytest.raises(Conflict, match=rf"ended with status 'completed'.*{action}"):
            pause_or_resume(PROJECT, batch.id, NOW + 11)
        with pytest.raises(NotFound):
            pause_or_resume(OTHER, batch.id, NOW + 11)
        with pytest.raises(NotFound):
            pause_or_resume(PROJECT, "batch_missing", NOW + 11)


def test_claims_follow_priority_then_deadline(store: Store) -> None:
    low = started_batch(store, 1)
    high = make_batch(priority=5)
    soon = make_batch(priority=5, expires_at=NOW + 600)
    for batch in (high, soon):
        store.insert_batch(batch)
        lease = claim_phase(store, batch.id)
        assert store.start_batch(lease, total=10, model="echo", input_key="k",
                                 chunks=specs(1), now=NOW + 1)
    assert [claim_chunk(store).batch_id for _ in range(3)] == [soon.id, high.id, low.id]


def test_lines_ahead_count_unanswered_lines_of_equal_or_higher_priority(store: Store) -> None:
    low = started_batch(store, 2)  # 20 lines at priority 0
    chunk = claim_chunk(store)
    assert store.commit_part(chunk, result(3, 1, first=chunk.spec.start_offset))
    assert store.lines_ahead(0) == 16
    assert store.lines_ahead(1) == 0
    store.insert_batch(make_batch(priority=3, total=7))  # validating, its size known
    assert (store.lines_ahead(1), store.lines_ahead(0), store.lines_ahead(4)) == (7, 23, 0)
    store.pause_batch(PROJECT, low.id, NOW + 5)  # waits for its owner: not ahead
    assert store.lines_ahead(0) == 7


def test_recent_runs_are_the_batches_that_ran_since(store: Store) -> None:
    batch = started_batch(store, 1)  # in progress since NOW + 1
    old = make_batch(status=BatchStatus.COMPLETED, in_progress_at=NOW - 7200,
                     finalizing_at=NOW - 7000, completed_at=NOW - 6990, total=5,
                     completed=5)
    recent = make_batch(status=BatchStatus.CANCELLED, in_progress_at=NOW - 100,
                        cancelling_at=NOW - 50, cancelled_at=NOW - 40, total=5, completed=2,
                        failed=3, unrun=3)
    never = make_batch(status=BatchStatus.FAILED, failed_at=NOW - 10)
    for made in (old, recent, never):
        store.insert_batch(made)
    assert [b.id for b in store.recent_runs(NOW - 3600)] == [batch.id, recent.id]


# -- jobs --------------------------------------------------------------------------------

def _python(name: str) -> Deployment:
    return Deployment(name=f"ep/{name}", backend="python", endpoint="ep",
                      options={"predictor": "m:C"})


@pytest.fixture
def jobs(store: SqlStore) -> SqlStore:
    store.set_deployments([_python("v1")], [Endpoint(name="ep", default_deployment="v1")])
    return store


def _job(store: SqlStore, priority: int = 0, **options: object) -> Job:
    job = Job(id=job_id(), project="p", endpoint="ep", deployment="v1",
              input=JobInput(kind=InputKind.ITEM_LIST, batch_size=1, items=[1, 2, 3]),
              options=JobOptions(**options),  # type: ignore[arg-type]
              output_path="/tmp/out", created_at=time.time(), priority=priority)
    store.insert_job(job)
    return job


def _enqueue(store: SqlStore, job: Job, n: int, *, finish: bool = True) -> None:
    lease = store.claim_job_phase("w", LONG, None)
    assert lease is not None and lease.job.id == job.id
    batches = [BatchSpec(index=i, segment_key="seg", start_offset=i * 2,
                         end_offset=i * 2 + 2, first_item=i, n_items=1) for i in range(n)]
    assert store.add_batches(lease, batches, time.time())
    if finish:
        assert store.finish_enqueue(lease)


def test_a_paused_job_claims_no_batch_and_completes_only_once_resumed(jobs: SqlStore) -> None:
    job = _job(jobs)
    _enqueue(jobs, job, 2)
    flying = jobs.claim_batch("w1", LONG, None)
    assert flying is not None
    paused = jobs.pause_job("p", job.id, 123.0)
    assert paused.status is JobStatus.PAUSED and paused.paused_at == 123.0
    assert jobs.pause_job("p", job.id, 456.0).paused_at == 123.0  # idempotent
    assert jobs.claim_batch("w2", LONG, None) is None
    assert jobs.job_demand() == {"ep/v1": 0}  # its queued batch waits: no worker wanted
    assert jobs.renew_batch(flying, LONG)  # the batch in flight runs on and ends
    assert jobs.complete_batch(flying, out_key="k0", duration_s=0.1)

    resumed = jobs.resume_job("p", job.id)
    assert resumed.status is JobStatus.RUNNING and resumed.paused_at is None
    assert jobs.resume_job("p", job.id) == resumed  # idempotent
    assert jobs.job_demand() == {"ep/v1": 1}
    last = jobs.claim_batch("w2", LONG, None)
    assert last is not None
    jobs.pause_job("p", job.id, 789.0)
    assert jobs.complete_batch(last, out_key="k1", duration_s=0.1)
    # Every batch ended while paused: it completes on resume, as a running job does.
    assert jobs.claim_job_phase("w", LONG, None) is None
    assert jobs.resume_job("p", job.id).stage is JobStage.COMPLETE
    lease = jobs.claim_job_phase("w", LONG, None)
    assert lease is not None and lease.job.status is JobStatus.RUNNING
    finished = jobs.finish_job(lease, results_url="u", now=time.time())
    assert finished is not None and finished.status is JobStatus.SUCCEEDED


def test_a_job_paused_while_enqueuing_stays_paused_and_resumes_its_stage(
        jobs: SqlStore) -> None:
    pending = _job(jobs)
    assert jobs.pause_job("p", pending.id, 1.0).status is JobStatus.PAUSED
    assert jobs.resume_job("p", pending.id).status is JobStatus.PENDING

    jobs.pause_job("p", pending.id, 2.0)
    lease = jobs.claim_job_phase("w", LONG, None)  # enqueuing goes on while paused
    assert lease is not None
    spec = BatchSpec(index=0, segment_key="s", start_offset=0, end_offset=2, first_item=0,
                     n_items=1)
    assert jobs.add_batches(lease, [spec], time.time())
    assert jobs.get_job("p", pending.id).status is JobStatus.PAUSED  # type: ignore[union-attr]
    assert jobs.claim_batch("w", LONG, None) is None
    assert jobs.resume_job("p", pending.id).status is JobStatus.ENQUEUING
    jobs.pause_job("p", pending.id, 3.0)
    assert jobs.finish_enqueue(lease)
    enqueued = jobs.get_job("p", pending.id)
    assert enqueued is not None
    assert (enqueued.status, enqueued.stage) == (JobStatus.PAUSED, JobStage.RUN)
    assert jobs.resume_job("p", pending.id).status is JobStatus.RUNNING
    assert jobs.claim_batch("w", LONG, None) is not None


def test_a_paused_job_times_out_stops_and_then_refuses(jobs: SqlStore) -> None:
    timed = _job(jobs, timeout_s=0.1)
    jobs.pause_job("p", timed.id, time.time())
    assert jobs.time_out_jobs(time.time() + 1) == [timed.id]  # a second later: past 0.1 s
    ended = jobs.get_job("p", timed.id)
    assert ended is not None and ended.status is JobStatus.TIMED_OUT
    assert ended.paused_at is None

    stopped = _job(jobs)
    jobs.pause_job("p", stopped.id, time.time())
    assert jobs.end_job(stopped.id, JobStatus.STOPPED, "by a test", project="p").status \
        is JobStatus.STOPPED
    with pytest.raises(Conflict, match=r"ended with status 'stopped'.*cannot be paused"):
        jobs.pause_job("p", stopped.id, time.time())
    with pytest.raises(Conflict, match=r"ended with status 'stopped'.*cannot be resumed"):
        jobs.resume_job("p", stopped.id)
    with pytest.raises(NotFound):
        jobs.pause_job("other", stopped.id, time.time())
    with pytest.raises(NotFound):
        jobs.resume_job("p", "job_missing")


def test_job_claims_follow_priority(jobs: SqlStore) -> None:
    low = _job(jobs)
    _enqueue(jobs, low, 1)
    high = _job(jobs, priority=7)
    _enqueue(jobs, high, 1)
    first, second = jobs.claim_batch("w", LONG, None), jobs.claim_batch("w", LONG, None)
    assert first is not None and first.job.id == high.id and first.job.priority == 7
    assert second is not None and second.job.id == low.id

