"""Webhooks end to end: a real `batchery serve` (shared mode, the test receiver's loopback
address allowed by its config), a real HTTP receiver, the official SDKs and the CLI.

Each test uses a project of its own, so that one test's events never reach another's
endpoints."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import standardwebhooks
import yaml
from openai import InvalidWebhookSignatureError, OpenAI
from openai.types.webhooks import BatchCompletedWebhookEvent, WebhookEndpointWithSecret

from batchery.security.auth import add_key
from tests.acceptance.jobs_support import deployment
from tests.conftest import Server, free_port, start_server
from tests.helpers import alive, chat_file, descendants, eventually

ROOT = Path(__file__).resolve().parents[2]
#: Short backoff and polling, through the documented settings.
FAST = {"BATCHERY_WEBHOOK_RETRY_BASE_S": "0.2", "BATCHERY_WEBHOOK_POLL_S": "0.1"}
PROJECTS = ("p-sdk", "p-retry", "p-rotate", "p-other", "p-callback", "p-cli", "p-docs")
#: What the receiver answers with: never to be shown by the API.
RECEIVER_BODY = "receiver-private-answer"
TERMINAL = ("completed", "failed", "expired", "cancelled")


# -- a receiver -------------------------------------------------------------------------------

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str
    at: float


@dataclass
class Receiver:
    """An HTTP server on loopback that records every request and answers each path with the
    statuses planned for it, then 200."""

    requests: list[Received] = field(default_factory=list)
    plans: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.requests.append(Received(
                        path=self.path, body=body.decode(), at=time.monotonic(),
                        headers={k.lower(): v for k, v in self.headers.items()}))
                    plan = receiver.plans.get(self.path) or []
                    status = plan.pop(0) if plan else 200
                self.send_response(status)
                self.send_header("content-length", str(len(RECEIVER_BODY)))
                self.end_headers()
                self.wfile.write(RECEIVER_BODY.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def plan(self, path: str, statuses: list[int]) -> None:
        with self.lock:
            self.plans[path] = list(statuses)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait(self, path: str, count: int = 1, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(found := self.at(path)) < count:
            assert time.monotonic() < deadline, f"{path}: {len(found)} of {count} requests"
            time.sleep(0.05)
        return found


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.start()
    yield found
    assert found.server is not None
    found.server.shutdown()
    found.server.server_close()


# -- a shared server --------------------------------------------------------------------------

@dataclass
class Shared:
    server: Server
    keys: dict[str, str]
    #: A port the allow-list lets webhooks reach, for the docs' receiver.
    docs_port: int

    def client(self, project: str) -> OpenAI:
        return OpenAI(base_url=self.server.v1, api_key=self.keys[project], max_retries=0)

    def http(self, project: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, timeout=60,
                            headers={"Authorization": f"Bearer {self.keys[project]}"})


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("webhooks")
    keys_file = tmp / "keys.yaml"
    keys = {p: add_key(keys_file, p, role="member")[1] for p in PROJECTS}
    keys["admin"] = add_key(keys_file, "ops", role="admin")[1]
    docs_port = free_port()
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "security": {"upstream_hosts": [f"127.0.0.1:{receiver.port}",
                                        f"127.0.0.1:{docs_port}"]},
        "deployments": [{"name": "echo", "backend": "echo"}],
        "endpoints": [{"name": "nums", "deployments": [deployment("v1", "Doubler")]}]}))
    server = start_server(tmp, "--config", str(config), "--keys-file", str(keys_file),
                          "--workers", "1", env=FAST, name="webhooks")
    yield Shared(server=server, keys=keys, docs_port=docs_port)
    server.stop()


def run_batch(client: OpenAI, **extra: Any) -> Any:
    f = client.files.create(file=chat_file(2), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", **extra)
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch.id)).status not in TERMINAL:
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.1)
    assert batch.status == "completed"
    return batch


def verified(client: OpenAI, delivery: Received, secret: str) -> dict[str, Any]:
    """The event, once the SDK's `unwrap` has verified the delivery. For our own event types
    the SDK picks one of its classes; the fields are right whichever."""
    event = client.webhooks.unwrap(delivery.body, delivery.headers, secret=secret)
    found: dict[str, Any] = event.model_dump()
    return found


def attempts(shared: Shared, project: str, endpoint_id: str, **params: Any) -> Any:
    with shared.http(project) as http:
        answer = http.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries", params=params)
    assert answer.status_code == 200, answer.text
    assert RECEIVER_BODY not in answer.text  # the receiver's answer is never passed on
    return answer.json()["data"]


# -- the tests --------------------------------------------------------------------------------

def test_the_sdk_manages_an_endpoint_and_unwrap_verifies_a_real_batch_completed(
        shared: Shared, receiver: Receiver) -> None:
    with shared.client("p-sdk") as client:
        # Our own event types are accepted beside OpenAI's (the SDK's types list only its).
        ours: Any = "job.failed"
        created = client.webhooks.create(name="ops", url=receiver.url("/sdk"),
                                         event_types=["batch.completed", ours])
        assert isinstance(created, WebhookEndpointWithSecret)
        secret = created.signing_secret
        assert secret.startswith("whsec_") and created.id.startswith("we_")
        assert created.signing_secret_hint and secret not in created.signing_secret_hint
        assert created.event_types == ["batch.completed", "job.failed"]
        assert created.url == receiver.url("/sdk") and created.object == "webhook_endpoint"
        got = client.webhooks.retrieve(created.id)
        assert got.signing_secret_hint == created.signing_secret_hint
        assert "signing_secret" not in (got.model_extra or {})  # shown on create only
        assert [e.id for e in client.webhooks.list()] == [created.id]
        renamed = client.webhooks.update(created.id, name="renamed")
        assert renamed.name == "renamed" and renamed.event_types == created.event_types
        types = client.webhooks.event_types.list()
        assert types.object == "list"
        assert {"batch.completed", "batch.failed", "batch.expired", "batch.cancelled",
                "message_batch.ended", "job.succeeded", "job.completed_with_failures",
                "job.failed", "job.stopped", "job.timed_out"} == set(types.data)

        batch = run_batch(client)
        [delivery] = receiver.wait("/sdk")
        event = client.webhooks.unwrap(delivery.body, delivery.headers, secret=secret)
        assert isinstance(event, BatchCompletedWebhookEvent)
        assert event.data.id == batch.id and event.object == "event"
        assert event.id == delivery.headers["webhook-id"] and event.id.startswith("evt_")
        assert json.loads(delivery.body) == {"id": event.id, "object": "event",
                                             "created_at": event.created_at,
                                             "type": "batch.completed",
                                             "data": {"id": batch.id}}
        standardwebhooks.Webhook(secret).verify(delivery.body, delivery.headers)

        # Recorded delivered at the first attempt: nothing is left to send, so the receiver
        # got it once.
        def recorded() -> list[Any] | None:
            return attempts(shared, "p-sdk", created.id) or None

        [attempt] = eventually(recorded, "the attempt to be recorded")
        assert (attempt["event_id"], attempt["status_code"], attempt["success"],
                attempt["attempt"], attempt["error"]) == (event.id, 200, True, 1, None)
        assert len(receiver.at("/sdk")) == 1
        assert isinstance(attempt["latency_ms"], int)

        deleted = client.webhooks.delete(created.id)
        assert (deleted.id, deleted.deleted, deleted.object) == \
            (created.id, True, "webhook_endpoint.deleted")
        with pytest.raises(openai.NotFoundError):
            client.webhooks.retrieve(created.id)


def test_a_receiver_failing_three_times_gets_the_event_on_the_fourth_attempt(
        shared: Shared, receiver: Receiver) -> None:
    receiver.plan("/retry", [500, 500, 500])
    with shared.client("p-retry") as client:
        endpoint = client.webhooks.create(name="flaky", url=receiver.url("/retry"),
                                          event_types=["batch.completed"])
        batch = run_batch(client)
        got = receiver.wait("/retry", 4)
        event = verified(client, got[3], endpoint.signing_secret)
    assert event["data"]["id"] == batch.id
    assert {r.headers["webhook-id"] for r in got} == {event["id"]}  # the same id every time
    assert {r.body for r in got} == {got[0].body}
    # Backoff: 0.2 s doubling, each delay jittered between half and all of it.
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert all(gap >= 0.09 * 2 ** i for i, gap in enumerate(gaps)), gaps
    # The fourth attempt is recorded a moment after the receiver answered it.
    found = eventually(lambda: attempts(shared, "p-retry", endpoint.id) if len(
        attempts(shared, "p-retry", endpoint.id)) == 4 else None, "the fourth attempt's record")
    assert [(a["attempt"], a["status_code"], a["success"]) for a in found] == \
        [(4, 200, True), (3, 500, False), (2, 500, False), (1, 500, False)]
    assert all("500" in a["error"] for a in found[1:])
    # The fourth attempt is recorded a success: nothing is left to send, no fifth comes.
    assert len(receiver.at("/retry")) == 4

    with shared.http("p-retry") as http:
        again = http.post(f"/v1/webhook_endpoints/{endpoint.id}/deliveries/{event['id']}"
                          "/redeliver")
        assert again.status_code == 200, again.text
        assert again.json()["event_id"] == event["id"]
        missing = http.post(f"/v1/webhook_endpoints/{endpoint.id}/deliveries/evt_nope"
                            "/redeliver")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "event_id"
    fifth = receiver.wait("/retry", 5)[4]
    assert fifth.headers["webhook-id"] == event["id"] and fifth.body == got[0].body


def test_a_rotation_keeps_both_signatures_valid(shared: Shared, receiver: Receiver) -> None:
    with shared.client("p-rotate") as client:
        created = client.webhooks.create(name="rot", url=receiver.url("/rotate"),
                                         event_types=["batch.completed"])
        first = created.signing_secret
        rotated = client.webhooks.rotate_secret(created.id,
                                                keep_old_secret_active_for_24_hours=True)
        second = rotated.signing_secret
        assert second.startswith("whsec_") and second != first
        assert rotated.signing_secret_hint != created.signing_secret_hint
        assert client.webhooks.retrieve(created.id).signing_secret_hint == \
            rotated.signing_secret_hint

        result = client.webhooks.test(created.id, event_type="batch.completed")
        assert (result.object, result.webhook_endpoint_id, result.event_type,
                result.status_code, result.success) == \
            ("webhook_endpoint.test", created.id, "batch.completed", 200, True)
        [during] = receiver.wait("/rotate")
        assert len(during.headers["webhook-signature"].split()) == 2
        for secret in (first, second):
            event = client.webhooks.unwrap(during.body, during.headers, secret=secret)
            assert event.type == "batch.completed"
            standardwebhooks.Webhook(secret).verify(during.body, during.headers)

        third = client.webhooks.rotate_secret(created.id).signing_secret
        client.webhooks.test(created.id, event_type="batch.failed")
        after = receiver.wait("/rotate", 2)[1]
        assert len(after.headers["webhook-signature"].split()) == 1
        assert client.webhooks.unwrap(after.body, after.headers, secret=third).type == \
            "batch.failed"
        for old in (first, second):
            with pytest.raises(InvalidWebhookSignatureError):
                client.webhooks.unwrap(after.body, after.headers, secret=old)

        receiver.plan("/rotate", [503])
        assert client.webhooks.test(created.id, event_type="batch.expired").status_code == 503


def test_endpoints_belong_to_a_project_and_urls_obey_the_allow_list(
        shared: Shared, receiver: Receiver) -> None:
    with shared.client("p-sdk") as mine, shared.client("p-other") as other, \
            shared.client("admin") as admin:
        endpoint = mine.webhooks.create(name="mine", url=receiver.url("/mine"),
                                        event_types=["batch.expired"])
        for client in (other, admin):
            with pytest.raises(openai.NotFoundError):
                client.webhooks.retrieve(endpoint.id)
            with pytest.raises(openai.NotFoundError):
                client.webhooks.delete(endpoint.id)
            with pytest.raises(openai.NotFoundError):
                client.webhooks.rotate_secret(endpoint.id)
            assert list(client.webhooks.list()) == []
        with pytest.raises(openai.BadRequestError) as bad:
            mine.webhooks.create(name="x", url=receiver.url("/x"),
                                 event_types=["batch.completed", "batch.exploded"])  # type: ignore[list-item]
        assert bad.value.param == "event_types[1]" and "batch.exploded" in bad.value.message
        refused = {"http://127.0.0.1:1/x": "127.0.0.1", "http://10.0.0.7/x": "10.0.0.7",
                   "https://example.com/x": "example.com"}
        for url, host in refused.items():
            with pytest.raises(openai.PermissionDeniedError) as denied:
                mine.webhooks.create(name="x", url=url, event_types=["batch.completed"])
            assert denied.value.param == "url"
            assert f"may not reach the host '{host}'" in denied.value.message
            assert "security.upstream_hosts" in denied.value.message
        with pytest.raises(openai.PermissionDeniedError):
            mine.webhooks.update(endpoint.id, url="http://127.0.0.1:1/x")
        mine.webhooks.delete(endpoint.id)


def test_webhook_url_callbacks_are_signed_with_the_project_secret(
        shared: Shared, receiver: Receiver) -> None:
    with shared.client("p-callback") as client, shared.http("p-callback") as http, \
            anthropic.Anthropic(base_url=shared.server.base_url,
                                api_key=shared.keys["p-callback"], max_retries=0) as claude:
        secret = client.get("/webhook_secret", cast_to=object)["signing_secret"]  # type: ignore[index]
        assert secret.startswith("whsec_")
        assert http.get("/v1/webhook_secret").json() == {"object": "webhook_secret",
                                                         "signing_secret": secret}
        with shared.http("p-other") as other:
            assert other.get("/v1/webhook_secret").json()["signing_secret"] != secret

        batch = run_batch(client, extra_body={"webhook_url": receiver.url("/cb-batch")})
        message_batch = claude.messages.batches.create(
            requests=[{"custom_id": "a", "params": {
                "model": "echo", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]}}],
            extra_body={"webhook_url": receiver.url("/cb-msg")})
        job = http.post("/api/v1/endpoints/nums/jobs", json={
            "item_list": {"items": [1, 2, 3], "batch_size": 2},
            "webhook_url": receiver.url("/cb-job")})
        assert job.status_code == 200, job.text
        expected = {"/cb-batch": ("batch.completed", batch.id),
                    "/cb-msg": ("message_batch.ended", message_batch.id),
                    "/cb-job": ("job.succeeded", job.json()["id"])}
        for path, (event_type, object_id) in expected.items():
            [delivery] = receiver.wait(path, timeout=90)
            event = verified(client, delivery, secret)
            assert (event["type"], event["data"]["id"]) == (event_type, object_id), path

        refused = "http://127.0.0.1:1/x"
        with pytest.raises(openai.PermissionDeniedError) as denied:
            run_batch(client, extra_body={"webhook_url": refused})
        assert denied.value.param == "webhook_url"
        with pytest.raises(anthropic.PermissionDeniedError):
            claude.messages.batches.create(requests=[{"custom_id": "a", "params": {
                "model": "echo", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]}}],
                extra_body={"webhook_url": refused})
        answer = http.post("/api/v1/endpoints/nums/jobs", json={
            "item_list": {"items": [1], "batch_size": 1}, "webhook_url": refused})
        assert answer.status_code == 403 and answer.json()["error"]["param"] == "webhook_url"
        answer = http.post("/v1/batches", json={"input_file_id": "file-x",
                                                "endpoint": "/v1/chat/completions",
                                                "webhook_url": "ftp://example.com/x"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "webhook_url"


def _cli(shared: Shared, project: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATCHERY_BASE_URL": shared.server.v1,
           "BATCHERY_API_KEY": shared.keys[project], "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "batchery", "webhooks", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_cli_creates_lists_rotates_tests_and_reads_deliveries(
        shared: Shared, receiver: Receiver) -> None:
    created = _cli(shared, "p-cli", "create", "--url", receiver.url("/cli"),
                   "-e", "batch.completed", "-e", "job.failed", "--name", "from-cli")
    assert created.returncode == 0, created.stderr
    endpoint = json.loads(created.stdout)
    assert endpoint["signing_secret"].startswith("whsec_")
    assert endpoint["event_types"] == ["batch.completed", "job.failed"]
    listed = _cli(shared, "p-cli", "list", "--json")
    assert [e["id"] for e in json.loads(listed.stdout)["data"]] == [endpoint["id"]]
    assert "signing_secret\"" not in listed.stdout
    table = _cli(shared, "p-cli", "list")
    assert table.returncode == 0 and "from-cli" in table.stdout
    rotated = _cli(shared, "p-cli", "rotate", endpoint["id"], "--keep-old")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = json.loads(rotated.stdout)["signing_secret"]
    assert new_secret != endpoint["signing_secret"]
    tested = _cli(shared, "p-cli", "test", endpoint["id"], "-e", "job.failed")
    assert tested.returncode == 0, tested.stderr
    assert "HTTP 200" in tested.stdout
    [delivery] = receiver.wait("/cli")
    for secret in (endpoint["signing_secret"], new_secret):
        standardwebhooks.Webhook(secret).verify(delivery.body, delivery.headers)
    found = json.loads(_cli(shared, "p-cli", "deliveries", endpoint["id"], "--json").stdout)
    assert [(a["event_type"], a["status_code"]) for a in found["data"]] == \
        [("job.failed", 200)]
    shown = _cli(shared, "p-cli", "deliveries", endpoint["id"])
    assert shown.returncode == 0 and "job.failed" in shown.stdout
    receiver.plan("/cli", [500])
    failing = _cli(shared, "p-cli", "test", endpoint["id"])
    assert failing.returncode == 1 and "HTTP 500" in failing.stdout
    missing = _cli(shared, "p-cli", "rotate", "we_missing")
    assert missing.returncode == 1 and "error 404" in missing.stderr
    refused = _cli(shared, "p-cli", "create", "--url", "http://127.0.0.1:1/x",
                   "-e", "batch.completed")
    assert refused.returncode == 1 and "error 403" in refused.stderr
    assert "(param: url)" in refused.stderr


def _docs_receiver() -> str:
    """The receiver snippet of docs/webhooks.md: the Python block that runs HTTPServer."""
    text = (ROOT / "docs" / "webhooks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    [snippet] = [str(b) for b in blocks if "HTTPServer(" in b]
    return snippet


def test_the_docs_receiver_verifies_deliveries(shared: Shared, tmp_path: Path) -> None:
    with shared.client("p-docs") as client:
        endpoint = client.webhooks.create(
            name="docs", url=f"http://127.0.0.1:{shared.docs_port}/hook",
            event_types=["batch.completed"])
        script = tmp_path / "receiver.py"
        script.write_text(_docs_receiver())
        out = tmp_path / "receiver.out"
        with out.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, str(script)], stdout=sink, stderr=subprocess.STDOUT,
                env={**os.environ, "PORT": str(shared.docs_port),
                     "OPENAI_WEBHOOK_SECRET": endpoint.signing_secret})
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    forged = httpx.post(f"http://127.0.0.1:{shared.docs_port}/hook",
                                        content=b'{"id":"evt_x"}', headers={
                                            "webhook-id": "evt_x", "webhook-signature": "v1,AA==",
                                            "webhook-timestamp": str(int(time.time()))})
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, out.read_text()
                    time.sleep(0.1)
            assert forged.status_code == 400  # a bad signature is refused
            assert client.webhooks.test(endpoint.id,
                                        event_type="batch.completed").status_code == 204
            batch = run_batch(client)
            deadline = time.monotonic() + 60
            while f"batch.completed {batch.id}" not in out.read_text():
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.1)
        finally:
            process.kill()
            process.wait()


# -- crash safety -----------------------------------------------------------------------------

@pytest.mark.slow
def test_an_event_survives_sigkill_of_every_process_between_commit_and_delivery(
        tmp_path: Path, receiver: Receiver) -> None:
    """Open mode (a loopback receiver is allowed there). The workers look at the outbox only
    once an hour, so the event waits there when everything is killed."""
    config = tmp_path / "config.yaml"
    config.write_text("deployments:\n  - {name: echo, backend: echo}\n")
    args = ("--config", str(config), "--workers", "1")
    server = start_server(tmp_path, *args, env={**FAST, "BATCHERY_WEBHOOK_POLL_S": "3600"},
                          name="crash")
    try:
        with OpenAI(base_url=server.v1, api_key="k", max_retries=0) as client:
            endpoint = client.webhooks.create(name="crash", url=receiver.url("/crash"),
                                              event_types=["batch.completed"])
            time.sleep(1.0)  # the worker has looked at the outbox, found nothing, and sleeps
            batch = run_batch(client)
        time.sleep(1.0)
        assert receiver.at("/crash") == []
        victims = [server.process.pid, *descendants(server.process.pid)]
        assert len(victims) >= 2, "the server and its worker"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        server.process.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in victims):
            assert time.monotonic() < deadline, "a Batchery process outlived SIGKILL"
            time.sleep(0.05)
    finally:
        server.stop()
    assert receiver.at("/crash") == []

    restarted = start_server(tmp_path, *args, env=FAST, name="crash")
    try:
        [delivery] = receiver.wait("/crash")
        with OpenAI(base_url=restarted.v1, api_key="k", max_retries=0) as client:
            event = client.webhooks.unwrap(delivery.body, delivery.headers,
                                           secret=endpoint.signing_secret)
            assert isinstance(event, BatchCompletedWebhookEvent)
            assert event.data.id == batch.id
            assert client.batches.retrieve(batch.id).status == "completed"
    finally:
        restarted.stop()
