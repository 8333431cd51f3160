"""A job's `workers` limit holds while several processes claim its batches at once.

Each claiming process opens its own store on the same database, so claims race in separate
transactions, as separate worker processes' claims do in production. Every process records
when it held each lease: from just after `claim_batch` returned (the lease was committed) to
just before `complete_batch` (still held). Each recorded span lies inside the real lease, so
the largest number of spans of one job that overlap is at most the real peak: a count above
the limit is a real breach, never an artefact of the measurement.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import queue
import time
import traceback
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from batchery.model.deployments import Deployment, Endpoint
from batchery.model.jobs import BatchSpec, InputKind, Job, JobInput, JobOptions, job_id
from batchery.stores.sql import engine as engines
from batchery.stores.sql.store import SqlStore
from batchery.stores.sql.tables import jobs

N_PROCESSES = 6
N_BATCHES = 16
#: How long each lease is held: long next to a claim, so that racing claims overlap.
HOLD_S = 0.03
LONG = 60.0

Span = tuple[str, float, float]


def _job(store: SqlStore, n_batches: int, workers: int | None) -> Job:
    """A job whose `n_batches` batches are queued and whose enqueuing is done."""
    job = Job(id=job_id(), project="p", endpoint="ep", deployment="v1",
              input=JobInput(kind=InputKind.ITEM_LIST, batch_size=1, items=[1]),
              options=JobOptions(workers=workers), output_path="/tmp/out",
              created_at=time.time())
    store.insert_job(job)
    lease = store.claim_job_phase("enqueuer", LONG, None)
    assert lease is not None and lease.job.id == job.id
    specs = [BatchSpec(index=i, segment_key="seg", start_offset=i, end_offset=i + 1,
                       first_item=i, n_items=1) for i in range(n_batches)]
    assert store.add_batches(lease, specs, time.time())
    assert store.finish_enqueue(lease)
    return job


def claim_in_a_loop(url: str, owner: str, job_ids: list[str], start: Any, holding: Any,
                    results: Any) -> None:
    """A claiming process: lease, hold, complete, until no batch of `job_ids` is queued.
    Each holds its first lease until every process holds one, so all take part.

    Puts `(owner, spans, error)` on `results`; a span is `(job id, held from, held to)`."""
    spans: list[Span] = []
    try:
        store = SqlStore(engines.create(url), run_migrations=False)
        try:
            start.wait(60)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                lease = store.claim_batch(owner, LONG, None)
                if lease is None:
                    if not any(store.batch_state_counts(j).get("queued") for j in job_ids):
                        break
                    time.sleep(0.002)
                    continue
                held_from = time.monotonic()
                if not spans:
                    holding.wait(60)
                time.sleep(HOLD_S)
                spans.append((lease.job.id, held_from, time.monotonic()))
                assert store.complete_batch(lease, out_key=None, duration_s=HOLD_S)
        finally:
            store.close()
        results.put((owner, spans, None))
    except BaseException:
        results.put((owner, spans, traceback.format_exc()))


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (a span ending as another starts does not count)."""
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    peak = open_now = 0
    for _, step in events:  # at equal times -1 sorts first: touching spans do not overlap
        open_now += step
        peak = max(peak, open_now)
    return peak


def run_claimers(url: str, job_ids: list[str]) -> list[Span]:
    ctx = multiprocessing.get_context("spawn")
    start, holding = ctx.Barrier(N_PROCESSES), ctx.Barrier(N_PROCESSES)
    results = ctx.Queue()
    processes = [ctx.Process(target=claim_in_a_loop,
                             args=(url, f"proc-{i}", job_ids, start, holding, results))
                 for i in range(N_PROCESSES)]
    for process in processes:
        process.start()
    reports = []
    try:
        for _ in processes:
            reports.append(results.get(timeout=180))
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
    assert [error for _, _, error in reports if error] == []
    # The first claims raced, and every process held a lease at once: each took part.
    assert all(spans for _, spans, _ in reports), reports
    return [span for _, spans, _ in reports for span in spans]


@pytest.mark.slow
def test_the_workers_limit_holds_under_concurrent_claims(store: SqlStore,
                                                         store_url: str) -> None:
    store.set_deployments([Deployment(name="ep/v1", backend="python", endpoint="ep",
                                      options={"predictor": "m:C"})],
                          [Endpoint(name="ep", default_deployment="v1")])
    one, two, unlimited = (_job(store, N_BATCHES, workers) for workers in (1, 2, None))

    spans = run_claimers(store_url, [one.id, two.id, unlimited.id])

    assert Counter(job for job, _, _ in spans) == {
        one.id: N_BATCHES, two.id: N_BATCHES, unlimited.id: N_BATCHES}
    peaks = {job.id: max_overlap([(t0, t1) for j, t0, t1 in spans if j == job.id])
             for job in (one, two, unlimited)}
    print(f"most leases held at once: workers=1: {peaks[one.id]}, workers=2: "
          f"{peaks[two.id]}, no limit: {peaks[unlimited.id]}")
    assert peaks[one.id] == 1
    assert 1 <= peaks[two.id] <= 2
    # Claims of a job without a limit still run side by side.
    assert peaks[unlimited.id] >= 2
    for job in (one, two, unlimited):
        assert store.batch_state_counts(job.id) == {"succeeded": N_BATCHES}


def test_a_claim_passes_over_a_limited_job_whose_row_is_busy(store: SqlStore) -> None:
    """A claim never waits for a job's row while it holds a batch's: it leases another job's
    batch instead, and the busy job's batches wait for the next claim."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one writing transaction at a time: no row is ever busy")
    store.set_deployments([Deployment(name="ep/v1", backend="python", endpoint="ep",
                                      options={"predictor": "m:C"})],
                          [Endpoint(name="ep", default_deployment="v1")])
    limited, other = _job(store, 2, 1), _job(store, 1, None)
    with store.engine.connect() as busy:
        busy.execute(sa.select(jobs.c.seq).where(jobs.c.id == limited.id).with_for_update())
        # A claim that waited for the row would wait for ever (the row is released below):
        # it runs in a thread, and a minute without an answer is that wait.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            claim = pool.submit(store.claim_batch, "w", LONG, None)
            try:
                lease = claim.result(timeout=60)
            except concurrent.futures.TimeoutError:
                busy.rollback()  # lets the waiting claim end, so the pool can close
                pytest.fail("the claim waited for the busy job's row")
        assert lease is not None and lease.job.id == other.id
        assert store.claim_batch("w", LONG, None) is None
        busy.rollback()
    lease = store.claim_batch("w", LONG, None)
    assert lease is not None and lease.job.id == limited.id
    assert store.claim_batch("w", LONG, None) is None  # workers=1
