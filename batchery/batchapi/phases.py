"""Batch-level work a worker does under a phase lease: validate the input, and assemble the
output and error files once the chunks have ended."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import orjson

from batchery.batchapi import validation
from batchery.batchapi.execution import lines_at
from batchery.model import ids, spend
from batchery.model.batches import Batch, BatchError, BatchStatus, EndReason, canonical_endpoint
from batchery.model.chunks import Chunk, ChunkSpec, ChunkState
from batchery.model.deployments import Deployment
from batchery.model.files import FileRecord, Purpose
from batchery.ports.filestore import FileStore
from batchery.ports.store import PhaseLease, PhaseStore, count_live
from batchery.queue.lease import LeaseLost
from batchery.wire import anthropic
from batchery.wire.openai_lines import error_line

_COPY_BUFFER = 1 << 20


def _blob_exists(files: FileStore, key: str) -> bool:
    try:
        files.size(key)
    except FileNotFoundError:
        return False
    return True


def _checked(lines: Iterator[tuple[int, bytes]], lost: Callable[[], bool],
             every: int = 20_000) -> Iterator[tuple[int, bytes]]:
    for n, item in enumerate(lines):
        if n % every == 0 and lost():
            raise LeaseLost
        yield item


@contextlib.contextmanager
def _reading(files: FileStore, key: str) -> Iterator[IO[bytes]]:
    with files.open_read(key) as stream:
        yield stream


#: The endpoints a deployment's backend accepts if it hands whole batches to a provider,
#: else None.
RemoteEndpoints = Callable[[str], "frozenset[str] | None"]
#: The endpoints a deployment serves (None: not known, so any).
ServedEndpoints = Callable[[Deployment], "frozenset[str] | None"]


def validate(store: PhaseStore, files: FileStore, lease: PhaseLease, lost: Callable[[], bool],
             remote_endpoints: RemoteEndpoints = lambda _: None,
             served: ServedEndpoints = lambda _: None) -> None:
    batch = lease.batch
    record = store.get_file(batch.project, batch.input_file_id)
    now = int(time.time())
    # A file deleted after the batch was created leaves its blob to the batch, which
    # pinned it (`input_key`) at creation.
    key = record.storage_key if record is not None else batch.input_key
    if key is None or (record is not None and record.expires_at is not None
                       and record.expires_at <= now) or not _blob_exists(files, key):
        _fail(store, files, lease, [missing_input(batch)], now)
        return
    # Another project's deployments are unknown models here, as they are in its listing.
    deployments = {d.name: d for d in store.list_deployments() if d.usable_by(batch.project)}
    # A model of another endpoint is not one this batch may use. A remote deployment is
    # judged whole by `_remote_plan`, which says why.
    endpoint = canonical_endpoint(batch.endpoint)
    known = {name for name, d in deployments.items() if remote_endpoints(d.backend) is not None
             or (ends := served(d)) is None or endpoint in ends}
    # Anthropic reports an unknown model per request (an errored result), not per batch.
    model_known = (known.__contains__ if batch.endpoint != anthropic.MESSAGES_ENDPOINT
                   else lambda _: True)

    def reread() -> Iterator[tuple[int, bytes]]:
        with _reading(files, key) as again:
            yield from validation.iter_lines(again)

    with _reading(files, key) as stream:
        report = validation.validate(
            _checked(validation.iter_lines(stream), lost),
            endpoint=canonical_endpoint(batch.endpoint),
            model_known=model_known, max_tasks=batch.max_tasks,
            chunk_size=batch.chunk_size, reread=reread)
    now = int(time.time())
    if not report.ok:
        _fail(store, files, lease, report.errors, now)
        return
    model = next(iter(report.models)) if len(report.models) == 1 else None
    remote = _remote_plan(batch, report.models, deployments, remote_endpoints)
    if isinstance(remote, BatchError):
        _fail(store, files, lease, [remote], now)
        return
    chunks = report.chunks if remote is not None else spread(
        files, key, report.chunks, batch.chunk_size, live_workers(store))
    # A retry's counts cover the lines it carries over from the batch it retries as well.
    total = batch.total if batch.retry_of else report.total
    store.start_batch(lease, total=total, model=model, input_key=key,
                      chunks=chunks, now=now, remote=remote)


#: A batch is cut into at least this many chunks per live worker, when it has the lines.
CHUNKS_PER_WORKER = 4
#: ...but not chunks under this many lines, unless each worker needs one: every chunk costs
#: a few store round trips, which a small batch's latency feels.
MIN_SPREAD_CHUNK = 25
#: Small batches are cut again finer only while their input is at most this big.
_RECUT_MAX_BYTES = 64 << 20
def live_workers(store: PhaseStore) -> int:
    return count_live(store.list_workers(), time.time())


def spread(files: FileStore, key: str, chunks: list[ChunkSpec], chunk_size: int,
           workers: int) -> list[ChunkSpec]:
    """Chunks small enough that every live worker gets a share of a small batch (and
    progress moves in small steps); the configured chunk size stays the ceiling."""
    total = sum(c.n_lines for c in chunks)
    workers = max(1, workers)
    size = max(MIN_SPREAD_CHUNK, -(-total // (workers * CHUNKS_PER_WORKER)))
    size = max(1, min(chunk_size, size, -(-total // workers)))
    if not chunks or size >= chunk_size or \
            chunks[-1].end_offset - chunks[0].start_offset > _RECUT_MAX_BYTES:
        return chunks
    start = chunks[0].start_offset
    lines = lines_at(files.read_range(key, start, chunks[-1].end_offset), start)
    recut: list[ChunkSpec] = []
    for i in range(0, len(lines), size):
        group = lines[i:i + size]
        end = lines[i + size][0] if i + size < len(lines) else chunks[-1].end_offset
        recut.append(ChunkSpec(index=len(recut), start_offset=group[0][0], end_offset=end,
                               first_line=chunks[0].first_line + i, n_lines=len(group)))
    return recut


def missing_input(batch: Batch) -> BatchError:
    """Why a batch whose input file is missing, or went away (deleted, expired) before it
    was read, fails: in the hosted API's words and code."""
    return BatchError(code="invalid_request", param="file_id",
                      message=f"Cannot find file {batch.input_file_id}, or project "
                              f"'{batch.project}' does not have access to it.")


