"""`/v1/batches`: create, list, retrieve and cancel batches."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from batchery.api import wire
from batchery.api.bodies import (
    IDEMPOTENCY_FIELD,
    IDEMPOTENCY_HEADER,
    PRIORITY_FIELD,
    SPEND_FIELDS,
    idempotency_of,
    json_body,
)
from batchery.api.deps import Project, Service, read
from batchery.api.responses import JSONResponse, ok
from batchery.api.routes.webhooks import Webhooks
from batchery.batchapi.service import MAX_METADATA_PAIRS
from batchery.model.batches import SUPPORTED_ENDPOINTS
from batchery.model.exceptions import InvalidRequest
from batchery.model.files import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S
from batchery.security.webhook_urls import URL_JSON_SCHEMA, optional_webhook_url

router = APIRouter()
#: `completion_window`: a whole number and a unit, up to 30 days (`batches.window_seconds`).
_WINDOW = ("^(([1-9][0-9]{0,5}|1[0-9]{6}|2[0-4][0-9]{5}|25[0-8][0-9]{4}|259[01][0-9]{3}"
           "|2592000)s|([1-9][0-9]{0,3}|[1-3][0-9]{4}|4[0-2][0-9]{3}|43[01][0-9]{2}|43200)m"
           "|([1-9][0-9]?|[1-6][0-9]{2}|7[01][0-9]|720)h|([1-9]|[12][0-9]|30)d)$")
#: The create body, for the OpenAPI schema (the route reads the body itself).
_CREATE_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["input_file_id", "endpoint"],
    "properties": {
        "input_file_id": {"type": "string",
                          "description": "A file uploaded with purpose 'batch'."},
        # Azure OpenAI's spelling, without `/v1`, is accepted too.
        "endpoint": {"type": "string", "enum": [*SUPPORTED_ENDPOINTS, *(
            e.removeprefix("/v1") for e in SUPPORTED_ENDPOINTS)]},
        "completion_window": {"type": "string", "pattern": _WINDOW, "default": "24h"},
        "metadata": {"type": ["object", "null"], "maxProperties": MAX_METADATA_PAIRS,
                     "propertyNames": {"maxLength": 64},
                     "additionalProperties": {"type": "string", "maxLength": 512}},
        "output_expires_after": {
            "type": ["object", "null"], "required": ["anchor", "seconds"],
            "properties": {"anchor": {"const": "created_at"},
                           "seconds": {"type": "integer", "minimum": MIN_EXPIRES_AFTER_S,
                                       "maximum": MAX_EXPIRES_AFTER_S}}},
        "webhook_url": {"anyOf": [URL_JSON_SCHEMA, {"type": "null"}],
                        "description": "Extension: one more receiver of this batch's end "
                                       "event, signed with the project's secret "
                                       "(GET /v1/webhook_secret)."},
        "idempotency_key": IDEMPOTENCY_FIELD, **SPEND_FIELDS,
        "priority": PRIORITY_FIELD}}}}}


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name,
                             code="missing_required_parameter")
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for '{name}': expected a string.", param=name,
                             code="invalid_type")
    return value


@router.post("/batches", responses=ok(wire.BatchObject, "The batch, validating."),
             openapi_extra={"requestBody": _CREATE_BODY,
                            "parameters": [IDEMPOTENCY_HEADER]})
async def create_batch(request: Request, project: Project, service: Service,
                       webhooks: Webhooks) -> Any:
    body = await json_body(request)
    webhook_url = optional_webhook_url(body, webhooks.policy)
    window = body.get("completion_window", "24h")
    if not isinstance(window, str):
        raise InvalidRequest("Invalid type for 'completion_window': expected a string.",
                             param="completion_window", code="invalid_type")
    batch = await run_in_threadpool(
        service.create_batch, project, input_file_id=_required_str(body, "input_file_id"),
        endpoint=_required_str(body, "endpoint"), completion_window=window,
        metadata=body.get("metadata"), output_expires_after=body.get("output_expires_after"),
        webhook_url=webhook_url, max_cost=body.get("max_cost"),
        max_total_tokens=body.get("max_total_tokens"),
        idempotency=idempotency_of(request, body), priority=body.get("priority"))
    return wire.batch_object(batch)


@router.get("/batches", responses=ok(wire.BatchList, "The project's batches, newest first."))
def list_batches(project: Project, service: Service, after: str | None = None,
                 limit: Annotated[int, Query(json_schema_extra={"minimum": 1,
                                                                "maximum": 100})] = 20) -> Any:
    return wire.page_object(service.list_batches(project, after=after, limit=limit),
                            wire.batch_object)


@router.get("/batches/{batch_id}", response_model=None,
            responses=ok(wire.BatchObject, "The batch."))
async def retrieve_batch(request: Request, batch_id: str, project: Project,
                         service: Service) -> JSONResponse:
    # The hot read (pollers): one store read, the answer rendered once (no response model).
    batch = await read(request, service.get_batch, project, batch_id)
    return JSONResponse(wire.batch_object(batch))


@router.post("/batches/{batch_id}/cancel",
             responses=ok(wire.BatchObject, "The batch, cancelling or already ended."))
def cancel_batch(batch_id: str, project: Project, service: Service) -> Any:
    # The SDK sends an empty body with a JSON content type: the body is never read.
    return wire.batch_object(service.cancel_batch(project, batch_id))


@router.post("/batches/{batch_id}/pause",
             responses=ok(wire.BatchObject, "The batch, paused (extension)."))
def pause_batch(batch_id: str, project: Project, service: Service) -> Any:
    """Extension: claim no new chunk of the batch until it is resumed."""
    return wire.batch_object(service.pause_batch(project, batch_id))


@router.post("/batches/{batch_id}/resume",
             responses=ok(wire.BatchObject, "The batch, in progress again (extension)."))
def resume_batch(batch_id: str, project: Project, service: Service) -> Any:
    """Extension: run a paused batch's remaining chunks."""
    return wire.batch_object(service.resume_batch(project, batch_id))
