"""Dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from batchery.auth import KeyRing
from batchery.service import BatchService


def presented_key(request: Request) -> str | None:
    """The API key, from `Authorization: Bearer`, `X-Api-Key` or Azure's `api-key`."""
    auth = request.headers.get("authorization")
    if auth and auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key") or request.headers.get("api-key")


def get_project(request: Request) -> str:
    keys: KeyRing = request.app.state.keys
    return keys.project_for(presented_key(request))


def get_service(request: Request) -> BatchService:
    service: BatchService = request.app.state.service
    return service


Project = Annotated[str, Depends(get_project)]
Service = Annotated[BatchService, Depends(get_service)]
