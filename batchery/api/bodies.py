"""Reading JSON request bodies with errors in our envelope (not FastAPI's 422), and the
operator's limits on how large a request body may be."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchery.api import errors
from batchery.batchapi.gemini import UPLOAD_MOUNTS
from batchery.jobs import submission
from batchery.model import idempotency, spend
from batchery.model.exceptions import InvalidRequest, TooLarge
from batchery.model.jobs import InputKind, OutputMode
from batchery.model.priority import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from batchery.security.trust import Limits
from batchery.security.webhook_urls import URL_JSON_SCHEMA

#: Room for the multipart framing and the small form fields around an uploaded file.
MULTIPART_SLACK_BYTES = 1 << 20
#: Routes whose body is a multipart upload rather than JSON.
UPLOAD_ROUTES = frozenset({("POST", "/v1/files"), ("POST", "/openai/files"),  # and Azure's
                           ("POST", "/openai/v1/files")}
                          # and Gemini's resumable uploads' chunks
                          | {("POST", f"{mount}/files") for mount in UPLOAD_MOUNTS})


@dataclass(frozen=True, slots=True)
class BodyCap:
    limit: int
    #: What a refused request is told.
    message: str


def body_cap(limits: Limits, method: str, path: str) -> BodyCap:
    """The operator's cap on one request's body: uploads get theirs, all else is JSON."""
    if (method, path) in UPLOAD_ROUTES:
        return BodyCap(limits.max_upload_bytes + MULTIPART_SLACK_BYTES,
                       f"The file is larger than this server's upload limit of "
                       f"{limits.max_upload_bytes} bytes.")
    return BodyCap(limits.max_json_body_bytes,
                   f"The request body is larger than this server's limit of "
                   f"{limits.max_json_body_bytes} bytes for a JSON body.")


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest("We could not parse the JSON body of your request. (HINT: "
                             "the body must be a JSON object.)") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def idempotency_of(request: Request, body: dict[str, Any],
                   **more: Any) -> idempotency.Idempotency | None:
    """The create's idempotency key (extension), from the `Idempotency-Key` header or the
    `idempotency_key` body field, with the fingerprint of its parameters (the body, and
    `more` given outside it)."""
    return idempotency.from_request(request.headers.get(idempotency.HEADER), body, **more)


#: The OpenAPI description of the `Idempotency-Key` header of the create routes.
_KEY_PATTERN = "^[^\\u0000-\\u001f\\u007f]*$"
IDEMPOTENCY_HEADER = {"name": idempotency.HEADER, "in": "header", "required": False,
                      "schema": {"type": "string", "minLength": 1,
                                 "maxLength": idempotency.MAX_KEY_LENGTH,
                                 "pattern": _KEY_PATTERN},
                      "description": "Extension: the same key with the same parameters "
                                     "returns the object the first request made (kept 24 "
                                     "hours); with other parameters, 409 (code 'conflict')."}
#: The body field that may carry the key instead (what `extra_body` sends).
IDEMPOTENCY_FIELD = {"type": "string", "minLength": 1,
                     "maxLength": idempotency.MAX_KEY_LENGTH, "pattern": _KEY_PATTERN,
                     "description": "Extension: the idempotency key, as a body field (the "
                                    "Idempotency-Key header wins over it)."}
#: A batch's spend ceilings (extension): crossing one stops the batch like a cancel.
SPEND_FIELDS = {
    "max_cost": {"type": ["number", "null"], "exclusiveMinimum": 0,
                 "description": "Extension: stop the batch once its lines cost this many US "
                                "dollars, at its deployments' prices."},
    "max_total_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": spend.MAX_TOKENS,
                         "description": "Extension: stop the batch once its lines used this "
                                        "many tokens, input and output together."}}
#: The claim order (extension) of batches, message batches and jobs.
PRIORITY_FIELD = {"type": ["integer", "null"], "minimum": MIN_PRIORITY,
                  "maximum": MAX_PRIORITY, "default": DEFAULT_PRIORITY,
                  "description": "Extension: work of higher priority is claimed first; "
                                 "then the earliest deadline, then the oldest."}


class BodyLimit:
    """Caps every request body at `limit_for(method, path)` bytes.

    A declared `Content-Length` over the cap is refused with 413 before a byte of the body
    is read. A body without one (chunked) is counted as it arrives, and the read that passes
    the cap raises `TooLarge`, which the route's error handling answers with 413: at most
    the cap is ever held, however much the client sends."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str, str], BodyCap]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > cap.limit:
            response = await errors.too_large(Request(scope), TooLarge(cap.message))
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap.limit:
                    raise TooLarge(cap.message)
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before we see it
    return None


# -- the job API's request bodies, for the OpenAPI schema (the routes read them) ------------

