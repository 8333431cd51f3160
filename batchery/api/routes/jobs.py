"""`/api/v1`: the native job API (endpoints, jobs, their workers, logs and results)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.responses import StreamingResponse

from batchery.api import bodies
from batchery.api import responses as docs
from batchery.api.bodies import json_body
from batchery.api.deps import Caller, Project, read
from batchery.api.job_wire import job_json
from batchery.api.responses import JSONResponse
from batchery.api.routes import reruns
from batchery.jobs import results as job_results
from batchery.jobs.joblog import SETTLE_S
from batchery.jobs.service import DryRun, JobService
from batchery.model.cursors import DEFAULT_PAGE_LINES, MAX_PAGE_LINES, cursor_pattern
from batchery.model.deployments import Deployment, Endpoint
from batchery.model.jobs import Job, JobBatch, JobStage, JobStatus, JobWorker
from batchery.ports.jobs import LogCursor

router = APIRouter()
#: How often a followed log looks for new lines, in seconds.
FOLLOW_POLL_S = 0.25
#: Log lines read from the store at a time.
LOG_PAGE = 1000


async def get_jobs(request: Request) -> JobService:
    service: JobService = request.app.state.jobs
    return service


Jobs = Annotated[JobService, Depends(get_jobs)]


# -- endpoints -------------------------------------------------------------------------

def _deployment_json(d: Deployment, default: str) -> dict[str, Any]:
    return {"name": d.short_name, "backend": d.backend, "default": d.short_name == default,
            "workers": d.workers.to_dict() if d.workers else None, "source": d.source,
            "prices": d.prices}


def _endpoint_json(endpoint: Endpoint, members: list[Deployment]) -> dict[str, Any]:
    return {"name": endpoint.name, "object": "endpoint",
            "default_deployment": endpoint.default_deployment, "source": endpoint.source,
            "project": endpoint.project,
            "deployments": [_deployment_json(d, endpoint.default_deployment)
                            for d in members]}


@router.get("/endpoints", responses=docs.ok(docs.EndpointList, "The endpoints the caller may "
                                                                "use."))
def list_endpoints(caller: Caller, jobs: Jobs) -> Any:
    return {"object": "list",
            "data": [_endpoint_json(e, m) for e, m in jobs.list_endpoints(caller)]}


@router.post("/endpoints", responses=docs.ok(docs.EndpointInfo, "The new endpoint."),
             openapi_extra=bodies.NEW_ENDPOINT)
async def create_endpoint(request: Request, caller: Caller, jobs: Jobs) -> Any:
    caller.require_admin("create endpoints")  # before the body is read
    body = await json_body(request)
    return _endpoint_json(*await run_in_threadpool(jobs.create_endpoint, caller, body))


@router.get("/endpoints/{name}", responses=docs.ok(docs.EndpointInfo, "The endpoint."))
def get_endpoint(name: str, caller: Caller, jobs: Jobs) -> Any:
    return _endpoint_json(*jobs.get_endpoint(caller, name))


@router.patch("/endpoints/{name}", responses=docs.ok(docs.EndpointInfo, "The endpoint."),
              openapi_extra=bodies.ENDPOINT_CHANGE)
async def update_endpoint(name: str, request: Request, caller: Caller, jobs: Jobs) -> Any:
    body = await json_body(request)
    await run_in_threadpool(jobs.set_default_deployment, caller, name,
                            body.get("default_deployment"))
    return _endpoint_json(*jobs.get_endpoint(caller, name))


@router.delete("/endpoints/{name}",
               responses=docs.ok(docs.EndpointDeleted, "The endpoint is deleted."))
def delete_endpoint(name: str, caller: Caller, jobs: Jobs) -> Any:
    jobs.delete_endpoint(caller, name)
    return {"name": name, "object": "endpoint.deleted", "deleted": True}


@router.get("/endpoints/{name}/deployments",
            responses=docs.ok(docs.DeploymentList, "The endpoint's deployments."))
def list_deployments(name: str, caller: Caller, jobs: Jobs) -> Any:
    endpoint, members = jobs.get_endpoint(caller, name)
    return {"object": "list",
            "data": [_deployment_json(d, endpoint.default_deployment) for d in members]}


@router.post("/endpoints/{name}/deployments",
             responses=docs.ok(docs.EndpointInfo, "The endpoint, with the new deployment."),
             openapi_extra=bodies.NEW_DEPLOYMENT)
async def add_deployment(name: str, request: Request, caller: Caller, jobs: Jobs) -> Any:
    body = await json_body(request)
    await run_in_threadpool(jobs.add_deployment, caller, name, body)
    endpoint, members = jobs.get_endpoint(caller, name)
    return _endpoint_json(endpoint, members)


# -- jobs ------------------------------------------------------------------------------

@router.post("/endpoints/{name}/jobs",
             responses={200: {"model": docs.JobInfo | docs.JobDryRun,
                              "description": "The job; or, for a dry run, what it would "
                                             "read."}},
             openapi_extra={**bodies.JOB_SUBMISSION,
                            "parameters": [bodies.IDEMPOTENCY_HEADER]})
async def submit_job(name: str, request: Request, project: Project, jobs: Jobs,
                     dry_run: bool = False) -> Any:
    body = await json_body(request)
    result = await run_in_threadpool(
        jobs.submit, project, name, body, dry_run=dry_run,
        idempotency=bodies.idempotency_of(request, body, endpoint=name))
    if isinstance(result, DryRun):
        return {"object": "job.dry_run", "endpoint": result.endpoint,
                "deployment": result.deployment, "files": result.files,
                "total_items": result.total_items,
                "total_batch_count": result.total_batch_count}
    view = await run_in_threadpool(jobs.view, project, result.id)
    return job_json(view.job, view)


@router.get("/jobs", responses=docs.ok(docs.JobList, "The project's jobs, newest first."))
def list_jobs(project: Project, jobs: Jobs, endpoint: str | None = None,
              status: Annotated[str | None, Query(json_schema_extra={
                  "enum": [*(s.value for s in JobStatus), "", None]})] = None,
              after: str | None = None,
              limit: Annotated[int, Query(json_schema_extra={"minimum": 1,
                                                             "maximum": 100})] = 20) -> Any:
    page = jobs.list_jobs(project, endpoint=endpoint, status=status, after=after, limit=limit)
    data = [job_json(job) for job in page.items]  # `get` adds the queue and worker states
    return {"object": "list", "data": data, "has_more": page.has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/jobs/{job_id}", response_model=None,
            responses=docs.ok(docs.JobInfo, "The job."))
async def get_job(request: Request, job_id: str, project: Project, jobs: Jobs) -> JSONResponse:
    # The hot read (pollers): the answer rendered once (no response model).
    view = await read(request, jobs.view, project, job_id)
    return JSONResponse(job_json(view.job, view))


@router.delete("/jobs/{job_id}", responses=docs.ok(docs.JobInfo, "The job, stopped."))
def stop_job(job_id: str, project: Project, jobs: Jobs) -> Any:
    jobs.stop(project, job_id)
    view = jobs.view(project, job_id)
    return job_json(view.job, view)


@router.post("/jobs/{job_id}/pause", responses=docs.ok(docs.JobInfo, "The job, paused "
                                                                     "(extension)."))
def pause_job(job_id: str, project: Project, jobs: Jobs) -> Any:
    """Extension: claim none of the job's batches until it is resumed."""
    jobs.pause(project, job_id)
    view = jobs.view(project, job_id)
    return job_json(view.job, view)


