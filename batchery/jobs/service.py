"""`JobService`: the job API's use cases (submit, inspect, stop, read results and logs)
and the management of endpoints, over the store. Framework-free; the HTTP routes and the
CLI call it."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from batchery import backends
from batchery.jobs import inputs, outputs, results, sandbox, submission
from batchery.model import idempotency as idem
from batchery.model.cursors import ResultsCursor, ResultsPage, check_limit
from batchery.model.deployments import API, Deployment, Endpoint, parse_deployment, parse_endpoint
from batchery.model.exceptions import ConfigError, Conflict, Forbidden, InvalidRequest, NotFound
from batchery.model.idempotency import Idempotency, IdempotencyKey
from batchery.model.jobs import (
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
from batchery.model.paging import Page
from batchery.ports.store import JobServiceStore, count_live
from batchery.security import auth, deployment_policy, secrets
from batchery.security.trust import Principal, TrustPolicy
from batchery.security.webhook_urls import check_webhook_url

NO_WORKER = ("No worker is running: the job waits until one starts (`batchery serve` with "
             "--workers above 0, or `batchery worker`).")
#: Open mode's policy, for a service built without one (tests, `batchery run`).
_OPEN_POLICY = TrustPolicy()


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
    def __init__(self, store: JobServiceStore, *, outputs_url: str, stall_after_s: float = 60.0,
                 policy: TrustPolicy = _OPEN_POLICY, files_url: str | None = None) -> None:
        self.store = store
        self.outputs_url = outputs_url
        #: The file store's root, where uploaded files (job inputs by id) live.
        self.files_url = files_url or outputs_url.rstrip("/").removesuffix("/outputs")
        self.stall_after_s = stall_after_s
        self.policy = policy
        self._pruner = idem.Pruner()
        #: The workers a deployment's pool asked for that do not run yet, `(name, why)`:
        #: `serve` sets it when its pools run on Ray.
        self.pending_workers: Callable[[str], list[tuple[str, str]]] = lambda _pool: []

    # -- endpoints ---------------------------------------------------------------------

    def list_endpoints(self, who: Principal | str) -> list[tuple[Endpoint, list[Deployment]]]:
        """The endpoints `who` sees: an admin every one; a member (or a bare project name)
        its project's own and the config file's that its project may use."""
        members = [d for d in self.store.list_deployments() if d.endpoint]
        return [(e, [d for d in members if d.endpoint == e.name])
                for e in self.store.list_endpoints() if _sees(who, e)]

    def visible_endpoint(self, who: Principal | str, name: str
                         ) -> tuple[Endpoint, list[Deployment]]:
        """The endpoint, with its deployments; NotFound, as for a missing one, when `who`
        (a caller, or the project of a job) may not see it."""
        for endpoint, members in self.list_endpoints(who):
            if endpoint.name == name:
                return endpoint, members
        raise NotFound(f"No endpoint named '{name}'.", param="endpoint")

    def get_endpoint(self, who: Principal | str, name: str) -> tuple[Endpoint, list[Deployment]]:
        return self.visible_endpoint(who, name)

    def create_endpoint(self, principal: Principal, body: Any
                        ) -> tuple[Endpoint, list[Deployment]]:
        principal.require_admin("create endpoints")
        owner = _owner(principal, body)
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k != "project"}
        try:
            endpoint, members = parse_endpoint(body, "body", source=API,
                                               check_options=backends.check_options)
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="body") from None
        endpoint = dataclasses.replace(endpoint, created_at=time.time(), project=owner)
        checked = [self._checked(dataclasses.replace(m, project=owner)) for m in members]
        self.store.create_endpoint(endpoint, checked)
        return self.visible_endpoint(principal, endpoint.name)

    def add_deployment(self, principal: Principal, endpoint_name: str, body: Any
                       ) -> Deployment:
        endpoint, _ = self.visible_endpoint(principal, endpoint_name)
        _require_manager(principal, endpoint, "add deployments to endpoints")
        try:
            deployment = parse_deployment(body, "body", endpoint=endpoint.name, source=API,
                                          check_options=backends.check_options)
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="body") from None
        deployment = dataclasses.replace(deployment, project=endpoint.project,
                                         projects=endpoint.projects)
        self.store.add_deployment(self._checked(deployment))
        return deployment

    def _checked(self, deployment: Deployment) -> Deployment:
        """Apply the operator's policy, build the backend once (bad options fail now), and
        seal credentials."""
        user_code = backends.runs_user_code(deployment.backend)
        deployment_policy.check(deployment, self.policy, via_api=True,
                                runs_user_code=user_code)
        if not user_code:  # user code is loaded by workers only
            try:
                backends.check(deployment)
            except ConfigError as exc:
                raise InvalidRequest(str(exc), param="body.options") from None
        box = secrets.SecretBox.from_env()
        return dataclasses.replace(deployment, options=secrets.seal_options(
            deployment.options, box, f"deployment '{deployment.name}' options"))

    def set_default_deployment(self, principal: Principal, endpoint_name: str,
                               deployment: Any) -> Endpoint:
        endpoint, _ = self.visible_endpoint(principal, endpoint_name)
        _require_manager(principal, endpoint, "change endpoints")
        if not isinstance(deployment, str):
            raise InvalidRequest("'default_deployment' must be a deployment's name.",
                                 param="default_deployment")
        return self.store.set_default_deployment(endpoint.name, deployment)

    def delete_endpoint(self, principal: Principal, name: str) -> None:
        endpoint, _ = self.visible_endpoint(principal, name)
        _require_manager(principal, endpoint, "delete endpoints")
        self.store.delete_endpoint(endpoint.name)

    # -- jobs --------------------------------------------------------------------------

    def submit(self, project: str, endpoint_name: str, body: Any, *,
               dry_run: bool = False, idempotency: Idempotency | None = None) -> Job | DryRun:
        """Submit a job (or plan it: a dry run). With `idempotency` (extension), a replay of
        an earlier submission returns the job it made."""
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k != idem.BODY_FIELD}
        dry_run = dry_run or (isinstance(body, dict) and body.get("dry_run") is True)
        if idempotency is not None and not dry_run \
                and (found := self._replay(project, idempotency)):
            return found
        spec = submission.parse(body)
        endpoint, members = self.visible_endpoint(project, endpoint_name)
        deployment = self._deployment(endpoint, members, spec.deployment)
        webhook_url = None if spec.webhook_url is None \
            else check_webhook_url(spec.webhook_url, self.policy, "webhook_url")
        box = sandbox.Sandbox(self.policy, project, outputs_url=self.outputs_url,
                              files_url=self.files_url)
        # Every named place is checked before anything is listed, opened or connected to.
        output_base = box.output_base(spec.output_path)
        job_input = spec.input
        if job_input.kind is not InputKind.ITEM_LIST:
            job_input = dataclasses.replace(job_input, paths=box.input_paths(
                job_input.paths, f"{job_input.kind.value}.paths"))
        files = self._files(project, job_input, box)
        if dry_run or spec.dry_run:
            items = _count_items(job_input, files)
            return DryRun(endpoint=endpoint.name, deployment=deployment.short_name,
                          files=[f.shown for f in files], total_items=items,
                          total_batch_count=math.ceil(items / job_input.batch_size))
        new_id = job_id()
        job = Job(id=new_id, project=project, endpoint=endpoint.name,
                  deployment=deployment.short_name, input=job_input, options=spec.options,
                  output_path=outputs.job_dir(output_base, new_id), created_at=time.time(),
                  webhook_url=webhook_url, priority=spec.priority, warnings=self._warnings())
        return self._insert(job, idempotency)

    def _warnings(self) -> list[str] | None:
        """(extension) What a new job should know: that no worker would run it."""
        if count_live(self.store.list_workers(), time.time()) == 0:
            return [NO_WORKER]
        return None

    def _replay(self, project: str, asked: Idempotency) -> Job | None:
        found = self.store.find_key(project, idem.JOB, asked.key,
                                    newer_than=time.time() - idem.KEY_TTL_S)
        return None if found is None else self._replayed(found, asked)

    def _replayed(self, found: IdempotencyKey, asked: Idempotency) -> Job:
        job = self.store.get_job(found.project, idem.replayed(found, asked, "job"))
        if job is None:
            raise idem.gone(found, "job")
        return job

    def _insert(self, job: Job, asked: Idempotency | None) -> Job:
        """Insert the job; with a key, the same transaction takes the key, and a concurrent
        submission that took it first wins: its job is returned."""
        now = time.time()
        key = asked.record(job.project, idem.JOB, job.id, now) if asked else None
        held = self.store.insert_job(job, key)
        if held is not None and asked is not None:
            return self._replayed(held, asked)
        if key is not None and self._pruner.due(now):
            self.store.prune_keys(now - idem.KEY_TTL_S)
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
        if not backends.serves_jobs(found.backend):
            able = ", ".join(f"'{b}'" for b in backends.job_backends())
            raise InvalidRequest(f"The deployment '{name}' runs the '{found.backend}' "
                                 f"backend, which does not serve jobs; jobs need a deployment "
                                 f"of a backend that does ({able}).", param="deployment")
        return found

    def _files(self, project: str, job_input: JobInput,
               box: sandbox.Sandbox) -> list[inputs.Source]:
        """The files the job reads, in the order its worker reads them: the listed paths,
        then the uploaded files given by id."""
        if job_input.kind is InputKind.ITEM_LIST:
            return []
        param = job_input.kind.value
        found: list[inputs.Source] = []
        if job_input.paths:
            selection = inputs.FileSelection(paths=job_input.paths,
                                             includes=job_input.includes,
                                             excludes=job_input.excludes)
            found = [inputs.Source.of(url)
                     for url in inputs.list_files(selection, param=param, guard=box)]
        now = time.time()
        found += [inputs.uploaded(self.store.get_file(project, file_id), file_id,
                                  lambda key: inputs.blob_url(self.files_url, key),
                                  param=param, now=now)
                  for file_id in job_input.file_ids]
        if job_input.kind is InputKind.DELIMITED_FILES:
            inputs.check_delimited(found, param=param)
        return found

    def get(self, project: str, job_id_: str) -> Job:
        job = self.store.get_job(project, job_id_)
        if job is None:
            raise NotFound(f"No job found with id '{job_id_}'.")
        return job

    def view(self, project: str, job_id_: str) -> JobView:
        # One read: this is what every poll of a job costs.
        found = self.store.job_view(project, job_id_)
        if found is None:
            raise NotFound(f"No job found with id '{job_id_}'.")
        job, counts, reports = found
        return JobView(job=job, batch_states=counts,
                       worker_counts=_worker_counts(self._workers(job, reports)))

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

    def pause(self, project: str, job_id_: str) -> Job:
        """(extension) None of the job's batches is claimed until it is resumed."""
        return self.store.pause_job(project, job_id_, time.time())

    def resume(self, project: str, job_id_: str) -> Job:
        """(extension) The job's batches are claimed again."""
        return self.store.resume_job(project, job_id_)

    def workers(self, project: str, job_id_: str) -> list[JobWorker]:
        job = self.get(project, job_id_)
        return self._workers(job, self.store.list_job_workers(job.id))

    def _workers(self, job: Job, reports: list[JobWorker]) -> list[JobWorker]:
        """The workers' reports as a reader sees them (stalled ones called so), and the
        pool's workers that do not run yet."""
        now = time.time()
        found = [self._derived(w, now, job) for w in reports]
        if job.stage is JobStage.DONE:
            return found
        return found + [JobWorker(job_id=job.id, worker_id=name, host="", pid=0,
                                  state=WorkerState.PENDING, reason=why)
                        for name, why in self.pending_workers(job.qualified_deployment)]

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

    def results_page(self, project: str, job_id_: str, after: str | None,
                     limit: int) -> ResultsPage:
        """(extension) Up to `limit` result rows after the cursor `after`, while the job
        runs or after it has ended (`jobs.results`)."""
        job = self.get(project, job_id_)
        if job.options.output.value == "summary_only":
            raise Conflict("This job's predictor writes its own output (output: "
                           f"summary_only) under {job.output_path}.")
        cursor = ResultsCursor.decode(after, results.STAGES)
        return results.read_page(self.store, job, cursor, check_limit(limit),
                                 lambda key: inputs.blob_url(self.files_url, key))

    def retry(self, project: str, job_id_: str) -> Job:
        """(extension) A new job, `retry_of` this ended one, that reruns the items of its
        dead-letter batches (read back from its `failed_batches.jsonl`)."""
        job = self.get(project, job_id_)
        if job.stage is not JobStage.DONE:
            raise Conflict(f"The job {job.id} is {job.status.value}: only a job that has ended "
                           f"can be retried.")
        if not self.store.list_job_batches(job.id, [BatchState.FAILED.value]):
            raise Conflict(f"The job {job.id} has no dead-letter batches: there is nothing "
                           f"to retry.")
        endpoint, members = self.visible_endpoint(project, job.endpoint)
        self._deployment(endpoint, members, job.deployment)
        items = outputs.dead_letter_items(f"{job.output_path}/{outputs.DEAD_LETTERS_NAME}",
                                          submission.MAX_INLINE_ITEMS)
        new_id = job_id()
        retried = Job(id=new_id, project=project, endpoint=job.endpoint,
                      deployment=job.deployment, options=job.options,
                      input=JobInput(kind=InputKind.ITEM_LIST,
                                     batch_size=job.input.batch_size, items=items),
                      output_path=outputs.job_dir(
                          job.output_path.removesuffix(f"/{job.id}"), new_id),
                      created_at=time.time(), webhook_url=job.webhook_url,
                      priority=job.priority, retry_of=job.id)
        self.store.insert_job(retried)
        return retried


