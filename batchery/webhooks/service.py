"""`WebhookService`: the webhook endpoints API's use cases over the `WebhookStore` port.
Framework-free; the HTTP routes and the CLI (through the routes) call it.

* Bodies are checked here, with errors that name the field and say what was expected.
* Signing secrets (`whsec_` + base64 of 32 random bytes) are made here and shown only by
  `create` and `rotate`; afterwards an endpoint shows a hint of its secret.
* Every receiver URL, an endpoint's or a `webhook_url` given at create, passes the
  operator's upstream allow-list (`batchery.security.webhook_urls`).
* Endpoints belong to the project of the key that made them: other projects get 404.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from batchery.model import webhooks as model
from batchery.model.exceptions import Conflict, InvalidRequest, NotFound
from batchery.model.paging import Page
from batchery.model.webhooks import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    SigningSecrets,
    WebhookEndpoint,
)
from batchery.ports.webhooks import WebhookStore
from batchery.security.trust import TrustPolicy
from batchery.security.webhook_urls import check_webhook_url
from batchery.webhooks import signing

#: Random bytes in a new signing secret (Standard Webhooks asks for 24 to 64).
SECRET_BYTES = 32
#: How long the previous secret keeps signing after `keep_old_secret_active_for_24_hours`.
KEEP_OLD_SECRET_S = 24 * 3600
MAX_NAME_CHARS = 256
#: How long `test` waits for a worker to send the sample event and hear the answer: a
#: worker picks it up within a second or two, and a receiver has `TIMEOUT_S` to answer.
TEST_WAIT_S = 20.0
_TEST_POLL_S = 0.1
_CREATE_FIELDS = ("name", "url", "event_types")
#: `status` is our extension: "enabled" resumes an endpoint disabled after failures.
_UPDATE_FIELDS = ("name", "url", "event_types", "status")
_ROTATE_FIELDS = ("keep_old_secret_active_for_24_hours",)
_TEST_FIELDS = ("event_type",)


def new_secret() -> str:
    return signing.SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_hint(secret: str) -> str:
    """A masked hint that tells two secrets apart without revealing either."""
    return f"{signing.SECRET_PREFIX}****{secret.rstrip('=')[-4:]}"


@dataclass(frozen=True, kw_only=True, slots=True)
class WebhookTestResult:
    endpoint_id: str
    event_type: str
    status_code: int


class WebhookService:
    def __init__(self, store: WebhookStore, policy: TrustPolicy, *,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 test_wait_s: float = TEST_WAIT_S) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self.sleep = sleep
        self.test_wait_s = test_wait_s

    def _now(self) -> int:
        return int(self.clock())

    # -- endpoints ---------------------------------------------------------------------

    def create(self, project: str, body: Any) -> tuple[WebhookEndpoint, str]:
        """The new endpoint and its signing secret (shown this once)."""
        body = _object(body, _CREATE_FIELDS)
        for name in _CREATE_FIELDS:
            if body.get(name) is None:
                raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name,
                                     code="missing_required_parameter")
        now = self._now()
        secret = new_secret()
        endpoint = WebhookEndpoint(
            id=model.endpoint_id(), project=project, name=_name(body["name"]),
            url=check_webhook_url(body["url"], self.policy),
            event_types=event_types(body["event_types"]),
            secrets=SigningSecrets(current=secret), created_at=now, updated_at=now)
        self.store.insert_webhook_endpoint(endpoint)
        return endpoint, secret

    def get(self, project: str, endpoint_id: str) -> WebhookEndpoint:
        endpoint = self.store.get_webhook_endpoint(project, endpoint_id)
        if endpoint is None:
            raise _missing(endpoint_id)
        return endpoint

    def list_endpoints(self, project: str, *, after: str | None = None,
             limit: int = 20) -> Page[WebhookEndpoint]:
        if not 1 <= limit <= 100:
            raise InvalidRequest("'limit' must be between 1 and 100.", param="limit",
                                 code="invalid_value")
        return self.store.list_webhook_endpoints(project, after=after, limit=limit)

    def update(self, project: str, endpoint_id: str, body: Any) -> WebhookEndpoint:
        body = _object(body, _UPDATE_FIELDS)
        self.get(project, endpoint_id)  # 404 before the body's errors
        name = None if body.get("name") is None else _name(body["name"])
        url = None if body.get("url") is None else check_webhook_url(body["url"], self.policy)
        types = None if body.get("event_types") is None else event_types(body["event_types"])
        updated = self.store.update_webhook_endpoint(
            project, endpoint_id, name=name, url=url, event_types=types,
            enabled=_enabled(body.get("status")), now=self._now())
        if updated is None:
            raise _missing(endpoint_id)
        return updated

    def delete(self, project: str, endpoint_id: str) -> None:
        if not self.store.delete_webhook_endpoint(project, endpoint_id):
            raise _missing(endpoint_id)

    def rotate_secret(self, project: str, endpoint_id: str,
                      body: Any) -> tuple[WebhookEndpoint, str]:
        """A new signing secret (shown this once). With
        `keep_old_secret_active_for_24_hours`, deliveries carry a signature by the previous
        secret too for 24 hours, so receivers can switch without missing an event."""
        body = _object(body, _ROTATE_FIELDS)
        keep = body.get("keep_old_secret_active_for_24_hours")
        keep = False if keep is None else keep
        if not isinstance(keep, bool):
            raise InvalidRequest("Invalid type for 'keep_old_secret_active_for_24_hours': "
                                 "expected true or false.",
                                 param="keep_old_secret_active_for_24_hours",
                                 code="invalid_type")
        old = self.get(project, endpoint_id).secrets.current
        now = self._now()
        secret = new_secret()
        rotated = SigningSecrets(current=secret, previous=old if keep else None,
                                 previous_expires_at=now + KEEP_OLD_SECRET_S if keep else None)
        endpoint = self.store.set_webhook_secrets(project, endpoint_id, rotated, now=now)
        if endpoint is None:
            raise _missing(endpoint_id)
        return endpoint, secret

    # -- test events and deliveries ----------------------------------------------------

    def test(self, project: str, endpoint_id: str, body: Any) -> WebhookTestResult:
        """Send a sample event of the type asked for, through a worker as every delivery
        goes, and wait for the receiver's status code (its body is never passed on)."""
        body = _object(body, _TEST_FIELDS)
        if body.get("event_type") is None:
            raise InvalidRequest("Missing required parameter: 'event_type'.",
                                 param="event_type", code="missing_required_parameter")
        event_type = _event_type(body["event_type"], "event_type")
        endpoint = self.get(project, endpoint_id)
        delivery = self.store.emit_test_webhook_event(project, endpoint_id, event_type,
                                                      now=self._now())
        if delivery is None:
            raise _missing(endpoint_id)
        done = self._wait_for(delivery)
        if done.last_status_code is None:
            raise Conflict(f"The test event could not be delivered to {endpoint.url}: "
                           f"{done.last_error or 'no answer'}.")
        return WebhookTestResult(endpoint_id=endpoint_id, event_type=event_type,
                          status_code=done.last_status_code)

    def _wait_for(self, delivery: Delivery) -> Delivery:
        deadline = self.clock() + self.test_wait_s
        while True:
            current = self.store.get_webhook_delivery(delivery.id) or delivery
            if current.attempts > 0 or current.status is not DeliveryStatus.PENDING:
                return current
            if self.clock() >= deadline:
                raise Conflict(f"No worker sent the test event within {self.test_wait_s:g} "
                               f"seconds: deliveries are sent by the workers, and none is "
                               f"running or all are busy. It stays queued.")
            self.sleep(_TEST_POLL_S)

    def attempts(self, project: str, endpoint_id: str, *, limit: int = 20,
                 event_id: str | None = None) -> list[DeliveryAttempt]:
        if not 1 <= limit <= 100:
            raise InvalidRequest("'limit' must be between 1 and 100.", param="limit",
                                 code="invalid_value")
        self.get(project, endpoint_id)
        return self.store.list_webhook_attempts(project, endpoint_id, limit=limit,
                                                event_id=event_id)

    def redeliver(self, project: str, endpoint_id: str, event_id: str) -> Delivery:
        self.get(project, endpoint_id)
        delivery = self.store.redeliver_webhook_event(project, endpoint_id, event_id,
                                                      now=self.clock())
        if delivery is None:
            raise NotFound(f"The event '{event_id}' was never sent to the webhook endpoint "
                           f"'{endpoint_id}'.", param="event_id")
        return delivery

    # -- event types and the project's secret ------------------------------------------

    @staticmethod
    def event_types() -> list[str]:
        """The event types Batchery sends (OpenAI's batch events, then ours)."""
        return list(model.EMITTED_EVENT_TYPES)

    def project_secret(self, project: str) -> str:
        """The secret that signs the callbacks of `webhook_url`s given at create."""
        return signing.project_signing_secret(self.store, project)


