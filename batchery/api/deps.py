"""Dependencies shared by the routes: who is calling, and the services."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from batchery.batchapi.gemini import is_gemini_path
from batchery.batchapi.service import BatchService
from batchery.security.auth import KeyRing
from batchery.security.trust import Principal


def presented_key(request: Request) -> str | None:
    """The API key, from `Authorization: Bearer`, `X-Api-Key`, Azure's `api-key`, or
    Gemini's `x-goog-api-key` (or `?key=` on the Gemini API's paths)."""
    auth = request.headers.get("authorization")
    if auth and auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return (request.headers.get("x-api-key") or request.headers.get("api-key")
            or request.headers.get("x-goog-api-key")
            or (request.query_params.get("key") if is_gemini_path(request.url.path) else None))


def get_keys(request: Request) -> KeyRing:
    keys: KeyRing = request.app.state.keys
    return keys


def get_principal(request: Request) -> Principal:
    """The caller; 401 for a missing, unknown or revoked key."""
    return get_keys(request).principal_for(presented_key(request))


Caller = Annotated[Principal, Depends(get_principal)]


def get_admin(request: Request, principal: Caller) -> Principal:
    """The caller, who must hold an admin key (403 otherwise)."""
    principal.require_admin(f"call {request.method} {request.url.path}")
    return principal


def get_project(principal: Caller) -> str:
    return principal.project


def get_service(request: Request) -> BatchService:
    service: BatchService = request.app.state.service
    return service


Admin = Annotated[Principal, Depends(get_admin)]
Keys = Annotated[KeyRing, Depends(get_keys)]
Project = Annotated[str, Depends(get_project)]
Service = Annotated[BatchService, Depends(get_service)]
