"""Azure OpenAI's paths, so that `openai.AzureOpenAI` works unchanged.

`AzureOpenAI(azure_endpoint=…, api_key=…, api_version=…)` calls `/openai/files` and
`/openai/batches` with `?api-version=…` and an `api-key` header (`deps` accepts it); Azure's
newer form is `/openai/v1/...`, where the version may be left out. Both serve the OpenAI
routes, with what Azure's docs say differs there:
- the `/openai/...` paths need an `api-version` no older than the Batch API's first;
- a file's `expires_after.seconds` is 14 to 30 days (the hosted OpenAI allows 1 hour);
- a failed batch's `errors` use Azure's codes for a line whose `url` is not the batch's
  endpoint (`url_mismatch`) and for a line of another model (`model_mismatch`).
Azure's endpoint spelling without `/v1` (`/chat/completions`) is accepted on every path
(`batches.canonical_endpoint`), and dotted form keys (`expires_after.seconds`) by `files`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from batchery.api import wire
from batchery.api.deps import Project, Service, read
from batchery.api.routes import batches, files, models
from batchery.api.routes.webhooks import Webhooks
from batchery.model.exceptions import InvalidRequest

#: Azure's shortest file expiry (`expires_after.seconds`): 14 days.
MIN_EXPIRES_AFTER_S = 14 * 86400
#: `api-version` values: a date, perhaps with `-preview`.
_VERSION = re.compile(r"\A(\d{4}-\d{2}-\d{2})(-preview)?\Z")
#: The first `api-version` with files for batches and the Batch API (Global Batch preview).
FIRST_BATCH_VERSION = "2024-07-01"
#: Our batch error codes, and Azure's for the same fault.
_AZURE_CODES = {"invalid_url": "url_mismatch", "mismatched_model": "model_mismatch"}


def require_api_version(
        api_version: Annotated[str | None, Query(alias="api-version")] = None) -> None:
    """Azure answers nothing on its `/openai/...` paths without a dated `api-version`."""
    if api_version is None:
        raise InvalidRequest(
            "Missing required query parameter: 'api-version'. Azure OpenAI's /openai/... "
            "paths need one, such as 'api-version=2024-10-21'; the /openai/v1/... paths "
            "do not.", param="api-version", code="missing_required_parameter")
    match = _VERSION.match(api_version)
    if match is None or match.group(1) < FIRST_BATCH_VERSION:
        raise InvalidRequest(
            f"Invalid value for 'api-version': '{api_version}'. Files and batches need "
            f"a version from {FIRST_BATCH_VERSION}-preview on, such as '2024-10-21'.",
            param="api-version", code="invalid_value")


def accept_api_version(
        api_version: Annotated[str | None, Query(alias="api-version")] = None) -> None:
    """The `/openai/v1/...` paths take any `api-version` (`preview`, `latest`) or none."""
    del api_version


def azure_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch object as Azure words it: its validation errors under Azure's codes."""
    if batch.get("errors"):
        for error in batch["errors"]["data"]:
            error["code"] = _AZURE_CODES.get(error["code"], error["code"])
    return batch


async def create_file(request: Request, project: Project, service: Service) -> Any:
    return await files.store_upload(request, project, service,
                                    min_expires_after_s=MIN_EXPIRES_AFTER_S)


async def create_batch(request: Request, project: Project, service: Service,
                       webhooks: Webhooks) -> Any:
    return azure_batch(await batches.create_batch(request, project, service, webhooks))


def list_batches(request: Request, project: Project, service: Service,
                 after: str | None = None, limit: int = 20) -> Any:
    page = batches.list_batches(project, service, after=after, limit=limit)
    for batch in page["data"]:
        azure_batch(batch)
    return page


async def retrieve_batch(request: Request, batch_id: str, project: Project,
                         service: Service) -> Any:
    return azure_batch(wire.batch_object(await read(request, service.get_batch, project,
                                                    batch_id)))


def cancel_batch(batch_id: str, project: Project, service: Service) -> Any:
    return azure_batch(batches.cancel_batch(batch_id, project, service))


#: `(method, path, handler)`: the OpenAI routes Azure's paths serve, Azure's where they differ.
_ROUTES: list[tuple[str, str, Callable[..., Any]]] = [
    ("POST", "/files", create_file),
    ("GET", "/files", files.list_files),
    ("GET", "/files/{file_id}", files.retrieve_file),
    ("GET", "/files/{file_id}/content", files.file_content),
    ("DELETE", "/files/{file_id}", files.delete_file),
    ("POST", "/batches", create_batch),
    ("GET", "/batches", list_batches),
    ("GET", "/batches/{batch_id}", retrieve_batch),
    ("POST", "/batches/{batch_id}/cancel", cancel_batch),
    ("GET", "/models", models.list_models),
    ("GET", "/models/{model_id:path}", models.retrieve_model),
]


def _router(version_check: Callable[..., None]) -> APIRouter:
    # Left out of the OpenAPI schema: the same operations are documented under /v1.
    router = APIRouter(dependencies=[Depends(version_check)], include_in_schema=False)
    for method, path, handler in _ROUTES:
        router.add_api_route(path, handler, methods=[method])
    return router


#: Mounted at `/openai`: the paths `AzureOpenAI(azure_endpoint=…)` calls.
legacy_router = _router(require_api_version)
#: Mounted at `/openai/v1`: Azure's v1 API, for `OpenAI(base_url=…/openai/v1)` too.
v1_router = _router(accept_api_version)
