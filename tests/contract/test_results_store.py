"""The store's part of results while a batch runs (extension): `list_parts_after` pages a
batch's committed parts by id, in commit order, so that a reader that pages while chunks
commit sees every part exactly once. Run over every adapter (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time

from batchery.model.chunks import ChunkPart
from batchery.ports.store import Store
from tests.contract.test_store import claim_chunk, make_batch, result, started_batch


def test_parts_page_by_id_in_commit_order(store: Store) -> None:
    batch = started_batch(store, 2)
    first, second = claim_chunk(store), claim_chunk(store)
    assert store.commit_part(second, result(3, 0, tag="b1", first=1000))
    assert store.commit_part(first, result(2, 1, tag="a1", first=0))
    assert store.complete_chunk(second, result(1, 0, tag="b2", first=1003))
    # Another batch's parts are not this one's.
    other = make_batch()
    store.insert_batch(other)

    found = store.list_parts_after(batch.id, 0)
    ids = [part_id for part_id, _ in found]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [p.out_key for _, p in found] == ["parts/b1.out", "parts/a1.out", "parts/b2.out"]
    assert [p.n_err for _, p in found] == [0, 1, 0]
    # Paging: after an id, at most `limit`.
    assert store.list_parts_after(batch.id, ids[0], 1) == [found[1]]
    assert store.list_parts_after(batch.id, ids[-1]) == []
    assert store.list_parts_after(other.id, 0) == []


def test_a_reader_paging_while_parts_commit_sees_each_part_once(store: Store) -> None:
    """Writers commit parts of several chunks at once while a reader pages by the last id
    it read: a part that took its id before another but committed after it would be
    skipped. Every part must be seen, once."""
    writers, per_writer = 4, 25
    batch = started_batch(store, writers)
    leases = [claim_chunk(store) for _ in range(writers)]
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(per_writer):
                part = result(1, 0, tag=f"w{n}-{i}", first=n * 1000 + i)
                assert store.commit_part(leases[n], part)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    seen: list[ChunkPart] = []
    last = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        finished = not any(t.is_alive() for t in threads)
        page = store.list_parts_after(batch.id, last, 7)
        seen += [part for _, part in page]
        if page:
            last = page[-1][0]
        elif finished:
            break
    for thread in threads:
        thread.join()
    assert not errors, errors
    keys = [p.out_key for p in seen]
    assert len(keys) == writers * per_writer
    assert len(set(keys)) == len(keys)
