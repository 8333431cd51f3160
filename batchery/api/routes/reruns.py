"""(extension) Under `/v1`: a batch's results while it runs (`GET /batches/{id}/results`),
and retrying only what failed (`POST /batches/{id}/retry`, and the same for message
batches). The official SDKs have no methods for these: clients call them raw."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from batchery.api import anthropic_wire, wire
from batchery.api.bodies import json_body
from batchery.api.deps import Project, Service
from batchery.api.responses import ok, stream
from batchery.api.routes.messages import Service as MessageService
from batchery.batchapi import results, retry
from batchery.model.batches import window_seconds
from batchery.model.cursors import (
    DEFAULT_PAGE_LINES,
    MAX_PAGE_LINES,
    ResultsCursor,
    ResultsPage,
    check_limit,
    cursor_pattern,
)
from batchery.ports.filestore import FileStore
from batchery.ports.store import ResultsStore

router = APIRouter()
#: The response headers of a results page.
NEXT_CURSOR = "Batchery-Next-Cursor"
HAS_MORE = "Batchery-Has-More"
FINAL = "Batchery-Results-Final"
_RETRY_BODY = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"include": {
        "type": "array", "minItems": 1, "maxItems": retry.MAX_INCLUDE,
        "items": {"type": "string", "minLength": 1},
        "description": "Rerun the failed lines with these codes instead of the retriable "
                       "ones: error codes (`batch_expired`), HTTP statuses (`400`) or their "
                       "class (`4xx`), reply error codes or types; for message batches, "
                       "result types (`errored`) or error types (`invalid_request_error`)."}}}}}}
PAGE_HEADERS = {
    NEXT_CURSOR: {"description": "Pass it as `after` to read the lines after this page.",
                  "schema": {"type": "string"}},
    HAS_MORE: {"description": "`true` when the page stopped at `limit`: more lines can be "
                              "read now.", "schema": {"type": "string"}},
    FINAL: {"description": "`true` once the batch (or job) has ended and the cursor is at "
                           "the end of its results: no line will come after it.",
            "schema": {"type": "string"}}}


def _engine(request: Request) -> tuple[ResultsStore, FileStore]:
    runtime = request.app.state.runtime
    store: ResultsStore = runtime.store
    files: FileStore = runtime.files
    return store, files


def _include(body: dict[str, Any]) -> frozenset[str] | None:
    return retry.parse_include(body.get("include"))


@router.post("/batches/{batch_id}/retry",
             responses=ok(wire.BatchObject, "The new batch, validating, which reruns the "
                                            "failed lines."),
             openapi_extra={"requestBody": _RETRY_BODY})
async def retry_batch(batch_id: str, request: Request, project: Project,
                      service: Service) -> Any:
    include = _include(await json_body(request))
    original = await run_in_threadpool(service.get_batch, project, batch_id)
    store, files = _engine(request)
    rules = retry.RetryRules(
        window_s=window_seconds(original.completion_window) or 86_400,
        chunk_size=service.chunk_size, max_tasks=service.max_tasks, now=int(time.time()))
    batch = await run_in_threadpool(retry.retry_batch, store, files, original, include, rules)
    return wire.batch_object(batch)


@router.get("/batches/{batch_id}/results", response_class=Response,
            responses={200: {**stream("application/jsonl",
                                      "The output and error lines committed so far after "
                                      "`after`, one JSON object a line.")[200],
                             "headers": PAGE_HEADERS}})
def batch_results(batch_id: str, request: Request, project: Project, service: Service,
                  after: Annotated[str | None, Query(json_schema_extra={
                      "pattern": cursor_pattern(results.STAGES)})] = None,
                  limit: Annotated[int, Query(json_schema_extra={
                      "minimum": 1, "maximum": MAX_PAGE_LINES})] = DEFAULT_PAGE_LINES
                  ) -> Response:
    batch = service.get_batch(project, batch_id)
    cursor = ResultsCursor.decode(after, results.STAGES)
    store, files = _engine(request)
    page = results.read_page(store, files, batch, cursor, check_limit(limit))
    return page_response(page, "application/jsonl")


def page_response(page: ResultsPage, media_type: str) -> Response:
    """A page of result lines, with where to carry on in its headers."""
    return Response(b"".join(page.lines), media_type=media_type, headers={
        NEXT_CURSOR: page.cursor.encode(), HAS_MORE: _flag(page.has_more),
        FINAL: _flag(page.final)})


def _flag(value: bool) -> str:
    return "true" if value else "false"


@router.post("/messages/batches/{batch_id}/retry",
             responses=ok(anthropic_wire.MessageBatch, "The new message batch, which reruns "
                                                       "the failed requests."),
             openapi_extra={"requestBody": _RETRY_BODY})
async def retry_message_batch(batch_id: str, request: Request, project: Project,
                              service: MessageService) -> Any:
    include = _include(await json_body(request))
    original = await run_in_threadpool(service.get, project, batch_id)
    store, files = _engine(request)
    rules = retry.RetryRules(window_s=service.window_s, chunk_size=service.chunk_size,
                             max_tasks=service.max_requests, now=int(time.time()))
    batch = await run_in_threadpool(retry.retry_batch, store, files, original, include, rules)
    return anthropic_wire.message_batch(batch, str(request.base_url))