def json_request(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A route's `openapi_extra`: the JSON body it reads itself."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {"application/json": {"schema": schema}}}}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}
_STRINGS = {"type": ["array", "null"], "items": {"type": "string", "minLength": 1}}
#: The largest whole number a submission may give.
_MAX_INT = submission.MAX_INT
_BATCH_SIZE = {"type": "integer", "minimum": 1, "maximum": _MAX_INT,
               "description": "Items in a batch."}
_ITEM_LIST = {"type": "object", "additionalProperties": False,
              "required": ["items", "batch_size"],
              "properties": {"items": {"type": "array", "minItems": 1,
                                       "maxItems": submission.MAX_INLINE_ITEMS},
                             "batch_size": _BATCH_SIZE}}
_FILES = {"type": "object", "additionalProperties": False, "required": ["batch_size"],
          "properties": {"paths": _STRINGS, "file_ids": _STRINGS, "includes": _STRINGS,
                         "excludes": _STRINGS, "batch_size": _BATCH_SIZE},
          # Paths (or URLs), ids of uploaded files, or both.
          "anyOf": [{"required": [key], "properties": {key: {"type": "array", "minItems": 1}}}
                    for key in ("paths", "file_ids")]}
_INPUTS = {InputKind.ITEM_LIST.value: _ITEM_LIST, InputKind.FILE_PATH_LISTER.value: _FILES,
           InputKind.DELIMITED_FILES.value: _FILES}
_SECONDS = {"type": ["number", "null"], "exclusiveMinimum": 0}
JOB_SUBMISSION = json_request({
    "type": "object", "additionalProperties": False,
    "properties": {
        **{name: _nullable(schema) for name, schema in _INPUTS.items()},
        "deployment": {"type": ["string", "null"], "minLength": 1},
        "workers": {"type": ["integer", "null"], "minimum": 1, "maximum": _MAX_INT},
        "config": {"type": ["object", "null"]},
        "timeout": _SECONDS, "batch_timeout": _SECONDS,
        "max_retries": {"type": ["integer", "null"], "minimum": 0, "maximum": _MAX_INT},
        "error_threshold": {"type": ["integer", "null"], "minimum": -1,
                            "maximum": _MAX_INT},
        "output": {"enum": [m.value for m in OutputMode]},
        "output_path": {"type": ["string", "null"], "minLength": 1},
        "dry_run": {"type": "boolean"},
        "webhook_url": {"anyOf": [URL_JSON_SCHEMA, {"type": "null"}],
                        "description": "Extension: a receiver of the job's end event."},
        "priority": PRIORITY_FIELD, "idempotency_key": IDEMPOTENCY_FIELD},
    # Exactly one input.
    "oneOf": [{"required": [name], "properties": {name: {"type": "object"}}}
              for name in _INPUTS]}, "The job: exactly one input, and its options.")
_POOL = {"type": ["object", "null"], "additionalProperties": False,
         "properties": {"min": {"type": "integer", "minimum": 0},
                        "max": {"type": "integer", "minimum": 1},
                        "idle_seconds": {"type": "number", "exclusiveMinimum": 0}}}
_PRICE = {"type": "number", "minimum": 0}
_DEPLOYMENT = {"type": "object", "required": ["name", "backend"],
               "properties": {"name": _NAME,
                              "backend": {"type": "string",
                                          "description": "echo, http, openai, python, ..."},
                              "options": {"type": ["object", "null"],
                                          "description": "The backend's options."},
                              "workers": _POOL,
                              "prices": {"type": ["object", "null"],
                                         "additionalProperties": False,
                                         "properties": {"input": _PRICE, "output": _PRICE},
                                         "description": "Extension: US dollars per million "
                                                        "tokens, for the cost of batches."}}}
NEW_DEPLOYMENT = json_request(_DEPLOYMENT, "A deployment, as in the config file.")
NEW_ENDPOINT = json_request({
    "type": "object", "required": ["name", "deployments"],
    "properties": {"name": _NAME,
                   "deployments": {"type": "array", "minItems": 1, "items": _DEPLOYMENT},
                   "default_deployment": {"type": "string"},
                   "project": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$",
                               "description": "The project that owns it; by default the "
                                              "admin's own."}}},
    "An endpoint and its deployments, as in the config file (admin keys only).")
ENDPOINT_CHANGE = json_request({
    "type": "object", "required": ["default_deployment"],
    "properties": {"default_deployment": {"type": "string"}}},
    "The deployment that serves the endpoint's jobs by default.")
_KEY_NAME = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}
NEW_KEY = json_request({
    "type": "object", "additionalProperties": False, "required": ["project"],
    "properties": {"project": _KEY_NAME, "role": {"enum": ["admin", "member"]},
                   "name": {"anyOf": [_KEY_NAME, {"type": "null"}]}}},
    "The new key's project, role (default: member) and name (default: made up).")