@router.post("/jobs/{job_id}/resume", responses=docs.ok(docs.JobInfo, "The job, running "
                                                                      "again (extension)."))
def resume_job(job_id: str, project: Project, jobs: Jobs) -> Any:
    """Extension: run a paused job's remaining batches."""
    jobs.resume(project, job_id)
    view = jobs.view(project, job_id)
    return job_json(view.job, view)


def _worker_json(w: JobWorker) -> dict[str, Any]:
    return {"id": w.worker_id, "host": w.host, "pid": w.pid, "state": w.state.value,
            "current_batch": w.current_batch, "batches_done": w.batches_done,
            "started_at": w.started_at, "last_heartbeat": w.last_heartbeat,
            "reason": w.reason}


@router.get("/jobs/{job_id}/workers",
            responses=docs.ok(docs.JobWorkerList, "The workers that ran the job's batches."))
def job_workers(job_id: str, project: Project, jobs: Jobs) -> Any:
    return {"object": "list", "data": [_worker_json(w) for w in jobs.workers(project, job_id)]}


def _dead_letter_json(b: JobBatch) -> dict[str, Any]:
    return {"batch_id": f"{b.job_id}:{b.spec.index}", "index": b.spec.index,
            "first_item": b.spec.first_item, "item_count": b.spec.n_items,
            "attempts": b.attempts, "error": b.last_error}


