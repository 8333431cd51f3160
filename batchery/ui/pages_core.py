"""The dashboard's core pages: sign-in, the overview and the endpoints."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Form, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from batchery.model.batches import BatchStatus
from batchery.model.exceptions import Forbidden, InvalidRequest, NotFound, Unauthorized
from batchery.model.jobs import JobStatus
from batchery.security.trust import Principal
from batchery.stores.sql import tables as t
from batchery.ui import auth, forbidden_page, project_filter, render, router
from batchery.wire.anthropic import MESSAGES_ENDPOINT

#: A worker whose last heartbeat is older than this is shown as gone, in seconds.
STALE_S = 60.0
#: The chart's span and bucket, in seconds.
CHART_SPAN_S = 3600
CHART_BUCKET_S = 60

ACTIVE_BATCH = [s.value for s in BatchStatus if not s.is_terminal]
ACTIVE_JOB = [s.value for s in JobStatus if not s.is_terminal]


# -- sign-in ---------------------------------------------------------------------------

@router.get("/login")
def login_page(request: Request, next: str = "/ui") -> Response:
    if request.app.state.keys.open:
        return RedirectResponse(auth.safe_next(next), status_code=303)
    return render(request, "login.html", next=auth.safe_next(next), error=None)


@router.post("/login")
def login(request: Request, key: Annotated[str, Form()] = "",
          next: Annotated[str, Form()] = "/ui") -> Response:
    target = auth.safe_next(next)
    if not auth._same_origin(request):
        return render(request, "login.html", status_code=403, next=target,
                      error="The sign-in form was posted from another site.")
    try:
        request.app.state.keys.principal_for(key.strip())
    except Unauthorized as exc:
        return render(request, "login.html", status_code=401, next=target, error=str(exc))
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(auth.COOKIE, key.strip(), httponly=True, samesite="strict",
                        path=auth.COOKIE_PATH, secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request, _: auth.Csrf) -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(auth.COOKIE, path=auth.COOKIE_PATH, httponly=True,
                           samesite="strict")
    return response


# -- overview ----------------------------------------------------------------------------

def _engine(request: Request) -> sa.Engine:
    engine: sa.Engine = request.app.state.runtime.store.engine
    return engine


def _in_project(column: Any, project: str | None) -> Any:
    return sa.true() if project is None else column == project


def _activity(conn: sa.Connection, project: str | None) -> dict[str, Any]:
    """Active batches, message batches and jobs, and the oldest of them still waiting."""
    rows = conn.execute(
        sa.select(t.batches.c.endpoint == MESSAGES_ENDPOINT, sa.func.count(),
                  sa.func.min(t.batches.c.created_at))
        .where(t.batches.c.status.in_(ACTIVE_BATCH), _in_project(t.batches.c.project, project))
        .group_by(t.batches.c.endpoint == MESSAGES_ENDPOINT)).all()
    counts = {bool(is_msg): (int(n), oldest) for is_msg, n, oldest in rows}
    job_n, job_oldest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(t.jobs.c.created_at))
        .where(t.jobs.c.status.in_(ACTIVE_JOB), _in_project(t.jobs.c.project, project))).one()
    oldest = [v for v in (counts.get(False, (0, None))[1], counts.get(True, (0, None))[1],
                          job_oldest) if v is not None]
    return {"batches": counts.get(False, (0, None))[0],
            "message_batches": counts.get(True, (0, None))[0],
            "jobs": int(job_n), "oldest": min(oldest) if oldest else None}


def _queue(conn: sa.Connection, project: str | None) -> dict[str, Any]:
    """Lines and items waiting for a worker, and when the oldest of them was submitted."""
    lines, oldest_batch = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(t.chunks.c.n_lines), 0),
                  sa.func.min(t.batches.c.created_at))
        .select_from(t.chunks.join(t.batches, t.batches.c.id == t.chunks.c.batch_id))
        .where(t.chunks.c.state == "queued", _in_project(t.batches.c.project, project))).one()
    items, oldest_job = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(t.job_batches.c.n_items), 0),
                  sa.func.min(t.jobs.c.created_at))
        .select_from(t.job_batches.join(t.jobs, t.jobs.c.id == t.job_batches.c.job_id))
        .where(t.job_batches.c.state == "queued", _in_project(t.jobs.c.project, project))).one()
    oldest = [v for v in (oldest_batch, oldest_job) if v is not None]
    return {"depth": int(lines) + int(items), "lines": int(lines), "job_items": int(items),
            "oldest": min(oldest) if oldest else None}


def _workers(conn: sa.Connection, deployments: Sequence[Any], now: float
             ) -> list[dict[str, Any]]:
    """Live job workers by state, per deployment; every deployment shows, even at zero."""
    by_dep: dict[str, dict[str, int]] = {d.name: {} for d in deployments}
    rows = conn.execute(
        sa.select(t.jobs.c.deployment, t.job_workers.c.state, sa.func.count())
        .select_from(t.job_workers.join(t.jobs, t.jobs.c.id == t.job_workers.c.job_id))
        .where(t.job_workers.c.last_heartbeat > now - STALE_S,
               t.job_workers.c.state != "stopped")
        .group_by(t.jobs.c.deployment, t.job_workers.c.state))
    for dep, state, n in rows:
        by_dep.setdefault(dep, {})[state] = int(n)
    pools = {d.name: d.workers for d in deployments}
    return [{"deployment": name, "states": states, "total": sum(states.values()),
             "pool": pools.get(name)} for name, states in sorted(by_dep.items())]


def _engine_workers(conn: sa.Connection, now: float) -> dict[str, int]:
    """The batch engine's workers (OpenAI and message batches) by state."""
    rows = conn.execute(
        sa.select(t.workers.c.state, sa.func.count())
        .where(t.workers.c.last_heartbeat > now - STALE_S, t.workers.c.state != "stopped")
        .group_by(t.workers.c.state))
    return {state: int(n) for state, n in rows}


