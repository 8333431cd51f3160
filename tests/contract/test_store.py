"""The `Store` port's contract, run once over every adapter (SQLite and PostgreSQL).

Each test states what the port promises (see the docstrings in `batchery/ports/store.py`) and
checks it through the port alone, except the migration tests, which look at the schema.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from batchery.model.batches import Batch, BatchError, BatchStatus, EndReason
from batchery.model.chunks import ChunkLease, ChunkPart, ChunkSpec, ChunkState
from batchery.model.deployments import Deployment
from batchery.model.exceptions import Conflict, NotFound
from batchery.model.files import FileRecord
from batchery.ports.store import PhaseLease, Store, WorkerInfo
from batchery.stores.sql import engine as engines
from batchery.stores.sql import migrate, tables
from batchery.stores.sql.store import SqlStore
from tests.helpers import eventually

NOW = 1_800_000_000
PROJECT = "proj-a"
OTHER = "proj-b"
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
#: Long enough that no lease runs out during a test unless the test wants it to.
LONG = 60.0
#: Short leases for tests that let one run out; SHORT_WAIT is safely past it.
SHORT = 0.2
SHORT_WAIT = 0.35
#: A hold-back that must outlast the next statement or two, then end during the test.
HOLD_BACK = 2.0

_counter = 0


def _next(prefix: str) -> str:
    global _counter
    _counter += 1
    return f"{prefix}{_counter:05d}"


def make_file(project: str = PROJECT, *, purpose: str = "batch", storage_key: str | None = None,
              created_at: int = NOW, expires_at: int | None = NOW + 3600) -> FileRecord:
    file_id = _next("file-")
    return FileRecord(id=file_id, project=project, filename=f"{file_id}.jsonl", purpose=purpose,
                      bytes=1234, created_at=created_at, expires_at=expires_at,
                      storage_key=storage_key or f"files/{file_id}")


def make_batch(project: str = PROJECT, *, status: BatchStatus = BatchStatus.VALIDATING,
               endpoint: str = CHAT, expires_at: int = NOW + 86400, **fields: Any) -> Batch:
    fields.setdefault("input_file_id", _next("file-"))
    return Batch(id=_next("batch_"), project=project, endpoint=endpoint,
                 completion_window="24h", status=status, created_at=NOW,
                 expires_at=expires_at, **fields)


def specs(n: int, lines: int = 10) -> list[ChunkSpec]:
    return [ChunkSpec(index=i, start_offset=i * 1000, end_offset=(i + 1) * 1000,
                      first_line=i * lines, n_lines=lines) for i in range(n)]


def result(n_ok: int, n_err: int, *, tokens: int = 0, tag: str = "x",
           first: int = 0) -> ChunkPart:
    """A part answering `n_ok + n_err` lines, which start at offsets `first`, `first + 1`…"""
    return ChunkPart(n_ok=n_ok, n_err=n_err, out_key=f"parts/{tag}.out",
                     err_key=f"parts/{tag}.err" if n_err else None,
                     offsets=tuple(range(first, first + n_ok + n_err)),
                     input_tokens=tokens, output_tokens=2 * tokens)


def claim_phase(store: Store, batch_id: str, lease_s: float = LONG,
                owner: str = "w-phase") -> PhaseLease:
    lease = store.claim_phase(owner, lease_s)
    assert lease is not None
    assert lease.batch.id == batch_id
    return lease


def started_batch(store: Store, n_chunks: int, *, lines: int = 10,
                  project: str = PROJECT) -> Batch:
    """A batch taken through validation into `in_progress`, with `n_chunks` queued chunks.
    Call it while no other batch waits for batch-level work."""
    batch = make_batch(project)
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id)
    assert store.start_batch(lease, total=n_chunks * lines, model="echo",
                             input_key=f"inputs/{batch.id}", chunks=specs(n_chunks, lines),
                             now=NOW + 1)
    got = store.get_batch(project, batch.id)
    assert got is not None
    return got


def claim_chunk(store: Store, lease_s: float = LONG, owner: str = "w-chunk") -> ChunkLease:
    lease = store.claim_chunk(owner, lease_s)
    assert lease is not None
    return lease


def get_batch(store: Store, batch_id: str) -> Batch:
    batch = store.get_batch(None, batch_id)
    assert batch is not None
    return batch


def chunk_states(store: Store, batch_id: str) -> list[tuple[ChunkState, int]]:
    return [(c.state, c.attempts) for c in store.list_chunks(batch_id)]


# -- files ---------------------------------------------------------------------------------


def test_file_insert_get_and_project_isolation(store: Store) -> None:
    record = make_file(expires_at=None)
    other = make_file(OTHER)
    store.insert_file(record)
    store.insert_file(other)

    assert store.get_file(PROJECT, record.id) == record
    assert store.get_file(None, record.id) == record
    assert store.get_file(OTHER, record.id) is None
    assert store.get_file(OTHER, other.id) == other
    assert store.get_file(PROJECT, other.id) is None
    assert store.get_file(PROJECT, "file-missing") is None


def test_list_files_pages_newest_first_and_oldest_first(store: Store) -> None:
    mine = [make_file(created_at=NOW + i) for i in range(5)]
    for i, record in enumerate(mine):
        store.insert_file(record)
        if i == 2:
            store.insert_file(make_file(OTHER))  # interleaved: must never show up
    ids = [r.id for r in mine]

    def page(after: str | None, limit: int, order: str) -> tuple[list[str], bool]:
        got = store.list_files(PROJECT, purpose=None, after=after, limit=limit, order=order)
        return [r.id for r in got.items], got.has_more

    assert page(None, 2, "desc") == ([ids[4], ids[3]], True)
    assert page(ids[3], 2, "desc") == ([ids[2], ids[1]], True)
    assert page(ids[1], 2, "desc") == ([ids[0]], False)
    assert page(ids[2], 2, "desc") == ([ids[1], ids[0]], False)
    assert page(ids[0], 2, "desc") == ([], False)
    assert page(None, 5, "desc") == (ids[::-1], False)
    assert page(None, 4, "desc") == (ids[:0:-1], True)

    assert page(None, 2, "asc") == ([ids[0], ids[1]], True)
    assert page(ids[1], 2, "asc") == ([ids[2], ids[3]], True)
    assert page(ids[3], 2, "asc") == ([ids[4]], False)
    assert page(ids[2], 2, "asc") == ([ids[3], ids[4]], False)

    full = store.list_files(PROJECT, purpose=None, after=None, limit=10, order="asc")
    assert full.items == mine
    other = store.list_files(OTHER, purpose=None, after=None, limit=10, order="desc")
    assert [r.project for r in other.items] == [OTHER]


def test_list_files_purpose_filter(store: Store) -> None:
    inputs = [make_file(purpose="batch") for _ in range(3)]
    outputs = [make_file(purpose="batch_output") for _ in range(2)]
    internal = make_file(purpose="message_batch")
    for record in (inputs[0], outputs[0], inputs[1], internal, outputs[1], inputs[2]):
        store.insert_file(record)

    def listed(purpose: str | None, after: str | None = None, limit: int = 10) -> list[str]:
        got = store.list_files(PROJECT, purpose=purpose, after=after, limit=limit,
                               order="asc")
        return [r.id for r in got.items]

    assert listed("batch") == [r.id for r in inputs]
    assert listed("batch_output") == [r.id for r in outputs]
    assert listed("batch", after=inputs[0].id, limit=1) == [inputs[1].id]
    # Internal (Anthropic message batch) files are listed only when asked for by purpose.
    assert listed(None) == [inputs[0].id, outputs[0].id, inputs[1].id, outputs[1].id,
                            inputs[2].id]
    assert listed("message_batch") == [internal.id]
    assert listed("fine-tune") == []


def test_list_files_with_now_hides_expired_files(store: Store) -> None:
    gone = make_file(expires_at=NOW - 1)
    edge = make_file(expires_at=NOW)
    live = make_file(expires_at=NOW + 1)
    forever = make_file(expires_at=None)
    for record in (gone, edge, live, forever):
        store.insert_file(record)

    page = store.list_files(PROJECT, purpose=None, after=None, limit=10, order="asc",
                            now=NOW)
    assert page.items == [live, forever]
    page = store.list_files(PROJECT, purpose="batch", after=None, limit=1, order="desc",
                            now=NOW)
    assert (page.items, page.has_more) == ([forever], True)
    page = store.list_files(PROJECT, purpose=None, after=None, limit=10, order="asc")
    assert page.items == [gone, edge, live, forever]


def test_delete_file(store: Store) -> None:
    record = make_file()
    kept = make_file()
    store.insert_file(record)
    store.insert_file(kept)

    assert store.delete_file(OTHER, record.id) is None
    assert store.get_file(PROJECT, record.id) == record
    assert store.delete_file(PROJECT, record.id) == record
    assert store.get_file(None, record.id) is None
    assert store.delete_file(PROJECT, record.id) is None
    assert store.get_file(PROJECT, kept.id) == kept
    page = store.list_files(PROJECT, purpose=None, after=None, limit=10, order="desc")
    assert page.items == [kept]


def test_blob_in_use(store: Store) -> None:
    by_file = make_file(storage_key="blobs/by-file")
    store.insert_file(by_file)
    store.insert_batch(make_batch(status=BatchStatus.VALIDATING, input_file_id=by_file.id))
    store.insert_batch(make_batch(status=BatchStatus.IN_PROGRESS, input_key="blobs/by-key"))
    store.insert_batch(make_batch(status=BatchStatus.CANCELLING, input_key="blobs/cancelling"))
    for status in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED,
                   BatchStatus.EXPIRED):
        store.insert_batch(make_batch(status=status, input_key=f"blobs/{status.value}"))

    assert store.blob_in_use("blobs/by-file")
    assert store.blob_in_use("blobs/by-key")
    assert store.blob_in_use("blobs/cancelling")
    assert not store.blob_in_use("blobs/completed")
    assert not store.blob_in_use("blobs/failed")
    assert not store.blob_in_use("blobs/cancelled")
    assert not store.blob_in_use("blobs/expired")
    assert not store.blob_in_use("blobs/unknown")


# -- batches -------------------------------------------------------------------------------


def test_batch_insert_get_round_trip(store: Store) -> None:
    full = make_batch(
        status=BatchStatus.COMPLETED, model="echo", output_file_id="file-out",
        error_file_id="file-err", in_progress_at=NOW + 1, finalizing_at=NOW + 2,
        completed_at=NOW + 3, total=10, completed=7, failed=3, unrun=1,
        input_tokens=5_000_000_000, output_tokens=123, metadata={"team": "x", "ü": "ñ"},
        end_reason=EndReason.DONE, input_key="inputs/a", chunk_size=7, max_tasks=99,
        errors=[BatchError(code="invalid_json", message="bad line", line=3),
                BatchError(code="model_not_found", message="no", param="body.model")],
        remote={"job": {"id": "j-1", "n": [1, 2]}, "polls": 3})
    bare = make_batch()
    store.insert_batch(full)
    store.insert_batch(bare)

    assert store.get_batch(PROJECT, full.id) == full
    assert store.get_batch(None, full.id) == full
    assert store.get_batch(PROJECT, bare.id) == bare
    assert store.get_batch(OTHER, full.id) is None
    assert store.get_batch(PROJECT, "batch_missing") is None


def test_list_batches_newest_first_with_paging_and_isolation(store: Store) -> None:
    mine = []
    for i in range(5):
        batch = make_batch(endpoint=EMBED if i % 2 else CHAT)
        store.insert_batch(batch)
        mine.append(batch)
        if i == 1:
            store.insert_batch(make_batch(OTHER))
    ids = [b.id for b in mine]

    def page(*, after: str | None = None, before: str | None = None, limit: int = 2,
             **filters: str) -> tuple[list[str], bool]:
        got = store.list_batches(PROJECT, after=after, before=before, limit=limit, **filters)
        return [b.id for b in got.items], got.has_more

    assert page() == ([ids[4], ids[3]], True)
    assert page(after=ids[3]) == ([ids[2], ids[1]], True)
    assert page(after=ids[1]) == ([ids[0]], False)
    assert page(after=ids[2]) == ([ids[1], ids[0]], False)
    assert page(limit=5) == (ids[::-1], False)
    # `before` pages towards newer batches, still presented newest first.
    assert page(before=ids[0]) == ([ids[2], ids[1]], True)
    assert page(before=ids[2]) == ([ids[4], ids[3]], False)
    assert page(endpoint=EMBED, limit=5) == ([ids[3], ids[1]], False)
    assert page(exclude_endpoint=EMBED, limit=5) == ([ids[4], ids[2], ids[0]], False)

    assert store.list_batches(PROJECT, after=None, limit=10).items == mine[::-1]
    other = store.list_batches(OTHER, after=None, limit=10)
    assert [b.project for b in other.items] == [OTHER]
    assert store.list_batches("proj-none", after=None, limit=10).items == []


def test_another_projects_id_pages_like_an_unknown_id(store: Store) -> None:
    """A cursor from another project must not reveal that the id exists."""
    mine_f = [make_file() for _ in range(3)]
    mine_b = [make_batch() for _ in range(3)]
    for record, batch in zip(mine_f, mine_b, strict=True):
        store.insert_file(record)
        store.insert_batch(batch)
    theirs_f, theirs_b = make_file(OTHER), make_batch(OTHER)
    store.insert_file(theirs_f)
    store.insert_batch(theirs_b)
    # Older and newer ones of mine around theirs: a resolved cursor would find them.
    store.insert_file(make_file())
    store.insert_batch(make_batch())

    for order in ("asc", "desc"):
        pages = [store.list_files(PROJECT, purpose=None, after=cursor, limit=10, order=order)
                 for cursor in (theirs_f.id, "file-garbage")]
        assert pages[0] == pages[1]
    for key in ("after", "before"):
        got = [store.list_batches(PROJECT, limit=10, **{"after": None, key: cursor})
               for cursor in (theirs_b.id, "batch_garbage")]
        assert got[0] == got[1]


def test_file_bytes_counts_a_projects_live_files(store: Store) -> None:
    store.insert_file(make_file(expires_at=None))
    store.insert_file(make_file(expires_at=NOW + 1))
    store.insert_file(make_file(expires_at=NOW))  # expired by NOW
    store.insert_file(make_file(OTHER))
    deleted = make_file()
    store.insert_file(deleted)
    store.delete_file(PROJECT, deleted.id)

    assert store.file_bytes(PROJECT, now=NOW) == 2 * 1234
    assert store.file_bytes(OTHER, now=NOW) == 1234
    assert store.file_bytes("proj-none", now=NOW) == 0


def test_delete_batch_only_once_ended(store: Store) -> None:
    running = make_batch(status=BatchStatus.IN_PROGRESS)
    ended = make_batch(status=BatchStatus.COMPLETED)
    store.insert_batch(running)
    store.insert_batch(ended)

    assert not store.delete_batch(PROJECT, running.id)
    assert store.get_batch(PROJECT, running.id) == running
    assert not store.delete_batch(OTHER, ended.id)
    assert store.get_batch(PROJECT, ended.id) == ended
    assert store.delete_batch(PROJECT, ended.id)
    assert store.get_batch(None, ended.id) is None
    assert not store.delete_batch(PROJECT, ended.id)


def test_request_cancel_moves_running_batches_to_cancelling(store: Store) -> None:
    for status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
        batch = make_batch(status=status)
        store.insert_batch(batch)
        got = store.request_cancel(PROJECT, batch.id, NOW + 5)
        assert got == replace(batch, status=BatchStatus.CANCELLING, cancelling_at=NOW + 5,
                              end_reason=EndReason.CANCELLED), status
        assert store.get_batch(PROJECT, batch.id) == got


def test_request_cancel_of_cancelled_or_finalizing_batches_changes_nothing(
        store: Store) -> None:
    cancelling = make_batch(status=BatchStatus.CANCELLING, cancelling_at=NOW + 1,
                            end_reason=EndReason.CANCELLED)
    cancelled = make_batch(status=BatchStatus.CANCELLED, cancelling_at=NOW + 1,
                           cancelled_at=NOW + 2, end_reason=EndReason.CANCELLED)
    # A finalizing batch has run all it will run (or is expiring): a cancel leaves it be.
    finalizing = make_batch(status=BatchStatus.FINALIZING, finalizing_at=NOW + 1,
                            end_reason=EndReason.DONE)
    expiring = make_batch(status=BatchStatus.FINALIZING, finalizing_at=NOW + 1,
                          end_reason=EndReason.EXPIRED)
    for batch in (cancelling, cancelled, finalizing, expiring):
        store.insert_batch(batch)
        assert store.request_cancel(PROJECT, batch.id, NOW + 9) == batch
        assert store.get_batch(PROJECT, batch.id) == batch


def test_request_cancel_of_ended_batches_conflicts(store: Store) -> None:
    for status in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED):
        batch = make_batch(status=status, end_reason=EndReason.DONE)
        store.insert_batch(batch)
        with pytest.raises(Conflict):
            store.request_cancel(PROJECT, batch.id, NOW + 9)
        assert store.get_batch(PROJECT, batch.id) == batch


def test_request_cancel_of_unknown_or_foreign_batch_is_not_found(store: Store) -> None:
    batch = make_batch(status=BatchStatus.IN_PROGRESS)
    store.insert_batch(batch)
    with pytest.raises(NotFound):
        store.request_cancel(PROJECT, "batch_missing", NOW)
    with pytest.raises(NotFound):
        store.request_cancel(OTHER, batch.id, NOW)
    assert store.get_batch(PROJECT, batch.id) == batch


def test_expire_due(store: Store) -> None:
    due = [make_batch(status=BatchStatus.VALIDATING, expires_at=NOW - 10),
           make_batch(status=BatchStatus.IN_PROGRESS, expires_at=NOW)]
    not_yet = make_batch(status=BatchStatus.IN_PROGRESS, expires_at=NOW + 1)
    others = [make_batch(status=BatchStatus.FINALIZING, expires_at=NOW - 10,
                         end_reason=EndReason.DONE),
              make_batch(status=BatchStatus.CANCELLING, expires_at=NOW - 10,
                         end_reason=EndReason.CANCELLED),
              make_batch(status=BatchStatus.COMPLETED, expires_at=NOW - 10),
              make_batch(status=BatchStatus.FAILED, expires_at=NOW - 10)]
    for batch in (*due, not_yet, *others):
        store.insert_batch(batch)

    assert store.expire_due(NOW) == 2
    for batch in due:
        assert get_batch(store, batch.id) == replace(
            batch, status=BatchStatus.FINALIZING, finalizing_at=NOW,
            end_reason=EndReason.EXPIRED)
    for batch in (not_yet, *others):
        assert get_batch(store, batch.id) == batch
    assert store.expire_due(NOW) == 0
    assert store.expire_due(NOW + 1) == 1
    assert get_batch(store, not_yet.id).end_reason is EndReason.EXPIRED


# -- batch-level phases --------------------------------------------------------------------


def test_claim_phase_claims_only_batches_with_batch_level_work(store: Store) -> None:
    by_status = {status: make_batch(status=status) for status in BatchStatus}
    remote = make_batch(status=BatchStatus.IN_PROGRESS, remote={"deployment": "r"})
    for batch in (*by_status.values(), remote):
        store.insert_batch(batch)

    claimed = []
    while (lease := store.claim_phase("w1", LONG)) is not None:
        assert lease.batch == get_batch(store, lease.batch.id)
        claimed.append(lease)
        assert len(claimed) <= len(by_status)
    assert sorted(lease.batch.id for lease in claimed) == sorted(
        [*(by_status[s].id for s in (BatchStatus.VALIDATING, BatchStatus.FINALIZING,
                                     BatchStatus.CANCELLING)), remote.id])
    assert len({lease.token for lease in claimed}) == 4
    assert store.claim_phase("w2", LONG) is None


def test_claim_phase_waits_for_a_live_lease_to_end(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)

    first = claim_phase(store, batch.id, LONG, owner="w1")
    assert store.claim_phase("w2", LONG) is None
    assert store.renew_phase(first, SHORT)  # a renewal sets the lease's end, here nearer
    second = eventually(lambda: store.claim_phase("w2", LONG), "the phase lease's end")
    assert second.batch.id == batch.id
    assert second.token != first.token
    assert not store.renew_phase(first, LONG)
    assert store.renew_phase(second, LONG)
    # Releasing the lost lease must not free the live one.
    store.release_phase(first)
    assert store.claim_phase("w3", LONG) is None
    store.release_phase(second)
    third = claim_phase(store, batch.id, LONG, owner="w3")
    assert not store.renew_phase(second, LONG)
    assert store.renew_phase(third, LONG)


def test_renew_phase_fails_once_the_status_changed(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id)
    assert store.renew_phase(lease, LONG)

    store.request_cancel(PROJECT, batch.id, NOW + 3)
    assert not store.renew_phase(lease, LONG)
    assert not store.start_batch(lease, total=10, model="echo", input_key="inputs/x",
                                 chunks=specs(1), now=NOW + 4)
    assert not store.fail_batch(lease, [BatchError(code="c", message="m")], NOW + 4)
    assert not store.finish_batch(lease, outputs=[], output_file_id=None, error_file_id=None,
                                  completed=0, failed=0, unrun=0, now=NOW + 4)
    got = get_batch(store, batch.id)
    assert got.status is BatchStatus.CANCELLING
    assert got.in_progress_at is None and got.failed_at is None
    assert store.list_chunks(batch.id) == []


def test_start_batch_creates_chunks_and_moves_to_in_progress(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id)
    cut = specs(3, lines=7)

    assert store.start_batch(lease, total=21, model="echo", input_key="inputs/k", chunks=cut,
                             now=NOW + 4)
    assert get_batch(store, batch.id) == replace(
        batch, status=BatchStatus.IN_PROGRESS, in_progress_at=NOW + 4, total=21, model="echo",
        input_key="inputs/k")
    chunks = store.list_chunks(batch.id)
    assert [c.spec for c in chunks] == cut
    assert {c.batch_id for c in chunks} == {batch.id}
    assert [(c.state, c.attempts, c.n_ok, c.n_err) for c in chunks] == [
        (ChunkState.QUEUED, 0, 0, 0)] * 3
    assert len({c.id for c in chunks}) == 3
    # The phase lease is done with: the same lease cannot start the batch again, and there
    # is no batch-level work left to claim.
    assert not store.renew_phase(lease, LONG)
    assert not store.start_batch(lease, total=21, model="echo", input_key="inputs/k",
                                 chunks=cut, now=NOW + 5)
    assert len(store.list_chunks(batch.id)) == 3
    assert store.claim_phase("w2", LONG) is None


def test_fail_batch(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id)
    errors = [BatchError(code="invalid_json", message="line 3 is not JSON", line=3),
              BatchError(code="model_not_found", message="no such model", param="body.model",
                         line=9)]

    assert store.fail_batch(lease, errors, NOW + 6)
    assert get_batch(store, batch.id) == replace(batch, status=BatchStatus.FAILED,
                                                 failed_at=NOW + 6, errors=errors)
    assert not store.fail_batch(lease, errors[:1], NOW + 7)
    assert get_batch(store, batch.id).errors == errors
    assert store.claim_phase("w2", LONG) is None


@pytest.mark.parametrize(("status", "reason", "final", "stamp"), [
    (BatchStatus.FINALIZING, EndReason.DONE, BatchStatus.COMPLETED, "completed_at"),
    (BatchStatus.FINALIZING, EndReason.EXPIRED, BatchStatus.EXPIRED, "expired_at"),
    (BatchStatus.CANCELLING, EndReason.CANCELLED, BatchStatus.CANCELLED, "cancelled_at"),
], ids=["done", "expired", "cancelled"])
def test_finish_batch_records_outputs_and_ends_the_batch(
        store: Store, status: BatchStatus, reason: EndReason, final: BatchStatus,
        stamp: str) -> None:
    batch = make_batch(status=status, end_reason=reason, total=12, in_progress_at=NOW + 1)
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id)
    output = make_file(purpose="batch_output", storage_key=f"outputs/{batch.id}.jsonl")
    errors = make_file(purpose="batch_output", storage_key=f"outputs/{batch.id}.err.jsonl")

    assert store.finish_batch(lease, outputs=[output, errors], output_file_id=output.id,
                              error_file_id=errors.id, completed=7, failed=5, unrun=2,
                              now=NOW + 8)
    stamped: dict[str, Any] = {stamp: NOW + 8}
    assert get_batch(store, batch.id) == replace(
        batch, status=final, output_file_id=output.id, error_file_id=errors.id, completed=7,
        failed=5, unrun=2, **stamped)
    assert store.get_file(PROJECT, output.id) == output
    assert store.get_file(PROJECT, errors.id) == errors
    assert not store.finish_batch(lease, outputs=[], output_file_id=None, error_file_id=None,
                                  completed=0, failed=0, unrun=0, now=NOW + 9)
    assert get_batch(store, batch.id).completed == 7
    assert store.claim_phase("w2", LONG) is None


def test_release_phase_with_retry_in_holds_the_batch_back(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id, owner="w1")

    store.release_phase(lease, retry_in=HOLD_BACK)
    assert not store.renew_phase(lease, LONG)
    assert store.claim_phase("w2", LONG) is None
    again = eventually(lambda: store.claim_phase("w2", LONG), "the hold-back's end")
    assert again.batch.id == batch.id
    store.release_phase(again)
    claim_phase(store, batch.id, owner="w3")  # a plain release frees it at once


def test_a_remote_batch_runs_without_chunks_under_phase_leases(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id)
    remote = {"deployment": "provider", "job": None, "polls": 0}

    assert store.start_batch(lease, total=20, model="gpt-x", input_key="inputs/r",
                             chunks=specs(2), now=NOW + 4, remote=remote)
    assert get_batch(store, batch.id) == replace(
        batch, status=BatchStatus.IN_PROGRESS, in_progress_at=NOW + 4, total=20,
        model="gpt-x", input_key="inputs/r", remote=remote)
    assert store.list_chunks(batch.id) == []
    assert store.claim_chunk("w", LONG) is None

    # Polling the provider is batch-level work, fenced like the rest.
    polling = claim_phase(store, batch.id)
    assert polling.batch.remote == remote
    state = {"deployment": "provider", "job": {"id": "job-1", "status": "running"},
             "polls": 1}
    assert store.save_remote(polling, state, completed=5, failed=1)
    got = get_batch(store, batch.id)
    assert (got.remote, got.completed, got.failed) == (state, 5, 1)
    assert store.renew_phase(polling, LONG)

    store.request_cancel(PROJECT, batch.id, NOW + 5)
    assert not store.save_remote(polling, {"stale": True}, completed=9, failed=9)
    got = get_batch(store, batch.id)
    assert (got.status, got.remote, got.completed, got.failed) == (
        BatchStatus.CANCELLING, state, 5, 1)


def test_a_stale_phase_lease_can_neither_start_nor_fail(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)
    stale = claim_phase(store, batch.id, SHORT, owner="w1")
    time.sleep(SHORT_WAIT)
    live = claim_phase(store, batch.id, LONG, owner="w2")

    assert not store.start_batch(stale, total=10, model="echo", input_key="inputs/x",
                                 chunks=specs(2), now=NOW + 2)
    assert not store.fail_batch(stale, [BatchError(code="c", message="m")], NOW + 2)
    assert get_batch(store, batch.id).status is BatchStatus.VALIDATING
    assert store.list_chunks(batch.id) == []
    assert store.start_batch(live, total=10, model="echo", input_key="inputs/x",
                             chunks=specs(2), now=NOW + 3)
    assert get_batch(store, batch.id).status is BatchStatus.IN_PROGRESS


def test_a_stale_phase_lease_cannot_finish(store: Store) -> None:
    batch = make_batch(status=BatchStatus.FINALIZING, end_reason=EndReason.DONE)
    store.insert_batch(batch)
    stale = claim_phase(store, batch.id, SHORT, owner="w1")
    time.sleep(SHORT_WAIT)
    live = claim_phase(store, batch.id, LONG, owner="w2")
    output = make_file(purpose="batch_output")

    assert not store.finish_batch(stale, outputs=[output], output_file_id=output.id,
                                  error_file_id=None, completed=1, failed=0, unrun=0,
                                  now=NOW + 2)
    assert store.get_file(None, output.id) is None
    assert get_batch(store, batch.id) == batch
    assert store.finish_batch(live, outputs=[output], output_file_id=output.id,
                              error_file_id=None, completed=1, failed=0, unrun=0, now=NOW + 3)
    assert get_batch(store, batch.id).status is BatchStatus.COMPLETED
    assert store.get_file(PROJECT, output.id) == output


# -- the chunk queue -----------------------------------------------------------------------


def test_claim_chunk_takes_the_oldest_queued_chunk_of_a_running_batch(store: Store) -> None:
    cancelled = started_batch(store, 2)
    first = started_batch(store, 2, lines=5)
    second = started_batch(store, 1)
    store.request_cancel(PROJECT, cancelled.id, NOW + 2)  # older chunks, but not running
    store.insert_batch(make_batch())  # validating: has no chunks yet

    leases = [claim_chunk(store, owner=f"w{i}") for i in range(3)]
    assert store.claim_chunk("w9", LONG) is None
    assert [(lease.batch_id, lease.spec) for lease in leases] == [
        (first.id, specs(2, lines=5)[0]), (first.id, specs(2, lines=5)[1]),
        (second.id, specs(1)[0])]
    assert [lease.chunk_id for lease in leases] == [
        *(c.id for c in store.list_chunks(first.id)), store.list_chunks(second.id)[0].id]
    assert {lease.endpoint for lease in leases} == {CHAT}
    assert [lease.input_key for lease in leases] == [
        f"inputs/{first.id}", f"inputs/{first.id}", f"inputs/{second.id}"]
    assert [lease.attempts for lease in leases] == [0, 0, 0]
    assert len({lease.token for lease in leases}) == 3
    assert chunk_states(store, first.id) == [(ChunkState.LEASED, 0)] * 2
    assert chunk_states(store, cancelled.id) == [(ChunkState.QUEUED, 0)] * 2


def test_renew_chunk(store: Store) -> None:
    batch = started_batch(store, 2)
    lease = claim_chunk(store, SHORT)
    assert store.renew_chunk(lease, LONG)
    time.sleep(SHORT_WAIT)
    assert store.reap_expired() == 0  # renewed: still ours
    assert store.renew_chunk(lease, LONG)
    assert store.complete_chunk(lease, result(10, 0))
    assert not store.renew_chunk(lease, LONG)
    assert chunk_states(store, batch.id)[0] == (ChunkState.DONE, 0)


def test_complete_chunk_is_fenced(store: Store) -> None:
    batch = started_batch(store, 2)
    lease = claim_chunk(store)
    done = result(8, 2, tokens=100, tag="c0")

    assert store.complete_chunk(lease, done)
    assert not store.complete_chunk(lease, done)
    assert not store.complete_chunk(lease, result(10, 0, tokens=5))
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed, got.input_tokens, got.output_tokens) == (8, 2, 100, 200)
    assert got.status is BatchStatus.IN_PROGRESS
    chunk = store.list_chunks(batch.id)[0]
    assert (chunk.state, chunk.n_ok, chunk.n_err) == (ChunkState.DONE, 8, 2)
    [part] = store.list_parts(batch.id)
    assert (part.out_key, part.err_key, len(part.offsets)) == ("parts/c0.out", "parts/c0.err", 10)
    # Neither can a completed chunk be handed back, nor failed for good.
    store.release_chunk(lease, error="late", count_attempt=True, max_attempts=1)
    assert store.list_chunks(batch.id)[0] == chunk
    assert get_batch(store, batch.id).failed == 2


def test_a_reaped_and_reclaimed_chunk_cannot_be_completed_by_its_old_lease(
        store: Store) -> None:
    batch = started_batch(store, 1)
    old = claim_chunk(store, SHORT, owner="slow")
    time.sleep(SHORT_WAIT)
    assert store.reap_expired() == 1
    chunk = store.list_chunks(batch.id)[0]
    # Its worker died: an expiry, which costs the chunk no attempt.
    assert (chunk.state, chunk.attempts, chunk.expiries) == (ChunkState.QUEUED, 0, 1)
    assert chunk.last_error

    new = claim_chunk(store, LONG, owner="fast")
    assert (new.chunk_id, new.attempts, new.expiries) == (old.chunk_id, 0, 1)
    assert not store.renew_chunk(old, LONG)
    assert not store.complete_chunk(old, result(10, 0, tag="old"))
    assert store.complete_chunk(new, result(9, 1, tag="new"))
    assert not store.complete_chunk(old, result(10, 0, tag="old"))
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed) == (9, 1)
    assert [p.out_key for p in store.list_parts(batch.id)] == ["parts/new.out"]


def test_counts_are_live_and_the_last_chunk_finalizes(store: Store) -> None:
    batch = started_batch(store, 3)
    leases = [claim_chunk(store) for _ in range(3)]
    expected = [(9, 1), (17, 3), (24, 6)]
    for i, lease in enumerate(leases):
        if i == 2:
            # Late in a second, where rounding the clock and truncating it differ.
            time.sleep((0.6 - time.time() % 1) % 1)
            before = int(time.time())
        assert store.complete_chunk(lease, result(10 - (i + 1), i + 1, tokens=10))
        got = get_batch(store, batch.id)
        assert (got.completed, got.failed) == expected[i]
        assert got.input_tokens == 10 * (i + 1)
        if i < 2:
            assert (got.status, got.end_reason, got.finalizing_at) == (
                BatchStatus.IN_PROGRESS, None, None)
    after = int(time.time())
    assert got.status is BatchStatus.FINALIZING
    assert got.end_reason is EndReason.DONE
    # Unix seconds from the database clock, never ahead of the wall clock.
    assert got.finalizing_at is not None
    assert before <= got.finalizing_at <= after
    assert claim_phase(store, batch.id).batch.status is BatchStatus.FINALIZING


def test_release_chunk_requeues_delays_and_finally_fails(store: Store) -> None:
    batch = started_batch(store, 2)
    first = claim_chunk(store)
    store.release_chunk(first, error="stopping", count_attempt=False, max_attempts=3)
    chunk = store.list_chunks(batch.id)[0]
    assert (chunk.state, chunk.attempts, chunk.last_error) == (ChunkState.QUEUED, 0, "stopping")

    second = claim_chunk(store)
    assert (second.chunk_id, second.attempts) == (first.chunk_id, 0)
    store.release_chunk(second, error="boom", count_attempt=True, max_attempts=3)
    assert chunk_states(store, batch.id)[0] == (ChunkState.QUEUED, 1)

    third = claim_chunk(store)
    assert (third.chunk_id, third.attempts) == (first.chunk_id, 1)
    store.release_chunk(third, error="boom again", count_attempt=True, max_attempts=3,
                        delay_s=0.5)
    assert chunk_states(store, batch.id)[0] == (ChunkState.QUEUED, 2)
    other = claim_chunk(store)  # the delayed chunk waits; the next one is handed out
    assert other.spec.index == 1
    assert store.claim_chunk("w", LONG) is None
    time.sleep(0.6)

    last = claim_chunk(store)
    assert (last.chunk_id, last.attempts) == (first.chunk_id, 2)
    store.release_chunk(last, error="gave up", count_attempt=True, max_attempts=3)
    chunk = store.list_chunks(batch.id)[0]
    assert (chunk.state, chunk.attempts, chunk.last_error) == (ChunkState.FAILED, 3, "gave up")
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed, got.status) == (0, 10, BatchStatus.IN_PROGRESS)
    # Fenced: the same lease cannot fail the chunk (and count its lines) twice.
    store.release_chunk(last, error="again", count_attempt=True, max_attempts=3)
    assert get_batch(store, batch.id).failed == 10
    assert store.claim_chunk("w", LONG) is None

    assert store.complete_chunk(other, result(10, 0))
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed) == (10, 10)
    assert (got.status, got.end_reason) == (BatchStatus.FINALIZING, EndReason.DONE)


def test_a_chunk_failed_for_good_can_finalize_the_batch(store: Store) -> None:
    batch = started_batch(store, 1, lines=4)
    lease = claim_chunk(store)
    store.release_chunk(lease, error="fatal", count_attempt=True, max_attempts=1)
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed) == (0, 4)
    assert (got.status, got.end_reason) == (BatchStatus.FINALIZING, EndReason.DONE)


def test_reap_expired(store: Store) -> None:
    batch = started_batch(store, 3)
    short = claim_chunk(store, SHORT, owner="dead")
    long = claim_chunk(store, LONG, owner="alive")
    time.sleep(SHORT_WAIT)

    assert store.reap_expired() == 1
    # Expiries cost no attempt: a worker that died never fails the lines it held.
    assert chunk_states(store, batch.id) == [
        (ChunkState.QUEUED, 0), (ChunkState.LEASED, 0), (ChunkState.QUEUED, 0)]
    assert [c.expiries for c in store.list_chunks(batch.id)] == [1, 0, 0]
    assert store.reap_expired() == 0
    assert store.renew_chunk(long, LONG)

    # Dying again and again only grows the run of expiries; the reaper fails nothing.
    for n in (2, 3, 4):
        again = claim_chunk(store, SHORT, owner="dead")
        assert (again.chunk_id, again.expiries) == (short.chunk_id, n - 1)
        time.sleep(SHORT_WAIT)
        assert store.reap_expired() == 1
        assert not store.complete_chunk(again, result(10, 0))
        assert store.list_chunks(batch.id)[0].expiries == n
    assert get_batch(store, batch.id).failed == 0

    # Progress committed under a lease starts the run of expiries again.
    progress = claim_chunk(store)
    assert progress.chunk_id == short.chunk_id
    assert store.commit_part(progress, result(3, 0, tag="p"))
    assert store.list_chunks(batch.id)[0].expiries == 0
    assert store.complete_chunk(progress, result(7, 0, tag="q", first=3))

    third = claim_chunk(store)
    assert third.spec.index == 2
    assert store.complete_chunk(third, result(10, 0))
    assert store.complete_chunk(long, result(10, 0))
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed, got.status) == (30, 0, BatchStatus.FINALIZING)


def test_abort_open_chunks_fences_out_their_leases(store: Store) -> None:
    batch = started_batch(store, 4)
    done = claim_chunk(store)
    assert store.complete_chunk(done, result(10, 0))
    held = claim_chunk(store)
    store.request_cancel(PROJECT, batch.id, NOW + 5)

    assert store.abort_open_chunks(batch.id) == 3
    assert [c.state for c in store.list_chunks(batch.id)] == [
        ChunkState.DONE, ChunkState.ABORTED, ChunkState.ABORTED, ChunkState.ABORTED]
    assert not store.renew_chunk(held, LONG)
    assert not store.complete_chunk(held, result(10, 0))
    store.release_chunk(held, error="x", count_attempt=True, max_attempts=1)
    assert store.list_chunks(batch.id)[1].state is ChunkState.ABORTED
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed, got.status) == (10, 0, BatchStatus.CANCELLING)
    assert store.claim_chunk("w", LONG) is None
    assert store.abort_open_chunks(batch.id) == 0


def test_reset_leases_frees_chunks_and_phases_without_an_attempt(store: Store) -> None:
    batch = started_batch(store, 2)
    chunk_lease = claim_chunk(store, owner="gone")
    validating = make_batch()
    store.insert_batch(validating)
    phase_lease = claim_phase(store, validating.id, owner="gone")
    assert store.claim_phase("w", LONG) is None

    store.reset_leases()
    assert chunk_states(store, batch.id) == [(ChunkState.QUEUED, 0)] * 2
    assert not store.complete_chunk(chunk_lease, result(10, 0))
    again = claim_chunk(store, owner="new")
    assert (again.chunk_id, again.attempts) == (chunk_lease.chunk_id, 0)
    assert store.complete_chunk(again, result(10, 0))
    assert get_batch(store, batch.id).completed == 10

    phase_again = claim_phase(store, validating.id, owner="new")
    assert phase_again.token != phase_lease.token
    assert not store.renew_phase(phase_lease, LONG)


# -- deployments and workers ---------------------------------------------------------------


def test_deployments_are_replaced_as_a_whole(store: Store) -> None:
    assert store.list_deployments() == []
    first = [Deployment(name="zeta", backend="echo"),
             Deployment(name="alpha", backend="openai",
                        options={"base_url": "http://x", "limits": {"rpm": 5}, "on": True})]
    store.set_deployments(first)
    assert store.list_deployments() == sorted(first, key=lambda d: d.name)
    store.set_deployments([Deployment(name="beta", backend="echo")])
    assert store.list_deployments() == [Deployment(name="beta", backend="echo")]
    store.set_deployments([])
    assert store.list_deployments() == []


def test_worker_heartbeats(store: Store) -> None:
    a = WorkerInfo(id="host-1-aa", host="host", pid=1, state="starting", started_at=100.5)
    b = WorkerInfo(id="host-2-bb", host="host", pid=2, state="idle", started_at=50.25,
                   last_heartbeat=60.0)
    store.heartbeat_worker(a)
    store.heartbeat_worker(b)
    a2 = replace(a, state="running", last_heartbeat=101.5, current="batch_x:3", chunks_done=4)
    store.heartbeat_worker(a2)
    assert store.list_workers() == [b, a2]


def test_counts(store: Store) -> None:
    assert store.counts() == {"batches": {}, "chunks": {}}
    started_batch(store, 3)
    store.insert_batch(make_batch(status=BatchStatus.COMPLETED))
    store.insert_batch(make_batch(status=BatchStatus.VALIDATING))
    assert store.complete_chunk(claim_chunk(store), result(10, 0))
    claim_chunk(store)
    assert store.counts() == {
        "batches": {"in_progress": 1, "completed": 1, "validating": 1},
        "chunks": {"done": 1, "leased": 1, "queued": 1}}


# -- many processes claiming at once -------------------------------------------------------

N_PROCESSES = 4
N_CHUNKS = 200
LINES = 3


def claim_until_drained(url: str, owner: str, start: Any, holding: Any, results: Any) -> None:
    """A worker process's loop: claim and complete chunks until none is left. Every process
    holds its first lease until all hold one (the `holding` barrier), so each takes part
    however the operating system schedules them.

    Puts `(owner, completed chunk ids, lost chunk ids, error)` on `results`."""
    completed: list[int] = []
    lost: list[int] = []
    try:
        store = SqlStore.from_url(url)
        try:
            start.wait(60)
            first = True
            while (lease := store.claim_chunk(owner, LONG)) is not None:
                if first:
                    holding.wait(60)
                    first = False
                done = result(LINES - 1, 1, tokens=lease.spec.n_lines, tag=lease.token)
                (completed if store.complete_chunk(lease, done) else lost).append(
                    lease.chunk_id)
        finally:
            store.close()
        results.put((owner, completed, lost, None))
    except BaseException:
        results.put((owner, completed, lost, traceback.format_exc()))


@pytest.mark.slow
def test_concurrent_claims_from_several_processes(store: Store, store_url: str) -> None:
    batch = started_batch(store, N_CHUNKS, lines=LINES)
    chunk_ids = [c.id for c in store.list_chunks(batch.id)]
    assert len(chunk_ids) == N_CHUNKS

    ctx = multiprocessing.get_context("spawn")
    start, holding = ctx.Barrier(N_PROCESSES), ctx.Barrier(N_PROCESSES)
    results = ctx.Queue()
    processes = [ctx.Process(target=claim_until_drained,
                             args=(store_url, f"proc-{i}", start, holding, results))
                 for i in range(N_PROCESSES)]
    for process in processes:
        process.start()
    reports = []
    try:
        for _ in processes:
            reports.append(results.get(timeout=120))
        for process in processes:
            process.join(30)
            assert process.exitcode == 0
    except queue.Empty:
        pytest.fail(f"a claiming process hung; reports so far: {reports}")
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
        results.join_thread()

    assert [error for *_, error in reports if error] == []
    assert [lost for _, _, lost, _ in reports] == [[]] * N_PROCESSES
    counts = Counter(cid for _, completed, _, _ in reports for cid in completed)
    assert [cid for cid, n in counts.items() if n > 1] == []
    assert sorted(counts) == sorted(chunk_ids)
    # The first claims raced, after the start barrier, and every process held a lease at
    # once (the holding barrier): each completed at least one chunk.
    assert all(completed for _, completed, _, _ in reports), reports

    assert [c.state for c in store.list_chunks(batch.id)] == [ChunkState.DONE] * N_CHUNKS
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed) == (N_CHUNKS * (LINES - 1), N_CHUNKS)
    assert got.input_tokens == N_CHUNKS * LINES
    assert (got.status, got.end_reason) == (BatchStatus.FINALIZING, EndReason.DONE)


# -- migrations ----------------------------------------------------------------------------


def _schema_diff(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(context, tables.metadata))


def _revision(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


def _head() -> str:
    head = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    assert head is not None
    return head


def test_migrated_schema_matches_the_tables(fresh_url: str) -> None:
    store = SqlStore.from_url(fresh_url)
    try:
        assert _schema_diff(store.engine) == []
        assert _revision(store.engine) == [_head()]
    finally:
        store.close()


def test_upgrading_twice_is_a_no_op(fresh_url: str) -> None:
    store = SqlStore.from_url(fresh_url)
    try:
        record = make_file()
        batch = started_batch(store, 2)
        store.insert_file(record)

        migrate.upgrade(store.engine)
        again = SqlStore.from_url(fresh_url)  # a second process starting on the database
        try:
            assert again.get_file(PROJECT, record.id) == record
        finally:
            again.close()

        assert _revision(store.engine) == [_head()]
        assert _schema_diff(store.engine) == []
        assert store.get_batch(PROJECT, batch.id) == batch
        assert len(store.list_chunks(batch.id)) == 2
    finally:
        store.close()


def test_upgrading_from_the_first_revision_keeps_the_rows(fresh_url: str) -> None:
    """Later migrations rebuild tables on SQLite: the rows must survive them."""
    engine = engines.create(fresh_url)
    try:
        with engine.begin() as conn:
            config = migrate.alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
        old_batches = sa.table(
            "batches", *(sa.column(name) for name in (
                "id", "project", "endpoint", "input_file_id", "completion_window", "status",
                "created_at", "expires_at", "completed")), sa.column("metadata", sa.JSON))
        with engine.begin() as conn:
            conn.execute(old_batches.insert().values(
                id="batch_old", project=PROJECT, endpoint=CHAT, input_file_id="file-old",
                completion_window="24h", status="completed", created_at=NOW,
                expires_at=NOW + 86400, completed=3, metadata={"k": "v"}))
        migrate.upgrade(engine)
        assert _revision(engine) == [_head()]
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()

    store = SqlStore.from_url(fresh_url)
    try:
        got = get_batch(store, "batch_old")
    finally:
        store.close()
    assert (got.status, got.completed, got.unrun, got.metadata, got.remote) == (
        BatchStatus.COMPLETED, 3, 0, {"k": "v"}, None)


# -- the lease core: parts, splits and bounded phases ------------------------------------

def test_parts_count_at_once_and_name_the_lines_they_answer(store: Store) -> None:
    batch = started_batch(store, 1)
    lease = claim_chunk(store)
    assert store.commit_part(lease, result(3, 1, tag="a", first=1000 - 1000))
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed, got.status) == (3, 1, BatchStatus.IN_PROGRESS)
    assert store.done_offsets(batch.id, 0, 1000) == {0, 1, 2, 3}
    assert store.done_offsets(batch.id, 2, 3) == {2}
    # The lease is kept: more parts, then the completion.
    assert store.renew_chunk(lease, LONG)
    assert store.complete_chunk(lease, result(6, 0, tag="b", first=4))
    assert [len(p.offsets) for p in store.list_parts(batch.id)] == [4, 6]
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed, got.status) == (9, 1, BatchStatus.FINALIZING)


def test_a_part_from_a_lost_lease_counts_nothing(store: Store) -> None:
    batch = started_batch(store, 1)
    old = claim_chunk(store, SHORT, owner="dead")
    time.sleep(SHORT_WAIT)
    assert store.reap_expired() == 1
    new = claim_chunk(store, LONG, owner="alive")
    assert not store.commit_part(old, result(5, 0, tag="old"))
    assert store.commit_part(new, result(2, 0, tag="new"))
    assert get_batch(store, batch.id).completed == 2
    assert [p.out_key for p in store.list_parts(batch.id)] == ["parts/new.out"]


def test_a_chunk_failed_for_good_fails_only_its_unanswered_lines(store: Store) -> None:
    batch = started_batch(store, 1)
    lease = claim_chunk(store)
    assert store.commit_part(lease, result(7, 0))
    store.release_chunk(lease, error="fatal", count_attempt=True, max_attempts=1)
    got = get_batch(store, batch.id)
    assert (got.completed, got.failed, got.status) == (7, 3, BatchStatus.FINALIZING)


def test_split_replaces_a_chunk_by_queued_halves(store: Store) -> None:
    batch = started_batch(store, 1)
    lease = claim_chunk(store)
    halves = [ChunkSpec(index=0, start_offset=0, end_offset=400, first_line=0, n_lines=4),
              ChunkSpec(index=0, start_offset=400, end_offset=1000, first_line=4, n_lines=6)]
    assert store.split_chunk(lease, halves, [(1, 0), (0, 0)], 1)
    assert not store.split_chunk(lease, halves, [(0, 0), (0, 0)], 1)  # fenced
    states = [(c.state, c.spec.n_lines, c.n_ok, c.expiries)
              for c in store.list_chunks(batch.id)]
    assert states == [(ChunkState.SPLIT, 10, 0, 0), (ChunkState.QUEUED, 4, 1, 1),
                      (ChunkState.QUEUED, 6, 0, 1)]
    first, second = claim_chunk(store), claim_chunk(store)
    assert (first.spec.start_offset, second.spec.start_offset) == (0, 400)
    assert first.expiries == second.expiries == 1
    assert store.complete_chunk(first, result(3, 0, first=1))
    assert get_batch(store, batch.id).status is BatchStatus.IN_PROGRESS  # the split one is over
    assert store.complete_chunk(second, result(6, 0, first=400))
    assert get_batch(store, batch.id).status is BatchStatus.FINALIZING


def test_a_chunk_of_a_cancelled_batch_stops_renewing_but_can_still_commit(
        store: Store) -> None:
    batch = started_batch(store, 2)
    lease = claim_chunk(store)
    store.request_cancel(PROJECT, batch.id, NOW + 5)
    assert not store.renew_chunk(lease, LONG)  # the worker learns to stop
    # Assembling the results waits while the chunk's lease is live…
    assert store.claim_phase("w", LONG) is None
    # …so the lines it finished are committed and kept.
    assert store.commit_part(lease, result(4, 0))
    store.release_chunk(lease, error="handed back", count_attempt=False, max_attempts=5)
    phase = claim_phase(store, batch.id)
    assert phase.batch.status is BatchStatus.CANCELLING
    assert get_batch(store, batch.id).completed == 4


def test_failed_phase_tries_are_counted_and_success_starts_again(store: Store) -> None:
    batch = make_batch()
    store.insert_batch(batch)
    first = claim_phase(store, batch.id)
    assert first.attempts == 0
    store.release_phase(first, error="OSError: disk")
    second = claim_phase(store, batch.id)
    assert (second.attempts, second.last_error) == (1, "OSError: disk")
    # A worker that died holding the work counts as a failed try too.
    store.release_phase(second)  # succeeded: the count starts again
    third = claim_phase(store, batch.id, SHORT, owner="dies")
    assert third.attempts == 0
    time.sleep(SHORT_WAIT)
    fourth = claim_phase(store, batch.id, LONG)
    assert fourth.attempts == 1
    assert not store.renew_phase(third, LONG)


def test_parts_add_their_usage_details_to_the_batch(store: Store) -> None:
    batch = started_batch(store, 1)
    lease = claim_chunk(store)
    part = ChunkPart(n_ok=2, n_err=0, out_key="parts/d.out", err_key=None, offsets=(0, 1),
                     input_tokens=20, output_tokens=8, cached_tokens=6, reasoning_tokens=3)
    assert store.commit_part(lease, part)
    assert store.commit_part(lease, replace(part, offsets=(2,), out_key="parts/e"))
    got = get_batch(store, batch.id)
    assert (got.input_tokens, got.cached_tokens, got.reasoning_tokens) == (40, 12, 6)
