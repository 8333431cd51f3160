"""`/v1/messages/batches`: Anthropic Message Batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from batchery.api import anthropic_wire as wire
from batchery.api.bodies import (
    IDEMPOTENCY_FIELD,
    IDEMPOTENCY_HEADER,
    PRIORITY_FIELD,
    SPEND_FIELDS,
    idempotency_of,
)
from batchery.api.deps import Project
from batchery.api.responses import ok, stream
from batchery.api.routes.webhooks import Webhooks
from batchery.batchapi.message_batches import MessageBatchService
from batchery.model.exceptions import InvalidRequest
from batchery.security.webhook_urls import URL_JSON_SCHEMA, optional_webhook_url

router = APIRouter()
_BLOCK = 1 << 20
#: The create body, for the OpenAPI schema (the route reads the body itself). The params are
#: checked for `model` and `stream` here; the rest when the batch runs, request by request.
_CREATE_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["requests"],
    "properties": {"requests": {
        "type": "array", "minItems": 1,
        "description": "At most 100,000 requests (or the server's --max-tasks), each with a "
                       "custom_id of its own.",
        "items": {"type": "object", "required": ["custom_id", "params"], "properties": {
            "custom_id": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
            "params": {"type": "object", "required": ["model"], "properties": {
                "model": {"type": "string"},
                "stream": {"enum": [False, None],
                           "description": "Batches do not stream."}}}}}},
        "webhook_url": {"anyOf": [URL_JSON_SCHEMA, {"type": "null"}],
                        "description": "Extension: a receiver of this batch's "
                                       "message_batch.ended event, signed with the "
                                       "project's secret (GET /v1/webhook_secret)."},
        "idempotency_key": IDEMPOTENCY_FIELD, **SPEND_FIELDS,
        "priority": PRIORITY_FIELD}}}}}
_ANSWER = "The message batch."


async def _service(request: Request) -> MessageBatchService:
    service: MessageBatchService = request.app.state.message_batches
    return service


Service = Annotated[MessageBatchService, Depends(_service)]


@router.post("/messages/batches", responses=ok(wire.MessageBatch, _ANSWER),
             openapi_extra={"requestBody": _CREATE_BODY,
                            "parameters": [IDEMPOTENCY_HEADER]})
async def create(request: Request, project: Project, service: Service,
                 webhooks: Webhooks) -> Any:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    webhook_url = optional_webhook_url(body, webhooks.policy)
    batch = await run_in_threadpool(service.create, project, body.get("requests"),
                                    webhook_url=webhook_url, max_cost=body.get("max_cost"),
                                    max_total_tokens=body.get("max_total_tokens"),
                                    idempotency=idempotency_of(request, body),
                                    priority=body.get("priority"))
    return wire.message_batch(batch, str(request.base_url))


@router.get("/messages/batches",
            responses=ok(wire.MessageBatchList, "The project's message batches, newest first."))
def list_batches(request: Request, project: Project, service: Service,
                 after_id: str | None = None, before_id: str | None = None,
                 limit: Annotated[int, Query(json_schema_extra={"minimum": 1,
                                                                "maximum": 1000})] = 20) -> Any:
    items = service.list(project, after_id=after_id, before_id=before_id, limit=limit)
    return wire.page(items, str(request.base_url))


@router.get("/messages/batches/{batch_id}", responses=ok(wire.MessageBatch, _ANSWER))
def retrieve(batch_id: str, request: Request, project: Project, service: Service) -> Any:
    return wire.message_batch(service.get(project, batch_id), str(request.base_url))


@router.post("/messages/batches/{batch_id}/cancel", responses=ok(wire.MessageBatch, _ANSWER))
def cancel(batch_id: str, request: Request, project: Project, service: Service) -> Any:
    return wire.message_batch(service.cancel(project, batch_id), str(request.base_url))


@router.post("/messages/batches/{batch_id}/pause",
             responses=ok(wire.MessageBatch, "The message batch, paused: still in_progress, "
                                             "with paused_at set (extension)."))
def pause(batch_id: str, request: Request, project: Project, service: Service) -> Any:
    """Extension: start no new request of the batch until it is resumed."""
    return wire.message_batch(service.pause(project, batch_id), str(request.base_url))


@router.post("/messages/batches/{batch_id}/resume",
             responses=ok(wire.MessageBatch, "The message batch, running again (extension)."))
def resume(batch_id: str, request: Request, project: Project, service: Service) -> Any:
    """Extension: run a paused message batch's remaining requests."""
    return wire.message_batch(service.resume(project, batch_id), str(request.base_url))


@router.delete("/messages/batches/{batch_id}",
              responses=ok(wire.MessageBatchDeleted, "The message batch is deleted."))
def delete(batch_id: str, project: Project, service: Service) -> Any:
    service.delete(project, batch_id)
    return {"id": batch_id, "type": "message_batch_deleted"}


@router.get("/messages/batches/{batch_id}/results", response_class=StreamingResponse,
            responses=stream("application/x-jsonl", "One result a line, once the batch has "
                                                     "ended."))
def results(batch_id: str, project: Project, service: Service) -> StreamingResponse:
    size, stream = service.open_results(project, batch_id)
    return StreamingResponse(_blocks(stream), media_type="application/x-jsonl",
                             headers={"Content-Length": str(size)})


def _blocks(stream: IO[bytes] | None) -> Iterator[bytes]:
    if stream is None:
        return
    with stream:
        while block := stream.read(_BLOCK):
            yield block
