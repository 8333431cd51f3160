"""Enqueuing on a real store and file store: batches cover every item once, in order,
and an enqueue cut short resumes where it stopped."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.jobs import enqueue
from batchery.jobs.joblog import JobLog
from batchery.model.jobs import InputKind, Job, JobInput, JobOptions, JobStage, job_id
from batchery.queue.lease import LeaseLost
from batchery.stores.sql.store import SqlStore


@pytest.fixture
def parts(tmp_path: Path, sqlite_url: str) -> tuple[SqlStore, FsspecFileStore, JobLog]:
    store = SqlStore.from_url(sqlite_url)
    return store, FsspecFileStore(str(tmp_path / "files")), JobLog(store, "test")


def _job(store: SqlStore, items: list[object], batch_size: int) -> Job:
    job = Job(id=job_id(), project="p", endpoint="ep", deployment="v1",
              input=JobInput(kind=InputKind.ITEM_LIST, batch_size=batch_size, items=items),
              options=JobOptions(), output_path="/tmp/x", created_at=time.time())
    store.insert_job(job)
    return job


def _items_in_order(store: SqlStore, files: FsspecFileStore, job: Job) -> list[object]:
    found: list[object] = []
    for batch in store.list_job_batches(job.id):
        data = files.read_range(batch.spec.segment_key, batch.spec.start_offset,
                                batch.spec.end_offset)
        lines = [orjson.loads(x) for x in data.splitlines()]
        assert len(lines) == batch.spec.n_items
        assert batch.spec.first_item == len(found)
        found.extend(lines)
    return found


def test_enqueue_cuts_batches_across_segments(parts: tuple[SqlStore, FsspecFileStore, JobLog],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store, files, log = parts
    monkeypatch.setattr(enqueue, "SEGMENT_BATCHES", 3)
    items: list[object] = [{"n": i, "text": "é" * (i % 4)} for i in range(23)]
    job = _job(store, items, batch_size=2)
    lease = store.claim_job_phase("w", 60, None)
    assert lease is not None
    enqueue.enqueue(store, files, lease, lambda: False, log)
    done = store.get_job(None, job.id)
    assert done is not None and done.stage is JobStage.RUN
    assert done.total_batch_count == 12 and done.total_items == 23
    assert _items_in_order(store, files, job) == items
    assert len({b.spec.segment_key for b in store.list_job_batches(job.id)}) == 4
    store.close()


def test_an_interrupted_enqueue_resumes_without_loss_or_repeat(
        parts: tuple[SqlStore, FsspecFileStore, JobLog],
        monkeypatch: pytest.MonkeyPatch) -> None:
    store, files, log = parts
    monkeypatch.setattr(enqueue, "SEGMENT_BATCHES", 2)
    items: list[object] = list(range(17))
    job = _job(store, items, batch_size=3)
    first = store.claim_job_phase("w1", 60, None)
    assert first is not None
    flushes = 0

    def lost_after_two_segments() -> bool:
        nonlocal flushes
        flushes += 1
        return flushes > 2

    with pytest.raises(LeaseLost):
        enqueue.enqueue(store, files, first, lost_after_two_segments, log)
    store.release_job_phase(first)
    second = store.claim_job_phase("w2", 60, None)
    assert second is not None and second.job.total_batch_count == 4
    enqueue.enqueue(store, files, second, lambda: False, log)
    assert _items_in_order(store, files, job) == items
    log.flush()
    assert "resuming enqueuing after 4 batches (12 items)" in [
        x.message for x in store.read_logs(job.id, after=0, limit=100)]
    store.close()


def test_an_empty_input_cannot_be_enqueued(parts: tuple[SqlStore, FsspecFileStore, JobLog],
                                           tmp_path: Path) -> None:
    store, files, log = parts
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    job = Job(id=job_id(), project="p", endpoint="ep", deployment="v1",
              input=JobInput(kind=InputKind.DELIMITED_FILES, batch_size=2,
                             paths=(str(empty),)),
              options=JobOptions(), output_path="/tmp/x", created_at=time.time())
    store.insert_job(job)
    lease = store.claim_job_phase("w", 60, None)
    assert lease is not None
    with pytest.raises(enqueue.EnqueueError, match="no items"):
        enqueue.enqueue(store, files, lease, lambda: False, log)
    store.close()