def _remote_plan(batch: Batch, models: set[str], deployments: dict[str, Deployment],
                 remote_endpoints: RemoteEndpoints) -> dict[str, Any] | BatchError | None:
    """The remote state of a batch handed to a provider, an error, or None to run it here."""
    remote = {m: ends for m in models if m in deployments
              and (ends := remote_endpoints(deployments[m].backend)) is not None}
    if not remote:
        return None
    name, endpoints = next(iter(remote.items()))
    if len(models) > 1:
        return BatchError(code="mismatched_model", param="body.model",
                          message=f"Every line must use the model '{name}': its deployment "
                                  "hands the whole batch to a provider.")
    if canonical_endpoint(batch.endpoint) not in endpoints:
        return BatchError(code="invalid_url", param="url",
                          message=f"The deployment '{name}' does not accept "
                                  f"{batch.endpoint} batches.")
    return new_remote_state(name, deployments[name].backend)


#: (extension) The error code of the requests a spend ceiling stopped.
BUDGET_EXCEEDED = "budget_exceeded"
_UNRUN = {
    EndReason.CANCELLED: ("batch_cancelled", "This request was not executed because the "
                                             "batch was cancelled."),
    EndReason.EXPIRED: ("batch_expired", "This request could not be executed before the "
                                         "completion window expired."),
}


