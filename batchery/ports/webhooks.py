"""The webhook store ports.

`WebhookStore` is what the API's use cases need (endpoints, secrets, delivery history,
redelivery, test events, the server's stored secret). `WebhookOutbox` is what the delivery
loop in the workers needs (claim a due delivery under a lease, record its attempt).
`SqlStore` implements both. Events themselves are written by the store, inside the
transaction that moves a batch, message batch or job to its end (there is no method to
forget to call); `emit_webhook_event` exists for tests and tools.

Every method taking `project` treats None as "any project" (the admin's view); with a
project, another project's endpoint is absent (None / False), as if it did not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from batchery.model.paging import Page
from batchery.model.webhooks import (
    AttemptResult,
    Delivery,
    DeliveryAttempt,
    DeliveryClaim,
    SigningSecrets,
    WebhookEndpoint,
    WebhookEvent,
)


class WebhookStore(Protocol):
    # -- endpoints ---------------------------------------------------------------------

    def insert_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None:
        """Record a new endpoint (its secrets are stored sealed when a key is set)."""

    def get_webhook_endpoint(self, project: str | None,
                             endpoint_id: str) -> WebhookEndpoint | None: ...

    def list_webhook_endpoints(self, project: str | None, *, after: str | None,
                               limit: int) -> Page[WebhookEndpoint]:
        """Newest first; `after` is the id of the last endpoint of the previous page."""

    def update_webhook_endpoint(self, project: str | None, endpoint_id: str, *,
                                name: str | None = None, url: str | None = None,
                                event_types: Sequence[str] | None = None,
                                enabled: bool | None = None,
                                now: int) -> WebhookEndpoint | None:
        """Change the fields given (None: unchanged). `updated_at` becomes `now` only if a
        value actually changed. `enabled=True` re-enables a disabled endpoint (its failure
        count restarts and its waiting deliveries resume); `enabled=False` disables it."""

    def delete_webhook_endpoint(self, project: str | None, endpoint_id: str) -> bool:
        """Delete the endpoint with its pending deliveries and attempt history."""

    def set_webhook_secrets(self, project: str | None, endpoint_id: str,
                            secrets: SigningSecrets, *, now: int) -> WebhookEndpoint | None:
        """Replace the endpoint's secrets (a rotation); `updated_at` becomes `now`."""

    # -- deliveries --------------------------------------------------------------------

    def list_webhook_attempts(self, project: str | None, endpoint_id: str, *, limit: int,
                              event_id: str | None = None) -> list[DeliveryAttempt]:
        """The endpoint's most recent attempts, newest first (optionally of one event)."""

    def redeliver_webhook_event(self, project: str | None, endpoint_id: str, event_id: str,
                                *, now: float) -> Delivery | None:
        """Queue the event to the endpoint again (due now, with the same `webhook-id`, a
        fresh retry window). None if the event was never owed to this endpoint."""

    def emit_test_webhook_event(self, project: str | None, endpoint_id: str,
                                event_type: str, *, now: int) -> Delivery | None:
        """Queue a sample event of `event_type` to this endpoint only (whatever it
        subscribes to, even if disabled). A test delivery is attempted once and never
        counts towards disabling the endpoint. None if the endpoint is absent. Poll
        `get_webhook_delivery` for its outcome (`last_status_code`)."""

    def get_webhook_delivery(self, delivery_id: int) -> Delivery | None: ...

    # -- the server's secret -----------------------------------------------------------

    def get_or_create_server_secret(self) -> str:
        """The server's random secret (made and stored once, on first use), used to derive
        per-project signing secrets when `BATCHERY_SECRET_KEY` is not set."""


@runtime_checkable
class WebhookOutbox(Protocol):
    def emit_webhook_event(self, event: WebhookEvent, *,
                           webhook_url: str | None = None) -> list[Delivery]:
        """Record `event` and a delivery to each enabled endpoint of its project that
        subscribes to its type, plus one to `webhook_url` if given."""

    def claim_webhook_delivery(self, owner: str, lease_s: float) -> DeliveryClaim | None:
        """Lease the next due delivery (SKIP LOCKED on PostgreSQL), or None if none is due."""

    def record_webhook_attempt(self, claim: DeliveryClaim, result: AttemptResult, *,
                               retry_in: float | None) -> bool:
        """Record one attempt and end the lease: succeeded on `result.success`; else due
        again in `retry_in` seconds (by the database's clock), or failed (given up) if it
        is None or the delivery is a test. Counts the endpoint's consecutive failures and
        disables it at `DISABLE_AFTER_FAILURES`. False if the lease was lost (then nothing
        is recorded)."""

    def get_or_create_server_secret(self) -> str: ...
