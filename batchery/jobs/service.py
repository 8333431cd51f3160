"""`JobService`: the job API's use cases (submit, inspect, stop, read results and logs)
and the management of endpoints, over the store. Framework-free; the HTTP routes and the
CLI call it."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from batchery import backends, secrets
from batchery.deployments import API, Deployment, Endpoint, parse_deployment, parse_endpoint
from batchery.exceptions import ConfigError, Conflict, InvalidRequest, NotFound
from batchery.jobs import inputs, outputs, submission
from batchery.jobs.model import (
    BatchState,
    InputKind,
    Job,
    JobBatch,
    JobInput,
    JobStage,
    JobStatus,
    JobWorker,
    LogLine,
    WorkerState,
    job_id,
)
from batchery.paging import Page
from batchery.store import Store

PYTHON_BACKEND = "python"


@dataclass(frozen=True, kw_only=True, slots=True)
class DryRun:
    endpoint: str
    deployment: str
    files: list[str]
    total_items: int
    total_batch_count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class JobView:
    """A job with what is read beside it for its status."""

    job: Job
    batch_states: dict[str, int]
    worker_counts: dict[str, int]


class JobService:
    def __init__(self, store: Store, *, outputs_url: str, stall_after_s: float = 60.0) -> None:
        self.store = store
        self.outputs_url = outputs_url
        self.stall_after_s = stall_after_s

    # -- endpoints ---------------------------------------------------------------------

    def list_endpoints(self) -> list[tuple[Endpoint, list[Deployment]]]:
        members = [d for d in self.store.list_deployments() if d.endpoint]
        return [(e, [d for d in members if d.endpoint == e.name])
                for e in self.store.list_endpoints()]

    def get_endpoint(self, name: str) -> tuple[Endpoint, list[Deployment]]:
        for endpoint, members in self.list_endpoints():
            if endpoint.name == name:
                return endpoint, members
        raise NotFound(f"No endpoint named '{name}'.", param="endpoint")

    def create_endpoint(self, body: Any) -> tuple[Endpoint, list[Deployment]]:
        try:
            endpoint, members = parse_endpoint(body, "body", source=API)
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="body") from None
        endpoint = dataclasses.replace(endpoint, created_at=time.time())
        self.store.create_endpoint(endpoint, [self._checked(m) for m in members])
        return self.get_endpoint(endpoint.name)

    def add_deployment(self, endpoint: str, body: Any) -> Deployment:
        self.get_endpoint(endpoint)
        try:
            deployment = parse_deployment(body, "body", endpoint=endpoint, source=API)
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="body") from None
        self.store.add_deployment(self._checked(deployment))
        return deployment

    def _checked(self, deployment: Deployment) -> Deployment:
        """Build the backend once (bad options fail now), and seal credentials."""
        if deployment.backend != PYTHON_BACKEND:
            try:
                backends.check(deployment)
            except ConfigError as exc:
                raise InvalidRequest(str(exc), param="body.options") from None
        box = secrets.SecretBox.from_env()
        return dataclasses.replace(deployment, options=secrets.seal_options(
            deployment.options, box, f"deployment '{deployment.name}' options"))

    def set_default_deployment(self, endpoint: str, deployment: Any) -> Endpoint:
        if not isinstance(deployment, str):
            raise InvalidRequest("'default_deployment' must be a deployment's name.",
                                 param="default_deployment")
        return self.store.set_default_deployment(endpoint, deployment)

    def delete_endpoint(self, name: str) -> None:
        self.store.delete_endpoint(name)

    # -- jobs --------------------------------------------------------------------------

    def submit(self, project: str, endpoint_name: str, body: Any, *,
               dry_run: bool = False) -> Job | DryRun:
        spec = submission.parse(body)
        endpoint, members = self.get_endpoint(endpoint_name)
        deployment = self._deployment(endpoint, members, spec.deployment)
        files = self._files(spec.input)
        if dry_run or spec.dry_run:
            items = _count_items(spec.input, files)
            return DryRun(endpoint=endpoint.name, deployment=deployment.short_name,
                          files=files, total_items=items,
                          total_batch_count=math.ceil(items / spec.input.batch_size))
        new_id = job_id()
        job = Job(id=new_id, project=project, endpoint=endpoint.name,
                  deployment=deployment.short_name, input=spec.input, options=spec.options,
                  output_path=outputs.job_dir(spec.output_path or self.outputs_url, new_id),
                  created_at=time.time())
        self.store.insert_job(job)
        return job

    @staticmethod
    def _deployment(endpoint: Endpoint, members: list[Deployment],
                    requested: str | None) -> Deployment:
        name = requested or endpoint.default_deployment
        found = next((d for d in members if d.short_name == name), None)
        if found is None:
            known = ", ".join(d.short_name for d in members)
            raise InvalidRequest(f"The endpoint '{endpoint.name}' has no deployment named "
                                 f"'{name}' (it has: {known}).", param="deployment")
        if found.backend != PYTHON_BACKEND:
            raise InvalidRequest(f"The deployment '{name}' runs the '{found.backend}' "
                                 f"backend; jobs need a '{PYTHON_BACKEND}' deployment.",
                                 param="deployment")
        return found

    @staticmethod
    def _files(job_input: JobInput) -> list[str]:
        if job_input.kind is InputKind.ITEM_LIST:
            return []
        selection = inputs.FileSelection(paths=job_input.paths, includes=job_input.includes,
                                         excludes=job_input.excludes)
        found = inputs.list_files(selection, param=job_input.kind.value)
        if job_input.kind is InputKind.DELIMITED_FILES:
            inputs.check_delimited(found, param=job_input.kind.value)
        return found

    def get(self, project: str, job_id_: str) -> Job:
        job = self.store.get_job(project, job_id_)
        if job is None:
            raise NotFound(f"No job found with id '{job_id_}'.")
        return job

    def view(self, project: str, job_id_: str) -> JobView:
        job = self.get(project, job_id_)
        return JobView(job=job, batch_states=self.store.batch_state_counts(job.id),
                       worker_counts=_worker_counts(self.workers(project, job.id)))

    def list_jobs(self, project: str, *, endpoint: str | None = None, status: str | None = None,
             after: str | None = None, limit: int = 20) -> Page[Job]:
        if not 1 <= limit <= 100:
            raise InvalidRequest("'limit' must be between 1 and 100.", param="limit")
        try:
            wanted = JobStatus(status) if status else None
        except ValueError:
            raise InvalidRequest(f"'status' must be one of "
                                 f"{', '.join(s.value for s in JobStatus)}.",
                                 param="status") from None
        return self.store.list_jobs(project, endpoint=endpoint, status=wanted, after=after,
                                    limit=limit)

    def stop(self, project: str, job_id_: str) -> Job:
        return self.store.end_job(job_id_, JobStatus.STOPPED, "stopped by a user",
                                  project=project)

    def workers(self, project: str, job_id_: str) -> list[JobWorker]:
        job = self.get(project, job_id_)
        now = time.time()
        return [self._derived(w, now, job) for w in self.store.list_job_workers(job.id)]

    def _derived(self, worker: JobWorker, now: float, job: Job) -> JobWorker:
        live = worker.state in (WorkerState.INITIALIZING, WorkerState.RUNNING,
                                WorkerState.IDLE)
        if live and job.stage is not JobStage.DONE \
                and now - worker.last_heartbeat > self.stall_after_s:
            return dataclasses.replace(worker, state=WorkerState.STALLED)
        return worker

    def failed_batches(self, project: str, job_id_: str) -> list[JobBatch]:
        job = self.get(project, job_id_)
        return self.store.list_job_batches(job.id, [BatchState.FAILED.value])

    def logs(self, project: str, job_id_: str, *, after: int = 0,
             limit: int = 1000) -> list[LogLine]:
        job = self.get(project, job_id_)
        return self.store.read_logs(job.id, after=after, limit=limit)

    def results(self, project: str, job_id_: str) -> Iterator[bytes]:
        job = self.get(project, job_id_)
        if job.options.output.value == "summary_only":
            raise Conflict("This job's predictor writes its own output (output: "
                           f"summary_only) under {job.output_path}.")
        if job.stage is not JobStage.DONE:
            raise Conflict(f"The job is {job.status.value}; its results file is written "
                           f"when it ends.")
        if job.results_url is None:
            raise NotFound("This job has no results file.", param="id")
        return outputs.read(job.results_url)


def _worker_counts(found: list[JobWorker]) -> dict[str, int]:
    counts = {state.value: 0 for state in WorkerState}
    for worker in found:
        counts[worker.state.value] += 1
    return counts


def _count_items(job_input: JobInput, files: list[str]) -> int:
    if job_input.kind is InputKind.ITEM_LIST:
        return len(job_input.items or [])
    if job_input.kind is InputKind.FILE_PATH_LISTER:
        return len(files)
    return sum(inputs.count_records(url) for url in files)