def finalize(store: PhaseStore, files: FileStore, lease: PhaseLease,
             lost: Callable[[], bool]) -> None:
    batch = lease.batch
    reason = batch.end_reason or EndReason.DONE
    if batch.status is BatchStatus.CANCELLING or reason is not EndReason.DONE:
        # Clears every chunk lease: from here on no late commit can land, so the counts and
        # parts read below are final.
        store.abort_open_chunks(batch.id)
    batch = store.get_batch(None, batch.id) or batch
    chunks = [c for c in store.list_chunks(batch.id) if c.state is not ChunkState.SPLIT]
    parts = _part_keys_in_file_order(store, batch)
    if not chunks and batch.input_key is None and batch.endpoint == anthropic.MESSAGES_ENDPOINT:
        # Ended before validation cut it: every request (we wrote the file, so it is valid
        # JSONL) is reported as canceled or expired.
        batch, chunks = _whole_input(store, files, batch)
    unrun = _Unrun(store, files, batch, chunks, reason)
    now = int(time.time())
    carried_outs, carried_errs = carried_keys(files, batch)
    outs = carried_outs + _keys(chunks, "out_key") + [out for out, _ in parts if out]
    errs = carried_errs + _keys(chunks, "err_key") + [err for _, err in parts if err]
    if batch.endpoint == anthropic.MESSAGES_ENDPOINT:
        # Anthropic batches have one results file holding every outcome.
        def write_results(out: IO[bytes]) -> None:
            _copy(files, outs + errs, out)
            unrun.write(out)

        output = _assemble(files, batch, "results", now, write_results)
        errors = None
    else:
        output = _assemble(files, batch, "output", now, lambda out: _copy(files, outs, out))
        if lost():
            raise LeaseLost

        def write_errors(out: IO[bytes]) -> None:
            _copy(files, errs, out)
            unrun.write(out)

        errors = _assemble(files, batch, "error", now, write_errors)
    made = [r for r in (output, errors) if r is not None]
    finished = store.finish_batch(
        lease, outputs=made, output_file_id=output.id if output else None,
        error_file_id=errors.id if errors else None, completed=batch.completed,
        failed=batch.failed + unrun.count, unrun=unrun.count, now=int(time.time()))
    if not finished:
        for record in made:
            files.delete(record.storage_key)
        raise LeaseLost
    files.delete_prefix(parts_prefix(batch.id))
    _drop_orphaned_input(store, files, batch)


#: Parts read from the store at a time while finalizing (at most a chunk's lines each); their
#: line offsets are dropped as soon as read, so memory does not grow with a batch's lines.
_PARTS_PAGE = 32


def _part_keys_in_file_order(store: PhaseStore, batch: Batch
                             ) -> list[tuple[str | None, str | None]]:
    """(extension) The output and error keys of the parts in the order the result files
    list them: in commit order for batches whose results can be read while they run
    (`GET /v1/batches/{id}/results`), so that a reader who started then carries on in the
    files where it stopped; in input order for the others (Gemini reads its answers back in
    request order), as `list_parts` sorts them."""
    found: list[tuple[int, int, str | None, str | None]] = []
    after = 0
    while page := store.list_parts_after(batch.id, after, _PARTS_PAGE):
        found += [(min(part.offsets), part_id, part.out_key, part.err_key)
                  for part_id, part in page]
        after = page[-1][0]
    if not (batch.id.startswith(RUNNING_RESULTS_PREFIX)
            and batch.endpoint != anthropic.MESSAGES_ENDPOINT):
        found.sort()
    return [(out, err) for _, _, out, err in found]


#: (extension) The ids of the batches whose results can be read while they run: OpenAI's.
RUNNING_RESULTS_PREFIX = "batch_"


def carried_key(batch_id: str, kind: str) -> str:
    """(extension) Where a retry keeps the result lines it carries over from the batch it
    retries (`kind`: `out`, or `err`), written when it is created, until it ends."""
    return f"{parts_prefix(batch_id)}/carried.{kind}"


def carried_keys(files: FileStore, batch: Batch) -> tuple[list[str], list[str]]:
    """(extension) The carried-over output and error lines of a retry, which come first in
    its result files: those of the batch it retries that it does not run again."""
    if batch.retry_of is None:
        return [], []
    found = [[key] if _blob_exists(files, key := carried_key(batch.id, kind)) else []
             for kind in ("out", "err")]
    return found[0], found[1]


def _carried_counts(files: FileStore, batch: Batch, keys: list[str]) -> tuple[int, int]:
    """How many of a retry's carried-over lines succeeded, and how many failed."""
    ok = failed = 0
    for key in keys:
        with files.open_read(key) as stream:
            for raw in stream:
                if raw.strip():
                    good = _succeeded(batch, orjson.loads(raw), key.endswith(".out"))
                    ok, failed = ok + good, failed + (not good)
    return ok, failed


