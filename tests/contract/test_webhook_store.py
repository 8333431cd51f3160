"""The webhook store's contract (`batchery/ports/webhooks.py`), on SQLite and PostgreSQL:
endpoints scoped by project, secrets sealed at rest, the outbox written in the transaction
that ends a batch or job, leased claims that never overlap, attempts, disabling."""

from __future__ import annotations

import json
import multiprocessing
import queue
import time
import traceback
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa

from batchery.model import webhooks as model
from batchery.model.batches import Batch, BatchError, BatchStatus, EndReason
from batchery.model.jobs import InputKind, Job, JobInput, JobOptions, JobStatus, job_id
from batchery.model.webhooks import (
    AttemptResult,
    DeliveryClaim,
    DeliveryStatus,
    EndpointStatus,
    SigningSecrets,
    WebhookEndpoint,
)
from batchery.ports.store import PhaseLease
from batchery.stores.sql import store as store_module
from batchery.stores.sql.store import SqlStore
from batchery.stores.sql.tables import webhook_endpoints
from tests.helpers import eventually

NOW = 1_800_000_000
PROJECT, OTHER = "proj-a", "proj-b"
LONG = 60.0
SECRET = "whsec_" + "A" * 43 + "="
_seq = 0


def _next(prefix: str) -> str:
    global _seq
    _seq += 1
    return f"{prefix}{_seq:05d}"


def make_endpoint(store: SqlStore, project: str = PROJECT, *,
                  event_types: tuple[str, ...] = model.EMITTED_EVENT_TYPES,
                  url: str = "http://127.0.0.1:9/hook", created_at: int = NOW,
                  secrets: SigningSecrets | None = None) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(id=model.endpoint_id(), project=project, name=_next("ep-"),
                               url=url, event_types=event_types,
                               secrets=secrets or SigningSecrets(current=SECRET),
                               created_at=created_at, updated_at=created_at)
    store.insert_webhook_endpoint(endpoint)
    return endpoint


def phase(store: SqlStore, status: BatchStatus, *, endpoint: str = "/v1/chat/completions",
          end_reason: EndReason | None = None, project: str = PROJECT,
          webhook_url: str | None = None) -> PhaseLease:
    batch = Batch(id=_next("batch_"), project=project, endpoint=endpoint,
                  input_file_id=_next("file-"), completion_window="24h", status=status,
                  created_at=NOW, expires_at=NOW + 86400, end_reason=end_reason,
                  webhook_url=webhook_url)
    store.insert_batch(batch)
    lease = store.claim_phase("w", LONG)
    assert lease is not None and lease.batch.id == batch.id
    return lease


def complete(store: SqlStore, **kwargs: Any) -> Batch:
    lease = phase(store, BatchStatus.FINALIZING, end_reason=EndReason.DONE, **kwargs)
    assert store.finish_batch(lease, outputs=[], output_file_id=None, error_file_id=None,
                              completed=1, failed=0, unrun=0, now=NOW + 5)
    return lease.batch


def claim(store: SqlStore, owner: str = "w", lease_s: float = LONG) -> DeliveryClaim:
    found = store.claim_webhook_delivery(owner, lease_s)
    assert found is not None
    return found


def answered(code: int) -> AttemptResult:
    ok = 200 <= code < 300
    return AttemptResult(success=ok, status_code=code, latency_ms=3,
                         error=None if ok else f"the receiver answered HTTP {code}")


def drain(store: SqlStore) -> list[DeliveryClaim]:
    claims = []
    while (found := store.claim_webhook_delivery("drain", LONG)) is not None:
        claims.append(found)
    return claims


# -- endpoints -----------------------------------------------------------------------------


def test_endpoints_belong_to_their_project(store: SqlStore) -> None:
    mine = make_endpoint(store)
    theirs = make_endpoint(store, OTHER)
    assert store.get_webhook_endpoint(PROJECT, mine.id) == mine
    assert store.get_webhook_endpoint(None, theirs.id) == theirs
    assert store.get_webhook_endpoint(PROJECT, theirs.id) is None
    assert store.update_webhook_endpoint(PROJECT, theirs.id, name="x", now=NOW + 1) is None
    assert store.set_webhook_secrets(PROJECT, theirs.id, SigningSecrets(current=SECRET),
                                     now=NOW + 1) is None
    assert not store.delete_webhook_endpoint(PROJECT, theirs.id)
    assert store.emit_test_webhook_event(PROJECT, theirs.id, "batch.completed",
                                         now=NOW) is None
    assert store.list_webhook_attempts(PROJECT, theirs.id, limit=10) == []
    assert [e.id for e in store.list_webhook_endpoints(PROJECT, after=None,
                                                       limit=10).items] == [mine.id]
    assert store.delete_webhook_endpoint(OTHER, theirs.id)
    assert store.get_webhook_endpoint(None, theirs.id) is None


