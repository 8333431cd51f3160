"""Rendering domain values as the hosted APIs' JSON objects: every field, nulls included.

The pydantic models below only document those objects in the OpenAPI schema (the routes
render with the functions here); keep the two in step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from batchery.batchapi.estimate import METHOD, Estimate
from batchery.model.batches import Batch, BatchStatus
from batchery.model.deployments import Deployment
from batchery.model.files import FileRecord
from batchery.ports.store import Page

T = TypeVar("T")


def file_object(record: FileRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "file", "bytes": record.bytes,
            "created_at": record.created_at, "expires_at": record.expires_at,
            "filename": record.filename, "purpose": record.purpose, "status": "processed",
            "status_details": None}


def batch_object(batch: Batch) -> dict[str, Any]:
    errors = ({"object": "list", "data": [e.to_dict() for e in batch.errors]}
              if batch.errors is not None else None)
    usage = None
    if batch.status is BatchStatus.COMPLETED or batch.input_tokens or batch.output_tokens:
        usage = {"input_tokens": batch.input_tokens,
                 "input_tokens_details": {"cached_tokens": batch.cached_tokens},
                 "output_tokens": batch.output_tokens,
                 "output_tokens_details": {"reasoning_tokens": batch.reasoning_tokens},
                 "total_tokens": batch.input_tokens + batch.output_tokens}
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "model": batch.model,
        "errors": errors, "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window, "status": batch.status.value,
        "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "created_at": batch.created_at, "in_progress_at": batch.in_progress_at,
        "expires_at": batch.expires_at, "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at, "failed_at": batch.failed_at,
        "expired_at": batch.expired_at, "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "request_counts": {"total": batch.total, "completed": batch.completed,
                           "failed": batch.failed},
        "usage": usage, "metadata": batch.metadata,
        # Extension: the provider's job, for a batch handed to a provider's batch API.
        "remote_job": batch.remote.get("job") if batch.remote else None,
        # Extension: the batch whose failed lines this one reruns (POST …/retry).
        "retry_of": batch.retry_of,
        # Extensions: the claim order, a pause, and what the caller should know.
        "priority": batch.priority, "paused_at": batch.paused_at, "warnings": batch.warnings,
        # Extensions: what the lines finished so far cost, and the spend ceilings.
        "cost": batch.cost, "max_cost": batch.max_cost,
        "max_total_tokens": batch.max_total_tokens,
    }


def cost_estimate_object(found: Estimate) -> dict[str, Any]:
    """(extension) A file's estimate, as `GET /v1/files/{id}/cost_estimate` answers it."""
    return {"object": "batch.cost_estimate", "file_id": found.file_id, "model": found.model,
            "requests": found.requests, "invalid_lines": found.invalid_lines,
            "input_tokens": found.input_tokens, "cost": found.cost, "currency": "usd",
            "models": [{"model": m.model, "requests": m.requests,
                        "input_tokens": m.input_tokens, "prices": m.prices, "cost": m.cost}
                       for m in found.models.values()],
            "method": METHOD}


def model_object(deployment: Deployment, endpoints: Iterable[str] = ()) -> dict[str, Any]:
    return {"id": deployment.name, "object": "model", "created": 0, "owned_by": "batchery",
            "backend": deployment.backend, "endpoints": sorted(endpoints),
            "prices": deployment.prices}


def list_object(items: Sequence[T], render: Callable[[T], dict[str, Any]],
                has_more: bool = False) -> dict[str, Any]:
    data = [render(i) for i in items]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def page_object(page: Page[T], render: Callable[[T], dict[str, Any]]) -> dict[str, Any]:
    return list_object(page.items, render, page.has_more)


# -- documentation of the objects above ----------------------------------------------------

class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: Literal["processed"]
    status_details: None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: Literal[True]


class BatchLineError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchLineError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: Usage | None
    metadata: dict[str, str] | None
    #: Extension: the provider's job, for a batch handed to a provider's batch API.
    remote_job: Any
    #: Extension: the batch whose failed lines this one reruns (`POST /v1/batches/{id}/retry`).
    retry_of: str | None
    #: Extension: higher runs first (-1000 to 1000; 0 by default).
    priority: int
    #: Extension: when the batch was paused, while it is (or will be, once validated).
    paused_at: int | None
    #: Extension: sentences the caller should read (no live worker, a window at risk).
    warnings: list[str] | None
    #: Extension: what the lines finished so far cost, in US dollars at the prices of their
    #: deployments (0 when none has prices).
    cost: float
    #: Extension: the spend ceilings; crossing one stops the batch like a cancel.
    max_cost: float | None
    max_total_tokens: int | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ModelCostEstimate(BaseModel):
    model: str
    requests: int
    input_tokens: int
    #: US dollars per million `input` and `output` tokens; null when the model has none.
    prices: dict[str, float] | None
    #: The input cost in US dollars; null when the model has no prices.
    cost: float | None


class CostEstimate(BaseModel):
    """Extension: a batch input file's input tokens and cost, estimated."""

    object: Literal["batch.cost_estimate"]
    file_id: str
    #: The model every request was priced at; null: each at its line's `body.model`.
    model: str | None
    requests: int
    #: Lines that are no JSON request with a body (a batch would fail validation).
    invalid_lines: int
    input_tokens: int
    #: The input cost in US dollars; null unless every model has prices.
    cost: float | None
    currency: Literal["usd"]
    models: list[ModelCostEstimate]
    #: How the tokens were estimated.
    method: str


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    backend: str
    #: Extension: the batch endpoints whose lines this model answers.
    endpoints: list[str]
    #: Extension: US dollars per million `input` and `output` tokens, if declared.
    prices: dict[str, float] | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
