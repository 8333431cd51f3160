"""Dashboard pages for batches: OpenAI batches and Anthropic message batches side by side.

Pages read through the services and the store of the running server, never over HTTP, and
actions (create, cancel) call the same service methods as the API."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import File, Form, Request, UploadFile
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from batchery import ui
from batchery.batchapi.gemini import GEMINI_ID_PREFIX
from batchery.model.batches import (
    CANCELLABLE,
    SUPPORTED_ENDPOINTS,
    Batch,
    BatchStatus,
    same_endpoint,
)
from batchery.model.exceptions import BatcheryError, NotFound
from batchery.runtime import Runtime
from batchery.security.trust import Principal
from batchery.ui.auth import Csrf, PagePrincipal
from batchery.wire.anthropic import MESSAGES_ENDPOINT

router = ui.router

PAGE_SIZE = 25
RESULTS_PAGE_SIZE = 20
#: The most batches per project the list reads before filtering: the page is for a look at
#: recent work, not an archive.
SCAN_LIMIT = 1000
#: The most result lines the results browser reads from a batch's files.
RESULT_SCAN_LIMIT = 100_000
#: The most line problems the create form reports at once.
MAX_FORM_ERRORS = 20
SINCE = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
FILE_KINDS = ("input", "output", "error")


# -- formatting ---------------------------------------------------------------------------

number = ui.human
iso = ui.iso
duration = ui.duration


def _ended_at(batch: Batch) -> int | None:
    return batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at


def kind_of(batch: Batch) -> str:
    if batch.endpoint == MESSAGES_ENDPOINT:
        return "message batch"
    return "Gemini batch" if batch.id.startswith(GEMINI_ID_PREFIX) else "batch"


@dataclass(frozen=True, slots=True)
class Row:
    """One batch as the list and the detail page show it."""

    batch: Batch
    kind: str
    model: str
    created: str
    duration: str
    done_pct: float
    failed_pct: float
    counts: str
    usage: str
    terminal: bool


def row(batch: Batch, now: int) -> Row:
    total = batch.total
    succeeded = max(batch.completed, 0)
    failed = max(batch.failed, 0)
    end = _ended_at(batch)
    start = batch.in_progress_at or batch.created_at
    tokens = batch.input_tokens + batch.output_tokens
    usage = (f"{number(batch.input_tokens)} in / {number(batch.output_tokens)} out"
             if tokens else "—")
    return Row(batch=batch, kind=kind_of(batch), model=batch.model or batch.endpoint,
               created=iso(batch.created_at),
               duration=duration((end or now) - start),
               done_pct=round(100 * succeeded / total, 1) if total else 0.0,
               failed_pct=round(100 * failed / total, 1) if total else 0.0,
               counts=f"{number(succeeded)} done, {number(failed)} failed of {number(total)}",
               usage=usage, terminal=batch.status.is_terminal)


# -- scope --------------------------------------------------------------------------------

def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def projects_in_view(request: Request, principal: Principal) -> list[str]:
    """A member sees their project; an admin every known project, or the one `?project=`
    names."""
    chosen = ui.project_filter(request, principal)
    return [chosen] if chosen else known_projects(request, principal)


def known_projects(request: Request, principal: Principal) -> list[str]:
    names = {principal.project}
    names.update(entry.project for entry in request.app.state.keys.entries())
    names.update(_runtime(request).policy.projects)
    return sorted(names)


def find_batch(request: Request, principal: Principal, batch_id: str) -> Batch:
    """The batch, if the principal may see it; NotFound as if absent otherwise."""
    project = None if principal.is_admin else principal.project
    batch = _runtime(request).store.get_batch(project, batch_id)
    if batch is None:
        raise NotFound(f"No batch found with id '{batch_id}'.")
    return batch


# -- list ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Filters:
    status: str
    model: str
    since: str
    project: str
    page: int

    @classmethod
    def of(cls, request: Request) -> Filters:
        query = request.query_params
        status = query.get("status", "")
        since = query.get("since", "")
        try:
            page = max(int(query.get("page", "1")), 1)
        except ValueError:
            page = 1
        return cls(status=status if status in set(BatchStatus) else "",
                   model=query.get("model", "").strip(),
                   since=since if since in SINCE else "",
                   project=query.get("project", ""), page=page)

    def matches(self, batch: Batch, now: int) -> bool:
        if self.status and batch.status != self.status:
            return False
        if self.model and self.model.lower() not in (batch.model or batch.endpoint).lower():
            return False
        return not self.since or batch.created_at >= now - SINCE[self.since]

    def query(self, **changes: Any) -> str:
        """The query string of these filters, with `changes`: links keep the filters."""
        values = {"status": self.status, "model": self.model, "since": self.since,
                  "project": self.project, "page": self.page, **changes}
        return urlencode({k: v for k, v in values.items() if v and (k != "page" or v != 1)})


def batches_in_view(request: Request, principal: Principal, filters: Filters,
                    now: int) -> list[Batch]:
    store = _runtime(request).store
    found: list[Batch] = []
    for project in projects_in_view(request, principal):
        page = store.list_batches(project, after=None, limit=SCAN_LIMIT)
        found.extend(b for b in page.items if filters.matches(b, now))
    found.sort(key=lambda b: (b.created_at, b.id), reverse=True)
    return found


def list_context(request: Request, principal: Principal) -> dict[str, Any]:
    now = int(time.time())
    filters = Filters.of(request)
    matching = batches_in_view(request, principal, filters, now)
    start = (filters.page - 1) * PAGE_SIZE
    shown = matching[start:start + PAGE_SIZE]
    return {"rows": [row(b, now) for b in shown], "filters": filters,
            "total": len(matching), "total_text": number(len(matching)),
            "has_prev": filters.page > 1, "has_next": start + PAGE_SIZE < len(matching),
            "statuses": [s.value for s in BatchStatus], "since_choices": list(SINCE),
            "projects": known_projects(request, principal) if principal.is_admin else [],
            "show_project": principal.is_admin}


@router.get("/batches")
def batches_page(request: Request, principal: PagePrincipal) -> Response:
    return ui.render(request, "batches.html", **list_context(request, principal))


@router.get("/fragments/batches")
def batches_fragment(request: Request, principal: PagePrincipal) -> Response:
    return ui.render(request, "batches_rows.html", **list_context(request, principal))


# -- create ---------------------------------------------------------------------------------

def check_lines(data: bytes, endpoint: str) -> list[str]:
    """What is wrong with an upload as a batch input file, line by line (at most
    MAX_FORM_ERRORS sentences); empty when it looks valid."""
    problems: list[str] = []
    seen: set[str] = set()
    lines = [line for line in data.splitlines() if line.strip()]
    if not lines:
        return ["The file is empty: expected one JSON request per line."]
    for number_, raw in enumerate(lines, 1):
        problem = _line_problem(raw, endpoint, seen)
        if problem:
            problems.append(f"Line {number_}: {problem}")
            if len(problems) >= MAX_FORM_ERRORS:
                problems.append("Further lines were not checked.")
                break
    return problems


def _line_problem(raw: bytes, endpoint: str, seen: set[str]) -> str | None:
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "not valid JSON."
    if not isinstance(item, dict):
        return "expected a JSON object."
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' is missing; every line needs a unique one."
    if custom_id in seen:
        return f"'custom_id' '{custom_id}' is used by an earlier line; they must be unique."
    seen.add(custom_id)
    if item.get("method") != "POST":
        return "'method' must be \"POST\"."
    if not same_endpoint(item.get("url"), endpoint):
        return f"'url' is {item.get('url')!r}, but the batch's endpoint is {endpoint}."
    body = item.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "'body' must be an object with a 'model'."
    return None


def _form(request: Request, **values: Any) -> Response:
    context = {"endpoints": SUPPORTED_ENDPOINTS, "endpoint": SUPPORTED_ENDPOINTS[0],
               "window": "24h", "problems": [], **values}
    return ui.render(request, "batch_new.html", status_code=400 if context["problems"] else 200,
                     **context)


@router.get("/batches/new")
def new_batch_page(request: Request, principal: PagePrincipal) -> Response:
    return _form(request)


@router.post("/batches/new")
async def create_batch(request: Request, principal: PagePrincipal, _csrf: Csrf,
                       file: Annotated[UploadFile, File()],
                       endpoint: Annotated[str, Form()] = SUPPORTED_ENDPOINTS[0],
                       window: Annotated[str, Form()] = "24h") -> Response:
    limits = _runtime(request).policy.limits
    data = await file.read(limits.max_upload_bytes + 1)
    values = {"endpoint": endpoint, "window": window}
    if len(data) > limits.max_upload_bytes:
        return _form(request, problems=[f"The file is larger than the server's limit of "
                                        f"{number(limits.max_upload_bytes)} bytes."], **values)
    problems = check_lines(data, endpoint) if endpoint in SUPPORTED_ENDPOINTS else [
        f"Choose an endpoint among {', '.join(SUPPORTED_ENDPOINTS)}."]
    if problems:
        return _form(request, problems=problems, **values)
    service = request.app.state.service
    try:
        record = service.upload(principal.project, io.BytesIO(data),
                                filename=file.filename or "batch.jsonl", purpose="batch",
                                max_bytes=limits.max_upload_bytes,
                                quota_bytes=limits.project_quota_bytes)
        batch = service.create_batch(principal.project, input_file_id=record.id,
                                     endpoint=endpoint, completion_window=window)
    except BatcheryError as exc:
        return _form(request, problems=[str(exc)], **values)
    return RedirectResponse(f"/ui/batches/{batch.id}", status_code=303)


# -- detail -------------------------------------------------------------------------------

def timeline(batch: Batch) -> list[tuple[str, str]]:
    steps = [("created", batch.created_at), ("in progress", batch.in_progress_at),
             ("paused", batch.paused_at), ("finalizing", batch.finalizing_at),
             ("cancelling", batch.cancelling_at),
             ("completed", batch.completed_at), ("failed", batch.failed_at),
             ("expired", batch.expired_at), ("cancelled", batch.cancelled_at)]
    return [(name, iso(ts) or "") for name, ts in steps if ts is not None]


def detail_context(request: Request, principal: Principal, batch_id: str) -> dict[str, Any]:
    batch = find_batch(request, principal, batch_id)
    now = int(time.time())
    files = {"input": batch.input_file_id, "output": batch.output_file_id,
             "error": batch.error_file_id}
    return {"row": row(batch, now), "batch": batch, "timeline": timeline(batch),
            "files": {k: v for k, v in files.items() if v},
            "cancellable": batch.status in CANCELLABLE,
            "notice": request.query_params.get("notice", "")}


@router.get("/batches/{batch_id}")
def batch_page(request: Request, principal: PagePrincipal, batch_id: str) -> Response:
    context = detail_context(request, principal, batch_id)
    context.update(results_context(request, context["batch"]))
    return ui.render(request, "batch.html", **context)


@router.get("/fragments/batches/{batch_id}")
def batch_fragment(request: Request, principal: PagePrincipal, batch_id: str) -> Response:
    return ui.render(request, "batch_summary.html",
                     **detail_context(request, principal, batch_id))


@router.post("/batches/{batch_id}/cancel")
def cancel(request: Request, principal: PagePrincipal, _csrf: Csrf,
           batch_id: str) -> Response:
    batch = find_batch(request, principal, batch_id)
    notice = "Cancel requested: the batch stops after the requests now running."
    try:
        if batch.endpoint == MESSAGES_ENDPOINT:
            request.app.state.message_batches.cancel(batch.project, batch.id)
        elif batch.id.startswith(GEMINI_ID_PREFIX):
            _runtime(request).store.request_cancel(batch.project, batch.id, int(time.time()))
        else:
            request.app.state.service.cancel_batch(batch.project, batch.id)
    except BatcheryError as exc:
        notice = str(exc)
    return RedirectResponse(f"/ui/batches/{batch.id}?{urlencode({'notice': notice})}",
                            status_code=303)


@router.get("/batches/{batch_id}/files/{kind}")
def download(request: Request, principal: PagePrincipal, batch_id: str,
             kind: str) -> Response:
    batch = find_batch(request, principal, batch_id)
    file_id = {"input": batch.input_file_id, "output": batch.output_file_id,
               "error": batch.error_file_id}.get(kind)
    record = _runtime(request).store.get_file(batch.project, file_id) if file_id else None
    if record is None:
        raise NotFound(f"Batch '{batch.id}' has no {kind} file (expected one of "
                       f"{', '.join(FILE_KINDS)}, once the batch has written it).")
    stream = request.app.state.service.files.open_read(record.storage_key)
    name = f"{batch.id}_{kind}.jsonl"
    return StreamingResponse(_blocks(stream), media_type="application/jsonl",
                             headers={"content-disposition": f'attachment; filename="{name}"'})


def _blocks(stream: IO[bytes]) -> Iterator[bytes]:
    with stream:
        while block := stream.read(1 << 16):
            yield block


# -- results browser ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Result:
    line: int
    custom_id: str
    ok: bool
    code: str
    text: str


def _error_code(item: dict[str, Any]) -> str | None:
    """The error code of a result line (OpenAI or Anthropic shape); None for a success."""
    error = item.get("error")
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "error")
    result = item.get("result")
    if isinstance(result, dict):
        if result.get("type") == "succeeded":
            return None
        inner = result.get("error")
        inner = inner.get("error", inner) if isinstance(inner, dict) else {}
        return str(inner.get("type") or result.get("type") or "error")
    response = item.get("response")
    status = response.get("status_code", 200) if isinstance(response, dict) else 200
    if isinstance(status, int) and status >= 400:
        body = response.get("body") if isinstance(response, dict) else None
        body_error = body.get("error") if isinstance(body, dict) else None
        if isinstance(body_error, dict) and (body_error.get("code") or body_error.get("type")):
            return str(body_error.get("code") or body_error.get("type"))
        return f"http_{status}"
    return None


def read_results(request: Request, batch: Batch) -> list[Result]:
    runtime = _runtime(request)
    results: list[Result] = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        record = runtime.store.get_file(batch.project, file_id) if file_id else None
        if record is None:
            continue
        with request.app.state.service.files.open_read(record.storage_key) as stream:
            for raw in stream:
                if len(results) >= RESULT_SCAN_LIMIT:
                    return results
                results.append(_result(len(results) + 1, raw))
    return results


def _result(line: int, raw: bytes) -> Result:
    text = raw.decode(errors="replace").strip()
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Result(line, "", False, "unreadable_line", text[:400])
    if not isinstance(item, dict):
        return Result(line, "", False, "unreadable_line", text[:400])
    code = _error_code(item)
    return Result(line, str(item.get("custom_id", "")), code is None, code or "", text[:400])


def error_groups(batch: Batch, results: list[Result]) -> list[dict[str, Any]]:
    """Errors by code, most frequent first, each with a count and one example."""
    groups: dict[str, dict[str, Any]] = {}
    for error in batch.errors or []:
        example = f"line {error.line}: {error.message}" if error.line else error.message
        group = groups.setdefault(error.code, {"code": error.code, "count": 0,
                                               "example": example})
        group["count"] += 1
    for result in results:
        if not result.ok:
            group = groups.setdefault(result.code, {"code": result.code, "count": 0,
                                                    "example": result.text})
            group["count"] += 1
    ordered = sorted(groups.values(), key=lambda g: (-g["count"], g["code"]))
    return [{**g, "count_text": number(g["count"])} for g in ordered]


def results_context(request: Request, batch: Batch) -> dict[str, Any]:
    query = request.query_params
    search = query.get("q", "").strip()
    wanted = query.get("result", "")
    try:
        page = max(int(query.get("rpage", "1")), 1)
    except ValueError:
        page = 1
    results = read_results(request, batch)
    shown = [r for r in results if (not search or search in r.custom_id)
             and (wanted != "ok" or r.ok) and (wanted != "error" or not r.ok)]
    start = (page - 1) * RESULTS_PAGE_SIZE

    def link(to_page: int) -> str:
        values = {"q": search, "result": wanted, "rpage": to_page}
        return "?" + urlencode({k: v for k, v in values.items() if v}) + "#results"

    return {"results": shown[start:start + RESULTS_PAGE_SIZE], "results_total": len(shown),
            "results_total_text": number(len(shown)), "search": search,
            "result_filter": wanted, "error_groups": error_groups(batch, results),
            "results_prev": link(page - 1) if page > 1 else None,
            "results_next": link(page + 1) if start + RESULTS_PAGE_SIZE < len(shown)
            else None}