def test_listing_is_newest_first_and_pages_by_id(store: SqlStore) -> None:
    made = [make_endpoint(store, created_at=NOW + i) for i in range(5)]
    foreign = make_endpoint(store, OTHER)
    first = store.list_webhook_endpoints(PROJECT, after=None, limit=2)
    assert [e.id for e in first.items] == [made[4].id, made[3].id] and first.has_more
    rest = store.list_webhook_endpoints(PROJECT, after=made[3].id, limit=10)
    assert [e.id for e in rest.items] == [made[2].id, made[1].id, made[0].id]
    assert not rest.has_more
    # Another project's id anchors nothing, as an unknown id would.
    assert store.list_webhook_endpoints(PROJECT, after=foreign.id, limit=10).items == []


def test_updates_advance_updated_at_only_when_something_changes(store: SqlStore) -> None:
    endpoint = make_endpoint(store)
    same = store.update_webhook_endpoint(PROJECT, endpoint.id, name=endpoint.name,
                                         url=endpoint.url, event_types=endpoint.event_types,
                                         enabled=True, now=NOW + 10)
    assert same == endpoint
    changed = store.update_webhook_endpoint(PROJECT, endpoint.id, url="http://h/new",
                                            event_types=["batch.failed"], now=NOW + 20)
    assert changed is not None
    assert (changed.url, changed.event_types, changed.updated_at) == (
        "http://h/new", ("batch.failed",), NOW + 20)
    assert (changed.name, changed.created_at) == (endpoint.name, endpoint.created_at)
    off = store.update_webhook_endpoint(None, endpoint.id, enabled=False, now=NOW + 30)
    assert off is not None and off.status is EndpointStatus.DISABLED and off.disabled_reason


