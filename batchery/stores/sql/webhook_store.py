"""The webhook store on SQLAlchemy Core: mixed into `SqlStore`, whose engine and database
clock it shares. `emit_event` is called by the batch and job stores inside the transaction
that ends a batch or job, so an event is recorded exactly when its cause commits."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import IntegrityError

from batchery.model import ids
from batchery.model import webhooks as model
from batchery.model.exceptions import ConfigError
from batchery.model.paging import Page
from batchery.model.webhooks import (
    AttemptResult,
    Delivery,
    DeliveryAttempt,
    DeliveryClaim,
    DeliveryStatus,
    EndpointStatus,
    SigningSecrets,
    WebhookEndpoint,
    WebhookEvent,
)
from batchery.security.secrets import SecretBox
from batchery.stores.sql.tables import (
    server_secrets,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
    webhook_events,
)

_d = webhook_deliveries
_e = webhook_endpoints
_PENDING = DeliveryStatus.PENDING.value
#: The name of the webhook server secret in `server_secrets`.
_SERVER_SECRET = "webhooks"


class SqlWebhookStore:
    engine: Engine
    _now: sa.ColumnElement[float]

    # -- endpoints ---------------------------------------------------------------------

    def insert_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None:
        with self.engine.begin() as conn:
            conn.execute(_e.insert().values(
                id=endpoint.id, project=endpoint.project, name=endpoint.name, url=endpoint.url,
                event_types=list(endpoint.event_types), created_at=endpoint.created_at,
                updated_at=endpoint.updated_at, status=endpoint.status.value,
                disabled_reason=endpoint.disabled_reason,
                consecutive_failures=endpoint.consecutive_failures,
                **_secret_columns(endpoint.secrets)))

    def get_webhook_endpoint(self, project: str | None,
                             endpoint_id: str) -> WebhookEndpoint | None:
        with self.engine.begin() as conn:
            row = _endpoint_row(conn, project, endpoint_id)
        return _endpoint(row) if row else None

    def list_webhook_endpoints(self, project: str | None, *, after: str | None,
                               limit: int) -> Page[WebhookEndpoint]:
        query = _e.select()
        if project is not None:
            query = query.where(_e.c.project == project)
        if after:
            # Only an id the caller may see anchors a page; another project's pages as unknown.
            anchor = sa.select(_e.c.seq).where(_e.c.id == after)
            if project is not None:
                anchor = anchor.where(_e.c.project == project)
            query = query.where(_e.c.seq < anchor.scalar_subquery())
        query = query.order_by(_e.c.seq.desc()).limit(limit + 1)
        with self.engine.begin() as conn:
            rows = list(conn.execute(query).mappings())
        return Page([_endpoint(r) for r in rows[:limit]], len(rows) > limit)

    def update_webhook_endpoint(self, project: str | None, endpoint_id: str, *,
                                name: str | None = None, url: str | None = None,
                                event_types: Sequence[str] | None = None,
                                enabled: bool | None = None,
                                now: int) -> WebhookEndpoint | None:
        with self.engine.begin() as conn:
            row = _endpoint_row(conn, project, endpoint_id, lock=True)
            if row is None:
                return None
            changes = _changes(row, name, url, event_types, enabled)
            if changes:
                conn.execute(_e.update().where(_e.c.id == endpoint_id)
                             .values(updated_at=now, **changes))
                row = _endpoint_row(conn, None, endpoint_id)
        return _endpoint(row) if row else None

    def delete_webhook_endpoint(self, project: str | None, endpoint_id: str) -> bool:
        with self.engine.begin() as conn:
            if _endpoint_row(conn, project, endpoint_id, lock=True) is None:
                return False
            conn.execute(webhook_attempts.delete().where(
                webhook_attempts.c.endpoint_id == endpoint_id))
            conn.execute(_d.delete().where(_d.c.endpoint_id == endpoint_id))
            conn.execute(_e.delete().where(_e.c.id == endpoint_id))
        return True

    def set_webhook_secrets(self, project: str | None, endpoint_id: str,
                            secrets: SigningSecrets, *, now: int) -> WebhookEndpoint | None:
        with self.engine.begin() as conn:
            if _endpoint_row(conn, project, endpoint_id, lock=True) is None:
                return None
            conn.execute(_e.update().where(_e.c.id == endpoint_id).values(
                updated_at=now, **_secret_columns(secrets)))
            row = _endpoint_row(conn, None, endpoint_id)
        return _endpoint(row) if row else None

    # -- deliveries: what the API reads and asks for ----------------------------------

    def list_webhook_attempts(self, project: str | None, endpoint_id: str, *, limit: int,
                              event_id: str | None = None) -> list[DeliveryAttempt]:
        a = webhook_attempts
        query = a.select().where(a.c.endpoint_id == endpoint_id)
        if event_id is not None:
            query = query.where(a.c.event_id == event_id)
        with self.engine.begin() as conn:
            if _endpoint_row(conn, project, endpoint_id) is None:
                return []
            rows = conn.execute(query.order_by(a.c.id.desc()).limit(limit)).mappings()
            return [_attempt(r) for r in rows]

    def redeliver_webhook_event(self, project: str | None, endpoint_id: str, event_id: str,
                                *, now: float) -> Delivery | None:
        with self.engine.begin() as conn:
            if _endpoint_row(conn, project, endpoint_id) is None:
                return None
            row = conn.execute(_deliveries().where(
                _d.c.endpoint_id == endpoint_id, _d.c.event_id == event_id,
            ).order_by(_d.c.id.desc()).limit(1)).mappings().first()
            if row is None:
                return None
            if row["status"] != _PENDING:
                # A pending one is queued (or in flight) already: leave its lease alone.
                conn.execute(_d.update().where(_d.c.id == row["id"]).values(
                    status=_PENDING, created_at=now, next_attempt_at=now, lease_owner=None,
                    lease_token=None, lease_expires_at=None))
            return _delivery_by_id(conn, row["id"])

    def emit_test_webhook_event(self, project: str | None, endpoint_id: str,
                                event_type: str, *, now: int) -> Delivery | None:
        with self.engine.begin() as conn:
            row = _endpoint_row(conn, project, endpoint_id)
            if row is None:
                return None
            event = model.sample_event(row["project"], event_type, now)
            _insert_event(conn, event)
            return _delivery_by_id(conn, _insert_delivery(
                conn, event, endpoint_id, row["url"], test=True))

    def get_webhook_delivery(self, delivery_id: int) -> Delivery | None:
        with self.engine.begin() as conn:
            return _delivery_by_id(conn, delivery_id)

    def get_or_create_server_secret(self) -> str:
        query = sa.select(server_secrets.c.value).where(server_secrets.c.name == _SERVER_SECRET)
        with self.engine.begin() as conn:
            found = conn.execute(query).scalar()
        if found is not None:
            return str(found)
        try:
            with self.engine.begin() as conn:
                conn.execute(server_secrets.insert().values(
                    name=_SERVER_SECRET, value=secrets.token_urlsafe(32)))
        except IntegrityError:
            pass  # another process made it first: theirs is the one
        with self.engine.begin() as conn:
            return str(conn.execute(query).scalar_one())

    # -- the outbox: what the delivery loop needs --------------------------------------

    def emit_webhook_event(self, event: WebhookEvent, *,
                           webhook_url: str | None = None) -> list[Delivery]:
        with self.engine.begin() as conn:
            return [d for i in emit_event(conn, event, webhook_url)
                    if (d := _delivery_by_id(conn, i)) is not None]

    def claim_webhook_delivery(self, owner: str, lease_s: float) -> DeliveryClaim | None:
        enabled = sa.exists().where(_e.c.id == _d.c.endpoint_id,
                                    _e.c.status == EndpointStatus.ENABLED.value)
        candidate = (sa.select(_d.c.id)
                     .where(_d.c.status == _PENDING, _d.c.next_attempt_at <= self._now,
                            sa.or_(_d.c.lease_expires_at.is_(None),
                                   _d.c.lease_expires_at < self._now),
                            sa.or_(_d.c.endpoint_id.is_(None), _d.c.test, enabled))
                     .order_by(_d.c.next_attempt_at, _d.c.id).limit(1)
                     .with_for_update(skip_locked=True))
        token = ids.lease_token()
        with self.engine.begin() as conn:
            delivery_id = conn.execute(candidate).scalar()
            if delivery_id is None:
                return None
            conn.execute(_d.update().where(_d.c.id == delivery_id).values(
                lease_owner=owner, lease_token=token, lease_expires_at=self._now + lease_s))
            delivery = _delivery_by_id(conn, delivery_id)
            assert delivery is not None
            body = conn.execute(sa.select(webhook_events.c.body).where(
                webhook_events.c.id == delivery.event_id)).scalar_one()
            endpoint = None
            if delivery.endpoint_id is not None:
                row = _endpoint_row(conn, None, delivery.endpoint_id)
                endpoint = _endpoint(row) if row else None
        return DeliveryClaim(delivery=delivery, token=token, body=body, endpoint=endpoint)

    def record_webhook_attempt(self, claim: DeliveryClaim, result: AttemptResult, *,
                               retry_in: float | None) -> bool:
        delivery = claim.delivery
        give_up = retry_in is None or delivery.test
        status = (DeliveryStatus.SUCCEEDED if result.success
                  else DeliveryStatus.FAILED if give_up else DeliveryStatus.PENDING)
        with self.engine.begin() as conn:
            fenced = conn.execute(_d.update().where(
                _d.c.id == delivery.id, _d.c.lease_token == claim.token,
                _d.c.status == _PENDING,
            ).values(status=status.value, attempts=_d.c.attempts + 1, lease_owner=None,
                     lease_token=None, lease_expires_at=None,
                     next_attempt_at=(self._now + retry_in
                                      if status is DeliveryStatus.PENDING
                                      and retry_in is not None else _d.c.next_attempt_at),
                     last_status_code=result.status_code, last_error=result.error,
                     delivered_at=self._now if result.success else None))
            if fenced.rowcount != 1:
                return False
            url = claim.endpoint.url if claim.endpoint is not None else delivery.url
            conn.execute(webhook_attempts.insert().values(
                delivery_id=delivery.id, event_id=delivery.event_id,
                event_type=delivery.event_type, endpoint_id=delivery.endpoint_id, url=url,
                attempt=delivery.attempts + 1, created_at=self._now, success=result.success,
                status_code=result.status_code, latency_ms=result.latency_ms,
                error=result.error))
            if delivery.endpoint_id is not None and not delivery.test:
                _count_outcome(conn, delivery.endpoint_id, result.success)
        return True


# -- helpers that run inside a transaction -------------------------------------------------

def emit_event(conn: Connection, event: WebhookEvent, webhook_url: str | None) -> list[int]:
    """Record `event` with a delivery to each enabled endpoint of its project subscribed to
    its type, and to `webhook_url`. Records nothing when nobody is to receive it. Returns
    the deliveries' ids."""
    rows = conn.execute(sa.select(_e.c.id, _e.c.url, _e.c.event_types).where(
        _e.c.project == event.project, _e.c.status == EndpointStatus.ENABLED.value)
        .order_by(_e.c.seq))
    targets: list[tuple[str | None, str]] = [
        (r.id, r.url) for r in rows if event.type in (r.event_types or ())]
    if webhook_url:
        targets.append((None, webhook_url))
    if not targets:
        return []
    _insert_event(conn, event)
    return [_insert_delivery(conn, event, endpoint_id, url) for endpoint_id, url in targets]


