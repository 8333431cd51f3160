"""The delivery loop against a real HTTP receiver on loopback: signatures the official
`openai` SDK and `standardwebhooks` verify, retries with the same `webhook-id`, backoff,
disabling, timeouts, redirects never followed, and two workers on PostgreSQL."""

from __future__ import annotations

import base64
import itertools
import multiprocessing
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
import sqlalchemy as sa
import standardwebhooks

from batchery.model import webhooks as model
from batchery.model.batches import Batch, BatchStatus, EndReason
from batchery.model.webhooks import (
    DeliveryStatus,
    EndpointStatus,
    SigningSecrets,
    WebhookEndpoint,
)
from batchery.stores.sql.store import SqlStore
from batchery.stores.sql.tables import webhook_deliveries
from batchery.webhooks import signing
from batchery.webhooks.delivery import DeliveryConfig, WebhookDelivery, retry_delay, retry_in
from tests.conftest import free_port
from tests.integration.threaded_server import ThreadedServer

PROJECT = "proj-a"
LONG = 60.0
#: A short backoff so that retries happen within a test (the documented env var).
FAST = DeliveryConfig(retry_base_s=0.05, poll_s=0.02, timeout_s=2.0)
RECEIVER_BODY = "receiver-private-text"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# -- the receiver ----------------------------------------------------------------------------

@dataclass
class Call:
    key: str  # the path
    headers: dict[str, str]
    body: str
    at: float


@dataclass
class ReceiverState:
    #: Per path: the answers to give, in order; the last one repeats. An int is a status;
    #: "slow" sleeps past the client's timeout; "redirect" answers 307 to /elsewhere.
    plans: dict[str, list[int | str]] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: list[Call] = field(default_factory=list)
    max_in_flight: int = 0
    in_flight_by_id: Counter[str] = field(default_factory=Counter)
    overlaps: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _handler(state: ReceiverState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            msg_id = self.headers.get("webhook-id", "")
            with state.lock:
                n = sum(1 for c in state.calls if c.key == self.path)
                state.calls.append(Call(self.path, dict(self.headers.items()), body,
                                        time.monotonic()))
                state.in_flight_by_id[msg_id] += 1
                if state.in_flight_by_id[msg_id] > 1:
                    state.overlaps.append(msg_id)
                plan = state.plans.get(self.path, [200])
                action = plan[min(n, len(plan) - 1)]
            try:
                self._answer(action)
            finally:
                with state.lock:
                    state.in_flight_by_id[msg_id] -= 1

        def _answer(self, action: int | str) -> None:
            if action == "slow":
                state.stopping.wait(60)
                action = 200
            if action == "hold":
                time.sleep(0.05)
                action = 200
            status = 307 if action == "redirect" else int(action)
            payload = RECEIVER_BODY.encode()
            self.send_response(status)
            if action == "redirect":
                self.send_header("location", "/elsewhere")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


class Receiver(ThreadedServer):
    label = "webhook receiver"

    def __init__(self) -> None:
        state = ReceiverState()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        server.daemon_threads = True
        super().__init__(server, state, "webhook-receiver")

    def url(self, path: str, *plan: int | str) -> str:
        if plan:
            self.state.plans[path] = list(plan)
        return self.base_url + path

    def wait_for(self, path: str, n: int, timeout: float = 20.0) -> list[Call]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            calls = self.calls_for(path)
            if len(calls) >= n:
                return calls
            time.sleep(0.01)
        raise AssertionError(f"{path}: {len(self.calls_for(path))} call(s), expected {n}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def store(sqlite_url: str) -> Iterator[SqlStore]:
    store = SqlStore.from_url(sqlite_url)
    yield store
    store.close()


# -- helpers ---------------------------------------------------------------------------------

_n = 0


def endpoint(store: SqlStore, url: str, *, secrets: SigningSecrets | None = None,
             event_types: tuple[str, ...] = model.EMITTED_EVENT_TYPES) -> WebhookEndpoint:
    made = WebhookEndpoint(id=model.endpoint_id(), project=PROJECT, name="receiver", url=url,
                           event_types=event_types,
                           secrets=secrets or SigningSecrets(current=new_secret()),
                           created_at=int(time.time()), updated_at=int(time.time()))
    store.insert_webhook_endpoint(made)
    return made


def complete_batch(store: SqlStore, *, webhook_url: str | None = None) -> Batch:
    global _n
    _n += 1
    now = int(time.time())
    batch = Batch(id=f"batch_{_n:06d}{secrets.token_hex(4)}", project=PROJECT,
                  endpoint="/v1/chat/completions", input_file_id="file-x",
                  completion_window="24h", status=BatchStatus.FINALIZING, created_at=now,
                  expires_at=now + 86400, end_reason=EndReason.DONE, webhook_url=webhook_url)
    store.insert_batch(batch)
    lease = store.claim_phase("phase", LONG)
    assert lease is not None and lease.batch.id == batch.id
    assert store.finish_batch(lease, outputs=[], output_file_id=None, error_file_id=None,
                              completed=1, failed=0, unrun=0, now=now)
    return batch


def _deliveries_to(store: SqlStore, endpoint_id: str) -> int:
    """How many deliveries (pending or done) the database holds for the endpoint."""
    with store.engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(webhook_deliveries)
                               .where(webhook_deliveries.c.endpoint_id == endpoint_id)) or 0)


