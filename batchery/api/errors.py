"""The one place that knows HTTP status codes: domain errors to error envelopes.

Routes under `/v1/messages` answer in Anthropic's envelope, all others in OpenAI's.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from batchery import anthropic, ids
from batchery.api.responses import JSONResponse
from batchery.exceptions import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    TooLarge,
    Unauthorized,
)

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
    error = {"message": message, "type": type_, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotFound)
    return error_response(request, 404, exc.message, param=exc.param)


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Conflict)
    # The SDKs retry 409 unless told not to; our conflicts never pass by waiting.
    return error_response(request, 409, exc.message, headers={"x-should-retry": "false"})


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


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TooLarge)
    return error_response(request, 413, exc.message, param=exc.param,
                          code="request_too_large")


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(request, exc.status_code, message)


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


def install(app: FastAPI) -> None:
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(InvalidRequest, _invalid)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(TooLarge, _too_large)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Exception, _unexpected)
