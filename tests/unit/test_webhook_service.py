"""`WebhookService` over the real SQLite store: bodies checked with errors that name the
field, secrets shown once, rotation, the URL policy, projects kept apart, test events and
redelivery, the per-project secret."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from batchery.jobs import submission
from batchery.model import webhooks as model
from batchery.model.exceptions import Conflict, Forbidden, InvalidRequest, NotFound
from batchery.model.webhooks import AttemptResult
from batchery.security.trust import TrustPolicy
from batchery.security.webhook_urls import check_webhook_url
from batchery.stores.sql.store import SqlStore
from batchery.webhooks import signing
from batchery.webhooks.service import (
    KEEP_OLD_SECRET_S,
    WebhookService,
    secret_hint,
)

OPEN = TrustPolicy(open=True)
SHARED = TrustPolicy(open=False, upstream_hosts=("hooks.example.com", "127.0.0.1:9000",
                                                  "*.0.0.1"))
GOOD = {"name": "ops", "url": "http://127.0.0.1:9000/hook", "event_types": ["batch.completed"]}


@pytest.fixture
def store(sqlite_url: str) -> Iterator[SqlStore]:
    store = SqlStore.from_url(sqlite_url)
    yield store
    store.close()


@pytest.fixture
def service(store: SqlStore) -> WebhookService:
    return WebhookService(store, SHARED, test_wait_s=5.0)


def test_create_shows_the_secret_once_and_a_hint_after(service: WebhookService) -> None:
    endpoint, secret = service.create("team-a", {**GOOD, "event_types": [
        "batch.completed", "job.failed", "batch.completed"]})
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert endpoint.id.startswith("we_")
    assert endpoint.event_types == ("batch.completed", "job.failed")  # each once, in order
    again = service.get("team-a", endpoint.id)
    assert again.secrets.current == secret  # kept to sign; the API shows only the hint
    hint = secret_hint(secret)
    assert hint.startswith("whsec_") and secret not in hint and hint.endswith(
        secret.rstrip("=")[-4:])
    _, other = service.create("team-a", GOOD)
    assert other != secret


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"url": GOOD["url"], "event_types": ["batch.completed"]}, "name", "Missing required"),
    ({"name": "x", "event_types": ["batch.completed"]}, "url", "Missing required"),
    ({"name": "x", "url": GOOD["url"]}, "event_types", "Missing required"),
    ({**GOOD, "event_types": ["batch.completed", "batch.exploded"]}, "event_types[1]",
     "'batch.exploded' is not an event type"),
    ({**GOOD, "event_types": []}, "event_types", "at least one"),
    ({**GOOD, "event_types": "batch.completed"}, "event_types", "expected an array"),
    ({**GOOD, "event_types": [3]}, "event_types[0]", "expected a string"),
    ({**GOOD, "name": 5}, "name", "expected a string"),
    ({**GOOD, "name": ""}, "name", "1 to 256"),
    ({**GOOD, "colour": "red"}, "colour", "Unknown parameter"),
    ({**GOOD, "url": "ftp://127.0.0.1:9000/x"}, "url", "http or https URL"),
    ({**GOOD, "url": "http:///nohost"}, "url", "names its host"),
    ({**GOOD, "url": "http://127.0.0.1:99999/x"}, "url", "not a valid URL"),
    ({**GOOD, "url": 7}, "url", "expected a string"),
    ({**GOOD, "url": "http://127.0.0.1:9000/" + "x" * 3000}, "url", "at most 2048"),
])
def test_bad_bodies_name_the_field(service: WebhookService, body: dict[str, Any],
                                   param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        service.create("team-a", body)
    assert exc.value.param == param
    assert words in exc.value.message


def test_our_event_types_are_accepted_beside_openais(service: WebhookService) -> None:
    types = ["message_batch.ended", "job.succeeded", "job.timed_out", "response.completed"]
    endpoint, _ = service.create("team-a", {**GOOD, "event_types": types})
    assert list(endpoint.event_types) == types
    assert service.event_types()[:4] == ["batch.completed", "batch.failed", "batch.expired",
                                         "batch.cancelled"]
    assert "message_batch.ended" in service.event_types()
    assert "response.completed" not in service.event_types()  # accepted, never sent


def test_shared_mode_urls_obey_the_upstream_allow_list() -> None:
    assert check_webhook_url("https://hooks.example.com/in", SHARED) == \
        "https://hooks.example.com/in"
    assert check_webhook_url("http://127.0.0.1:9000/in", SHARED)  # listed exactly
    strict = dataclasses.replace(SHARED, upstream_hosts=("hooks.example.com",
                                                         "127.0.0.1:9000"))
    refusals = [(strict, "http://127.0.0.1:9001/in", "may not reach the host '127.0.0.1'"),
                (strict, "http://10.1.2.3/in", "may not reach the host '10.1.2.3'"),
                (strict, "https://evil.example.net/in",
                 "may not reach the host 'evil.example.net'"),
                # A wildcard never opens an address inside the network.
                (SHARED, "http://127.0.0.1/in", "is an address inside the network")]
    for policy, url, words in refusals:
        with pytest.raises(Forbidden) as exc:
            check_webhook_url(url, policy, "webhook_url")
        assert exc.value.param == "webhook_url", url
        assert words in exc.value.message, url
        assert "security.upstream_hosts" in exc.value.message
    with pytest.raises(Forbidden) as exc:
        check_webhook_url("http://10.1.2.3/in", strict)
    assert exc.value.message.startswith("url: webhook URLs may not reach the host")


def test_open_mode_allows_a_loopback_receiver() -> None:
    assert check_webhook_url("http://127.0.0.1:8123/hook", OPEN)
    assert check_webhook_url("http://localhost/hook", OPEN)
    with pytest.raises(InvalidRequest):
        check_webhook_url("file:///etc/passwd", OPEN)


def test_endpoints_belong_to_their_project(service: WebhookService) -> None:
    mine, _ = service.create("team-a", GOOD)
    service.create("team-b", {**GOOD, "name": "theirs"})
    for call in (lambda: service.get("team-b", mine.id),
                 lambda: service.update("team-b", mine.id, {"name": "stolen"}),
                 lambda: service.rotate_secret("team-b", mine.id, {}),
                 lambda: service.delete("team-b", mine.id),
                 lambda: service.attempts("team-b", mine.id),
                 lambda: service.test("team-b", mine.id, {"event_type": "batch.completed"})):
        with pytest.raises(NotFound):
            call()
    assert [e.id for e in service.list_endpoints("team-a").items] == [mine.id]
    assert [e.name for e in service.list_endpoints("team-b").items] == ["theirs"]
    assert service.get("team-a", mine.id).name == "ops"
    service.delete("team-a", mine.id)
    with pytest.raises(NotFound):
        service.get("team-a", mine.id)


def test_list_pages_newest_first(service: WebhookService) -> None:
    made = [service.create("p", {**GOOD, "name": f"e{i}"})[0].id for i in range(5)]
    first = service.list_endpoints("p", limit=2)
    assert [e.id for e in first.items] == made[::-1][:2] and first.has_more
    rest = service.list_endpoints("p", after=first.items[-1].id, limit=10)
    assert [e.id for e in rest.items] == made[::-1][2:] and not rest.has_more
    with pytest.raises(InvalidRequest) as exc:
        service.list_endpoints("p", limit=0)
    assert exc.value.param == "limit"


def test_update_changes_what_is_given(service: WebhookService) -> None:
    endpoint, _ = service.create("p", GOOD)
    changed = service.update("p", endpoint.id, {"event_types": ["job.failed"],
                                                "name": "renamed"})
    assert changed.event_types == ("job.failed",) and changed.name == "renamed"
    assert changed.url == GOOD["url"]
    assert service.update("p", endpoint.id, {"status": "disabled"}).status.value == "disabled"
    assert service.update("p", endpoint.id, {"status": "enabled"}).status.value == "enabled"
    with pytest.raises(InvalidRequest) as exc:
        service.update("p", endpoint.id, {"status": "paused"})
    assert exc.value.param == "status"
    with pytest.raises(Forbidden) as forbidden:
        service.update("p", endpoint.id, {"url": "http://192.168.1.1/x"})
    assert forbidden.value.param == "url"
    assert service.get("p", endpoint.id).url == GOOD["url"]


def _verify(secret: str, secrets: list[str]) -> None:
    """A delivery signed by `secrets` verifies with `secret`, by the OpenAI SDK."""
    body = '{"id":"evt_1","object":"event","created_at":1,"type":"batch.completed",' \
           '"data":{"id":"batch_1"}}'
    now = int(time.time())
    headers = signing.headers(secrets, "evt_1", now, body)
    OpenAI(api_key="x").webhooks.unwrap(body, headers, secret=secret)


def test_rotation_keeps_the_old_secret_for_a_day_only_when_asked(
        service: WebhookService) -> None:
    endpoint, first = service.create("p", GOOD)
    now = time.time()
    kept, second = service.rotate_secret("p", endpoint.id,
                                         {"keep_old_secret_active_for_24_hours": True})
    assert second != first and kept.secrets.current == second
    assert kept.secrets.previous == first
    assert kept.secrets.previous_expires_at is not None
    assert abs(kept.secrets.previous_expires_at - (now + KEEP_OLD_SECRET_S)) < 5
    active = kept.secrets.active(now)
    assert active == [second, first]
    for secret in (first, second):  # a receiver with either secret verifies
        _verify(secret, active)
    assert kept.secrets.active(now + KEEP_OLD_SECRET_S + 1) == [second]
    dropped, third = service.rotate_secret("p", endpoint.id, {})
    assert dropped.secrets.previous is None and dropped.secrets.active(now) == [third]
    assert service.get("p", endpoint.id).secrets.current == third
    with pytest.raises(InvalidRequest) as exc:
        service.rotate_secret("p", endpoint.id, {"keep_old_secret_active_for_24_hours": "yes"})
    assert exc.value.param == "keep_old_secret_active_for_24_hours"


def _worker_answers(store: SqlStore, status_code: int | None, error: str | None = None
                    ) -> threading.Thread:
    """A stand-in for a worker's delivery loop: claims one delivery, records one attempt."""
    def work() -> None:
        deadline = time.monotonic() + 30
        while (claim := store.claim_webhook_delivery("w1", 30)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        store.record_webhook_attempt(claim, AttemptResult(
            success=status_code is not None and 200 <= status_code < 300,
            status_code=status_code, latency_ms=3, error=error), retry_in=None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_test_waits_for_a_worker_and_reports_the_status_code(
        service: WebhookService, store: SqlStore) -> None:
    endpoint, _ = service.create("p", GOOD)
    worker = _worker_answers(store, 418)
    result = service.test("p", endpoint.id, {"event_type": "job.succeeded"})
    worker.join(30)
    assert (result.status_code, result.event_type, result.endpoint_id) == \
        (418, "job.succeeded", endpoint.id)
    attempts = service.attempts("p", endpoint.id)
    assert [(a.status_code, a.success, a.event_type) for a in attempts] == \
        [(418, False, "job.succeeded")]
    with pytest.raises(InvalidRequest) as exc:
        service.test("p", endpoint.id, {"event_type": "batch.exploded"})
    assert exc.value.param == "event_type"
    with pytest.raises(InvalidRequest) as exc:
        service.test("p", endpoint.id, {})
    assert exc.value.param == "event_type"


def test_test_without_an_answer_is_a_conflict_that_says_why(
        service: WebhookService, store: SqlStore) -> None:
    endpoint, _ = service.create("p", GOOD)
    worker = _worker_answers(store, None, "connection refused")
    with pytest.raises(Conflict) as exc:
        service.test("p", endpoint.id, {"event_type": "batch.completed"})
    worker.join(30)
    assert "connection refused" in exc.value.message
    idle = WebhookService(store, SHARED, test_wait_s=0.3)
    with pytest.raises(Conflict) as exc:
        idle.test("p", endpoint.id, {"event_type": "batch.completed"})
    assert "No worker sent the test event" in exc.value.message


def test_redeliver_queues_a_sent_event_again_with_its_id(
        service: WebhookService, store: SqlStore) -> None:
    endpoint, _ = service.create("p", GOOD)
    event = model.new_event("p", "batch.completed", "batch_abc", int(time.time()))
    store.emit_webhook_event(event)
    _worker_answers(store, 500).join(30)
    [attempt] = service.attempts("p", endpoint.id, event_id=event.id)
    assert attempt.status_code == 500
    again = service.redeliver("p", endpoint.id, event.id)
    assert (again.event_id, again.status.value, again.endpoint_id) == \
        (event.id, "pending", endpoint.id)
    with pytest.raises(NotFound) as exc:
        service.redeliver("p", endpoint.id, "evt_never")
    assert exc.value.param == "event_id"
    with pytest.raises(NotFound):
        service.redeliver("q", endpoint.id, event.id)


def test_the_project_secret_is_derived_from_the_server_secret(
        service: WebhookService, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = service.project_secret("team-a")
    assert stored == service.project_secret("team-a")  # made once, kept in the database
    assert stored != service.project_secret("team-b")
    monkeypatch.setenv("BATCHERY_SECRET_KEY", "server-passphrase")
    digest = hmac.new(b"server-passphrase", b"project-webhook:team-a", hashlib.sha256).digest()
    assert service.project_secret("team-a") == "whsec_" + base64.b64encode(digest).decode()


def test_a_job_submission_carries_a_webhook_url() -> None:
    body = {"item_list": {"items": [1], "batch_size": 1},
            "webhook_url": "http://127.0.0.1:9000/jobs"}
    assert submission.parse(body).webhook_url == "http://127.0.0.1:9000/jobs"
    assert submission.parse({**body, "webhook_url": None}).webhook_url is None
    with pytest.raises(InvalidRequest) as exc:
        submission.parse({**body, "webhook_url": 3})
    assert exc.value.param == "webhook_url"
