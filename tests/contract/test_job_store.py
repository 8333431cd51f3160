"""The job store port's contract (`batchery/ports/jobs.py`), over every adapter."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from batchery.model.deployments import API, Deployment, Endpoint
from batchery.model.exceptions import Conflict, NotFound
from batchery.model.jobs import (
    BatchLease,
    BatchSpec,
    BatchState,
    InputKind,
    Job,
    JobInput,
    JobLease,
    JobOptions,
    JobStage,
    JobStatus,
    JobWorker,
    WorkerState,
    job_id,
)
from batchery.ports.jobs import NewLogLine
from batchery.stores.sql.store import SqlStore
from tests.helpers import eventually

LONG = 60.0
#: A lease meant to run out during the test, and a sleep that outlasts it.
SHORT, SHORT_WAIT = 0.2, 0.35
#: A retry delay that must outlast the next statement, then end during the test.
HOLD_BACK = 2.0


def python(name: str, endpoint: str = "ep") -> Deployment:
    return Deployment(name=f"{endpoint}/{name}", backend="python", endpoint=endpoint,
                      options={"predictor": "m:C"})


def make_job(store: SqlStore, *, project: str = "p", deployment: str = "v1",
             **options: object) -> Job:
    job = Job(id=job_id(), project=project, endpoint="ep", deployment=deployment,
              input=JobInput(kind=InputKind.ITEM_LIST, batch_size=1, items=[1, 2]),
              options=JobOptions(**options),  # type: ignore[arg-type]
              output_path="/tmp/out", created_at=time.time())
    store.insert_job(job)
    return job


def enqueued(store: SqlStore, n: int, **options: object) -> Job:
    """A job whose `n` batches are queued and whose enqueuing is done."""
    job = make_job(store, **options)
    lease = store.claim_job_phase("w", LONG, None)
    assert lease is not None and lease.job.id == job.id
    specs = [BatchSpec(index=i, segment_key="seg", start_offset=i * 2, end_offset=i * 2 + 2,
                       first_item=i, n_items=1) for i in range(n)]
    assert store.add_batches(lease, specs, time.time())
    assert store.finish_enqueue(lease)
    return job


@pytest.fixture
def store(store: SqlStore) -> SqlStore:
    store.set_deployments([python("v1"), python("v2")],
                          [Endpoint(name="ep", default_deployment="v1")])
    return store


def test_endpoints_aliases_and_sources(store: SqlStore) -> None:
    names = {d.name: d for d in store.list_deployments()}
    assert names["ep"].alias_of == "ep/v1" and names["ep/v1"].endpoint == "ep"
    store.create_endpoint(Endpoint(name="mine", default_deployment="a", source=API),
                          [replace(python("a", "mine"), source=API)])
    with pytest.raises(Conflict):
        store.create_endpoint(Endpoint(name="mine", default_deployment="a", source=API), [])
    store.add_deployment(replace(python("b", "mine"), source=API))
    with pytest.raises(NotFound):
        store.set_default_deployment("mine", "zzz")
    assert store.set_default_deployment("mine", "b").default_deployment == "b"
    # A restart re-publishes the config file and keeps what the API made.
    store.set_deployments([python("v1")], [Endpoint(name="ep", default_deployment="v1")])
    assert {e.name for e in store.list_endpoints()} == {"ep", "mine"}
    with pytest.raises(Conflict, match="config file"):
        store.delete_endpoint("ep")
    store.delete_endpoint("mine")
    assert "mine/a" not in {d.name for d in store.list_deployments()}


def test_enqueue_run_complete_and_finish(store: SqlStore) -> None:
    job = enqueued(store, 2)
    assert store.get_job("p", job.id).status is JobStatus.RUNNING  # type: ignore[union-attr]
    assert store.get_job("other", job.id) is None
    a = store.claim_batch("w1", LONG, None)
    b = store.claim_batch("w2", LONG, {"ep/v1"})
    assert a is not None and b is not None and {a.spec.index, b.spec.index} == {0, 1}
    assert store.claim_batch("w3", LONG, None) is None
    assert store.claim_job_phase("w", LONG, None) is None  # batches in flight
    assert store.complete_batch(a, out_key="k0", duration_s=0.5)
    assert not store.complete_batch(a, out_key="k0", duration_s=0.5)  # fenced: once
    assert store.complete_batch(b, out_key="k1", duration_s=1.5)
    lease = store.claim_job_phase("w", LONG, None)
    assert lease is not None and lease.job.stage is JobStage.COMPLETE
    finished = store.finish_job(lease, results_url="u", now=time.time())
    assert finished is not None and finished.status is JobStatus.SUCCEEDED
    assert finished.metrics.succeeded == 2 and finished.metrics.average_time_per_batch == 1.0
    assert finished.items_succeeded == 2 and finished.ended_at is not None


def test_claims_follow_deployments_and_the_workers_limit(store: SqlStore) -> None:
    job = enqueued(store, 3, workers=1)
    assert store.claim_batch("w", LONG, {"ep/v2"}) is None
    first = store.claim_batch("w", LONG, None)
    assert first is not None and first.job.id == job.id
    assert store.claim_batch("w2", LONG, None) is None  # workers=1
    assert store.job_demand() == {"ep/v1": 1}
    store.release_batch(first)
    assert store.claim_batch("w2", LONG, None) is not None


def test_failed_attempts_dead_letters_and_the_error_threshold(store: SqlStore) -> None:
    job = enqueued(store, 3, max_retries=1, error_threshold=0)
    lease = store.claim_batch("w", LONG, None)
    assert lease is not None
    assert store.fail_batch_attempt(lease, "boom 1", delay_s=0) is False
    again = store.claim_batch("w", LONG, None)
    assert again is not None and again.spec.index == lease.spec.index and again.attempts == 1
    assert store.fail_batch_attempt(again, "boom 2", delay_s=0) is True
    ended = store.get_job(None, job.id)
    assert ended is not None and ended.status is JobStatus.FAILED
    assert "error_threshold of 0" in (ended.error or "")
    assert ended.metrics.failed == 2 and ended.metrics.dead_letters == 1
    (dead,) = store.list_job_batches(job.id, ["failed"])
    assert dead.attempts == 2 and dead.last_error == "boom 2"
    assert store.claim_batch("w", LONG, None) is None  # the rest were aborted


def test_retry_delay_is_honoured(store: SqlStore) -> None:
    enqueued(store, 1)
    lease = store.claim_batch("w", LONG, None)
    assert lease is not None
    store.fail_batch_attempt(lease, "later", delay_s=HOLD_BACK)
    assert store.claim_batch("w", LONG, None) is None
    again = eventually(lambda: store.claim_batch("w", LONG, None), "the retry delay's end")
    assert again.job.id == lease.job.id


def running(store: SqlStore, n_batches: int, owner: str, lease_s: float
            ) -> tuple[Job, BatchLease]:
    """A job of `n_batches`, its first batch leased by `owner`, who reports it running."""
    job = enqueued(store, n_batches)
    lease = store.claim_batch(owner, lease_s, None)
    assert lease is not None
    store.report_job_worker(JobWorker(job_id=job.id, worker_id=owner, host="h", pid=1,
                                      state=WorkerState.RUNNING, current_batch=0,
                                      last_heartbeat=time.time()))
    return job, lease


def test_expired_leases_are_reaped_and_their_workers_marked_failed(store: SqlStore) -> None:
    job, lease = running(store, 1, "dead-worker", SHORT)
    time.sleep(SHORT_WAIT)
    (reaped,) = store.reap_expired_batches()
    assert reaped.owner == "dead-worker" and not reaped.dropped
    assert not store.complete_batch(lease, out_key=None, duration_s=1)  # fenced out
    (worker,) = store.list_job_workers(job.id)
    assert worker.state is WorkerState.FAILED
    again = store.claim_batch("w2", LONG, None)
    assert again is not None
    # The worker died: an expiry, not an attempt of the batch.
    assert (again.attempts, again.expiries) == (0, 1)
    got = store.get_job(None, job.id)
    assert got is not None and got.metrics.failed == 0


def test_split_batches_and_a_poison_item_dead_alone(store: SqlStore) -> None:
    job = enqueued(store, 1, max_retries=5)
    lease = store.claim_batch("w", LONG, None)
    assert lease is not None
    spec = lease.spec
    halves = [replace(spec, end_offset=spec.start_offset + 1, n_items=1),
              replace(spec, start_offset=spec.start_offset + 1,
                      first_item=spec.first_item + 1, n_items=1)]
    assert store.split_batch(lease, halves)
    assert not store.split_batch(lease, halves)  # fenced
    states = store.batch_state_counts(job.id)
    assert states == {BatchState.SPLIT.value: 1, BatchState.QUEUED.value: 2}
    first = store.claim_batch("w", LONG, None)
    assert first is not None and first.expiries >= 1 and first.spec.n_items == 1
    # A poison item is a dead letter at once, whatever retries remain.
    assert store.fail_batch_attempt(first, "worker_crashed: …", delay_s=0.0, dead=True)
    got = store.get_job(None, job.id)
    assert got is not None and got.metrics.dead_letters == 1 and got.items_failed == 1


def test_stop_keeps_batches_in_flight_and_drops_queued_ones(store: SqlStore) -> None:
    job = enqueued(store, 3)
    flying = store.claim_batch("w", LONG, None)
    assert flying is not None
    stopped = store.end_job(job.id, JobStatus.STOPPED, "by a test", project="p")
    assert stopped.status is JobStatus.STOPPED and stopped.stage is JobStage.COMPLETE
    with pytest.raises(Conflict):
        store.end_job(job.id, JobStatus.STOPPED, None)
    with pytest.raises(NotFound):
        store.end_job("job_missing", JobStatus.STOPPED, None)
    assert store.claim_batch("w", LONG, None) is None
    assert store.claim_job_phase("w", LONG, None) is None  # waits for the one in flight
    assert store.complete_batch(flying, out_key="k", duration_s=1)
    lease = store.claim_job_phase("w", LONG, None)
    assert lease is not None
    finished = store.finish_job(lease, results_url=None, now=time.time())
    assert finished is not None and finished.status is JobStatus.STOPPED
    assert store.batch_state_counts(job.id) == {"succeeded": 1, "aborted": 2}


def test_timeouts_and_enqueue_fencing(store: SqlStore) -> None:
    job = make_job(store, timeout_s=0.1)
    lease = store.claim_job_phase("w", LONG, None)
    assert lease is not None
    assert store.time_out_jobs(time.time() + 1) == [job.id]  # a second later: past 0.1 s
    spec = BatchSpec(index=0, segment_key="s", start_offset=0, end_offset=1, first_item=0,
                     n_items=1)
    assert not store.add_batches(lease, [spec], time.time())  # the job moved on
    assert not store.renew_job_phase(lease, LONG)
    timed_out = store.get_job(None, job.id)
    assert timed_out is not None and timed_out.status is JobStatus.TIMED_OUT


def test_enqueue_failures_count_until_permanent(store: SqlStore) -> None:
    job = make_job(store)
    lease = store.claim_job_phase("w", LONG, None)
    assert lease is not None
    assert not store.fail_enqueue(lease, "flaky", permanent=False, max_attempts=2)
    store.release_job_phase(lease)
    second = store.claim_job_phase("w", LONG, None)
    assert isinstance(second, JobLease)
    assert store.fail_enqueue(second, "flaky again", permanent=False, max_attempts=2)
    failed = store.get_job(None, job.id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert "flaky again" in (failed.error or "")


def test_another_projects_job_id_pages_like_an_unknown_id(store: SqlStore) -> None:
    mine = [make_job(store) for _ in range(2)]
    theirs = make_job(store, project="q")
    mine.append(make_job(store))
    pages = [store.list_jobs("p", endpoint=None, status=None, after=cursor, limit=10)
             for cursor in (theirs.id, "job_garbage")]
    assert pages[0] == pages[1]
    # A cursor of the project's own still pages.
    older = store.list_jobs("p", endpoint=None, status=None, after=mine[2].id, limit=10)
    assert [j.id for j in older.items] == [mine[1].id, mine[0].id]


def test_logs_workers_and_listing(store: SqlStore) -> None:
    jobs = [make_job(store) for _ in range(3)]
    store.append_logs([NewLogLine(job_id=jobs[0].id, ts=1.0 + i, level="INFO", source="w",
                                  message=f"line {i}") for i in range(5)])
    first = store.read_logs(jobs[0].id, after=0, limit=3)
    assert [x.message for x in first] == ["line 0", "line 1", "line 2"]
    rest = store.read_logs(jobs[0].id, after=first[-1].id, limit=10)
    assert [x.message for x in rest] == ["line 3", "line 4"]
    assert store.read_logs(jobs[1].id, after=0, limit=10) == []
    page = store.list_jobs("p", endpoint="ep", status=None, after=None, limit=2)
    assert [j.id for j in page.items] == [jobs[2].id, jobs[1].id] and page.has_more
    older = store.list_jobs("p", endpoint=None, status=JobStatus.PENDING,
                            after=page.items[-1].id, limit=2)
    assert [j.id for j in older.items] == [jobs[0].id] and not older.has_more
    report = JobWorker(job_id=jobs[0].id, worker_id="w", host="h", pid=7,
                       state=WorkerState.IDLE, last_heartbeat=1.0, started_at=1.0)
    store.report_job_worker(report)
    store.touch_job_workers("w", 5.0)
    (seen,) = store.list_job_workers(jobs[0].id)
    assert seen.last_heartbeat == 5.0 and seen.pid == 7


def test_a_job_view_is_the_job_its_batch_counts_and_workers_in_one_read(
        store: SqlStore) -> None:
    job, lease = running(store, 3, "w", LONG)
    assert store.complete_batch(lease, out_key=None, duration_s=1)
    found = store.job_view("p", job.id)
    assert found is not None
    seen, counts, workers = found
    assert seen == store.get_job("p", job.id)
    assert counts == store.batch_state_counts(job.id) == {"succeeded": 1, "queued": 2}
    assert workers == store.list_job_workers(job.id) and [w.worker_id for w in workers] == ["w"]
    # Scoped like get_job: another project's job, or none, is not found.
    assert store.job_view("other", job.id) is None
    assert store.job_view(None, "job_missing") is None
