"""Rendering batches as Anthropic `MessageBatch` objects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel

from batchery.model.batches import Batch, BatchStatus, EndReason
from batchery.ports.store import Page


def rfc3339(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def processing_status(status: BatchStatus) -> str:
    if status.is_terminal:
        return "ended"
    return "canceling" if status is BatchStatus.CANCELLING else "in_progress"


def request_counts(batch: Batch) -> dict[str, int]:
    if not batch.status.is_terminal:
        # Requests count as processing until the whole batch has ended.
        return {"processing": batch.total, "succeeded": 0, "errored": 0, "canceled": 0,
                "expired": 0}
    if batch.status is BatchStatus.FAILED:
        return {"processing": 0, "succeeded": 0, "errored": batch.total, "canceled": 0,
                "expired": 0}
    expired = batch.unrun if batch.end_reason is EndReason.EXPIRED else 0
    # (extension) The requests a spend ceiling stopped are `errored` results.
    over_budget = batch.unrun if batch.end_reason is EndReason.BUDGET_EXCEEDED else 0
    canceled = batch.unrun - expired - over_budget
    return {"processing": 0, "succeeded": batch.completed,
            "errored": batch.failed - batch.unrun + over_budget, "canceled": canceled,
            "expired": expired}


def ended_at(batch: Batch) -> int | None:
    return batch.completed_at or batch.cancelled_at or batch.expired_at or batch.failed_at


def message_batch(batch: Batch, base_url: str) -> dict[str, Any]:
    ended = batch.status.is_terminal
    return {
        "id": batch.id, "type": "message_batch",
        "processing_status": processing_status(batch.status),
        "request_counts": request_counts(batch),
        "created_at": rfc3339(batch.created_at), "expires_at": rfc3339(batch.expires_at),
        "ended_at": rfc3339(ended_at(batch)) if ended else None,
        "cancel_initiated_at": rfc3339(batch.cancelling_at), "archived_at": None,
        "results_url": (f"{base_url.rstrip('/')}/v1/messages/batches/{batch.id}/results"
                        if ended else None),
        # Extension: the provider's job, for a batch handed to a provider's batch API.
        "remote_job": batch.remote.get("job") if batch.remote else None,
        # Extension: the message batch whose failed requests this one reruns.
        "retry_of": batch.retry_of,
        # Extensions: a paused batch stays `in_progress` and says since when it is paused.
        "paused_at": rfc3339(batch.paused_at), "priority": batch.priority,
        "warnings": batch.warnings,
        # Extensions: tokens and cost of the requests finished so far, and the ceilings.
        "usage": {"input_tokens": batch.input_tokens, "output_tokens": batch.output_tokens},
        "cost": batch.cost, "max_cost": batch.max_cost,
        "max_total_tokens": batch.max_total_tokens,
    }


def page(items: Page[Batch], base_url: str) -> dict[str, Any]:
    data = [message_batch(b, base_url) for b in items.items]
    return {"data": data, "has_more": items.has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


# -- documentation of the objects above (the functions render them) ------------------------

class MessageBatchCounts(BaseModel):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatchUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessageBatch(BaseModel):
    id: str
    type: Literal["message_batch"]
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: MessageBatchCounts
    created_at: datetime
    expires_at: datetime | None
    ended_at: datetime | None
    cancel_initiated_at: datetime | None
    archived_at: None
    results_url: str | None
    #: Extension: the provider's job, for a batch handed to a provider's batch API.
    remote_job: Any
    #: Extension: the message batch whose failed requests this one reruns (`…/retry`).
    retry_of: str | None
    #: Extension: when the batch was paused, while it is; it stays `in_progress`.
    paused_at: datetime | None
    #: Extension: higher runs first (-1000 to 1000; 0 by default).
    priority: int
    #: Extension: sentences the caller should read (no live worker, a window at risk).
    warnings: list[str] | None
    #: Extension: the tokens of the requests finished so far.
    usage: MessageBatchUsage
    #: Extension: what they cost, in US dollars at the deployments' prices.
    cost: float
    #: Extension: the spend ceilings; crossing one stops the batch like a cancel.
    max_cost: float | None
    max_total_tokens: int | None


class MessageBatchList(BaseModel):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class MessageBatchDeleted(BaseModel):
    id: str
    type: Literal["message_batch_deleted"]