def _insert_event(conn: Connection, event: WebhookEvent) -> None:
    conn.execute(webhook_events.insert().values(
        id=event.id, project=event.project, type=event.type, created_at=event.created_at,
        body=event.body))


def _insert_delivery(conn: Connection, event: WebhookEvent, endpoint_id: str | None,
                     url: str, *, test: bool = False) -> int:
    # Due at once: 0 is before any clock, the database's included.
    result = conn.execute(_d.insert().values(
        event_id=event.id, project=event.project, endpoint_id=endpoint_id, url=url,
        test=test, status=_PENDING, attempts=0, created_at=float(event.created_at),
        next_attempt_at=0.0).returning(_d.c.id))
    return int(result.scalar_one())


def _count_outcome(conn: Connection, endpoint_id: str, success: bool) -> None:
    """Count the endpoint's consecutive failures; disable it when there are too many."""
    if success:
        conn.execute(_e.update().where(_e.c.id == endpoint_id, _e.c.consecutive_failures != 0)
                     .values(consecutive_failures=0))
        return
    conn.execute(_e.update().where(_e.c.id == endpoint_id)
                 .values(consecutive_failures=_e.c.consecutive_failures + 1))
    conn.execute(_e.update().where(
        _e.c.id == endpoint_id, _e.c.status == EndpointStatus.ENABLED.value,
        _e.c.consecutive_failures >= model.DISABLE_AFTER_FAILURES,
    ).values(status=EndpointStatus.DISABLED.value,
             disabled_reason=model.DISABLED_FOR_FAILURES))