def _sees(who: Principal | str, endpoint: Endpoint) -> bool:
    if isinstance(who, Principal):
        return who.is_admin or endpoint.usable_by(who.project)
    return endpoint.usable_by(who)


def _require_manager(principal: Principal, endpoint: Endpoint, action: str) -> None:
    """Admins manage what the API made; what the config file declares stays its own."""
    principal.require_admin(action)
    if endpoint.source != API:
        raise Forbidden(f"The endpoint '{endpoint.name}' is declared in the config file; "
                        f"change it there.")


def _owner(principal: Principal, body: Any) -> str:
    """The project a new endpoint belongs to: the body's `project`, else the admin's own."""
    project = body.get("project") if isinstance(body, dict) else None
    if project is None:
        return principal.project
    return auth.check_name(project, "project")


def _worker_counts(found: list[JobWorker]) -> dict[str, int]:
    counts = {state.value: 0 for state in WorkerState}
    for worker in found:
        counts[worker.state.value] += 1
    return counts


def _count_items(job_input: JobInput, files: list[inputs.Source]) -> int:
    if job_input.kind is InputKind.ITEM_LIST:
        return len(job_input.items or [])
    if job_input.kind is InputKind.FILE_PATH_LISTER:
        return len(files)
    # A file a worker could not read is a 400 that names it, not a 500.
    return sum(inputs.count_for_request(f, param=job_input.kind.value) for f in files)
