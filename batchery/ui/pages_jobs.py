"""The dashboard's job pages (list, detail with live status and logs, stop) and the
webhook endpoints page with their recent deliveries. They read through `JobService` and
`WebhookService`, the same use cases the API calls."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from batchery import ui
from batchery.jobs.service import JobService
from batchery.model.exceptions import InvalidRequest, NotFound
from batchery.model.jobs import Job, JobStage, JobStatus, LogLine
from batchery.model.webhooks import WebhookEndpoint
from batchery.security.auth import KeyRing
from batchery.security.trust import Principal
from batchery.ui.auth import Csrf, PagePrincipal
from batchery.webhooks.service import WebhookService

router = ui.router
#: Jobs a list page shows.
PAGE_SIZE = 20
#: Log lines a page shows: the newest ones that pass the filters.
LOG_TAIL = 500
#: Seconds the logs are still followed after a job ends.
LOG_GRACE_S = 10.0
#: Log lines read from the store at most for one view (in pages of `_LOG_READ`).
_LOG_SCAN = 50_000
_LOG_READ = 1000
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Delivery attempts shown per webhook endpoint.
ATTEMPTS_SHOWN = 10


def _jobs(request: Request) -> JobService:
    service: JobService = request.app.state.jobs
    return service


def _webhooks(request: Request) -> WebhookService:
    service: WebhookService = request.app.state.webhooks
    return service


def _known_projects(request: Request, principal: Principal) -> list[str]:
    """The projects an admin's "all projects" view covers: those that hold keys, and the
    admin's own (the only one in open mode)."""
    keys: KeyRing = request.app.state.keys
    found = {entry.project for entry in keys.entries()} if not keys.open else set()
    return sorted(found | {principal.project})


def _project_choice(request: Request, principal: Principal) -> list[str]:
    """The projects an admin may choose between; none for a member, or in open mode."""
    if not principal.is_admin or principal.open:
        return []
    return _known_projects(request, principal)


def _missing(request: Request, error: NotFound) -> Response:
    return ui.render(request, "error.html", status_code=404, title="Not found",
                     message=str(error))


def _job_project(request: Request, principal: Principal, job_id: str) -> str:
    """The project a job page reads in: a member's own; for an admin, the job's own."""
    if not principal.is_admin:
        return principal.project
    job = _jobs(request).store.get_job(None, job_id)
    return job.project if job is not None else principal.project


def _with_project(job: Job, principal: Principal) -> str:
    """The query that takes an admin to a job of another project."""
    return "" if job.project == principal.project else "?" + urlencode({"project": job.project})


# -- jobs list ----------------------------------------------------------------------------


@router.get("/jobs", response_class=HTMLResponse)
def jobs_list(request: Request, principal: PagePrincipal) -> Response:
    return ui.render(request, "jobs.html", **_list_context(request, principal))


@router.get("/fragments/jobs", response_class=HTMLResponse)
def jobs_fragment(request: Request, principal: PagePrincipal) -> Response:
    """The list's rows, polled while one of them has not ended."""
    return ui.fragment(request, "jobs_rows.html", **_list_context(request, principal))


def _list_context(request: Request, principal: Principal) -> dict[str, Any]:
    project = ui.project_filter(request, principal)
    status = request.query_params.get("status") or None
    after = request.query_params.get("after") or None
    query = request.url.query
    context: dict[str, Any] = {"status": status or "", "statuses": [s.value for s in JobStatus],
                               "projects": _project_choice(request, principal),
                               "next_query": None, "error": None, "jobs": [], "live": False,
                               "list_query": f"?{query}" if query else ""}
    try:
        found, more = _list(request, principal, project, status, after)
    except InvalidRequest as error:
        return {**context, "error": str(error)}
    context["more_elsewhere"] = more and project is None
    if more and found and project is not None:
        pairs = {"project": request.query_params.get("project"), "status": status,
                 "after": found[-1].id}
        context["next_query"] = urlencode({k: v for k, v in pairs.items() if v})
    context["jobs"] = [_job_row(job, principal) for job in found]
    context["any_jobs"] = bool(found) or status is not None or after is not None
    context["live"] = any(not job.status.is_terminal for job in found)
    return context