def _endpoint_row(conn: Connection, project: str | None, endpoint_id: str, *,
                  lock: bool = False) -> RowMapping | None:
    query = _e.select().where(_e.c.id == endpoint_id)
    if project is not None:
        query = query.where(_e.c.project == project)
    if lock:
        query = query.with_for_update()
    return conn.execute(query).mappings().first()


def _changes(row: RowMapping, name: str | None, url: str | None,
             event_types: Sequence[str] | None, enabled: bool | None) -> dict[str, Any]:
    """The columns an update changes; empty when it changes nothing."""
    changes: dict[str, Any] = {}
    if name is not None and name != row["name"]:
        changes["name"] = name
    if url is not None and url != row["url"]:
        changes["url"] = url
    if event_types is not None and list(event_types) != list(row["event_types"]):
        changes["event_types"] = list(event_types)
    status = (None if enabled is None
              else EndpointStatus.ENABLED if enabled else EndpointStatus.DISABLED)
    if status is not None and status.value != row["status"]:
        changes["status"] = status.value
        changes["consecutive_failures"] = 0
        changes["disabled_reason"] = (None if enabled
                                      else "disabled by an update of the endpoint")
    return changes


def _seal(value: str) -> Any:
    box = SecretBox.from_env()
    return box.seal(value) if box is not None else value


