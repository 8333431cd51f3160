"""The one place that knows HTTP status codes: domain errors to error envelopes.

Routes under `/v1/messages` answer in Anthropic's envelope, the Gemini API's (see
`batchery.batchapi.gemini.MOUNTS`) in Google's, all others in OpenAI's.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchery.api.responses import JSONResponse
from batchery.batchapi import gemini
from batchery.model import ids
from batchery.model.exceptions import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    TooLarge,
    Unauthorized,
)
from batchery.wire import anthropic

log = logging.getLogger("batchery.api")
ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {409: "conflict_error"}


def error_response(request: Request, status: int, message: str, *,
                   type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if request.url.path.startswith(ANTHROPIC_PREFIX):
        request_id = getattr(request.state, "request_id", None) or ids.request_id()
        kind = _ANTHROPIC_TYPES.get(status) or anthropic.error_type(status)
        body = {"type": "error", "error": {"type": kind, "message": message},
                "request_id": request_id}
        return JSONResponse(body, status_code=status, headers=headers)
    if gemini.is_gemini_path(request.url.path):
        return JSONResponse(gemini.error_body(status, message, param=param, code=code),
                            status_code=status, headers=headers)
    error = {"message": message, "type": type_, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotFound)
    return error_response(request, 404, exc.message, param=exc.param)


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Conflict)
    # The SDKs retry 409 unless told not to; our conflicts never pass by waiting.
    return error_response(request, 409, exc.message, code=exc.code,
                          headers={"x-should-retry": "false"})


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidRequest)
    return error_response(request, 400, exc.message, param=exc.param, code=exc.code)


async def _unauthorized(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Unauthorized)
    return error_response(request, 401, exc.message, code="invalid_api_key")


async def _forbidden(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Forbidden)
    return error_response(request, 403, exc.message, param=exc.param,
                          code="permission_denied")


async def too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TooLarge)
    # The rest of the body may still be on its way: closing the connection spares the
    # server reading it, and the client learns not to send more on this connection.
    return error_response(request, 413, exc.message, param=exc.param,
                          code="request_too_large", headers={"Connection": "close"})


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        allowed = allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        message = (f"Method {request.method} is not allowed on {request.url.path}; "
                   f"allowed: {', '.join(allowed)}.")
    else:
        message = str(exc.detail)
    return error_response(request, exc.status_code, message, headers=headers or None)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on this path. Starlette's own `Allow` names only
    the first route that matched the path, and a path may have one route per method."""
    return [method for method in _METHODS if any(
        isinstance(route, BaseRoute)
        and route.matches({**request.scope, "method": method})[0] is Match.FULL
        for route in request.app.router.routes)]


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}." if param \
        else str(first.get("msg", "Invalid request."))
    return error_response(request, 400, message, param=param, code="invalid_value")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path,
                  exc_info=exc)
    return error_response(request, 500, "The server had an error while processing your "
                                        "request.", type_="server_error")


class UnexpectedErrors:
    """Answers an unexpected exception with the 500 envelope, and does not let it go on.

    Starlette's outermost `ServerErrorMiddleware` also answers, but then re-raises, and the
    server drops the connection without `Connection: close`: a client's next request on it
    fails. This middleware sits inside it, so the exception stops here and the connection
    stays usable. Once a response has started, only closing the connection can tell the
    client that it is cut short, so the exception goes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = await _unexpected(Request(scope), exc)
            await response(scope, receive, send)


# -- the error envelopes, in the OpenAPI schema -------------------------------------------

class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """The error envelope of `/v1` (but `/v1/messages`) and `/api/v1`."""

    error: OpenAIErrorBody


class AnthropicErrorBody(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """The error envelope of `/v1/messages`."""

    type: Literal["error"]
    error: AnthropicErrorBody
    request_id: str


_STATUS_TEXT = {400: "The request is invalid; `param` names the field at fault.",
                401: "The API key is missing, unknown or revoked.",
                403: "The key may not do this: a member key on an admin route, or a path, "
                     "host or setting the operator does not allow.",
                404: "No such object in the caller's project.",
                409: "The object's state forbids this, or the name is not available.",
                413: "The request body or upload is over the operator's limit."}


def _error_statuses(method: str, operation: dict[str, Any]) -> list[int]:
    statuses = [400, 401, 403, 404]
    if method != "get":
        statuses.append(409)
    if "requestBody" in operation:
        statuses.append(413)
    return statuses


def document(schema: dict[str, Any], *, keys_required: bool) -> None:
    """Completes FastAPI's schema in place: every operation's error statuses in its API's
    envelope (and no 422: validation errors are 400s here), and the API key."""
    models = {m.__name__: m for m in (OpenAIError, AnthropicError)}
    _, defs = models_json_schema([(m, "serialization") for m in models.values()],
                                 ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {})
    found = components.setdefault("schemas", {})
    found.update(defs.get("$defs", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        found.pop(unused, None)
    for path, operations in schema.get("paths", {}).items():
        envelope = "AnthropicError" if path.startswith(ANTHROPIC_PREFIX) else "OpenAIError"
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in _error_statuses(method, operation):
                responses.setdefault(str(status), {
                    "description": _STATUS_TEXT[status],
                    "content": {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{envelope}"}}}})
    if keys_required:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
        schema["security"] = [{"bearer": []}, {"api-key": []}]


def install(app: FastAPI) -> None:
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(InvalidRequest, _invalid)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(TooLarge, too_large)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    # A fallback for errors outside `UnexpectedErrors` (in middleware further out).
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(UnexpectedErrors)