def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a condition")
        time.sleep(0.02)


@pytest.fixture
def loop(store: SqlStore) -> Iterator[Callable[[DeliveryConfig], WebhookDelivery]]:
    """Starts delivery loops (threads) on `store`; stops them after the test."""
    started: list[WebhookDelivery] = []

    def start(config: DeliveryConfig) -> WebhookDelivery:
        delivery = WebhookDelivery(store, f"w{len(started)}", config)
        delivery.start()
        started.append(delivery)
        return delivery

    yield start
    for delivery in started:
        delivery.stop()


# -- signatures --------------------------------------------------------------------------------


def test_the_openai_sdk_and_standard_webhooks_verify_a_delivery(
        store: SqlStore, receiver: Receiver) -> None:
    hook = endpoint(store, receiver.url("/hook"))
    batch = complete_batch(store)
    assert WebhookDelivery(store, "w", FAST).run_once() == 1
    [call] = receiver.calls_for("/hook")
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9",
                           webhook_secret=hook.secrets.current)
    event = client.webhooks.unwrap(call.body, call.headers)
    assert event.type == "batch.completed" and event.data.id == batch.id
    assert event.object == "event" and event.id == call.headers["webhook-id"]
    assert standardwebhooks.Webhook(hook.secrets.current).verify(
        call.body, call.headers)["data"] == {"id": batch.id}
    assert call.headers["content-type"] == "application/json"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(call.body, call.headers, secret=new_secret())
    [attempt] = store.list_webhook_attempts(PROJECT, hook.id, limit=5)
    assert (attempt.success, attempt.status_code, attempt.error) == (True, 200, None)
    assert attempt.latency_ms is not None and attempt.latency_ms >= 0


