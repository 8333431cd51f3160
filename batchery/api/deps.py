"""Dependencies shared by the routes: who is calling, and the services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, ParamSpec, TypeVar

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

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


P = ParamSpec("P")
T = TypeVar("T")


async def read(request: Request, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """A hot route's store read: on SQLite in the event loop (a read of a local file that
    waits for no writer costs less than the hop to a worker thread), elsewhere (a database
    across the network) in a worker thread, so that the loop never waits on the network."""
    if request.app.state.inline_reads:
        return call(*args, **kwargs)
    return await run_in_threadpool(call, *args, **kwargs)


# The dependencies are coroutines: they do no I/O (the keys file is looked at at most once a
# period), and FastAPI would run a plain function in a worker thread, a hop per request.

async def get_keys(request: Request) -> KeyRing:
    keys: KeyRing = request.app.state.keys
    return keys


def get_principal(request: Request) -> Principal:
    """The caller; 401 for a missing, unknown or revoked key."""
    keys: KeyRing = request.app.state.keys
    return keys.principal_for(presented_key(request))


async def _caller(request: Request) -> Principal:
    return get_principal(request)


Caller = Annotated[Principal, Depends(_caller)]


async def get_admin(request: Request, principal: Caller) -> Principal:
    """The caller, who must hold an admin key (403 otherwise)."""
    principal.require_admin(f"call {request.method} {request.url.path}")
    return principal


async def get_project(principal: Caller) -> str:
    return principal.project


async def get_service(request: Request) -> BatchService:
    service: BatchService = request.app.state.service
    return service


Admin = Annotated[Principal, Depends(get_admin)]
Keys = Annotated[KeyRing, Depends(get_keys)]
Project = Annotated[str, Depends(get_project)]
Service = Annotated[BatchService, Depends(get_service)]
