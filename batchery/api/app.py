"""`create_app`: the FastAPI application over a `Runtime`."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchery import __version__, ui
from batchery.api import bodies, errors, metrics
from batchery.api.doorbell import RingOnWork
from batchery.api.responses import JSONResponse
from batchery.api.routes import (
    azure,
    batches,
    files,
    gemini,
    jobs,
    messages,
    models,
    reruns,
    status,
    webhooks,
)
from batchery.api.routes import keys as key_routes
from batchery.model import ids
from batchery.runtime import Runtime
from batchery.security.auth import KeyRing
from batchery.webhooks.service import WebhookService


class RequestIdMiddleware:
    """Tags every response with a request id: `x-request-id` is what the OpenAI SDK reads,
    `request-id` what the Anthropic SDK reads."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ids.request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", header),
                                      (b"request-id", header)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BatcheryAPI(FastAPI):
    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            errors.document(super().openapi(), keys_required=not self.state.keys.open)
        return self.openapi_schema or {}


def create_app(runtime: Runtime, keys: KeyRing | None = None,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # Runs before the server exits, whatever stopped it (SIGTERM included).
        if on_shutdown is not None:
            await run_in_threadpool(on_shutdown)

    # /docs is the dashboard's offline page (FastAPI's loads Swagger UI from a CDN).
    app = BatcheryAPI(title="Batchery", version=__version__, docs_url=None, redoc_url=None,
                      default_response_class=JSONResponse, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.service = runtime.service
    app.state.message_batches = runtime.message_batches
    app.state.jobs = runtime.jobs
    app.state.webhooks = WebhookService(runtime.store, runtime.policy)
    app.state.keys = keys or KeyRing.load(runtime.settings.keys_file)
    # Hot reads of a SQLite store run in the event loop (`deps.read`).
    app.state.inline_reads = runtime.store.engine.dialect.name == "sqlite"
    errors.install(app)
    # Added after the error middleware, so further out: its 413 is counted by the metrics.
    app.add_middleware(bodies.BodyLimit,
                       limit_for=functools.partial(bodies.body_cap, runtime.policy.limits))
    for module in (files, batches, models, messages, webhooks, reruns):
        app.include_router(module.router, prefix="/v1")
    app.include_router(azure.legacy_router, prefix="/openai")
    app.include_router(azure.v1_router, prefix="/openai/v1")
    gemini.install(app)  # the Gemini API under /gemini/v1beta, /gemini/v1 and /v1beta
    app.include_router(jobs.router, prefix="/api/v1")
    app.include_router(status.router, prefix="/api/v1")
    app.include_router(key_routes.router, prefix="/api/v1")

    @app.get("/healthz", include_in_schema=False, response_model=None)
    async def healthz() -> dict[str, Any]:
        # The pid tells apart the processes of `serve --api-workers N` (and hosts' health
        # checks see which one answered).
        return {"status": "ok", "version": __version__, "pid": os.getpid()}

    ui.install(app)  # the dashboard at /ui, `/` -> /ui, and the offline /docs
    metrics.install(app, runtime.store)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(RingOnWork, doorbell=runtime.doorbell)
    return app