def _succeeded(batch: Batch, line: dict[str, Any], in_output: bool) -> bool:
    if batch.endpoint == anthropic.MESSAGES_ENDPOINT:
        return bool(line.get("result", {}).get("type") == "succeeded")
    return in_output


def _whole_input(store: PhaseStore, files: FileStore, batch: Batch) -> tuple[Batch, list[Chunk]]:
    record = store.get_file(None, batch.input_file_id)
    if record is None:
        return batch, []
    spec = ChunkSpec(index=0, start_offset=0, end_offset=files.size(record.storage_key),
                     first_line=1, n_lines=batch.total)
    unrun = Chunk(id=0, batch_id=batch.id, spec=spec, state=ChunkState.ABORTED, attempts=0)
    return dataclasses.replace(batch, input_key=record.storage_key), [unrun]


def finish_from_parts(store: PhaseStore, files: FileStore, lease: PhaseLease,
                      out_keys: list[str], err_keys: list[str], *, completed: int,
                      failed: int, unrun: int) -> None:
    """End a batch whose result lines already sit in part files (a remote batch's)."""
    batch = lease.batch
    now = int(time.time())
    # A retry handed to a provider: the provider's counts are of the lines it reran.
    carried_outs, carried_errs = carried_keys(files, batch)
    out_keys, err_keys = carried_outs + out_keys, carried_errs + err_keys
    carried_ok, carried_failed = _carried_counts(files, batch, carried_outs + carried_errs)
    completed, failed = completed + carried_ok, failed + carried_failed

    def copy(keys: list[str]) -> Callable[[IO[bytes]], None]:
        def write(out: IO[bytes]) -> None:
            for key in keys:
                with files.open_read(key) as part:
                    shutil.copyfileobj(part, out, _COPY_BUFFER)
        return write

    if batch.endpoint == anthropic.MESSAGES_ENDPOINT:
        output, errors = _assemble(files, batch, "results", now, copy(out_keys + err_keys)), None
    else:
        output = _assemble(files, batch, "output", now, copy(out_keys))
        errors = _assemble(files, batch, "error", now, copy(err_keys))
    made = [r for r in (output, errors) if r is not None]
    done = store.finish_batch(
        lease, outputs=made, output_file_id=output.id if output else None,
        error_file_id=errors.id if errors else None, completed=completed, failed=failed,
        unrun=unrun, now=int(time.time()))
    if not done:
        for record in made:
            files.delete(record.storage_key)
        raise LeaseLost
    files.delete_prefix(parts_prefix(batch.id))


def new_remote_state(deployment: str, backend: str) -> dict[str, Any]:
    return {"deployment": deployment, "backend": backend, "job": None, "poll_s": 1.0,
            "cancel_sent": False, "failures": 0}


def parts_prefix(batch_id: str) -> str:
    return f"parts/{batch_id}"


def _assemble(files: FileStore, batch: Batch, kind: str, now: int,
              write: Callable[[IO[bytes]], None]) -> FileRecord | None:
    """Write a result file; returns its record, or None (and no blob) when it is empty."""
    file_id = ids.file_id()
    key = f"files/{file_id}"
    _note_result(files, batch.id, kind, key)
    with files.open_write(key) as out:
        write(out)
    size = files.size(key)
    if size == 0:
        files.delete(key)
        return None
    purpose = (Purpose.MESSAGE_BATCH_RESULTS if batch.endpoint == anthropic.MESSAGES_ENDPOINT
               else Purpose.BATCH_OUTPUT)
    return FileRecord(id=file_id, project=batch.project, filename=f"batch_{batch.id}_{kind}.jsonl",
                      purpose=purpose.value, bytes=size, created_at=now, expires_at=None,
                      storage_key=key)


