"""`/v1/batches`: create, list, retrieve and cancel batches."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from batchery.api import wire
from batchery.api.bodies import json_body
from batchery.api.deps import Project, Service
from batchery.exceptions import InvalidRequest

router = APIRouter()


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name,
                             code="missing_required_parameter")
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for '{name}': expected a string.", param=name,
                             code="invalid_type")
    return value


@router.post("/batches")
async def create_batch(request: Request, project: Project, service: Service) -> Any:
    body = await json_body(request)
    window = body.get("completion_window", "24h")
    if not isinstance(window, str):
        raise InvalidRequest("Invalid type for 'completion_window': expected a string.",
                             param="completion_window", code="invalid_type")
    batch = await run_in_threadpool(
        service.create_batch, project, input_file_id=_required_str(body, "input_file_id"),
        endpoint=_required_str(body, "endpoint"), completion_window=window,
        metadata=body.get("metadata"))
    return wire.batch_object(batch)


@router.get("/batches")
def list_batches(project: Project, service: Service, after: str | None = None,
                 limit: int = 20) -> Any:
    return wire.page_object(service.list_batches(project, after=after, limit=limit),
                            wire.batch_object)


@router.get("/batches/{batch_id}")
def retrieve_batch(batch_id: str, project: Project, service: Service) -> Any:
    return wire.batch_object(service.get_batch(project, batch_id))


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, project: Project, service: Service) -> Any:
    # The SDK sends an empty body with a JSON content type: the body is never read.
    return wire.batch_object(service.cancel_batch(project, batch_id))