def test_secrets_are_sealed_at_rest_when_a_key_is_set(store: SqlStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHERY_SECRET_KEY", "a passphrase")
    rotated = SigningSecrets(current=SECRET, previous="whsec_b2xk", previous_expires_at=NOW)
    endpoint = make_endpoint(store, secrets=rotated)
    with store.engine.begin() as conn:
        raw = conn.execute(sa.select(webhook_endpoints.c.secret,
                                     webhook_endpoints.c.previous_secret)).one()
    assert SECRET not in str(raw) and "whsec_b2xk" not in str(raw)
    assert store.get_webhook_endpoint(PROJECT, endpoint.id).secrets == rotated  # type: ignore[union-attr]


def test_secrets_are_plain_without_a_key_and_rotation_replaces_them(store: SqlStore) -> None:
    endpoint = make_endpoint(store)
    with store.engine.begin() as conn:
        assert conn.execute(sa.select(webhook_endpoints.c.secret)).scalar_one() == SECRET
    rotation = SigningSecrets(current="whsec_bmV3", previous=SECRET,
                              previous_expires_at=NOW + 86400)
    rotated = store.set_webhook_secrets(PROJECT, endpoint.id, rotation, now=NOW + 7)
    assert rotated is not None and rotated.secrets == rotation
    assert rotated.updated_at == NOW + 7
    assert rotation.active(NOW + 1) == ["whsec_bmV3", SECRET]
    assert rotation.active(NOW + 86400) == ["whsec_bmV3"]


def test_the_server_secret_is_made_once(store: SqlStore, store_url: str) -> None:
    first = store.get_or_create_server_secret()
    other = SqlStore.from_url(store_url)
    try:
        assert other.get_or_create_server_secret() == first
    finally:
        other.close()
    assert len(first) >= 32


# -- the outbox ----------------------------------------------------------------------------


def test_a_completed_batch_queues_its_event_to_subscribed_endpoints(store: SqlStore) -> None:
    wants = make_endpoint(store, event_types=("batch.completed",))
    make_endpoint(store, event_types=("batch.failed",))
    make_endpoint(store, OTHER)
    batch = complete(store)
    [found] = drain(store)
    assert found.delivery.endpoint_id == wants.id and found.endpoint == wants
    assert found.delivery.event_type == "batch.completed"
    assert found.delivery.attempts == 0 and found.delivery.status is DeliveryStatus.PENDING
    assert json.loads(found.body) == {
        "id": found.delivery.event_id, "object": "event", "created_at": NOW + 5,
        "type": "batch.completed", "data": {"id": batch.id}}
    assert found.delivery.event_id.startswith("evt_")


@pytest.mark.parametrize(("status", "reason", "expected"), [
    (BatchStatus.FINALIZING, EndReason.EXPIRED, "batch.expired"),
    (BatchStatus.CANCELLING, EndReason.CANCELLED, "batch.cancelled"),
])
def test_every_terminal_status_has_its_event(store: SqlStore, status: BatchStatus,
                                             reason: EndReason, expected: str) -> None:
    make_endpoint(store)
    lease = phase(store, status, end_reason=reason)
    assert store.finish_batch(lease, outputs=[], output_file_id=None, error_file_id=None,
                              completed=0, failed=0, unrun=0, now=NOW)
    assert [c.delivery.event_type for c in drain(store)] == [expected]


def test_failed_and_message_batches(store: SqlStore) -> None:
    make_endpoint(store)
    lease = phase(store, BatchStatus.VALIDATING)
    assert store.fail_batch(lease, [BatchError(code="invalid", message="no")], NOW)
    assert [c.delivery.event_type for c in drain(store)] == ["batch.failed"]
    message_batch = complete(store, endpoint="/v1/messages")
    [ended] = drain(store)
    assert ended.delivery.event_type == "message_batch.ended"
    assert f'"data":{{"id":"{message_batch.id}"}}' in ended.body


def test_a_webhook_url_gets_its_own_delivery(store: SqlStore) -> None:
    batch = complete(store, webhook_url="http://127.0.0.1:9/cb")
    assert store.get_batch(PROJECT, batch.id).webhook_url == "http://127.0.0.1:9/cb"  # type: ignore[union-attr]
    [callback] = drain(store)
    assert callback.endpoint is None and callback.delivery.endpoint_id is None
    assert callback.delivery.url == "http://127.0.0.1:9/cb"
    assert callback.delivery.project == PROJECT


def test_no_receiver_no_event(store: SqlStore) -> None:
    make_endpoint(store, OTHER)
    make_endpoint(store, event_types=("batch.failed",))
    complete(store)
    assert drain(store) == []


def test_the_event_commits_with_the_change_or_not_at_all(
        store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
    make_endpoint(store)
    lease = phase(store, BatchStatus.FINALIZING, end_reason=EndReason.DONE)

    def broken(*_args: Any) -> None:
        raise RuntimeError("the outbox write failed")

    monkeypatch.setattr(store_module, "emit_event", broken)
    with pytest.raises(RuntimeError):
        store.finish_batch(lease, outputs=[], output_file_id=None, error_file_id=None,
                           completed=1, failed=0, unrun=0, now=NOW)
    # Rolled back together: the batch has not completed either.
    assert store.get_batch(PROJECT, lease.batch.id).status is BatchStatus.FINALIZING  # type: ignore[union-attr]
    monkeypatch.undo()
    stale = replace(lease, token="not-the-lease")
    assert not store.finish_batch(stale, outputs=[], output_file_id=None, error_file_id=None,
                                  completed=1, failed=0, unrun=0, now=NOW)
    assert drain(store) == []  # a fenced-out finish emits nothing
    store.release_phase(lease)
    again = store.claim_phase("w", LONG)
    assert again is not None
    assert store.finish_batch(again, outputs=[], output_file_id=None, error_file_id=None,
                              completed=1, failed=0, unrun=0, now=NOW)
    assert len(drain(store)) == 1


def _finished_job(store: SqlStore, *, stop: bool = False, webhook_url: str | None = None
                  ) -> Job:
    job = Job(id=job_id(), project=PROJECT, endpoint="ep", deployment="v1",
              input=JobInput(kind=InputKind.ITEM_LIST, batch_size=1, items=[1]),
              options=JobOptions(), output_path="/tmp/out", created_at=time.time(),
              webhook_url=webhook_url)
    store.insert_job(job)
    if stop:
        store.end_job(job.id, JobStatus.STOPPED, "stopped by a test")
    else:
        lease = store.claim_job_phase("w", LONG, None)
        assert lease is not None
        assert store.add_batches(lease, [], time.time()) and store.finish_enqueue(lease)
    assert drain(store) == []  # nothing until the job has wholly ended
    lease = store.claim_job_phase("w", LONG, None)
    assert lease is not None
    ended = store.finish_job(lease, results_url=None, now=time.time())
    assert ended is not None
    return ended


def test_a_job_queues_its_event_when_it_has_ended(store: SqlStore) -> None:
    make_endpoint(store, event_types=model.JOB_EVENT_TYPES)
    job = _finished_job(store, webhook_url="http://127.0.0.1:9/job")
    assert job.status is JobStatus.SUCCEEDED and job.webhook_url == "http://127.0.0.1:9/job"
    claims = drain(store)
    assert [c.delivery.event_type for c in claims] == ["job.succeeded"] * 2
    assert {c.delivery.endpoint_id is None for c in claims} == {True, False}
    assert all(f'"id":"{job.id}"' in c.body for c in claims)
    _finished_job(store, stop=True)
    assert [c.delivery.event_type for c in drain(store)] == ["job.stopped"]


# -- claims, attempts, retries, disabling --------------------------------------------------


def test_claims_are_leased_and_attempts_recorded(store: SqlStore) -> None:
    endpoint = make_endpoint(store)
    complete(store)
    first = claim(store, "w1")
    assert store.claim_webhook_delivery("w2", LONG) is None  # leased
    assert store.record_webhook_attempt(first, answered(500), retry_in=0.0)
    assert not store.record_webhook_attempt(first, answered(200), retry_in=None)  # once
    second = claim(store, "w2")
    assert second.delivery.id == first.delivery.id and second.delivery.attempts == 1
    assert second.delivery.event_id == first.delivery.event_id
    assert store.record_webhook_attempt(second, answered(204), retry_in=None)
    assert store.claim_webhook_delivery("w3", LONG) is None
    attempts = store.list_webhook_attempts(PROJECT, endpoint.id, limit=10)
    assert [(a.attempt, a.status_code, a.success) for a in attempts] == [
        (2, 204, True), (1, 500, False)]
    assert attempts[1].error == "the receiver answered HTTP 500"
    assert {a.event_id for a in attempts} == {first.delivery.event_id}
    done = store.get_webhook_delivery(first.delivery.id)
    assert done is not None and done.status is DeliveryStatus.SUCCEEDED
    assert done.last_status_code == 204 and done.delivered_at is not None


def test_a_retry_waits_and_a_lost_lease_records_nothing(store: SqlStore) -> None:
    make_endpoint(store)
    complete(store)
    first = claim(store)
    assert store.record_webhook_attempt(first, answered(503), retry_in=2.0)
    assert store.claim_webhook_delivery("w", LONG) is None  # not due yet
    short = eventually(lambda: store.claim_webhook_delivery("w1", 0.2), "the retry's time")
    time.sleep(0.35)
    taken = claim(store, "w2")  # the first lease ran out: the delivery is claimable again
    assert taken.delivery.id == short.delivery.id
    assert not store.record_webhook_attempt(short, answered(200), retry_in=None)
    assert store.record_webhook_attempt(taken, answered(200), retry_in=None)


def test_giving_up_and_redelivering(store: SqlStore) -> None:
    endpoint = make_endpoint(store)
    complete(store)
    first = claim(store)
    assert store.record_webhook_attempt(first, answered(410), retry_in=None)
    failed = store.get_webhook_delivery(first.delivery.id)
    assert failed is not None and failed.status is DeliveryStatus.FAILED
    assert store.claim_webhook_delivery("w", LONG) is None
    assert store.redeliver_webhook_event(OTHER, endpoint.id, first.delivery.event_id,
                                         now=NOW) is None
    assert store.redeliver_webhook_event(PROJECT, endpoint.id, "evt_unknown", now=NOW) is None
    again = store.redeliver_webhook_event(PROJECT, endpoint.id, first.delivery.event_id,
                                          now=time.time())
    assert again is not None and again.status is DeliveryStatus.PENDING
    retried = claim(store)
    assert retried.delivery.event_id == first.delivery.event_id and retried.body == first.body
    # Asked again while it is pending: still one delivery, untouched.
    assert store.redeliver_webhook_event(PROJECT, endpoint.id, first.delivery.event_id,
                                         now=time.time()) is not None
    assert store.claim_webhook_delivery("w", LONG) is None


def test_consecutive_failures_disable_an_endpoint(store: SqlStore) -> None:
    endpoint = make_endpoint(store)
    complete(store)
    for _ in range(model.DISABLE_AFTER_FAILURES - 1):
        assert store.record_webhook_attempt(claim(store), answered(500), retry_in=0.0)
    # Test deliveries never count towards disabling.
    test = store.emit_test_webhook_event(PROJECT, endpoint.id, "batch.failed", now=NOW)
    assert test is not None and test.test
    both = drain(store)
    [tested] = [c for c in both if c.delivery.test]
    [regular] = [c for c in both if not c.delivery.test]
    assert store.record_webhook_attempt(tested, answered(500), retry_in=0.0)
    assert store.get_webhook_delivery(test.id).status is DeliveryStatus.FAILED  # type: ignore[union-attr]
    assert store.get_webhook_endpoint(PROJECT, endpoint.id).status is EndpointStatus.ENABLED  # type: ignore[union-attr]
    assert store.record_webhook_attempt(regular, answered(500), retry_in=0.0)
    disabled = store.get_webhook_endpoint(PROJECT, endpoint.id)
    assert disabled is not None and disabled.status is EndpointStatus.DISABLED
    assert disabled.disabled_reason == model.DISABLED_FOR_FAILURES
    assert disabled.consecutive_failures == model.DISABLE_AFTER_FAILURES
    # Its deliveries wait; new events skip it; a test still goes.
    assert store.claim_webhook_delivery("w", LONG) is None
    complete(store)
    assert store.claim_webhook_delivery("w", LONG) is None
    assert store.emit_test_webhook_event(PROJECT, endpoint.id, "batch.completed", now=NOW)
    assert claim(store).delivery.test
    enabled = store.update_webhook_endpoint(PROJECT, endpoint.id, enabled=True, now=NOW + 1)
    assert enabled is not None and enabled.status is EndpointStatus.ENABLED
    assert enabled.consecutive_failures == 0 and enabled.disabled_reason is None
    resumed = claim(store)
    assert resumed.delivery.attempts == model.DISABLE_AFTER_FAILURES


def test_a_success_resets_the_failure_count(store: SqlStore) -> None:
    endpoint = make_endpoint(store)
    complete(store)
    complete(store)
    assert store.record_webhook_attempt(claim(store), answered(500), retry_in=0.0)
    for found in drain(store):
        assert store.record_webhook_attempt(found, answered(200), retry_in=None)
    assert store.get_webhook_endpoint(None, endpoint.id).consecutive_failures == 0  # type: ignore[union-attr]


def test_deleting_an_endpoint_drops_its_deliveries(store: SqlStore) -> None:
    endpoint = make_endpoint(store)
    complete(store)
    assert store.delete_webhook_endpoint(PROJECT, endpoint.id)
    assert store.claim_webhook_delivery("w", LONG) is None


# -- many processes claiming at once -------------------------------------------------------

N_PROCESSES = 4
N_EVENTS = 60


def claim_until_drained(url: str, owner: str, start: Any, holding: Any, results: Any) -> None:
    """A worker process: claim and record deliveries until none is due; reports ids. Each
    holds its first claim until every process holds one, so all take part."""
    done: list[int] = []
    try:
        store = SqlStore.from_url(url)
        try:
            start.wait(60)
            first = True
            while (found := store.claim_webhook_delivery(owner, LONG)) is not None:
                if first:
                    holding.wait(60)
                    first = False
                if store.record_webhook_attempt(found, answered(200), retry_in=None):
                    done.append(found.delivery.id)
        finally:
            store.close()
        results.put((owner, done, None))
    except BaseException:
        results.put((owner, done, traceback.format_exc()))


@pytest.mark.slow
def test_claims_never_overlap_across_processes(store: SqlStore, store_url: str) -> None:
    make_endpoint(store)
    make_endpoint(store)
    for _ in range(N_EVENTS):
        store.emit_webhook_event(model.new_event(PROJECT, "batch.completed", _next("batch_"),
                                                 NOW))
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
    counts = Counter(i for _, done, _ in reports for i in done)
    assert len(counts) == 2 * N_EVENTS
    assert [i for i, n in counts.items() if n > 1] == []
    # The first claims raced, and every process held one at once: each delivered some.
    assert all(done for _, done, _ in reports), reports