def test_during_a_rotation_both_secrets_verify(store: SqlStore, receiver: Receiver) -> None:
    old, new = new_secret(), new_secret()
    rotation = SigningSecrets(current=new, previous=old,
                              previous_expires_at=int(time.time()) + 86400)
    endpoint(store, receiver.url("/rotating"), secrets=rotation)
    complete_batch(store)
    WebhookDelivery(store, "w", FAST).run_once()
    [call] = receiver.calls_for("/rotating")
    assert len(call.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        openai.OpenAI(api_key="x").webhooks.verify_signature(call.body, call.headers,
                                                             secret=secret)
        standardwebhooks.Webhook(secret).verify(call.body, call.headers)
    expired = store.set_webhook_secrets(None, store.list_webhook_endpoints(
        PROJECT, after=None, limit=1).items[0].id, replace(rotation, previous_expires_at=1),
        now=int(time.time()))
    assert expired is not None
    complete_batch(store)
    WebhookDelivery(store, "w", FAST).run_once()
    later = receiver.calls_for("/rotating")[-1]
    assert len(later.headers["webhook-signature"].split(" ")) == 1
    standardwebhooks.Webhook(new).verify(later.body, later.headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(old).verify(later.body, later.headers)


@pytest.mark.parametrize("key", [None, "an operator's passphrase"])
def test_a_webhook_url_is_signed_with_the_projects_secret(
        store: SqlStore, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        key: str | None) -> None:
    if key:
        monkeypatch.setenv("BATCHERY_SECRET_KEY", key)
    batch = complete_batch(store, webhook_url=receiver.url("/callback"))
    WebhookDelivery(store, "w", FAST).run_once()
    [call] = receiver.calls_for("/callback")
    server_secret = key or store.get_or_create_server_secret()
    project_secret = signing.project_secret(server_secret, PROJECT)
    assert project_secret == signing.project_signing_secret(store, PROJECT)
    event = openai.OpenAI(api_key="x").webhooks.unwrap(call.body, call.headers,
                                                       secret=project_secret)
    assert event.data.id == batch.id
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="x").webhooks.unwrap(
            call.body, call.headers, secret=signing.project_secret(server_secret, "other"))


# -- retries -------------------------------------------------------------------------------


def test_a_receiver_failing_three_times_gets_the_fourth_attempt(
        store: SqlStore, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        loop: Callable[[DeliveryConfig], WebhookDelivery]) -> None:
    monkeypatch.setenv(model.RETRY_BASE_ENV, "0.2")
    config = DeliveryConfig(poll_s=0.02)
    assert config.retry_base_s == 0.2
    hook = endpoint(store, receiver.url("/flaky", 500, 500, 500, 200))
    complete_batch(store)
    loop(config)
    calls = receiver.wait_for("/flaky", 4)
    # Delivered: the fourth attempt is recorded a success, and nothing is left to send, so
    # no fifth attempt can come.
    until(lambda: any(a.success for a in store.list_webhook_attempts(PROJECT, hook.id,
                                                                     limit=5)))
    assert store.claim_webhook_delivery("check", LONG) is None
    assert len(receiver.calls_for("/flaky")) == 4
    assert len({c.headers["webhook-id"] for c in calls}) == 1
    assert len({c.body for c in calls}) == 1
    for call in calls:  # each attempt is signed afresh, and verifies
        standardwebhooks.Webhook(hook.secrets.current).verify(call.body, call.headers)
    # Exponential backoff with jitter: each wait is within [half, all] of 0.2 * 2^(n-1).
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    for n, gap in enumerate(gaps, start=1):
        step = 0.2 * 2 ** (n - 1)
        assert 0.5 * step - 0.02 <= gap <= step + 1.0, gaps
    attempts = store.list_webhook_attempts(PROJECT, hook.id, limit=10)
    assert [(a.attempt, a.status_code, a.success) for a in attempts] == [
        (4, 200, True), (3, 500, False), (2, 500, False), (1, 500, False)]
    assert all(RECEIVER_BODY not in (a.error or "") for a in attempts)
    assert store.get_webhook_endpoint(PROJECT, hook.id).consecutive_failures == 0  # type: ignore[union-attr]


def test_retry_delays_grow_and_stop_after_the_window() -> None:
    config = DeliveryConfig(retry_base_s=10.0, max_delay_s=100.0)
    assert [retry_delay(n, config, lambda: 1.0) for n in (1, 2, 3, 4, 5, 9)] == [
        10.0, 20.0, 40.0, 80.0, 100.0, 100.0]
    assert retry_delay(3, config, lambda: 0.0) == 20.0
    assert retry_delay(10_000, config, lambda: 1.0) == 100.0


def test_a_delivery_is_given_up_after_72_hours(store: SqlStore, receiver: Receiver) -> None:
    hook = endpoint(store, receiver.url("/gone", 500))
    complete_batch(store)
    later = time.time() + model.RETRY_FOR_S - 1.0
    WebhookDelivery(store, "w", FAST, clock=lambda: later).run_once()
    [delivery_attempt] = store.list_webhook_attempts(PROJECT, hook.id, limit=5)
    assert not delivery_attempt.success
    assert store.claim_webhook_delivery("w", LONG) is None  # failed for good
    assert store.list_webhook_attempts(PROJECT, hook.id, limit=5) == [delivery_attempt]
    # A claim made before the window closed would retry instead.
    complete_batch(store)
    claim = store.claim_webhook_delivery("w", LONG)
    assert claim is not None
    assert retry_in(claim, FAST, time.time()) is not None
    assert retry_in(claim, FAST, time.time() + model.RETRY_FOR_S) is None


def test_consecutive_failures_disable_the_endpoint(
        store: SqlStore, receiver: Receiver,
        loop: Callable[[DeliveryConfig], WebhookDelivery]) -> None:
    hook = endpoint(store, receiver.url("/down", 503))
    complete_batch(store)
    loop(DeliveryConfig(retry_base_s=0.001, max_delay_s=0.01, poll_s=0.01))
    until(lambda: store.get_webhook_endpoint(PROJECT, hook.id).status  # type: ignore[union-attr]
          is EndpointStatus.DISABLED)
    disabled = store.get_webhook_endpoint(PROJECT, hook.id)
    assert disabled is not None and "20 consecutive failed" in (disabled.disabled_reason or "")
    # New events skip a disabled endpoint: recording one gives it no delivery (only the one
    # that failed 20 times waits), so nothing can reach it even once it is enabled again.
    assert _deliveries_to(store, hook.id) == 1
    complete_batch(store)
    assert _deliveries_to(store, hook.id) == 1
    assert len(receiver.calls_for("/down")) == model.DISABLE_AFTER_FAILURES
    # Re-enabled, it gets the waiting delivery again (same id) once the receiver is back.
    receiver.state.plans["/down"] = [200]
    store.update_webhook_endpoint(PROJECT, hook.id, enabled=True, now=int(time.time()))
    calls = receiver.wait_for("/down", model.DISABLE_AFTER_FAILURES + 1)
    assert len({c.headers["webhook-id"] for c in calls}) == 1


# -- what a receiver cannot make the sender do -----------------------------------------------


def test_a_slow_receiver_times_out(store: SqlStore, receiver: Receiver) -> None:
    hook = endpoint(store, receiver.url("/slow", "slow"))
    complete_batch(store)
    started = time.monotonic()
    WebhookDelivery(store, "w", replace(FAST, timeout_s=0.5)).run_once()
    # The receiver holds the request for 60 s: a send that ends far sooner was cut short.
    assert time.monotonic() - started < 30
    [attempt] = store.list_webhook_attempts(PROJECT, hook.id, limit=5)
    assert attempt.status_code is None and not attempt.success
    assert attempt.error == "the receiver did not answer within 0.5s"


def test_redirects_are_never_followed_nor_bodies_kept(store: SqlStore,
                                                      receiver: Receiver) -> None:
    hook = endpoint(store, receiver.url("/moved", "redirect"))
    complete_batch(store)
    WebhookDelivery(store, "w", FAST).run_once()
    assert receiver.calls_for("/elsewhere") == []
    [attempt] = store.list_webhook_attempts(PROJECT, hook.id, limit=5)
    assert attempt.status_code == 307 and not attempt.success
    assert "redirect" in (attempt.error or "") and RECEIVER_BODY not in (attempt.error or "")


def test_an_unreachable_receiver_is_an_attempt_too(store: SqlStore, receiver: Receiver) -> None:
    hook = endpoint(store, f"http://127.0.0.1:{free_port()}/nobody")  # nothing listens
    complete_batch(store)
    WebhookDelivery(store, "w", replace(FAST, retry_base_s=60.0)).run_once()
    [attempt] = store.list_webhook_attempts(PROJECT, hook.id, limit=5)
    assert attempt.status_code is None and (attempt.error or "").startswith(
        "could not reach the receiver")
    assert store.claim_webhook_delivery("w", LONG) is None  # retried later, not now


def test_a_test_event_is_sent_once(store: SqlStore, receiver: Receiver) -> None:
    hook = endpoint(store, receiver.url("/test", 500), event_types=("batch.failed",))
    made = store.emit_test_webhook_event(PROJECT, hook.id, "batch.completed",
                                         now=int(time.time()))
    assert made is not None
    WebhookDelivery(store, "w", FAST).run_once()
    time.sleep(0.2)
    assert WebhookDelivery(store, "w", FAST).run_once() == 0
    [call] = receiver.calls_for("/test")
    event = openai.OpenAI(api_key="x").webhooks.unwrap(call.body, call.headers,
                                                       secret=hook.secrets.current)
    assert event.type == "batch.completed" and event.data.id.startswith("batch_")
    done = store.get_webhook_delivery(made.id)
    assert done is not None and done.status is DeliveryStatus.FAILED
    assert done.last_status_code == 500


# -- two workers on PostgreSQL ---------------------------------------------------------------

N_EVENTS = 40


def deliver_for(url: str, owner: str, seconds: float, start: Any) -> None:
    store = SqlStore.from_url(url)
    try:
        delivery = WebhookDelivery(store, owner, DeliveryConfig(poll_s=0.01, concurrency=4))
        start.wait(60)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not delivery.run_once():
                time.sleep(0.01)
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_on_postgres_deliver_each_event_once(pg_url: str,
                                                         receiver: Receiver) -> None:
    store = SqlStore.from_url(pg_url)
    try:
        endpoint(store, receiver.url("/pg", "hold"))
        ids = {d.event_id for _ in range(N_EVENTS) for d in store.emit_webhook_event(
            model.new_event(PROJECT, "batch.completed", f"batch_{secrets.token_hex(8)}",
                            int(time.time())))}
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(2)
        workers = [ctx.Process(target=deliver_for, args=(pg_url, f"w{i}", 6.0, start))
                   for i in range(2)]
        for worker in workers:
            worker.start()
        try:
            calls = receiver.wait_for("/pg", N_EVENTS, timeout=60)
            for worker in workers:
                worker.join(30)
                assert worker.exitcode == 0
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join()
        assert receiver.state.overlaps == []
        received = Counter(c.headers["webhook-id"] for c in receiver.calls_for("/pg"))
        assert set(received) == ids and set(received.values()) == {1}
        [hook] = store.list_webhook_endpoints(None, after=None, limit=1).items
        attempts = store.list_webhook_attempts(None, hook.id, limit=1000)
        assert sorted(a.event_id for a in attempts) == sorted(ids)
        assert all(a.success for a in attempts) and len(calls) == N_EVENTS
    finally:
        store.close()
