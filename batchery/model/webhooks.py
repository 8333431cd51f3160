"""Webhooks: the domain values, the event type names and the event payloads.

An *event* (`evt_…`) is one thing that happened (a batch completed). It is recorded once, with
the exact JSON body every attempt sends, in the same transaction as the state change that
causes it. A *delivery* is that event owed to one receiver: a webhook endpoint of the event's
project, or the `webhook_url` a batch, message batch or job named at create. Every attempt of
a delivery is recorded; all attempts of one event carry the event's id as `webhook-id`.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchery.model.batches import MESSAGES_ENDPOINT, BatchStatus

# -- event types -----------------------------------------------------------------------

BATCH_COMPLETED = "batch.completed"
BATCH_FAILED = "batch.failed"
BATCH_EXPIRED = "batch.expired"
BATCH_CANCELLED = "batch.cancelled"
MESSAGE_BATCH_ENDED = "message_batch.ended"
JOB_SUCCEEDED = "job.succeeded"
JOB_COMPLETED_WITH_FAILURES = "job.completed_with_failures"
JOB_FAILED = "job.failed"
JOB_STOPPED = "job.stopped"
JOB_TIMED_OUT = "job.timed_out"

#: OpenAI's batch events, which Batchery sends for `/v1/batches` batches.
BATCH_EVENT_TYPES = (BATCH_COMPLETED, BATCH_FAILED, BATCH_EXPIRED, BATCH_CANCELLED)
#: Our extra event types: Anthropic message batches and native jobs.
JOB_EVENT_TYPES = (JOB_SUCCEEDED, JOB_COMPLETED_WITH_FAILURES, JOB_FAILED, JOB_STOPPED,
                   JOB_TIMED_OUT)
EXTRA_EVENT_TYPES = (MESSAGE_BATCH_ENDED, *JOB_EVENT_TYPES)
#: Every event type Batchery emits, in the order `GET /v1/webhook_event_types` lists them.
EMITTED_EVENT_TYPES = (*BATCH_EVENT_TYPES, *EXTRA_EVENT_TYPES)
#: Every event type the installed OpenAI SDK may name in `event_types`. An endpoint may
#: subscribe to those Batchery never emits (so code written for OpenAI works unchanged).
OPENAI_EVENT_TYPES = (
    *BATCH_EVENT_TYPES,
    "response.completed", "response.failed", "response.cancelled", "response.incomplete",
    "eval.run.succeeded", "eval.run.failed", "eval.run.canceled",
    "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled",
    "realtime.call.incoming", "video.completed", "video.failed",
    "agent.environment.ready", "agent.environment.failed", "agent.environment.suspended",
    "agent.environment.expired", "agent.session.created", "agent.session.action_required",
    "agent.session.in_progress", "agent.session.idle", "agent.session.failed",
    "safety.alert.created",
)
#: What `event_types` (create, update) and `event_type` (test) accept; anything else is a 400.
ACCEPTED_EVENT_TYPES = frozenset(OPENAI_EVENT_TYPES) | frozenset(EXTRA_EVENT_TYPES)

_BATCH_EVENTS = {BatchStatus.COMPLETED: BATCH_COMPLETED, BatchStatus.FAILED: BATCH_FAILED,
                 BatchStatus.EXPIRED: BATCH_EXPIRED, BatchStatus.CANCELLED: BATCH_CANCELLED}
_JOB_EVENTS = {"succeeded": JOB_SUCCEEDED, "completed_with_failures": JOB_COMPLETED_WITH_FAILURES,
               "failed": JOB_FAILED, "stopped": JOB_STOPPED, "timed_out": JOB_TIMED_OUT}


def batch_event_type(status: BatchStatus, endpoint: str) -> str | None:
    """The event a batch reaching `status` emits, or None if `status` is not terminal."""
    if status not in _BATCH_EVENTS:
        return None
    return MESSAGE_BATCH_ENDED if endpoint == MESSAGES_ENDPOINT else _BATCH_EVENTS[status]


def job_event_type(status: str) -> str | None:
    """The event a job reaching `status` (a `JobStatus` value) emits, or None if not ended."""
    return _JOB_EVENTS.get(str(status))


# -- constants of delivery ---------------------------------------------------------------

#: Consecutive failed attempts after which an endpoint is disabled.
DISABLE_AFTER_FAILURES = 20
#: How long a delivery is retried, from when it was queued, before it is given up.
RETRY_FOR_S = 72 * 3600
#: Environment variable: the first retry's delay in seconds (tests shorten it).
RETRY_BASE_ENV = "BATCHERY_WEBHOOK_RETRY_BASE_S"
DEFAULT_RETRY_BASE_S = 30.0
#: The longest delay between two attempts, before jitter.
MAX_RETRY_DELAY_S = 3600.0
#: Seconds a receiver has to answer (connect, send, read together).
TIMEOUT_S = 5.0
#: `disabled_reason` of an endpoint disabled for failing.
DISABLED_FOR_FAILURES = (f"disabled after {DISABLE_AFTER_FAILURES} consecutive failed "
                         "deliveries; update the endpoint with status 'enabled' to resume")


def event_id() -> str:
    return "evt_" + secrets.token_hex(16)


def endpoint_id() -> str:
    return "we_" + secrets.token_hex(16)


class EndpointStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"  #: too many consecutive failures; deliveries wait until re-enabled


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  #: due at `next_attempt_at` (or leased by a worker now)
    SUCCEEDED = "succeeded"  #: a 2xx answer
    FAILED = "failed"  #: given up (retried for `RETRY_FOR_S`); a redeliver queues it again


@dataclass(frozen=True, kw_only=True, slots=True)
class SigningSecrets:
    """An endpoint's signing secrets (`whsec_…`): the current one, and during a rotation
    with `keep_old_secret_active_for_24_hours` the previous one until `previous_expires_at`."""

    current: str
    previous: str | None = None
    previous_expires_at: int | None = None

    def active(self, now: float) -> list[str]:
        """The secrets that sign a delivery at `now` (both during a rotation)."""
        keep = (self.previous is not None and self.previous_expires_at is not None
                and now < self.previous_expires_at)
        return [self.current, self.previous] if keep and self.previous else [self.current]


@dataclass(frozen=True, kw_only=True, slots=True)
class WebhookEndpoint:
    id: str
    project: str
    name: str
    url: str
    event_types: tuple[str, ...]
    secrets: SigningSecrets
    created_at: int
    updated_at: int
    status: EndpointStatus = EndpointStatus.ENABLED
    disabled_reason: str | None = None
    consecutive_failures: int = 0

    def wants(self, event_type: str) -> bool:
        return self.status is EndpointStatus.ENABLED and event_type in self.event_types


@dataclass(frozen=True, kw_only=True, slots=True)
class WebhookEvent:
    """One event. `body` is the exact JSON every attempt sends (and signs)."""

    id: str
    project: str
    type: str
    created_at: int
    data: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """OpenAI's shape: `{id, object: "event", created_at, type, data}`."""
        return {"id": self.id, "object": "event", "created_at": self.created_at,
                "type": self.type, "data": self.data}

    @property
    def body(self) -> str:
        return orjson.dumps(self.payload()).decode()


