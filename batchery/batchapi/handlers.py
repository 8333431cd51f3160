"""The batch API's work, as the worker loop runs it: batch phases and chunks.

`BatchPhases` runs batch-level work under a batch's phase lease: validating the input,
advancing a batch handed to a provider, and assembling the result files once the chunks
have ended. `ChunkRunner` runs chunks: it commits answered lines in parts while the chunk
runs (so progress moves, and a crash loses at most the last second), skips lines committed
by an earlier lease, splits a chunk whose workers keep dying, and fails alone a line that
takes its worker down every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Callable

import orjson

from batchery import backends
from batchery.batchapi import execution, phases, remote
from batchery.model import spend
from batchery.model.batches import BatchError, BatchStatus, canonical_endpoint
from batchery.model.chunks import ChunkLease, ChunkPart, ChunkSpec
from batchery.model.deployments import CONFIG, Deployment
from batchery.model.exceptions import ConfigError
from batchery.model.leases import (
    MAX_PHASE_ATTEMPTS,
    PHASE_RETRY_S,
    SPLIT_AFTER_EXPIRIES,
    WORKER_CRASHED,
    halves,
    is_poison,
    should_split,
)
from batchery.ports.backend import ModelBackend
from batchery.ports.filestore import FileStore
from batchery.ports.store import ChunkStore, PhaseLease, PhaseStore, Registry
from batchery.queue.lease import LeaseLost
from batchery.queue.leased import Cancelled, Leased
from batchery.queue.parts import drop_parts, part_key, write_part
from batchery.queue.worker import WorkerContext
from batchery.wire import anthropic
from batchery.wire.openai_lines import error_line, response_line

log = logging.getLogger("batchery.worker")

#: While a chunk runs, its answered lines are committed this often, in seconds.
COMMIT_EVERY_S = 0.5
#: While a worker runs chunk after chunk, it looks for batch-level work (validate,
#: finalize) at most this often, in seconds: each look is a write transaction.
PHASE_LOOK_S = 0.25

_WHAT = {BatchStatus.VALIDATING: "validate", BatchStatus.FINALIZING: "assemble the results of",
         BatchStatus.CANCELLING: "assemble the results of"}


def _summary(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _line(exc: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class Deployments:
    """The deployments a worker has loaded, checked against the batch's project each time
    (validation already refused the others; checked again in case one changed hands)."""

    def __init__(self, store: Registry) -> None:
        self.store = store
        self._backends: dict[str, ModelBackend] = {}
        self._usable: dict[str, Deployment] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    def find(self, name: str, project: str | None) -> Deployment | None:
        found = next((d for d in self.store.list_deployments() if d.name == name), None)
        if found is None or project is None or not found.usable_by(project):
            return None
        return found

    async def backend(self, model: str, project: str | None) -> ModelBackend | None:
        deployment = self._usable.get(model)
        if deployment is None or project is None or not deployment.usable_by(project):
            deployment = self.find(model, project)
            if deployment is None:
                return None
            self._usable[model] = deployment
        backend = self._backends.get(model)
        if backend is not None:
            return backend
        # A chunk's slices ask for their model together: one loads it, the others wait.
        async with self._loading.setdefault(model, asyncio.Lock()):
            backend = self._backends.get(model)
            if backend is None:
                backend = backends.create(deployment)
                await backend.start()
                self._backends[model] = backend
                log.info("loaded deployment %s (backend %s)", model, deployment.backend)
        return backend

    async def preload(self, report: Callable[[str, str | None], None],
                      loaded: Callable[[str, float | None, str | None], None]) -> None:
        """Load the config file's in-process models (those whose `preload` holds) before
        this worker claims work: a warm pool. Reports `loading` with the model's name
        meanwhile, and `loaded(model, seconds, error)` after each. A model that fails to
        load is logged and skipped: its lines then fail as they would without preloading."""
        for deployment in self.store.list_deployments():
            name = deployment.name
            try:
                wanted = deployment.source == CONFIG and deployment.alias_of is None \
                    and name not in self._backends and backends.preloads(deployment)
            except Exception as exc:  # its backend's module cannot be imported, say
                wanted = False
                loaded(name, None, f"{name} could not be loaded: {_line(exc)}")
            if not wanted:
                continue
            report("loading", name)
            started = time.perf_counter()
            task = asyncio.ensure_future(self._open(deployment))
            while not (await asyncio.wait({task}, timeout=1.0))[0]:
                report("loading", name)  # a heartbeat while a big model loads
            failure = task.exception()
            if failure is not None:
                log.error("could not preload deployment %s: %s", name, _summary(failure))
                loaded(name, None, f"{name} could not be loaded: {_line(failure)}")
                continue
            self._backends[name] = task.result()
            seconds = time.perf_counter() - started
            log.info("loaded deployment %s (backend %s) in %.2fs, before claiming work",
                     name, deployment.backend, seconds)
            loaded(name, seconds, None)

    @staticmethod
    async def _open(deployment: Deployment) -> ModelBackend:
        backend = backends.create(deployment)
        try:
            await backend.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await backend.aclose()
            raise
        return backend

    def cost(self, by_model: dict[str, tuple[int, int]], project: str | None) -> float:
        """(extension) What `model -> (input, output)` tokens cost at the prices of the
        deployments that answered them (the ones loaded for them, with these prices)."""
        total = 0.0
        for model, (tokens_in, tokens_out) in by_model.items():
            deployment = self._usable.get(model) or self.find(model, project)
            total += spend.cost(deployment.prices if deployment else None, tokens_in,
                                tokens_out)
        return total

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
        self._backends.clear()


class BatchPhases:
    """Batch-level work: validate, advance a remote batch, assemble the results."""

    def __init__(self, store: PhaseStore, files: FileStore, ctx: WorkerContext,
                 deployments: Deployments) -> None:
        self.store, self.files, self.ctx = store, files, ctx
        self.deployments = deployments
        self._next_look = 0.0

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def housekeeping(self) -> None:
        self.store.expire_due(int(time.time()))

    def run_once(self) -> bool:
        now = time.monotonic()
        if self.ctx.busy and now < self._next_look:
            return False
        lease = self.store.claim_phase(self.ctx.id, self.ctx.config.lease_s)
        if lease is None:
            self._next_look = now + PHASE_LOOK_S
            return False
        self.run(lease)
        return True

    def run(self, lease: PhaseLease) -> None:
        batch = lease.batch
        if lease.attempts >= MAX_PHASE_ATTEMPTS:
            self._give_up(lease)
            return
        self.ctx.report("running", f"{batch.id}:{batch.status.value}")
        renew = lambda: self.store.renew_phase(lease, self.ctx.config.lease_s)  # noqa: E731
        try:
            with Leased(renew, self.ctx.config.renew_s) as held:
                self._step(lease, lambda: held.lost)
        except LeaseLost:
            log.info("batch %s changed while this worker worked on it; leaving it", batch.id)
        except FileNotFoundError as exc:
            # The input (or a part) is gone: waiting will not bring it back.
            log.warning("batch %s: a file it needs is gone (%s); failing it", batch.id, exc)
            if self.store.fail_batch(lease, [phases.missing_input(batch)], int(time.time())):
                self.files.delete_prefix(phases.parts_prefix(batch.id))
        except Exception as exc:
            self._failed(lease, exc)
        finally:
            # Free the batch at once if the work did not (a cancel cut validation short,
            # say); fenced by the token, so it is a no-op once the lease moved on.
            self.store.release_phase(lease)

    def _step(self, lease: PhaseLease, lost: Callable[[], bool]) -> None:
        batch = lease.batch
        if batch.status is BatchStatus.VALIDATING:
            phases.validate(self.store, self.files, lease, lost, backends.remote_endpoints,
                            backends.endpoints_of)
            self.ctx.ring()  # its chunks are queued now: wake the idle workers
        elif batch.remote is not None:
            self._advance_remote(lease)
        else:
            phases.finalize(self.store, self.files, lease, lost)

    def _failed(self, lease: PhaseLease, exc: Exception) -> None:
        batch = lease.batch
        tries = lease.attempts + 1
        if lease.attempts == 0:  # the traceback once; later failures in a line each
            log.exception("batch-level work on %s failed (try %d of %d); retrying in %gs",
                          batch.id, tries, MAX_PHASE_ATTEMPTS, PHASE_RETRY_S)
        else:
            log.error("batch-level work on %s failed again (try %d of %d): %s", batch.id,
                      tries, MAX_PHASE_ATTEMPTS, _summary(exc))
        self.store.release_phase(lease, retry_in=PHASE_RETRY_S, error=_summary(exc))

    def _give_up(self, lease: PhaseLease) -> None:
        batch = lease.batch
        what = ("advance" if batch.remote is not None
                else _WHAT.get(batch.status, "process"))
        message = (f"Batchery could not {what} this batch after {lease.attempts} tries; the "
                   f"last error: {lease.last_error or 'its worker stopped (killed or crashed)'}")
        log.error("batch %s: %s", batch.id, message)
        if self.store.fail_batch(lease, [BatchError(code="server_error", message=message)],
                                 int(time.time())):
            self.files.delete_prefix(phases.parts_prefix(batch.id))

    def _advance_remote(self, lease: PhaseLease) -> None:
        assert lease.batch.remote is not None
        name = lease.batch.remote["deployment"]
        deployment = self.deployments.find(name, lease.batch.project)
        if deployment is None:
            self.store.fail_batch(lease, [BatchError(
                code="model_not_found", param="body.model",
                message=f"The deployment '{name}' is no longer configured.")],
                int(time.time()))
            return
        try:
            backend = backends.create_remote(deployment)
        except ConfigError as exc:
            # An operator's error (an unset variable, another BATCHERY_SECRET_KEY): waiting
            # will not mend it. Without a connector the provider's job cannot be cancelled.
            cause = str(exc).removeprefix(f"deployment '{name}': ")
            remote.fail(self.store, lease, f"The connector of the deployment '{name}' cannot "
                        f"be built on this worker: {cause}", None)
            return
        try:
            remote.advance(self.store, self.files, lease, backend)
        finally:
            backend.close()


class ChunkRunner:
    """Runs the lines of chunks, committing them in parts as they finish."""

    def __init__(self, store: ChunkStore, files: FileStore, ctx: WorkerContext,
                 deployments: Deployments) -> None:
        self.store, self.files, self.ctx = store, files, ctx
        self.deployments = deployments
        self._projects: dict[str, str | None] = {}

    def start(self) -> None:
        # A warm pool: the config file's models load before the first chunk is claimed.
        if self.ctx.config.preload:
            self.ctx.runner.run(self.deployments.preload(self.ctx.report, self.ctx.loaded))

    def close(self) -> None:
        try:
            self.ctx.runner.run(self.deployments.close())
        except Exception:
            log.exception("closing backends failed")

    def housekeeping(self) -> None:
        reaped = self.store.reap_expired()
        if reaped:
            log.warning("requeued %d chunk(s) whose worker stopped renewing its lease", reaped)

    def run_once(self) -> bool:
        lease = self.store.claim_chunk(self.ctx.id, self.ctx.config.lease_s)
        if lease is None:
            return False
        self.ctx.report("running", f"{lease.batch_id}:{lease.spec.index}")
        self.run(lease)
        return True

    def run(self, lease: ChunkLease) -> None:
        spec = lease.spec
        data = self.files.read_range(lease.input_key, spec.start_offset, spec.end_offset)
        lines = execution.lines_at(data, spec.start_offset)
        # A chunk no lease has answered a line of needs no look at the parts.
        done = (self.store.done_offsets(lease.batch_id, spec.start_offset, spec.end_offset)
                if lease.answered else set())
        todo = [(o, raw) for o, raw in lines if o not in done]
        if not todo:
            self._complete(lease, None)
        elif is_poison(lease.expiries, len(todo)):
            self._isolate(lease, todo[0])
        elif should_split(lease.expiries, len(todo)):
            self._split(lease, lines, todo, done)
        else:
            self._execute(lease, todo)

    # -- running -----------------------------------------------------------------------

    def _execute(self, lease: ChunkLease, todo: list[tuple[int, bytes]]) -> None:
        config = self.ctx.config
        messages = lease.endpoint == anthropic.MESSAGES_ENDPOINT
        output = execution.ChunkOutput(render=anthropic.result_line if messages
                                       else response_line)
        commits = _Commits(self, lease)
        renew = lambda: self.store.renew_chunk(lease, config.lease_s)  # noqa: E731
        try:
            with Leased(renew, config.renew_s, overdue=self.ctx.overdue,
                        runner=self.ctx.runner) as held:
                held.run(self._run_lines(lease, todo, output, commits))
        except Cancelled as cut:
            # Keep what finished: the lease still fences the commit. A batch that was
            # cancelled or expired left the lease in place for this; one taken over by
            # another worker refuses it.
            if commits.commit(output.take()):
                self.store.release_chunk(lease, error="handed back", count_attempt=False,
                                         max_attempts=config.max_attempts)
            if cut.lost:
                log.info("chunk %s of %s: stopped (batch cancelled or expired, or the lease "
                         "was lost)", lease.spec.index, lease.batch_id)
            return
        except Exception:
            detail = traceback.format_exc()
            log.error("chunk %s of %s failed:\n%s", lease.spec.index, lease.batch_id, detail)
            if commits.commit(output.take()):
                self.store.release_chunk(lease, error=detail, count_attempt=True,
                                         max_attempts=config.max_attempts,
                                         delay_s=config.retry.delay(lease.attempts + 1))
            return
        self._complete(lease, commits.write(output.take()))

    def _project(self, batch_id: str) -> str | None:
        """The batch's project (it never changes), read once per batch."""
        if batch_id in self._projects:
            return self._projects[batch_id]
        batch = self.store.get_batch(None, batch_id)
        project = batch.project if batch is not None else None
        if len(self._projects) >= 1024:
            self._projects.clear()
        self._projects[batch_id] = project
        return project

    async def _run_lines(self, lease: ChunkLease, todo: list[tuple[int, bytes]],
                         output: execution.ChunkOutput, commits: _Commits) -> None:
        project = self._project(lease.batch_id)
        commits.project = project

        async def backend_for(model: str) -> ModelBackend | None:
            return await self.deployments.backend(model, project)

        main = asyncio.current_task()
        assert main is not None

        async def commit_as_they_finish() -> None:
            while True:
                await asyncio.sleep(COMMIT_EVERY_S)
                if not commits.commit(output.take()):
                    main.cancel()  # the lease is lost: stop running its lines
                    return

        committer = asyncio.create_task(commit_as_they_finish())
        try:
            await execution.run_chunk(
                [raw for _, raw in todo], canonical_endpoint(lease.endpoint), backend_for,
                self.ctx.config.retry, offsets=[o for o, _ in todo], output=output)
        finally:
            committer.cancel()

    def _complete(self, lease: ChunkLease, part: ChunkPart | None) -> None:
        if self.store.complete_chunk(lease, part):
            self.ctx.done()
            return
        log.info("chunk %s of %s: lease lost before commit; results dropped",
                 lease.spec.index, lease.batch_id)
        if part is not None:
            drop_parts(self.files, part.out_key, part.err_key)

    # -- workers that keep dying -------------------------------------------------------

    def _split(self, lease: ChunkLease, lines: list[tuple[int, bytes]],
               todo: list[tuple[int, bytes]], done: set[int]) -> None:
        """Cut the chunk in two at the middle of its lines still to run."""
        spec = lease.spec
        cut = todo[halves(len(todo))][0]
        first = [o for o, _ in lines if o < cut]
        specs = [ChunkSpec(index=spec.index, start_offset=spec.start_offset, end_offset=cut,
                           first_line=spec.first_line, n_lines=len(first)),
                 ChunkSpec(index=spec.index, start_offset=cut, end_offset=spec.end_offset,
                           first_line=spec.first_line + len(first),
                           n_lines=len(lines) - len(first))]
        answered = [(sum(1 for o in first if o in done), 0),
                    (sum(1 for o, _ in lines if o >= cut and o in done), 0)]
        if self.store.split_chunk(lease, specs, answered, SPLIT_AFTER_EXPIRIES - 1):
            log.warning("chunk %s of %s: its workers stopped %d times in a row; split it in "
                        "two to find the line at fault", spec.index, lease.batch_id,
                        lease.expiries)

    def _isolate(self, lease: ChunkLease, line: tuple[int, bytes]) -> None:
        """Fail the one line that took its worker down every time it ran."""
        offset, raw = line
        custom_id = _custom_id(raw)
        message = (f"This request was tried {lease.expiries} times, and each time the worker "
                   f"running it exited before it finished (crashed or was killed); it was "
                   f"set aside so that the rest of the batch could run.")
        if lease.endpoint == anthropic.MESSAGES_ENDPOINT:
            rendered = anthropic.unrun_line(custom_id, "errored", message)
        else:
            rendered = error_line(custom_id, WORKER_CRASHED, message)
        commits = _Commits(self, lease)
        part = commits.write(execution.ChunkOutput(err=bytearray(rendered), n_err=1,
                                                   offsets=[offset]))
        log.error("batch %s: request %s took its worker down %d times; failing it alone",
                  lease.batch_id, custom_id, lease.expiries)
        self._complete(lease, part)


