"""`/v1/webhook_endpoints` and `/v1/webhook_event_types`: OpenAI's webhook endpoints API,
wire-exact with the SDK's `client.webhooks`; and our extensions: an endpoint's `status` and
`disabled_reason`, its delivery attempts, redelivery, and `/v1/webhook_secret` (the
project's secret, which signs the callbacks of a `webhook_url` given at create).

Any key of a project manages that project's endpoints; other projects' are absent (404).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from batchery.api.bodies import json_body, json_request
from batchery.api.deps import Project
from batchery.api.responses import ok
from batchery.model import webhooks as model
from batchery.model.webhooks import Delivery, WebhookEndpoint
from batchery.security.webhook_urls import URL_JSON_SCHEMA
from batchery.webhooks.service import WebhookService, secret_hint

router = APIRouter()


async def get_webhooks(request: Request) -> WebhookService:
    service: WebhookService = request.app.state.webhooks
    return service


Webhooks = Annotated[WebhookService, Depends(get_webhooks)]
Limit = Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": 100})]


# -- the objects ------------------------------------------------------------------------


def endpoint_json(endpoint: WebhookEndpoint, secret: str | None = None) -> dict[str, Any]:
    shown = {"signing_secret": secret} if secret is not None else {}
    return {"id": endpoint.id, "object": "webhook_endpoint", "name": endpoint.name,
            "url": endpoint.url, "event_types": list(endpoint.event_types),
            "created_at": endpoint.created_at, "updated_at": endpoint.updated_at,
            **shown, "signing_secret_hint": secret_hint(endpoint.secrets.current),
            "status": endpoint.status.value, "disabled_reason": endpoint.disabled_reason}


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {"object": "webhook_delivery", "event_id": delivery.event_id,
            "event_type": delivery.event_type, "webhook_endpoint_id": delivery.endpoint_id,
            "url": delivery.url, "status": delivery.status.value,
            "attempts": delivery.attempts,
            "next_attempt_at": None if delivery.next_attempt_at is None
            else int(delivery.next_attempt_at)}


class WebhookEndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"]
    name: str
    url: str
    event_types: list[str]
    created_at: int
    updated_at: int
    signing_secret_hint: str
    #: Extension: "disabled" after too many consecutive failed deliveries.
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None


class WebhookEndpointWithSecret(WebhookEndpointObject):
    signing_secret: str


class WebhookEndpointList(BaseModel):
    object: Literal["list"]
    data: list[WebhookEndpointObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedWebhookEndpoint(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"]
    deleted: bool


class WebhookEndpointTestResult(BaseModel):
    object: Literal["webhook_endpoint.test"]
    webhook_endpoint_id: str
    event_type: str
    status_code: int
    success: Literal[True]


class WebhookEventTypeList(BaseModel):
    object: Literal["list"]
    data: list[str]


class WebhookDeliveryAttempt(BaseModel):
    object: Literal["webhook_delivery_attempt"]
    event_id: str
    event_type: str
    webhook_endpoint_id: str | None
    url: str
    attempt: int
    created_at: int
    success: bool
    status_code: int | None
    latency_ms: int | None
    error: str | None


class WebhookDeliveryAttemptList(BaseModel):
    object: Literal["list"]
    data: list[WebhookDeliveryAttempt]


class WebhookDelivery(BaseModel):
    object: Literal["webhook_delivery"]
    event_id: str
    event_type: str
    webhook_endpoint_id: str | None
    url: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: int | None


class WebhookSecret(BaseModel):
    object: Literal["webhook_secret"]
    signing_secret: str


# -- the request bodies, for the OpenAPI schema (the routes read them) ------------------

_TYPES = {"type": "array", "minItems": 1,
          "items": {"enum": sorted(model.ACCEPTED_EVENT_TYPES)}}
_NAME = {"type": "string", "minLength": 1, "maxLength": 256}
_CREATE = json_request({
    "type": "object", "additionalProperties": False,
    "required": ["name", "url", "event_types"],
    "properties": {"name": _NAME, "url": URL_JSON_SCHEMA, "event_types": _TYPES}},
    "The endpoint: a name, the receiver's URL, the event types it receives.")
_UPDATE = json_request({
    "type": "object", "additionalProperties": False,
    "properties": {"name": _NAME, "url": URL_JSON_SCHEMA, "event_types": _TYPES,
                   "status": {"enum": ["enabled", "disabled"],
                              "description": "Extension: 'enabled' resumes an endpoint "
                                             "disabled after failed deliveries."}}},
    "The fields to change; event_types is the complete new set.")
_ROTATE = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False,
    "properties": {"keep_old_secret_active_for_24_hours": {"type": "boolean",
                                                           "default": False}}}}}}}
_TEST = json_request({
    "type": "object", "additionalProperties": False, "required": ["event_type"],
    "properties": {"event_type": {"enum": sorted(model.ACCEPTED_EVENT_TYPES)}}},
    "The event type of the sample event to send.")
_ENDPOINT = "/webhook_endpoints/{webhook_endpoint_id}"


# -- the routes ---------------------------------------------------------------------------


@router.post("/webhook_endpoints",
             responses=ok(WebhookEndpointWithSecret, "The endpoint, with its signing secret: "
                                                     "shown this once."),
             openapi_extra=_CREATE)
async def create_endpoint(request: Request, project: Project, webhooks: Webhooks) -> Any:
    body = await json_body(request)
    endpoint, secret = await run_in_threadpool(webhooks.create, project, body)
    return endpoint_json(endpoint, secret)


@router.get("/webhook_endpoints",
            responses=ok(WebhookEndpointList, "The project's endpoints, newest first."))
def list_endpoints(project: Project, webhooks: Webhooks, after: str | None = None,
                   limit: Limit = 20) -> Any:
    page = webhooks.list_endpoints(project, after=after, limit=limit)
    data = [endpoint_json(e) for e in page.items]
    return {"object": "list", "data": data, "has_more": page.has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get(_ENDPOINT, responses=ok(WebhookEndpointObject, "The endpoint."))
def retrieve_endpoint(webhook_endpoint_id: str, project: Project, webhooks: Webhooks) -> Any:
    return endpoint_json(webhooks.get(project, webhook_endpoint_id))


@router.post(_ENDPOINT, responses=ok(WebhookEndpointObject, "The endpoint, changed."),
             openapi_extra=_UPDATE)
async def update_endpoint(webhook_endpoint_id: str, request: Request, project: Project,
                          webhooks: Webhooks) -> Any:
    body = await json_body(request)
    return endpoint_json(await run_in_threadpool(webhooks.update, project,
                                                 webhook_endpoint_id, body))


@router.delete(_ENDPOINT, responses=ok(DeletedWebhookEndpoint, "The endpoint is deleted."))
def delete_endpoint(webhook_endpoint_id: str, project: Project, webhooks: Webhooks) -> Any:
    webhooks.delete(project, webhook_endpoint_id)
    return {"id": webhook_endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}


@router.post(_ENDPOINT + "/rotate_secret",
             responses=ok(WebhookEndpointWithSecret, "The endpoint, with its new signing "
                                                     "secret: shown this once."),
             openapi_extra=_ROTATE)
async def rotate_secret(webhook_endpoint_id: str, request: Request, project: Project,
                        webhooks: Webhooks) -> Any:
    body = await json_body(request)
    endpoint, secret = await run_in_threadpool(webhooks.rotate_secret, project,
                                               webhook_endpoint_id, body)
    return endpoint_json(endpoint, secret)


@router.post(_ENDPOINT + "/test",
             responses=ok(WebhookEndpointTestResult, "The receiver's status code for a "
                                                     "sample event."),
             openapi_extra=_TEST)
async def test_endpoint(webhook_endpoint_id: str, request: Request, project: Project,
                        webhooks: Webhooks) -> Any:
    body = await json_body(request)
    result = await run_in_threadpool(webhooks.test, project, webhook_endpoint_id, body)
    return {"object": "webhook_endpoint.test", "webhook_endpoint_id": result.endpoint_id,
            "event_type": result.event_type, "status_code": result.status_code,
            "success": True}


@router.get(_ENDPOINT + "/deliveries",
            responses=ok(WebhookDeliveryAttemptList, "Extension: the endpoint's recent "
                                                     "delivery attempts, newest first."))
def list_attempts(webhook_endpoint_id: str, project: Project, webhooks: Webhooks,
                  limit: Limit = 20, event_id: str | None = None) -> Any:
    found = webhooks.attempts(project, webhook_endpoint_id, limit=limit, event_id=event_id)
    return {"object": "list", "data": [a.to_dict() for a in found]}


@router.post(_ENDPOINT + "/deliveries/{event_id}/redeliver",
             responses=ok(WebhookDelivery, "Extension: the event, queued to the endpoint "
                                           "again with the same webhook-id."))
def redeliver(webhook_endpoint_id: str, event_id: str, project: Project,
              webhooks: Webhooks) -> Any:
    return _delivery_json(webhooks.redeliver(project, webhook_endpoint_id, event_id))


@router.get("/webhook_event_types",
            responses=ok(WebhookEventTypeList, "The event types Batchery sends."))
def list_event_types(_: Project, webhooks: Webhooks) -> Any:
    return {"object": "list", "data": webhooks.event_types()}


@router.get("/webhook_secret",
            responses=ok(WebhookSecret, "Extension: the project's signing secret, for the "
                                        "webhook_url given when creating a batch, message "
                                        "batch or job."))
def project_secret(project: Project, webhooks: Webhooks) -> Any:
    return {"object": "webhook_secret", "signing_secret": webhooks.project_secret(project)}