def new_event(project: str, event_type: str, object_id: str, now: int) -> WebhookEvent:
    return WebhookEvent(id=event_id(), project=project, type=event_type, created_at=now,
                        data={"id": object_id})


_SAMPLE_PREFIX = {"batch": "batch_", "message_batch": "msgbatch_", "job": "job_"}


def sample_event(project: str, event_type: str, now: int) -> WebhookEvent:
    """The sample event `POST /v1/webhook_endpoints/{id}/test` sends: a made-up object id."""
    prefix = _SAMPLE_PREFIX.get(event_type.split(".")[0], "obj_")
    return new_event(project, event_type, prefix + "test_" + secrets.token_hex(8), now)


@dataclass(frozen=True, kw_only=True, slots=True)
class Delivery:
    """One event owed to one receiver. `endpoint_id` is None for a per-object callback
    (the `webhook_url` given at create), which is signed with the project's secret."""

    id: int
    event_id: str
    event_type: str
    project: str
    endpoint_id: str | None
    url: str
    status: DeliveryStatus
    attempts: int
    created_at: float
    next_attempt_at: float | None
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    #: A sample event from `POST …/test`: attempted once, never counted towards disabling.
    test: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryAttempt:
    """One recorded attempt. `status_code` is None when no answer came (timeout, refused);
    `error` then says what happened, in our words (the receiver's body is never kept)."""

    event_id: str
    event_type: str
    endpoint_id: str | None
    url: str
    attempt: int
    created_at: float
    success: bool
    status_code: int | None
    latency_ms: int | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"object": "webhook_delivery_attempt", "event_id": self.event_id,
                "event_type": self.event_type, "webhook_endpoint_id": self.endpoint_id,
                "url": self.url, "attempt": self.attempt, "created_at": int(self.created_at),
                "success": self.success, "status_code": self.status_code,
                "latency_ms": self.latency_ms, "error": self.error}


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryClaim:
    """A worker's lease on one due delivery: what to send, where, signed with what."""

    delivery: Delivery
    token: str
    body: str
    #: The endpoint's state when claimed (secrets included); None for a per-object callback.
    endpoint: WebhookEndpoint | None


@dataclass(frozen=True, kw_only=True, slots=True)
class AttemptResult:
    success: bool
    status_code: int | None
    latency_ms: int
    error: str | None
