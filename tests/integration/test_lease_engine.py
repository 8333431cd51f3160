"""The lease engine's rules for batches, driven in process: a real store (SQLite and
PostgreSQL), a real file store, and the worker loop with its real handlers."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from batchery.batchapi.service import BatchService
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.model.batches import BatchStatus
from batchery.model.chunks import ChunkPart
from batchery.model.deployments import Deployment
from batchery.model.leases import MAX_PHASE_ATTEMPTS
from batchery.queue.worker import Worker, WorkerConfig
from batchery.stores.sql.store import SqlStore
from batchery.wire.openai_lines import error_line
from batchery.workers import worker as worker_for
from tests.helpers import chat_file

PROJECT = "p"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    url = (f"sqlite:///{tmp_path / 'b.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    store = SqlStore.from_url(url)
    store.set_deployments([Deployment(name="echo", backend="echo")])
    yield store
    store.close()


@pytest.fixture
def files(tmp_path: Path) -> FsspecFileStore:
    return FsspecFileStore(str(tmp_path / "files"))


@contextlib.contextmanager
def _worker(store: SqlStore, files: FsspecFileStore) -> Iterator[Worker]:
    worker = worker_for(store, files, WorkerConfig(poll_s=0.01))
    try:
        yield worker
    finally:
        worker.stop()
        worker.run()  # closes what it holds, as a stopping worker does


def _drain(worker: Worker, store: SqlStore | None = None, batch_id: str = "",
           timeout: float = 10.0) -> None:
    """Run the worker until it finds nothing to do (and, given `batch_id`, that batch has
    ended: a lease that runs out waits for the reaper's next round)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.run_once():
            continue
        batch = store.get_batch(None, batch_id) if store is not None else None
        if batch is None or batch.status.is_terminal:
            return
        time.sleep(0.05)


def _new_batch(store: SqlStore, files: FsspecFileStore, lines: int) -> str:
    service = BatchService(store, files)
    record = service.upload(PROJECT, io.BytesIO(chat_file(lines, model="echo")),
                            filename="in.jsonl", purpose="batch")
    return service.create_batch(PROJECT, input_file_id=record.id,
                                endpoint="/v1/chat/completions").id


def test_an_input_file_deleted_after_create_still_runs_and_goes_at_the_end(
        store: SqlStore, files: FsspecFileStore) -> None:
    service = BatchService(store, files)
    batch_id = _new_batch(store, files, 12)
    batch = store.get_batch(PROJECT, batch_id)
    assert batch is not None and batch.input_key is not None
    service.delete_file(PROJECT, batch.input_file_id)
    assert files.size(batch.input_key) > 0  # pinned by the batch
    with _worker(store, files) as worker:
        _drain(worker)
    done = store.get_batch(PROJECT, batch_id)
    assert done is not None and done.status is BatchStatus.COMPLETED
    assert (done.completed, done.failed) == (12, 0)
    with pytest.raises(FileNotFoundError):
        files.size(batch.input_key)  # and released with the batch's end


def test_a_vanished_input_fails_the_batch_at_once_naming_the_file(
        store: SqlStore, files: FsspecFileStore, caplog: pytest.LogCaptureFixture) -> None:
    batch_id = _new_batch(store, files, 30)
    with _worker(store, files) as worker, \
            caplog.at_level(logging.WARNING, logger="batchery.worker"):
        assert worker.run_once()  # validation: the batch runs now
        batch = store.get_batch(PROJECT, batch_id)
        assert batch is not None and batch.status is BatchStatus.IN_PROGRESS
        assert batch.input_key is not None
        files.delete(batch.input_key)  # gone from under the batch (an operator, a lost disk)
        store.request_cancel(PROJECT, batch_id, 0)  # assembling needs the input's custom_ids
        _drain(worker)
    done = store.get_batch(PROJECT, batch_id)
    assert done is not None and done.status is BatchStatus.FAILED
    assert done.errors is not None
    assert (done.errors[0].code, done.errors[0].param) == ("invalid_request", "file_id")
    assert batch.input_file_id in done.errors[0].message
    assert "Traceback" not in caplog.text


def test_a_phase_that_keeps_failing_ends_the_batch_with_the_last_error(
        store: SqlStore, files: FsspecFileStore) -> None:
    batch_id = _new_batch(store, files, 3)
    for attempt in range(MAX_PHASE_ATTEMPTS):
        lease = store.claim_phase("earlier", 30)
        assert lease is not None and lease.attempts == attempt
        store.release_phase(lease, error=f"OSError: disk full ({attempt})")
    with _worker(store, files) as worker:
        assert worker.run_once()
    done = store.get_batch(PROJECT, batch_id)
    assert done is not None and done.status is BatchStatus.FAILED
    assert done.errors is not None and done.errors[0].code == "server_error"
    message = done.errors[0].message
    assert f"after {MAX_PHASE_ATTEMPTS} tries" in message
    assert "disk full (4)" in message


def test_lines_committed_in_parts_are_not_run_again(
        store: SqlStore, files: FsspecFileStore) -> None:
    """A chunk taken over after its worker died skips what the dead worker committed."""
    batch_id = _new_batch(store, files, 8)
    with _worker(store, files) as worker:
        _take_over(store, files, worker, batch_id)
    done = store.get_batch(PROJECT, batch_id)
    assert done is not None and done.status is BatchStatus.COMPLETED
    assert done.completed + done.failed == 8
    assert done.error_file_id is not None and done.output_file_id is not None
    error_lines = _lines(store, files, done.error_file_id)
    output_ids = [x["custom_id"] for x in _lines(store, files, done.output_file_id)]
    assert [x["error"]["code"] for x in error_lines] == ["test_marker"]
    assert error_lines[0]["custom_id"] not in output_ids
    assert len(output_ids) == len(set(output_ids)) == 7


def _take_over(store: SqlStore, files: FsspecFileStore, worker: Worker, batch_id: str) -> None:
    assert worker.run_once()  # validation
    lease = store.claim_chunk("dead", 0.2)
    assert lease is not None
    data = files.read_range(lease.input_key, lease.spec.start_offset, lease.spec.end_offset)
    first = data.index(b"\n") + 1  # the dead worker answered the chunk's first line
    line = data[:first].rstrip(b"\n")
    custom_id = orjson.loads(line)["custom_id"]
    key = f"parts/{batch_id}/by-dead-worker.err"
    with files.open_write(key) as out:
        out.write(error_line(custom_id, "test_marker", "answered before the worker died"))
    assert store.commit_part(lease, ChunkPart(n_ok=0, n_err=1, out_key=None, err_key=key,
                                              offsets=(lease.spec.start_offset,)))
    _drain(worker, store, batch_id)  # once the dead worker's lease runs out


def _lines(store: SqlStore, files: FsspecFileStore, file_id: str) -> list[dict[str, object]]:
    record = store.get_file(PROJECT, file_id)
    assert record is not None
    with files.open_read(record.storage_key) as stream:
        return [orjson.loads(x) for x in stream.read().splitlines()]


def test_a_chunks_slices_load_their_model_once(
        store: SqlStore, files: FsspecFileStore, caplog: pytest.LogCaptureFixture) -> None:
    """The slices of a chunk run together and all ask for the model at once: one worker
    loads it once (a second load would hold the model twice in memory)."""
    batch_id = _new_batch(store, files, 200)
    with _worker(store, files) as worker, caplog.at_level(logging.INFO, "batchery.worker"):
        _drain(worker, store, batch_id)
    done = store.get_batch(PROJECT, batch_id)
    assert done is not None and done.status is BatchStatus.COMPLETED
    loads = [r for r in caplog.records if r.getMessage().startswith("loaded deployment echo")]
    assert len(loads) == 1