def _unseal(value: Any) -> str:
    if isinstance(value, dict):
        box = SecretBox.from_env()
        if box is None:
            raise ConfigError("a webhook endpoint's signing secret is stored encrypted but "
                              "BATCHERY_SECRET_KEY is not set in this process's environment")
        return box.open(value)
    return str(value)


def _secret_columns(secrets: SigningSecrets) -> dict[str, Any]:
    return {"secret": _seal(secrets.current),
            "previous_secret": _seal(secrets.previous) if secrets.previous else None,
            "previous_expires_at": secrets.previous_expires_at if secrets.previous else None}


def _endpoint(row: RowMapping) -> WebhookEndpoint:
    previous = row["previous_secret"]
    signing = SigningSecrets(current=_unseal(row["secret"]),
                             previous=_unseal(previous) if previous is not None else None,
                             previous_expires_at=row["previous_expires_at"])
    return WebhookEndpoint(
        id=row["id"], project=row["project"], name=row["name"], url=row["url"],
        event_types=tuple(row["event_types"]), secrets=signing, created_at=row["created_at"],
        updated_at=row["updated_at"], status=EndpointStatus(row["status"]),
        disabled_reason=row["disabled_reason"],
        consecutive_failures=row["consecutive_failures"])


def _deliveries() -> sa.Select[Any]:
    return (sa.select(_d, webhook_events.c.type.label("event_type"))
            .join(webhook_events, webhook_events.c.id == _d.c.event_id))


def _delivery_by_id(conn: Connection, delivery_id: int) -> Delivery | None:
    row = conn.execute(_deliveries().where(_d.c.id == delivery_id)).mappings().first()
    return _delivery(row) if row else None


def _delivery(row: RowMapping) -> Delivery:
    return Delivery(id=row["id"], event_id=row["event_id"], event_type=row["event_type"],
                    project=row["project"], endpoint_id=row["endpoint_id"], url=row["url"],
                    status=DeliveryStatus(row["status"]), attempts=row["attempts"],
                    created_at=row["created_at"], next_attempt_at=row["next_attempt_at"],
                    last_status_code=row["last_status_code"], last_error=row["last_error"],
                    delivered_at=row["delivered_at"], test=bool(row["test"]))


def _attempt(row: RowMapping) -> DeliveryAttempt:
    return DeliveryAttempt(event_id=row["event_id"], event_type=row["event_type"],
                           endpoint_id=row["endpoint_id"], url=row["url"],
                           attempt=row["attempt"], created_at=row["created_at"],
                           success=bool(row["success"]), status_code=row["status_code"],
                           latency_ms=row["latency_ms"], error=row["error"])
