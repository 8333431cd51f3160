"""Enqueuing: streaming a job's input into batches. Items are written, a JSON line each,
to segment files of the file store, and each batch is recorded as a byte range of one;
memory holds one segment at most, whatever the dataset's size. Enqueuing resumes where
it stopped: the input is read in the same order again, and what was recorded is skipped."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from batchery.jobs import inputs
from batchery.jobs.joblog import JobLog
from batchery.model.jobs import BatchSpec, InputKind, Job, JobInput, JobLease
from batchery.ports.filestore import FileStore
from batchery.ports.jobs import JobPhaseQueue
from batchery.ports.store import FileRecords
from batchery.queue.lease import LeaseLost

#: A segment file is cut after this many batches or bytes, whichever comes first.
SEGMENT_BATCHES = 100
SEGMENT_BYTES = 8 << 20
_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class EnqueueError(Exception):
    """The input cannot be enqueued, and trying again will not help."""


#: Finds a project's uploaded file by id, as a source to read.
Resolver = Callable[[str], inputs.Source]


def iter_items(job_input: JobInput, resolve: Resolver | None = None) -> Iterator[Any]:
    """Every item of the input, always in the same order: the files the paths list,
    then the uploaded files given by id (which `resolve` finds)."""
    if job_input.kind is InputKind.ITEM_LIST:
        yield from job_input.items or []
        return
    param = job_input.kind.value
    found: list[inputs.Source] = []
    if job_input.paths:
        selection = inputs.FileSelection(paths=job_input.paths, includes=job_input.includes,
                                         excludes=job_input.excludes)
        found = [inputs.Source.of(url) for url in inputs.list_files(selection, param=param)]
    if job_input.file_ids and resolve is None:
        raise EnqueueError("this worker cannot read uploaded files (file_ids)")
    found += [resolve(file_id) for file_id in job_input.file_ids] if resolve else []
    if job_input.kind is InputKind.FILE_PATH_LISTER:
        yield from (source.url for source in found)
        return
    inputs.check_delimited(found, param=param)
    for source in found:
        yield from inputs.iter_records(source)


def resolver(store: FileRecords, files: FileStore, job: Job) -> Resolver:
    """Finds `job`'s project's uploaded files, as the job's submission did."""
    def resolve(file_id: str) -> inputs.Source:
        return inputs.uploaded(store.get_file(job.project, file_id), file_id, files.url,
                               param=job.input.kind.value, now=time.time())
    return resolve


def dump(value: Any) -> bytes:
    return orjson.dumps(value, default=str, option=_DUMP_OPTIONS)


def enqueue(store: JobPhaseQueue, files: FileStore, lease: JobLease,
            lost: Callable[[], bool], log: JobLog, *, resolve: Resolver | None = None,
            on_batches: Callable[[], None] = lambda: None) -> None:
    """Cut the job's input into batches. `on_batches` is called as each segment's batches
    are queued (workers may start on them while enqueuing goes on)."""
    job = lease.job
    size = job.input.batch_size
    index, first = job.total_batch_count, job.total_items
    if first:
        log.write(job.id, "INFO", f"resuming enqueuing after {index} batches ({first} items)")
    else:
        log.write(job.id, "INFO", f"partitioning the {job.input.kind.value} input into "
                                  f"batches of {size}")
    items = itertools.islice(iter_items(job.input, resolve), first, None)
    segment, specs = bytearray(), []
    while batch := list(itertools.islice(items, size)):
        start = len(segment)
        for item in batch:
            segment += dump(item)
            segment += b"\n"
        specs.append(BatchSpec(index=index, segment_key="", start_offset=start,
                               end_offset=len(segment), first_item=first, n_items=len(batch)))
        index, first = index + 1, first + len(batch)
        if len(specs) >= SEGMENT_BATCHES or len(segment) >= SEGMENT_BYTES:
            _flush(store, files, lease, segment, specs, lost)
            on_batches()
            log.write(job.id, "INFO", f"enqueued {index} batches")
            segment, specs = bytearray(), []
    if specs:
        _flush(store, files, lease, segment, specs, lost)
        on_batches()
    if index == 0:
        raise EnqueueError("the input holds no items")
    if not store.finish_enqueue(lease):
        raise LeaseLost
    log.write(job.id, "INFO", f"completed enqueuing a total of {index} batches "
                              f"({first} items)")


def _flush(store: JobPhaseQueue, files: FileStore, lease: JobLease, segment: bytearray,
           specs: list[BatchSpec], lost: Callable[[], bool]) -> None:
    if lost():
        raise LeaseLost
    # The token in the name keeps a segment from a lost lease apart from its successor's.
    key = f"{segment_prefix(lease.job.id)}/{specs[0].index:09d}-{lease.token}.jsonl"
    with files.open_write(key) as out:
        out.write(segment)
    placed = [BatchSpec(index=s.index, segment_key=key, start_offset=s.start_offset,
                        end_offset=s.end_offset, first_item=s.first_item, n_items=s.n_items)
              for s in specs]
    if not store.add_batches(lease, placed, time.time()):
        files.delete(key)
        raise LeaseLost


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def segment_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}/input"


def parts_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}/parts"
