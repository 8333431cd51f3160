"""A JSON response rendered with orjson, and the schemas of the routes' answers."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field
from starlette import responses

from batchery.model.jobs import JobStatus, OutputMode, WorkerState


class JSONResponse(responses.JSONResponse):
    """Starlette's JSON response, rendered with orjson. A subclass of it, so that FastAPI
    documents answers as the JSON objects they are."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def ok(model: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: its answer, documented by `model`."""
    return {200: {"model": model, "description": description}}


def stream(media_type: str, description: str,
           schema: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: a streamed answer of `media_type` (text or bytes)."""
    return {200: {"description": description,
                  "content": {media_type: {"schema": schema or {"type": "string"}}}}}


# -- the job API's objects, documented (`routes/jobs.py` and `job_wire.py` render them) ------

class WorkerPool(BaseModel):
    min: int
    max: int
    idle_seconds: float


class DeploymentInfo(BaseModel):
    name: str
    backend: str
    default: bool
    workers: WorkerPool | None
    source: str
    #: Extension: US dollars per million `input` and `output` tokens, if declared.
    prices: dict[str, float] | None


class DeploymentList(BaseModel):
    object: Literal["list"]
    data: list[DeploymentInfo]


class EndpointInfo(BaseModel):
    name: str
    object: Literal["endpoint"]
    default_deployment: str
    source: str
    #: The project that owns it; null for the config file's endpoints.
    project: str | None
    deployments: list[DeploymentInfo]


class EndpointList(BaseModel):
    object: Literal["list"]
    data: list[EndpointInfo]


class EndpointDeleted(BaseModel):
    name: str
    object: Literal["endpoint.deleted"]
    deleted: Literal[True]


class JobDryRun(BaseModel):
    object: Literal["job.dry_run"]
    endpoint: str
    deployment: str
    files: list[str]
    total_items: int
    total_batch_count: int


class JobBatchMetrics(BaseModel):
    """A job's batches so far. A batch is tried until it succeeds or runs out of retries
    (then it is a dead letter): attempts, batches and items are counted apart. The first
    five fields are the Cortex-compatible names, kept; the others say what they count."""

    succeeded: int = Field(description="Batches that succeeded (Cortex's name; the same as "
                                       "`batches_succeeded`).")
    failed: int = Field(description="Failed attempts, not batches: a batch that failed "
                                    "twice counts twice (Cortex's name; the same as "
                                    "`batch_attempts_failed`).")
    dead_letters: int = Field(description="Batches out of retries (the same as "
                                          "`batches_dead_lettered`).")
    average_time_per_batch: float | None = Field(
        description="Seconds per succeeded batch; null before the first (the same as "
                    "`seconds_per_succeeded_batch`).")
    avg_time_per_batch: float | None = Field(
        description="Cortex's name for `average_time_per_batch`.")
    batches_succeeded: int = Field(
        description="Batches that succeeded, each counted once whatever its attempts.")
    batch_attempts_failed: int = Field(
        description="Attempts that failed (the predictor raised, or ran past "
                    "`batch_timeout`), over all batches: a batch that failed twice and then "
                    "succeeded adds 2.")
    batches_dead_lettered: int = Field(
        description="Batches that failed their last allowed attempt (`max_retries` + 1 "
                    "attempts): they are listed at `failed_batches`.")
    items_succeeded: int = Field(description="Items in the succeeded batches.")
    items_failed: int = Field(description="Items in the dead-lettered batches.")
    seconds_per_succeeded_batch: float | None = Field(
        description="The mean duration, in seconds, of the successful attempt of each "
                    "succeeded batch; failed attempts are not counted. Null before the "
                    "first batch succeeds.")


class JobItemCounts(BaseModel):
    total: int
    succeeded: int
    failed: int


class JobInfo(BaseModel):
    id: str
    object: Literal["job"]
    endpoint: str
    deployment: str
    status: JobStatus
    #: The input's kind, and a summary of it.
    input: dict[str, Any]
    workers: int | None
    config: dict[str, Any]
    timeout: float | None
    batch_timeout: float | None
    max_retries: int
    error_threshold: int
    output: OutputMode
    output_path: str
    total_batch_count: int
    enqueuing_done: bool
    batch_metrics: JobBatchMetrics
    item_counts: JobItemCounts
    error: str | None
    results_url: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    #: Extension: higher is claimed first (-1000 to 1000; 0 by default).
    priority: int
    #: Extension: when the job was paused, while it is.
    paused_at: float | None
    #: Extension: sentences the caller should read (no live worker, say).
    warnings: list[str] | None
    #: Extension: the job whose dead letters this one reruns (`POST /api/v1/jobs/{id}/retry`).
    retry_of: str | None = None
    #: Only on one job (not in listings): its queue and its workers' states.
    batches_in_queue: int = 0
    batches_in_flight: int = 0
    worker_counts: dict[str, int] = Field(default_factory=dict)


class JobList(BaseModel):
    object: Literal["list"]
    data: list[JobInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None


class JobWorkerInfo(BaseModel):
    id: str
    host: str
    pid: int
    state: WorkerState
    current_batch: int | None
    batches_done: int
    started_at: float
    last_heartbeat: float
    #: Extension: why a `pending` worker (Ray) is not placed yet.
    reason: str | None = None


class JobWorkerList(BaseModel):
    object: Literal["list"]
    data: list[JobWorkerInfo]


class FailedBatch(BaseModel):
    batch_id: str
    index: int
    first_item: int
    item_count: int
    attempts: int
    error: str | None


class FailedBatchList(BaseModel):
    object: Literal["list"]
    data: list[FailedBatch]


# -- API keys (`routes/keys.py`) -------------------------------------------------------------

class ApiKey(BaseModel):
    name: str
    object: Literal["api_key"]
    project: str
    role: Literal["admin", "member"]
    created_at: int | None
    revoked_at: int | None


class ApiKeyList(BaseModel):
    object: Literal["list"]
    data: list[ApiKey]


class NewApiKey(ApiKey):
    #: The key itself: shown in this answer only.
    key: str