def _throughput(conn: sa.Connection, project: str | None, now: float) -> list[float]:
    """Lines (and job items) per second over the last hour, one value per minute: each
    finished batch or job counts its lines in the minute it ended."""
    start = now - CHART_SPAN_S
    buckets = [0.0] * (CHART_SPAN_S // CHART_BUCKET_S)
    batch_rows = conn.execute(
        sa.select(t.batches.c.completed_at, t.batches.c.completed + t.batches.c.failed)
        .where(t.batches.c.completed_at >= int(start),
               _in_project(t.batches.c.project, project)))
    job_rows = conn.execute(
        sa.select(t.jobs.c.ended_at, t.jobs.c.items_succeeded + t.jobs.c.items_failed)
        .where(t.jobs.c.ended_at >= start, _in_project(t.jobs.c.project, project)))
    for ended, lines in [*batch_rows, *job_rows]:
        index = min(int((ended - start) // CHART_BUCKET_S), len(buckets) - 1)
        if index >= 0:
            buckets[index] += (lines or 0) / CHART_BUCKET_S
    return buckets


def chart_points(values: list[float], width: int = 600, height: int = 120) -> str:
    """An SVG polyline's points for `values`, scaled to the box."""
    top = max(values) or 1.0
    step = width / max(len(values) - 1, 1)
    return " ".join(f"{i * step:.1f},{height - v / top * (height - 4):.1f}"
                    for i, v in enumerate(values))


def overview_data(request: Request, principal: Principal) -> dict[str, Any]:
    project = project_filter(request, principal)
    now = time.time()
    deployments = request.app.state.runtime.store.list_deployments()
    visible = {d.name for _, members in request.app.state.jobs.list_endpoints(principal)
               for d in members}
    deployments = [d for d in deployments if d.name in visible]
    with _engine(request).connect() as conn:
        rate = _throughput(conn, project, now)
        return {"activity": _activity(conn, project), "queue": _queue(conn, project),
                "workers": _workers(conn, deployments, now),
                "engine_workers": _engine_workers(conn, now),
                "rate": rate, "rate_now": rate[-1], "rate_max": max(rate),
                "points": chart_points(rate), "now": now}


@router.get("")
async def overview(request: Request, principal: auth.PagePrincipal) -> Response:
    data = await run_in_threadpool(overview_data, request, principal)
    return render(request, "overview.html", **data)


@router.get("/fragments/overview")
async def overview_fragment(request: Request, principal: auth.PagePrincipal) -> Response:
    data = await run_in_threadpool(overview_data, request, principal)
    return render(request, "overview_live.html", **data)


# -- endpoints -----------------------------------------------------------------------------

@router.get("/endpoints")
def endpoints_page(request: Request, principal: auth.PagePrincipal) -> Response:
    endpoints = request.app.state.jobs.list_endpoints(principal)
    project = project_filter(request, principal)
    if project is not None and principal.is_admin:
        endpoints = [(e, m) for e, m in endpoints
                     if e.project in (None, project)]
    with _engine(request).connect() as conn:
        current = {w["deployment"]: w["total"] for w in _workers(conn, [], time.time())}
    return render(request, "endpoints.html", endpoints=endpoints, current=current,
                  message=request.query_params.get("message"))


@router.post("/endpoints/{name}/default")
def switch_default(request: Request, name: str, principal: auth.PagePrincipal,
                   _: auth.Csrf, deployment: Annotated[str, Form()] = "") -> Response:
    try:
        principal.require_admin("switch an endpoint's default deployment")
        request.app.state.jobs.set_default_deployment(principal, name, deployment)
    except Forbidden as exc:
        return forbidden_page(request, exc)
    except NotFound as exc:
        return render(request, "error.html", status_code=404, title="Not found",
                      message=str(exc))
    except InvalidRequest as exc:
        return render(request, "error.html", status_code=400, title="Not switched",
                      message=str(exc))
    return RedirectResponse(f"/ui/endpoints?message=Default+of+{name}+is+now+{deployment}",
                            status_code=303)
