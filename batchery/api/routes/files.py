"""`/v1/files`: upload, list, retrieve, download and delete files."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import StreamingResponse

from batchery.api import wire
from batchery.api.deps import Project, Service
from batchery.api.responses import ok, stream
from batchery.batchapi.service import BatchService
from batchery.model.exceptions import InvalidRequest, TooLarge
from batchery.model.files import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S, UPLOAD_PURPOSES

router = APIRouter()
_BLOCK = 1 << 20
#: The upload form, for the OpenAPI schema (the route parses the form itself).
_UPLOAD_FORM = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": sorted(UPLOAD_PURPOSES)},
        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
        "expires_after[seconds]": {"type": "integer", "minimum": MIN_EXPIRES_AFTER_S,
                                   "maximum": MAX_EXPIRES_AFTER_S}}}}}}


def _field(form: Any, name: str) -> str | None:
    """A form field, accepting both `a[b]` (the SDKs) and `a.b` (Azure's docs)."""
    key = name
    if key not in form and "[" in name:
        key = name.replace("[", ".").replace("]", "")
    values = form.getlist(key)
    if len(values) > 1:
        shown = key.replace("[", ".").replace("]", "")
        raise InvalidRequest(f"'{shown}' was given {len(values)} times; give it once.",
                             param=shown, code="invalid_value")
    value = values[0] if values else None
    return value if isinstance(value, str) else None


@router.post("/files", responses=ok(wire.FileObject, "The stored file."),
             openapi_extra={"requestBody": _UPLOAD_FORM})
async def create_file(request: Request, project: Project, service: Service) -> Any:
    return await store_upload(request, project, service)


async def store_upload(request: Request, project: str, service: BatchService, *,
                       min_expires_after_s: int = MIN_EXPIRES_AFTER_S) -> Any:
    """Store the uploaded file. `min_expires_after_s`: the shortest expiry allowed, which
    Azure's paths raise to Azure's 14 days."""
    try:
        form = await request.form(max_part_size=1 << 20)
    except TooLarge:
        raise
    except Exception as exc:
        raise InvalidRequest(f"Could not parse the multipart body: {exc}") from exc
    limits = request.app.state.runtime.policy.limits
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                                 code="missing_required_parameter")
        purpose = _field(form, "purpose")
        if not purpose:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                                 code="missing_required_parameter")
        seconds = _expires_after(form, min_expires_after_s)
        record = await run_in_threadpool(service.upload, project, upload.file,
                                         filename=upload.filename or "upload",
                                         purpose=purpose, expires_after_s=seconds,
                                         max_bytes=limits.max_upload_bytes,
                                         quota_bytes=limits.project_quota_bytes)
    finally:
        await form.close()
    return wire.file_object(record)


def _expires_after(form: Any, min_seconds: int) -> int | None:
    anchor = _field(form, "expires_after[anchor]")
    seconds = _field(form, "expires_after[seconds]")
    if anchor is not None and anchor != "created_at":
        raise InvalidRequest("'expires_after.anchor' must be 'created_at'.",
                             param="expires_after.anchor", code="invalid_value")
    if seconds is None:
        return None
    try:
        value = int(seconds)
    except ValueError:
        raise InvalidRequest("'expires_after.seconds' must be an integer.",
                             param="expires_after.seconds", code="invalid_type") from None
    if not min_seconds <= value <= MAX_EXPIRES_AFTER_S:
        raise InvalidRequest(f"'expires_after.seconds' must be between {min_seconds} and "
                             f"{MAX_EXPIRES_AFTER_S}; got {value}.",
                             param="expires_after.seconds", code="invalid_value")
    return value


@router.get("/files", responses=ok(wire.FileList, "The project's files, a page of them."))
def list_files(project: Project, service: Service, after: str | None = None,
               limit: Annotated[int, Query(json_schema_extra={"minimum": 1,
                                                              "maximum": 10_000})] = 10_000,
               order: Annotated[str, Query(json_schema_extra={"enum": ["asc", "desc"]})]
               = "desc", purpose: str | None = None) -> Any:
    page = service.list_files(project, purpose=purpose, after=after, limit=limit, order=order)
    return wire.page_object(page, wire.file_object)


@router.get("/files/{file_id}", responses=ok(wire.FileObject, "The file."))
def retrieve_file(file_id: str, project: Project, service: Service) -> Any:
    return wire.file_object(service.get_file(project, file_id))


@router.get("/files/{file_id}/content", response_class=StreamingResponse,
            responses=stream("application/octet-stream", "The file's bytes.",
                             {"type": "string", "format": "binary"}))
def file_content(file_id: str, project: Project, service: Service) -> StreamingResponse:
    record, stream = service.open_content(project, file_id)
    # The filename is the uploader's: percent-encode it so it cannot break the header.
    disposition = f"attachment; filename*=UTF-8''{quote(record.filename, safe='')}"
    return StreamingResponse(_blocks(stream), media_type="application/octet-stream",
                             headers={"Content-Length": str(record.bytes),
                                      "Content-Disposition": disposition})


def _blocks(stream: IO[bytes]) -> Iterator[bytes]:
    with stream:
        while block := stream.read(_BLOCK):
            yield block


@router.get("/files/{file_id}/cost_estimate",
            responses=ok(wire.CostEstimate, "Extension: the input tokens and cost of a batch "
                                            "of this file, estimated."))
def cost_estimate(file_id: str, project: Project, service: Service,
                  model: Annotated[str | None, Query(min_length=1)] = None) -> Any:
    """Extension: estimates a batch input file's input tokens (UTF-8 bytes of the requests'
    text / 4) and their cost at `model`'s prices, or at each line's own model's."""
    return wire.cost_estimate_object(service.cost_estimate(project, file_id, model))


@router.delete("/files/{file_id}", responses=ok(wire.FileDeleted, "The file is deleted."))
def delete_file(file_id: str, project: Project, service: Service) -> Any:
    record = service.delete_file(project, file_id)
    return {"id": record.id, "object": "file", "deleted": True}