# -- checks of bodies -------------------------------------------------------------------


def _object(body: Any, known: Sequence[str]) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise InvalidRequest(f"Unknown parameter: '{unknown[0]}'. Known: {', '.join(known)}.",
                             param=unknown[0], code="unknown_parameter")
    return body


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("Invalid type for 'name': expected a string.", param="name",
                             code="invalid_type")
    if not 1 <= len(value) <= MAX_NAME_CHARS:
        raise InvalidRequest(f"'name' must be 1 to {MAX_NAME_CHARS} characters long.",
                             param="name", code="invalid_value")
    return value


def event_types(value: Any) -> tuple[str, ...]:
    """A non-empty list of known event types, each once, in the order given."""
    if not isinstance(value, list):
        raise InvalidRequest("Invalid type for 'event_types': expected an array of event "
                             "types (see GET /v1/webhook_event_types).", param="event_types",
                             code="invalid_type")
    if not value:
        raise InvalidRequest("'event_types' must name at least one event type.",
                             param="event_types", code="invalid_value")
    return tuple(dict.fromkeys(_event_type(item, f"event_types[{i}]")
                               for i, item in enumerate(value)))


def _event_type(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for '{param}': expected a string.", param=param,
                             code="invalid_type")
    if value not in model.ACCEPTED_EVENT_TYPES:
        raise InvalidRequest(f"Invalid value for '{param}': '{value}' is not an event type. "
                             f"Batchery sends {', '.join(model.EMITTED_EVENT_TYPES)}; "
                             f"OpenAI's other event types are accepted too.",
                             param=param, code="invalid_value")
    return value


def _enabled(value: Any) -> bool | None:
    if value is None:
        return None
    if value not in (model.EndpointStatus.ENABLED.value, model.EndpointStatus.DISABLED.value):
        raise InvalidRequest("Invalid value for 'status': expected 'enabled' or 'disabled'.",
                             param="status", code="invalid_value")
    return bool(value == model.EndpointStatus.ENABLED.value)


def _missing(endpoint_id: str) -> NotFound:
    return NotFound(f"No webhook endpoint found with id '{endpoint_id}'.")