def _list(request: Request, principal: Principal, project: str | None, status: str | None,
          after: str | None) -> tuple[list[Job], bool]:
    """A page of one project's jobs; for an admin's "all projects", the newest of every
    project (ids sort by submission), paged by choosing a project."""
    service = _jobs(request)
    if project is not None:
        page = service.list_jobs(project, status=status, after=after, limit=PAGE_SIZE)
        return page.items, page.has_more
    merged: list[Job] = []
    more = False
    for each in _known_projects(request, principal):
        page = service.list_jobs(each, status=status, limit=PAGE_SIZE)
        merged.extend(page.items)
        more = more or page.has_more
    merged.sort(key=lambda job: job.created_at, reverse=True)
    return merged[:PAGE_SIZE], more or len(merged) > PAGE_SIZE


def _job_row(job: Job, principal: Principal) -> dict[str, Any]:
    return {"job": job, "progress": _progress(job), "duration": _duration(job),
            "query": _with_project(job, principal)}


@dataclass(frozen=True, slots=True)
class Progress:
    done: int
    failed: int
    total: int

    @property
    def done_pct(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    @property
    def failed_pct(self) -> float:
        return 100.0 * self.failed / self.total if self.total else 0.0


def _progress(job: Job) -> Progress:
    total = max(job.total_items, job.items_succeeded + job.items_failed)
    return Progress(done=job.items_succeeded, failed=job.items_failed, total=total)


# -- job detail ---------------------------------------------------------------------------


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_detail(job_id: str, request: Request, principal: PagePrincipal) -> Response:
    project = _job_project(request, principal, job_id)
    level, worker = _log_filters(request)
    try:
        context = _job_context(request, principal, project, job_id)
    except NotFound as error:
        return _missing(request, error)
    return ui.render(request, "job.html", level=level, worker=worker, levels=LOG_LEVELS,
                     log_query=_log_query(context["job"], principal, level, worker),
                     logs=_log_tail(request, project, job_id, level, worker),
                     **{**context, "logs_live": _logs_live(context["job"])})


@router.get("/fragments/jobs/{job_id}", response_class=HTMLResponse)
def job_fragment(job_id: str, request: Request, principal: PagePrincipal) -> Response:
    """The live part of a job's page: status, counts, metrics, workers, failed batches."""
    project = _job_project(request, principal, job_id)
    return ui.fragment(request, "job_status.html",
                       **_job_context(request, principal, project, job_id))


@router.get("/fragments/jobs/{job_id}/logs", response_class=HTMLResponse)
def job_logs_fragment(job_id: str, request: Request, principal: PagePrincipal) -> Response:
    """The newest log lines that pass the page's filters."""
    project = _job_project(request, principal, job_id)
    level, worker = _log_filters(request)
    job = _jobs(request).get(project, job_id)
    return ui.fragment(request, "job_logs.html", job=job, logs_live=_logs_live(job),
                       log_query=_log_query(job, principal, level, worker),
                       logs=_log_tail(request, project, job.id, level, worker))


def _live(job: Job) -> bool:
    # A stopped job is `stopped` at once while its batches in flight end, and workers
    # flush their last log lines a moment later: follow until nothing is left to do.
    return job.stage is not JobStage.DONE


def _logs_live(job: Job) -> bool:
    """Workers flush their last lines a moment after their work: follow a little longer."""
    if _live(job):
        return True
    return job.ended_at is None or time.time() - job.ended_at < LOG_GRACE_S


def _job_context(request: Request, principal: Principal, project: str,
                 job_id: str) -> dict[str, Any]:
    service = _jobs(request)
    view = service.view(project, job_id)
    job = view.job
    return {"job": job, "progress": _progress(job), "duration": _duration(job),
            "batch_states": view.batch_states, "worker_counts": view.worker_counts,
            "workers": service.workers(project, job.id),
            "failed_batches": service.failed_batches(project, job.id),
            "live": _live(job), "times": _times(job), "secs": _seconds,
            "query": _with_project(job, principal)}


def _log_filters(request: Request) -> tuple[str, str]:
    level = (request.query_params.get("level") or "").upper()
    return (level if level in LOG_LEVELS else ""), request.query_params.get("worker") or ""


def _log_query(job: Job, principal: Principal, level: str, worker: str) -> str:
    pairs = [("project", job.project if job.project != principal.project else ""),
             ("level", level), ("worker", worker)]
    shown = urlencode([(k, v) for k, v in pairs if v])
    return "?" + shown if shown else ""


def _log_tail(request: Request, project: str, job_id: str, level: str,
              worker: str) -> dict[str, Any]:
    """The newest `LOG_TAIL` lines at or above `level` from `worker`, and the workers
    seen in the log (for the filter)."""
    service = _jobs(request)
    minimum = LOG_LEVELS.index(level) if level else 0
    kept: list[LogLine] = []
    sources: set[str] = set()
    after, scanned = 0, 0
    while scanned < _LOG_SCAN:
        lines = service.logs(project, job_id, after=after, limit=_LOG_READ)
        sources.update(line.source for line in lines)
        kept.extend(line for line in lines if _level_rank(line.level) >= minimum
                    and (not worker or line.source == worker))
        kept = kept[-LOG_TAIL:]
        scanned += len(lines)
        if len(lines) < _LOG_READ:
            break
        after = lines[-1].id
    return {"lines": kept, "sources": sorted(sources), "truncated": len(kept) >= LOG_TAIL,
            "capped": scanned >= _LOG_SCAN}


def _level_rank(level: str) -> int:
    upper = level.upper()
    return LOG_LEVELS.index(upper) if upper in LOG_LEVELS else len(LOG_LEVELS)


@router.post("/jobs/{job_id}/stop")
async def job_stop(job_id: str, request: Request, principal: PagePrincipal,
                   _csrf: Csrf) -> Response:
    project = await run_in_threadpool(_job_project, request, principal, job_id)
    service = _jobs(request)
    job = await run_in_threadpool(service.get, project, job_id)
    if not job.status.is_terminal:
        await run_in_threadpool(service.stop, project, job_id)
    return RedirectResponse(f"/ui/jobs/{job_id}{_with_project(job, principal)}",
                            status_code=303)


# -- webhooks -----------------------------------------------------------------------------


@router.get("/webhooks", response_class=HTMLResponse)
def webhooks_page(request: Request, principal: PagePrincipal) -> Response:
    """The project's webhook endpoints, each with its latest delivery attempts. Webhook
    endpoints belong to a project: an admin sees their own unless `?project=` names one."""
    project = ui.project_filter(request, principal) or principal.project
    service = _webhooks(request)
    endpoints: list[WebhookEndpoint] = []
    after: str | None = None
    while True:
        page = service.list_endpoints(project, after=after, limit=100)
        endpoints.extend(page.items)
        if not page.has_more or not page.items:
            break
        after = page.items[-1].id
    shown = [{"endpoint": e, "attempts": service.attempts(project, e.id, limit=ATTEMPTS_SHOWN)}
             for e in endpoints]
    return ui.render(request, "webhooks.html", shown_project=project, endpoints=shown,
                     projects=_project_choice(request, principal))


# -- formatting ---------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    """Short spans (a batch's average time) need the fraction that `duration` drops."""
    if value is None:
        return ui.duration(None)
    return f"{value:.2f}s" if value < 60 else ui.duration(value)


def _duration(job: Job) -> str:
    if job.started_at is None:
        return ui.duration(None)
    end = job.ended_at if job.ended_at is not None else time.time()
    return ui.duration(end - job.started_at)


def _times(job: Job) -> list[tuple[str, float]]:
    """The job's status times, in order, for its timeline."""
    found = [("created", job.created_at), ("started", job.started_at),
             ("paused", job.paused_at), ("ended", job.ended_at)]
    return [(name, ts) for name, ts in found if ts]