@router.get("/jobs/{job_id}/failed_batches",
            responses=docs.ok(docs.FailedBatchList, "The job's dead-lettered batches."))
def failed_batches(job_id: str, project: Project, jobs: Jobs) -> Any:
    return {"object": "list",
            "data": [_dead_letter_json(b) for b in jobs.failed_batches(project, job_id)]}


@router.get("/jobs/{job_id}/results", response_class=StreamingResponse,
            responses={200: {**docs.stream(
                "application/x-ndjson", "One result a line: an ended job's whole results "
                                        "file; with `after` or `limit`, or while the job "
                                        "runs (extension), a page of the rows written so "
                                        "far.")[200], "headers": reruns.PAGE_HEADERS}})
def results(job_id: str, project: Project, jobs: Jobs,
            after: Annotated[str | None, Query(json_schema_extra={
                "pattern": cursor_pattern(job_results.STAGES)})] = None,
            limit: Annotated[int | None, Query(json_schema_extra={
                "minimum": 1, "maximum": MAX_PAGE_LINES})] = None) -> Any:
    if after is None and limit is None and jobs.get(project, job_id).stage is JobStage.DONE:
        stream = jobs.results(project, job_id)
        return StreamingResponse(iterate_in_threadpool(stream),
                                 media_type="application/x-ndjson",
                                 headers={"content-disposition":
                                          f'attachment; filename="{job_id}-results.jsonl"'})
    page = jobs.results_page(project, job_id, after, limit or DEFAULT_PAGE_LINES)
    return reruns.page_response(page, "application/x-ndjson")


@router.post("/jobs/{job_id}/retry",
             responses=docs.ok(docs.JobInfo, "The new job (extension), which reruns the "
                                             "items of the dead-letter batches."))
def retry_job(job_id: str, project: Project, jobs: Jobs) -> Any:
    retried = jobs.retry(project, job_id)
    view = jobs.view(project, retried.id)
    return job_json(view.job, view)


@router.get("/jobs/{job_id}/logs", response_class=StreamingResponse,
            responses=docs.stream("text/plain", "The job's log in time order, a line an "
                                                "entry."))
def logs(job_id: str, project: Project, jobs: Jobs, follow: bool = False,
         after: int = 0) -> Any:
    jobs.get(project, job_id)  # 404 before the stream starts
    return StreamingResponse(_log_lines(jobs, project, job_id, follow, after),
                             media_type="text/plain; charset=utf-8")


async def _log_lines(jobs: JobService, project: str, job_id: str, follow: bool,
                     after: int) -> AsyncIterator[bytes]:
    """The lines after the line `after` (an id; 0: all), in time order. Without `follow`,
    every line written so far. A follower reads only lines older than `SETTLE_S`, so a
    worker's late flush cannot put a line behind its cursor; once the job has been over
    that long, every line is written and one last read gets the rest."""
    cursor: LogCursor | int = after
    while True:
        # Read the job before the lines: once it is over, a read gets every line.
        job = await run_in_threadpool(jobs.get, project, job_id)
        horizon = time.time() - SETTLE_S
        last = not follow or _over_before(job, horizon)
        batch = await run_in_threadpool(jobs.store.read_logs, job.id, after=cursor,
                                        limit=LOG_PAGE, before=None if last else horizon)
        if batch:
            cursor = LogCursor.of(batch[-1])
            yield "".join(line.render() + "\n" for line in batch).encode()
            continue
        if last:
            return
        await asyncio.sleep(FOLLOW_POLL_S)


def _over_before(job: Job, horizon: float) -> bool:
    """Whether the job ended before `horizon`: its workers have written all they will."""
    return job.stage is JobStage.DONE and (job.ended_at is None or job.ended_at < horizon)