class _Commits:
    """Writes a chunk's answered lines to part files and commits them, fenced."""

    def __init__(self, runner: ChunkRunner, lease: ChunkLease) -> None:
        self.runner, self.lease = runner, lease
        self.seq = 0
        #: The batch's project, once known: whose deployments' prices apply.
        self.project: str | None = None

    def write(self, output: execution.ChunkOutput) -> ChunkPart | None:
        if not output.offsets:
            return None
        lease, files = self.lease, self.runner.files
        self.seq += 1
        prefix = phases.parts_prefix(lease.batch_id)
        out_key = write_part(files, part_key(prefix, lease.spec.index, lease.token, self.seq,
                                             ".out"), output.out)
        err_key = write_part(files, part_key(prefix, lease.spec.index, lease.token, self.seq,
                                             ".err"), output.err)
        cost = self.runner.deployments.cost(output.by_model, self.project) \
            if output.by_model else 0.0
        return ChunkPart(n_ok=output.n_ok, n_err=output.n_err, out_key=out_key,
                         err_key=err_key, offsets=tuple(output.offsets),
                         input_tokens=output.input_tokens, output_tokens=output.output_tokens,
                         cached_tokens=output.cached_tokens,
                         reasoning_tokens=output.reasoning_tokens,
                         cost=cost)

    def commit(self, output: execution.ChunkOutput) -> bool:
        """Commit what finished; False if the lease is lost (the part is then deleted)."""
        part = self.write(output)
        if part is None:
            return True
        if self.runner.store.commit_part(self.lease, part):
            return True
        drop_parts(self.runner.files, part.out_key, part.err_key)
        return False


def _custom_id(raw: bytes) -> str:
    return str(orjson.loads(raw)["custom_id"])
