"""The Gemini API's Batch Mode and Files API, as the `google-genai` SDK calls them.

Mounted at each of `batchery.batchapi.gemini.MOUNTS` (uploads at `UPLOAD_MOUNTS`), so that
`genai.Client(api_key=…, http_options={"base_url": "http://host:port/gemini"})` works with
either API version, and `base_url="http://host:port"` with `api_version="v1beta"`:

    POST   models/{model}:batchGenerateContent    create (inline requests or a file)
    POST   models/{model}:asyncBatchEmbedContent  create an embeddings batch
    GET    batches                                list, newest first
    GET    batches/{id}                           the batch, as its long-running operation
    POST   batches/{id}:cancel                    cancel
    DELETE batches/{id}                           delete an ended batch
    POST   upload/.../files                       resumable upload (start, chunks)
    GET    files, files/{id}, files/{id}:download list, get, download
    DELETE files/{id}                             delete

Files are the project's files (the OpenAI Files API's too); a batch's results file is one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from batchery.api import bodies, errors
from batchery.api.deps import Project, Service, get_principal
from batchery.api.responses import JSONResponse
from batchery.batchapi import gemini
from batchery.batchapi.gemini import GeminiBatchService, UploadSessions
from batchery.model.batches import Batch
from batchery.model.exceptions import InvalidRequest, NotFound, TooLarge
from batchery.ports.backend import CHAT_ENDPOINT

router = APIRouter(include_in_schema=False)
upload_router = APIRouter(include_in_schema=False)
_BLOCK = 1 << 20
#: The SDK uploads in chunks of this many bytes; the server takes any size.
_GRANULARITY = 8 << 20


def install(app: FastAPI) -> None:
    for prefix in gemini.MOUNTS:
        app.include_router(router, prefix=prefix)
    for prefix in gemini.UPLOAD_MOUNTS:
        app.include_router(upload_router, prefix=prefix)


async def _batches(request: Request) -> GeminiBatchService:
    runtime = request.app.state.runtime
    settings = runtime.settings
    return GeminiBatchService(runtime.store, runtime.files, chunk_size=settings.chunk_size,
                              max_requests=settings.max_tasks,
                              window_s=settings.message_batch_window_s)


Batches = Annotated[GeminiBatchService, Depends(_batches)]


def _mount(request: Request) -> str:
    """The mount the request came in on, uploads' mapped to the API's own."""
    path = request.url.path
    for mount in sorted(gemini.MOUNTS + gemini.UPLOAD_MOUNTS, key=len, reverse=True):
        if path.startswith(mount + "/"):
            return mount.replace("/upload", "", 1)
    return gemini.MOUNTS[0]


def _api_root(request: Request) -> str:
    return str(request.base_url).rstrip("/") + _mount(request)


def _version(request: Request) -> str:
    return _mount(request).rsplit("/", 1)[-1]


def _page_size(value: int | None, default: int, maximum: int) -> int:
    """Google's rule: unset or 0 is the default, and values above the maximum are
    lowered to it."""
    if value is None or value == 0:
        return default
    if value < 0:
        raise InvalidRequest("Invalid value at 'page_size': it must not be negative.",
                             param="page_size")
    return min(value, maximum)


# -- batches ----------------------------------------------------------------------------

def _operation(service: GeminiBatchService, batch: Batch) -> dict[str, Any]:
    return gemini.operation(batch, service.output(batch))


def _create(service: GeminiBatchService, project: str, model: str, version: str,
            body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    name = service.model(project, model, version, endpoint)
    return _operation(service, service.create(project, name, body, endpoint))


@router.post("/models/{model}:batchGenerateContent")
async def create_batch(model: str, request: Request, project: Project,
                       service: Batches) -> Any:
    body = await bodies.json_body(request)
    return await run_in_threadpool(_create, service, project, model, _version(request), body,
                                   CHAT_ENDPOINT)


@router.post("/models/{model}:asyncBatchEmbedContent")
async def create_embeddings_batch(model: str, request: Request, project: Project,
                                  service: Batches) -> Any:
    body = await bodies.json_body(request)
    return await run_in_threadpool(_create, service, project, model, _version(request), body,
                                   gemini.EMBEDDINGS_ENDPOINT)


@router.get("/batches")
def list_batches(project: Project, service: Batches,
                 page_size: Annotated[int | None, Query(alias="pageSize")] = None,
                 page_token: Annotated[str | None, Query(alias="pageToken")] = None) -> Any:
    page = service.list(project, page_token=page_token,
                        page_size=_page_size(page_size, 50, 1000))
    answer: dict[str, Any] = {"operations": [_operation(service, b) for b in page.items]}
    if page.has_more and page.items:
        answer["nextPageToken"] = page.items[-1].id
    return answer


@router.get("/batches/{batch_id}")
def get_batch(batch_id: str, project: Project, service: Batches) -> Any:
    return _operation(service, service.get(project, batch_id))


@router.post("/batches/{batch_id}:cancel")
def cancel_batch(batch_id: str, project: Project, service: Batches) -> Any:
    service.cancel(project, batch_id)
    return {}


@router.delete("/batches/{batch_id}")
def delete_batch(batch_id: str, project: Project, service: Batches) -> Any:
    service.delete(project, batch_id)
    return {}


# -- files ------------------------------------------------------------------------------

@router.get("/files")
def list_files(request: Request, project: Project, files: Service,
               page_size: Annotated[int | None, Query(alias="pageSize")] = None,
               page_token: Annotated[str | None, Query(alias="pageToken")] = None) -> Any:
    page = files.list_files(project, after=page_token or None,
                            limit=_page_size(page_size, 10, 100))
    root = _api_root(request)
    answer: dict[str, Any] = {"files": [gemini.file_object(r, root) for r in page.items]}
    if page.has_more and page.items:
        answer["nextPageToken"] = page.items[-1].id
    return answer


@router.get("/files/{file_id}:download")
def download_file(file_id: str, project: Project, files: Service) -> StreamingResponse:
    record, stream = files.open_content(project, file_id)
    return StreamingResponse(_blocks(stream), media_type=gemini.mime_type(record.filename),
                             headers={"Content-Length": str(record.bytes)})


def _blocks(stream: IO[bytes]) -> Iterator[bytes]:
    with stream:
        while block := stream.read(_BLOCK):
            yield block


@router.get("/files/{file_id}")
def get_file(file_id: str, request: Request, project: Project, files: Service) -> Any:
    return gemini.file_object(files.get_file(project, file_id), _api_root(request))


@router.delete("/files/{file_id}")
def delete_file(file_id: str, project: Project, files: Service) -> Any:
    files.delete_file(project, file_id)
    return {}


# -- resumable uploads ------------------------------------------------------------------

def _sessions(request: Request) -> UploadSessions:
    return UploadSessions(request.app.state.runtime.files)


@upload_router.post("/files")
async def upload(request: Request) -> Response:
    """Starts an upload (an API call, with the key), or takes a chunk of one (which
    carries no key: its upload id, from the start's answer, is what authorizes it)."""
    upload_id = request.query_params.get("upload_id")
    if upload_id is None:
        return await _start(request)
    try:
        return await _chunk(request, upload_id)
    except (InvalidRequest, NotFound, TooLarge) as exc:
        # `final`: the SDK stops at an answer that names a status, and retries one that
        # does not.
        status = 404 if isinstance(exc, NotFound) else 413 if isinstance(exc, TooLarge) \
            else 400
        return errors.error_response(request, status, exc.message, param=exc.param,
                                     headers={"x-goog-upload-status": "final"})


def _header_int(request: Request, name: str) -> int:
    value = request.headers.get(name)
    if value is None or not value.strip().isdigit():
        raise InvalidRequest(f"The {name} header must be a whole number of bytes, got "
                             f"{value!r}.", param=name)
    return int(value)


def _commands(request: Request) -> set[str]:
    value = request.headers.get("x-goog-upload-command", "")
    return {c.strip().lower() for c in value.split(",") if c.strip()}


async def _start(request: Request) -> Response:
    project = get_principal(request).project
    if request.headers.get("x-goog-upload-protocol", "").lower() != "resumable" \
            or _commands(request) != {"start"}:
        raise InvalidRequest("Only resumable uploads are supported: start one with "
                             "'X-Goog-Upload-Protocol: resumable' and "
                             "'X-Goog-Upload-Command: start'.",
                             param="X-Goog-Upload-Protocol")
    body = await bodies.json_body(request)
    spec = body.get("file") or {}
    if not isinstance(spec, dict):
        raise InvalidRequest("Invalid value at 'file': expected an object.", param="file")
    if spec.get("name") is not None:
        raise InvalidRequest("Invalid value at 'file.name': this server names files itself; "
                             "leave the name out.", param="file.name")
    size = _header_int(request, "x-goog-upload-header-content-length")
    limit = request.app.state.runtime.policy.limits.max_upload_bytes
    if limit is not None and size > limit:
        raise TooLarge(f"The file is larger than this server's upload limit of {limit} bytes.",
                       param="file")
    filename = gemini.field(spec, "displayName") \
        or request.headers.get("x-goog-upload-file-name") or "upload"
    upload_id = await run_in_threadpool(_sessions(request).start, project, str(filename), size)
    url = request.url.replace(query="").include_query_params(upload_id=upload_id,
                                                            upload_protocol="resumable")
    return Response(status_code=200, headers={
        "x-goog-upload-url": str(url), "x-goog-upload-status": "active",
        "x-goog-upload-chunk-granularity": str(_GRANULARITY)})


def _active(received: int) -> Response:
    return Response(status_code=200, headers={"x-goog-upload-status": "active",
                                              "x-goog-upload-size-received": str(received)})


async def _chunk(request: Request, upload_id: str) -> Response:
    sessions = _sessions(request)
    session = await run_in_threadpool(sessions.get, upload_id)
    commands = _commands(request)
    if commands == {"query"}:
        return _active(session.received)
    if not commands or not commands <= {"upload", "finalize"}:
        raise InvalidRequest("X-Goog-Upload-Command must be 'upload', 'upload, finalize', "
                             "'finalize' or 'query'.", param="X-Goog-Upload-Command")
    offset = _header_int(request, "x-goog-upload-offset")
    if offset != session.received:
        raise InvalidRequest(f"X-Goog-Upload-Offset is {offset}, but the server holds "
                             f"{session.received} bytes of this upload.",
                             param="X-Goog-Upload-Offset")
    data = await request.body()
    if "upload" in commands:
        session = await run_in_threadpool(sessions.append, upload_id, session, [data])
    if "finalize" not in commands:
        return _active(session.received)
    if session.received != session.size:
        raise InvalidRequest(f"The upload holds {session.received} bytes, but its start "
                             f"announced {session.size}.", param="X-Goog-Upload-Offset")
    record = await run_in_threadpool(_finish, request, sessions, upload_id, session)
    return JSONResponse({"file": gemini.file_object(record, _api_root(request))},
                        headers={"x-goog-upload-status": "final"})


def _finish(request: Request, sessions: UploadSessions, upload_id: str,
            session: gemini.Upload) -> Any:
    runtime = request.app.state.runtime
    limits = runtime.policy.limits
    with sessions.content(upload_id, session) as stream:
        return runtime.service.upload(session.project, stream, filename=session.filename,
                                      purpose=gemini.UPLOAD_PURPOSE,
                                      expires_after_s=gemini.FILE_TTL_S,
                                      max_bytes=limits.max_upload_bytes,
                                      quota_bytes=limits.project_quota_bytes)
