"""`/api/v1/status` (extension): what `batchery status` shows — the server's version, its
live workers by state, the active work and the queue, counted as the dashboard's overview
counts them (a member sees their project; an admin every project, or `?project=`)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from batchery import __version__
from batchery.api.deps import Caller
from batchery.api.responses import ok
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
