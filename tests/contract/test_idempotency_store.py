"""The store's promises for idempotent creates and spend ceilings (extensions), on SQLite and
PostgreSQL: a key names one object per project and kind, taken in the transaction that
inserts it, so concurrent creates make one; parts add their cost; a commit that crosses a
ceiling stops the batch like a cancel, in the same transaction."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from batchery.model.batches import Batch, BatchStatus, EndReason
from batchery.model.chunks import ChunkPart
from batchery.model.idempotency import BATCH, JOB, KEY_TTL_S, MESSAGE_BATCH, IdempotencyKey
from batchery.model.jobs import InputKind, Job, JobInput, JobOptions, job_id
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
    specs,
)


def key(object_id: str, *, name: str = "k-1", project: str = PROJECT, kind: str = BATCH,
        print_: str = "fp-a", at: float = NOW) -> IdempotencyKey:
    return IdempotencyKey(project=project, kind=kind, key=name, fingerprint=print_,
                          object_id=object_id, created_at=at)


def make_job(project: str = PROJECT) -> Job:
    return Job(id=job_id(), project=project, endpoint="ep", deployment="v1",
               input=JobInput(kind=InputKind.ITEM_LIST, batch_size=1, items=[1]),
               options=JobOptions(), output_path="/tmp/out", created_at=time.time())


def part(tokens_in: int, tokens_out: int, *, cost: float = 0.0, first: int = 0,
         lines: int = 1) -> ChunkPart:
    return ChunkPart(n_ok=lines, n_err=0, out_key=f"parts/{first}.out", err_key=None,
                     offsets=tuple(range(first, first + lines)), input_tokens=tokens_in,
                     output_tokens=tokens_out, cost=cost)


def started(store: SqlStore, n_chunks: int, **ceilings: Any) -> Batch:
    batch = make_batch(**ceilings)
    store.insert_batch(batch)
    lease = claim_phase(store, batch.id)
    assert store.start_batch(lease, total=n_chunks * 10, model="echo",
                             input_key=f"inputs/{batch.id}", chunks=specs(n_chunks), now=NOW)
    return batch


# -- idempotency keys ----------------------------------------------------------------------

def test_a_key_is_taken_with_its_batch_and_a_second_insert_gets_the_holder(
        store: SqlStore) -> None:
    first, second = make_batch(), make_batch()
    assert store.insert_batch(first, key(first.id)) is None
    held = store.insert_batch(second, key(second.id, print_="fp-b"))
    assert held is not None
    assert (held.object_id, held.fingerprint) == (first.id, "fp-a")
    assert store.get_batch(PROJECT, second.id) is None  # nothing was inserted
    found = store.find_key(PROJECT, BATCH, "k-1", newer_than=NOW - KEY_TTL_S)
    assert found is not None and found.object_id == first.id


def test_keys_are_per_project_and_kind(store: SqlStore) -> None:
    ours, theirs, job = make_batch(), make_batch(OTHER), make_job()
    assert store.insert_batch(ours, key(ours.id)) is None
    assert store.insert_batch(theirs, key(theirs.id, project=OTHER)) is None
    assert store.insert_job(job, key(job.id, kind=JOB)) is None
    message = make_batch()
    assert store.insert_batch(message, key(message.id, kind=MESSAGE_BATCH)) is None
    assert store.find_key(OTHER, BATCH, "k-1", newer_than=0) == key(theirs.id, project=OTHER)
    assert store.find_key(PROJECT, JOB, "k-1", newer_than=0) == key(job.id, kind=JOB)
    assert store.find_key(PROJECT, BATCH, "k-2", newer_than=0) is None


def test_a_job_key_replays_like_a_batch_key(store: SqlStore) -> None:
    first, second = make_job(), make_job()
    assert store.insert_job(first, key(first.id, kind=JOB)) is None
    held = store.insert_job(second, key(second.id, kind=JOB))
    assert held is not None and held.object_id == first.id
    assert store.get_job(PROJECT, second.id) is None


def test_an_expired_key_is_free_again_and_pruning_forgets_old_keys(store: SqlStore) -> None:
    old, new = make_batch(), make_batch()
    assert store.insert_batch(old, key(old.id, at=NOW)) is None
    later = NOW + KEY_TTL_S + 1
    # Past its lifetime the key is forgotten by lookups…
    assert store.find_key(PROJECT, BATCH, "k-1", newer_than=later - KEY_TTL_S) is None
    # …and taken by the next create, which makes a batch of its own.
    assert store.insert_batch(new, key(new.id, at=later)) is None
    found = store.find_key(PROJECT, BATCH, "k-1", newer_than=later - KEY_TTL_S)
    assert found is not None and found.object_id == new.id
    kept = make_batch()
    assert store.insert_batch(kept, key(kept.id, name="k-2", at=later)) is None
    assert store.prune_keys(later + 1) == 2
    assert store.find_key(PROJECT, BATCH, "k-2", newer_than=0) is None


def test_concurrent_creates_with_one_key_make_one_batch(store: SqlStore) -> None:
    contenders = [make_batch() for _ in range(8)]
    barrier = threading.Barrier(len(contenders))
    answers: dict[str, str] = {}
    errors: list[BaseException] = []

    def create(batch: Batch) -> None:
        try:
            barrier.wait(10)
            held = store.insert_batch(batch, key(batch.id))
            answers[batch.id] = held.object_id if held is not None else batch.id
        except BaseException as exc:  # reported below, with the thread's own error
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(b,)) for b in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert len(set(answers.values())) == 1, answers
    inserted = [b.id for b in contenders if store.get_batch(PROJECT, b.id) is not None]
    assert inserted == list(set(answers.values()))


# -- cost and spend ceilings ---------------------------------------------------------------

def test_parts_add_their_cost_and_tokens(store: SqlStore) -> None:
    batch = started(store, 2)
    lease = claim_chunk(store)
    assert store.commit_part(lease, part(100, 50, cost=0.25))
    assert store.commit_part(lease, part(10, 5, cost=0.5, first=1))
    got = get_batch(store, batch.id)
    assert (got.input_tokens, got.output_tokens, got.cost) == (110, 55, pytest.approx(0.75))
    assert got.status is BatchStatus.IN_PROGRESS


def test_a_commit_that_reaches_max_total_tokens_stops_the_batch_like_a_cancel(
        store: SqlStore) -> None:
    batch = started(store, 2, max_total_tokens=100)
    lease = claim_chunk(store)
    assert store.commit_part(lease, part(40, 40))
    assert get_batch(store, batch.id).status is BatchStatus.IN_PROGRESS
    assert store.commit_part(lease, part(15, 5, first=1))
    got = get_batch(store, batch.id)
    assert (got.status, got.end_reason) == (BatchStatus.CANCELLING, EndReason.BUDGET_EXCEEDED)
    assert got.cancelling_at is not None
    # The running chunk learns to stop; what it finished is still committed and kept.
    assert not store.renew_chunk(lease, LONG)
    assert store.commit_part(lease, part(1, 1, first=2))
    assert store.claim_chunk("another", LONG) is None  # no new work is handed out
    store.release_chunk(lease, error="handed back", count_attempt=False, max_attempts=5)
    phase = claim_phase(store, batch.id)
    assert phase.batch.end_reason is EndReason.BUDGET_EXCEEDED
    assert EndReason.BUDGET_EXCEEDED.final_status is BatchStatus.CANCELLED
    assert get_batch(store, batch.id).completed == 3


def test_max_cost_stops_the_batch_and_unpriced_parts_do_not(store: SqlStore) -> None:
    batch = started(store, 2, max_cost=1.0)
    lease = claim_chunk(store)
    assert store.commit_part(lease, part(0, 0))  # no spend: nothing to check
    assert store.commit_part(lease, part(10, 10, cost=0.6, first=1))
    assert get_batch(store, batch.id).status is BatchStatus.IN_PROGRESS
    assert store.commit_part(lease, part(10, 10, cost=0.6, first=2))
    got = get_batch(store, batch.id)
    assert (got.status, got.end_reason) == (BatchStatus.CANCELLING, EndReason.BUDGET_EXCEEDED)
    assert got.cost == pytest.approx(1.2)


def test_a_ceiling_reached_by_the_last_lines_lets_the_batch_complete(store: SqlStore) -> None:
    batch = started(store, 1, max_total_tokens=10)
    lease = claim_chunk(store)
    assert store.complete_chunk(lease, part(20, 20, lines=10))
    got = get_batch(store, batch.id)
    assert (got.status, got.end_reason) == (BatchStatus.FINALIZING, EndReason.DONE)


def test_a_ceiling_crossed_with_chunks_left_stops_at_the_chunk_completion(
        store: SqlStore) -> None:
    batch = started(store, 2, max_total_tokens=10)
    lease = claim_chunk(store)
    assert store.complete_chunk(lease, part(20, 20, lines=10))
    got = get_batch(store, batch.id)
    assert (got.status, got.end_reason) == (BatchStatus.CANCELLING, EndReason.BUDGET_EXCEEDED)