def _note_result(files: FileStore, batch_id: str, kind: str, key: str) -> None:
    """Note the result file about to be written where the next worker to assemble this
    batch's results looks, and delete the one an earlier worker noted: that worker died
    (or lost its lease) before the commit that would have named it, so no record ever
    will. The note lies among the batch's parts, deleted once the batch has ended."""
    note = f"{parts_prefix(batch_id)}/assembling.{kind}"
    try:
        with files.open_read(note) as stream:
            earlier = stream.read().decode()
    except FileNotFoundError:
        earlier = ""
    if earlier and earlier != key:
        files.delete(earlier)
    with files.open_write(note) as out:
        out.write(key.encode())


def _keys(chunks: list[Chunk], attr: str) -> list[str]:
    """The part files of chunks committed whole (before chunks committed in parts)."""
    return [key for c in chunks if c.state is ChunkState.DONE and (key := getattr(c, attr))]


def _copy(files: FileStore, keys: list[str], out: IO[bytes]) -> None:
    for key in keys:
        with files.open_read(key) as part:
            shutil.copyfileobj(part, out, _COPY_BUFFER)


class _Unrun:
    """The requests that never got an answer: of chunks that failed for good (counted as
    failed already), and of chunks a cancel or an expiry stopped (counted here)."""

    def __init__(self, store: PhaseStore, files: FileStore, batch: Batch, chunks: list[Chunk],
                 reason: EndReason) -> None:
        self.store, self.files, self.batch, self.reason = store, files, batch, reason
        self.open = [c for c in chunks if c.state is not ChunkState.DONE]
        self.count = sum(c.spec.n_lines - c.n_ok - c.n_err for c in self.open
                         if c.state is not ChunkState.FAILED)

    def write(self, out: IO[bytes]) -> None:
        for chunk in self.open:
            render = _unrun_renderer(self.batch, chunk, self.reason)
            start, end = chunk.spec.start_offset, chunk.spec.end_offset
            data = self.files.read_range(self.batch.input_key or "", start, end)
            done = self.store.done_offsets(self.batch.id, start, end)  # one chunk's at a time
            for offset, raw in lines_at(data, start):
                if offset not in done:
                    out.write(render(orjson.loads(raw)["custom_id"]))


def _unrun_renderer(batch: Batch, chunk: Chunk, reason: EndReason) -> Callable[[str], bytes]:
    """How to report the requests of a chunk that never ran to the end."""
    failed = chunk.state is ChunkState.FAILED
    detail = f"This request could not be executed: {_last_line(chunk.last_error)}"
    if reason is EndReason.BUDGET_EXCEEDED and not failed:
        return _over_budget_renderer(batch)
    if batch.endpoint == anthropic.MESSAGES_ENDPOINT:
        kind = "errored" if failed else ("expired" if reason is EndReason.EXPIRED
                                         else "canceled")
        return lambda custom_id: anthropic.unrun_line(custom_id, kind, detail)
    code, message = ("server_error", detail) if failed else \
        _UNRUN.get(reason, _UNRUN[EndReason.CANCELLED])
    return lambda custom_id: error_line(custom_id, code, message)


def _over_budget_renderer(batch: Batch) -> Callable[[str], bytes]:
    """(extension) The requests a spend ceiling stopped: error code `budget_exceeded`, or
    on a message batch an `errored` result (Anthropic's shapes have no such outcome) whose
    message starts with that code."""
    message = spend.ceiling_message(batch.max_cost, batch.max_total_tokens)
    if batch.endpoint == anthropic.MESSAGES_ENDPOINT:
        return lambda custom_id: anthropic.unrun_line(custom_id, "errored",
                                                      f"{BUDGET_EXCEEDED}: {message}")
    return lambda custom_id: error_line(custom_id, BUDGET_EXCEEDED, message)


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "unknown error").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _fail(store: PhaseStore, files: FileStore, lease: PhaseLease,
          errors: list[BatchError], now: int) -> None:
    """Fail the batch in validation; an input file deleted meanwhile takes its blob along."""
    if store.fail_batch(lease, errors, now):
        _drop_orphaned_input(store, files, lease.batch)


def _drop_orphaned_input(store: PhaseStore, files: FileStore, batch: Batch) -> None:
    """A batch's input file deleted while it ran keeps its blob until the batch ends."""
    key = batch.input_key
    if key and store.get_file(None, batch.input_file_id) is None and not store.blob_in_use(key):
        files.delete(key)
