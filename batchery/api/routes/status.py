"""`/api/v1/status` (extension): what `batchery status` shows — the server's version, its
live workers by state, the active work and the queue, counted as the dashboard's overview
counts them (a member sees their project; an admin every project, or `?project=`).

`/api/v1/workers` (extension): the batch engine's live workers one by one — state, what
each runs, and the models each loaded when it started, with their load times."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from batchery import __version__
from batchery.api.deps import Caller, Service, read
from batchery.api.responses import ok
from batchery.ports.store import LIVE_WORKER_S
from batchery.ui.pages_core import overview_data

router = APIRouter()


class DeploymentWorkers(BaseModel):
    deployment: str
    #: Live job workers by state (`idle`, `running`, …).
    states: dict[str, int]
    total: int


class LiveWorkers(BaseModel):
    #: The batch engine's live workers (OpenAI and message batches) by state.
    batches: dict[str, int]
    #: Each deployment's live job workers.
    jobs: list[DeploymentWorkers]


class ActiveWork(BaseModel):
    batches: int
    message_batches: int
    jobs: int
    #: When the oldest of them was created (Unix seconds), or null.
    oldest: float | None


class QueueDepth(BaseModel):
    #: Batch lines and job items waiting for a worker.
    depth: int
    lines: int
    job_items: int
    oldest: float | None


class ServerStatus(BaseModel):
    object: Literal["status"]
    version: str
    workers: LiveWorkers
    active: ActiveWork
    queue: QueueDepth
    #: Lines (and job items) finished per second over the last minute.
    lines_per_second: float


@router.get("/status", responses=ok(ServerStatus, "The server's version, live workers, "
                                                  "active work and queue (extension)."))
def server_status(request: Request, caller: Caller) -> Any:
    found = overview_data(request, caller)
    return {"object": "status", "version": __version__,
            "workers": {"batches": found["engine_workers"],
                        "jobs": [{"deployment": w["deployment"], "states": w["states"],
                                  "total": w["total"]} for w in found["workers"]]},
            "active": found["activity"], "queue": found["queue"],
            "lines_per_second": found["rate_now"]}


class EngineWorker(BaseModel):
    id: str
    host: str
    pid: int
    #: `starting`, `loading` (its models, before it claims work), `idle` or `running`.
    state: str
    #: What it works on: the model it loads, or `batch_id:chunk` (a batch's phase).
    current: str | None
    chunks_done: int
    started_at: float
    last_heartbeat: float
    #: The models it loaded when it started (its warm pool), with the seconds each took.
    load_seconds: dict[str, float]
    #: The models it could not load when it started, with why; their lines fail.
    load_errors: dict[str, str]


class EngineWorkerList(BaseModel):
    object: Literal["list"]
    data: list[EngineWorker]


@router.get("/workers", responses=ok(EngineWorkerList, "The batch engine's live workers, "
                                                      "with their models' load times "
                                                      "(extension)."))
async def engine_workers(request: Request, caller: Caller, service: Service) -> Any:
    found = await read(request, service.store.list_workers)
    now = time.time()
    return {"object": "list", "data": [
        {"id": w.id, "host": w.host, "pid": w.pid, "state": w.state, "current": w.current,
         "chunks_done": w.chunks_done, "started_at": w.started_at,
         "last_heartbeat": w.last_heartbeat, "load_seconds": w.load_s,
         "load_errors": w.load_errors}
        for w in found if w.state != "stopped" and now - w.last_heartbeat < LIVE_WORKER_S]}
